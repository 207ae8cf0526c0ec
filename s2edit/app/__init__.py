"""The Gradio web app: `python app.py`, `python -m s2edit.app` or `s2edit-app` (needs the `[app]` extra)."""
