"""`python -m trainer.mine`: the entry point the README, slurm/ and launch/ name; the tool is
trainer/tools/mine.py."""

from trainer.tools.mine import main

if __name__ == "__main__":
    main()
