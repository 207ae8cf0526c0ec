"""S2Edit identity fine-tuning: learn a placeholder token ([I]) for ONE image (SPEC §2).

Usage: `python train.py --help`. The command lives in `s2edit/training/run.py`; it also runs as
`python -m s2edit.train` and, installed, as `s2edit-train`.
"""

from s2edit.training.run import cli

if __name__ == "__main__":
    cli()
