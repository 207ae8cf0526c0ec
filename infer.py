"""Edit an image with S2Edit + SPL (SPEC §1, §3–§6, §9).

Usage: `python infer.py --help`. The command lives in `s2edit/editing/run.py`; it also runs as
`python -m s2edit.infer` and, installed, as `s2edit-infer`.
"""

from s2edit.editing.run import cli

if __name__ == "__main__":
    cli()
