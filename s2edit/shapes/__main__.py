"""`python -m s2edit.shapes train key=value ...` (see `python -m s2edit.shapes train --help`)."""

from __future__ import annotations

import sys

from editkit.config import run_main
from editkit.errors import InputError

USAGE = ("usage: python -m s2edit.shapes train [key=value ...] [config=file.yaml]   (train --help: every key)"
         "\n       python -m s2edit.shapes ship OUT/model   (make a trained model the model=shapes preset)")


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] == "ship":
        if len(argv) != 2:
            raise InputError(f"ship takes one model folder (the `model/` of a training run): {USAGE}")
        from s2edit.shapes.model import ship_preset

        print(f"shipped {argv[1]} as {ship_preset(argv[1])} (model=shapes)")
        return
    if argv[0] != "train":
        raise InputError(f"unknown command '{argv[0]}': the commands are train and ship ({USAGE})")
    from s2edit.shapes.train import main as train_main  # model imports take seconds; --help needs none

    train_main(argv[1:])


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
