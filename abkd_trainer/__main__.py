"""`python -m abkd_trainer`: the same as the `abkd-train` console script."""

import sys

from abkd_trainer.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
