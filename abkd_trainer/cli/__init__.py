"""The command-line programs: ``abkd-train`` (:mod:`abkd_trainer.cli.train`) and
``abkd-cache-teacher`` (:mod:`abkd_trainer.cli.cache_teacher`)."""

from abkd_trainer.cli.train import main

__all__ = ["main"]
