"""`python -m abkd_trainer.tools.sweep`: the `abkd-sweep` command."""

import sys

from abkd_trainer.tools.sweep.command import main

if __name__ == "__main__":
    sys.exit(main())
