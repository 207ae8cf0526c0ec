"""The shapes world (issue 20): a procedural scene generator with ground truth, scorers, and a small
diffusion model trained on it (`python -m s2edit.shapes train`), loaded by `load_shapes_components`."""
