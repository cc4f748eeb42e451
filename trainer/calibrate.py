"""`python -m trainer.calibrate`: the entry point the README, slurm/ and launch/ name; the tool is
trainer/tools/calibrate.py."""

from trainer.tools.calibrate import main

if __name__ == "__main__":
    main()
