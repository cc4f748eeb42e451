"""`python -m trainer.summary`: the entry point the README, slurm/ and launch/ name; the tool is
trainer/tools/summary.py."""

import sys

from trainer.tools.summary import main

if __name__ == "__main__":
    sys.exit(main())
