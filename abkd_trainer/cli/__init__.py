"""The command-line programs: `abkd-train` (`abkd_trainer.cli.train`) and
`abkd-cache-teacher` (`abkd_trainer.cli.cache_teacher`)."""

from abkd_trainer.cli.train import main

__all__ = ["main"]
