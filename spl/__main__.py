"""Entry point of `python -m spl` (see spl/cli_app.py)."""

from spl.cli_app import cli

if __name__ == "__main__":
    cli()
