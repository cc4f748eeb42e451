"""`python -m trainer.score`: the entry point the README, slurm/ and launch/ name; the tool is
trainer/tools/score.py."""

from trainer.tools.score import main

if __name__ == "__main__":
    main()
