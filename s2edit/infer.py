"""`python -m s2edit.infer`: the `infer.py` command (s2edit.editing.run)."""

from s2edit.editing.run import cli

if __name__ == "__main__":
    cli()
