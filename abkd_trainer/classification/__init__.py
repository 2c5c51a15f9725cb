"""ABKD for classifiers (image, text, audio): `ABKDClassifierTrainer` and `ABKDClassifierConfig`.

Imports only `abkd_trainer.core` and `abkd_trainer.divergences` (never the causal-LM package).
"""
