"""Plumbing shared by the project's packages and scripts, with no model or SPL math in it.

- :mod:`editkit.errors`: the errors a user can cause (printed as one line by every CLI).
- :mod:`editkit.config`: typed `key=value` command lines over dataclass schemas, with range checks.
- :mod:`editkit.files`: atomic writes, file hashes, slugs, output-path safety (no output over an input),
  the output-folder lock of a run, and I/O errors (full or read-only disk) as one line.
- :mod:`editkit.images`: reading and writing images and masks.

Both `spl` (the model-free SPL math) and `s2edit` (the diffusion system) build on it; it imports neither.
"""
