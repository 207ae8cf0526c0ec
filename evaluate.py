"""Evaluate an editing method on a dataset of edits (SPEC §8): edit, score, summarise; resumable.

Usage: `python evaluate.py --help`. The command lives in `s2edit/evaluation/run.py`; it also runs as
`python -m s2edit.evaluate` and, installed, as `s2edit-evaluate`.
"""

from s2edit.evaluation.run import cli

if __name__ == "__main__":
    cli()
