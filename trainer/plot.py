"""`python -m trainer.plot`: the entry point the README, slurm/ and launch/ name; the tool is
trainer/tools/plot.py."""

import sys

from trainer.tools.plot import main

if __name__ == "__main__":
    sys.exit(main())
