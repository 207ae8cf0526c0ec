"""`python -m s2edit.evaluate`: the `evaluate.py` command (s2edit.evaluation.run)."""

from s2edit.evaluation.run import cli

if __name__ == "__main__":
    cli()
