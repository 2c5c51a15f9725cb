"""Causal-LM distillation: [`ABKDTrainer`][abkd_trainer.lm.trainer.ABKDTrainer] on TRL's
`SFTTrainer`, its config, data checks, on-policy sampling, the offline teacher cache, ROUGE-L
evaluation and the offline demo."""
