"""On-policy distillation: which micro-batches train on sampled completions, and building them.

Each training micro-batch comes from one of four sources (`BatchSource`): the dataset's
completions (off-policy), completions the current student samples for the batch's prompts
(on-policy, GKD's `lmbda`), completions the teacher samples (sequence-level KD, `seq_kd`), or
student samples replayed from a buffer (the adaptive schedule). `OnPolicySchedule` draws
the source; `OnPolicyBatches` swaps the completions of the micro-batches of one optimizer
step before the trainer counts their supervised tokens, so that the loss normalisation (the
supervised-token count of the whole accumulated, all-rank batch) counts the sampled tokens.

A sampled micro-batch has the layout SFTTrainer's collator produces: `input_ids` = prompt +
completion, right-padded; `labels` = the completion tokens and `-100` on the prompt and the
padding. The trainer's loss then supervises exactly the sampled tokens (the end-of-sequence token
included when it was sampled), and the teacher scores the same token sequences.

The prompt of a training example is read off its collated row: the tokens before its final
supervised span. For `prompt`/`completion` data (completion-only loss) that is the prompt, for
conversational data with `assistant_only_loss=True` every turn before the final assistant turn,
rendered with the chat template and its generation prompt (how SFTTrainer tokenises it).
"""

from abkd_trainer.lm.on_policy.completions import OnPolicyBatches
from abkd_trainer.lm.on_policy.prompts import (
    build_completion_batch,
    check_dataset_has_prompts,
    extract_prompts,
    prompt_lengths,
)
from abkd_trainer.lm.on_policy.replay import (
    REPLAY_BUFFER_FILE,
    ReplayBuffer,
    load_replay_buffer,
    save_replay_buffer,
)
from abkd_trainer.lm.on_policy.schedule import BatchSource, OnPolicySchedule
from abkd_trainer.lm.on_policy.setup import (
    build_on_policy_batches,
    build_on_policy_schedule,
    on_policy_settings,
)

__all__ = [
    "REPLAY_BUFFER_FILE",
    "BatchSource",
    "OnPolicyBatches",
    "OnPolicySchedule",
    "ReplayBuffer",
    "build_completion_batch",
    "build_on_policy_batches",
    "build_on_policy_schedule",
    "check_dataset_has_prompts",
    "extract_prompts",
    "load_replay_buffer",
    "on_policy_settings",
    "prompt_lengths",
    "save_replay_buffer",
]
