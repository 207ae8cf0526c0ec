"""`python -m s2edit.app`: the web app (s2edit.app.run)."""

from s2edit.app.run import cli

cli()
