"""Edit images with S2Edit + SPL in the browser (Gradio 6 web app).

Usage: `python app.py --help`. The command lives in `s2edit/app/run.py`; it also runs as
`python -m s2edit.app` and, installed, as `s2edit-app`.
"""

from s2edit.app.run import cli

if __name__ == "__main__":
    cli()
