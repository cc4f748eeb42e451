"""`python -m trainer.evaluate`: the entry point the README, slurm/ and launch/ name; the tool is
trainer/tools/evaluate.py."""

from trainer.tools.evaluate import main

if __name__ == "__main__":
    main()
