"""`python -m s2edit.train`: the `train.py` command (s2edit.training.run)."""

from s2edit.training.run import cli

if __name__ == "__main__":
    cli()
