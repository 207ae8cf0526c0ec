"""Entry point of `python -m spl` (see spl/cli_app.py)."""

from editkit.config import run_main
from spl.cli_app import main

if __name__ == "__main__":
    run_main(main)
