"""`python -m trainer.check [overrides]`: the entry point the README, slurm/ and launch/ name; the
tool is trainer/tools/check/."""

import sys

from trainer.tools.check import main

if __name__ == "__main__":
    sys.exit(main())
