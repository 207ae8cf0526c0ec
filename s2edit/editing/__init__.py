"""Editing (SPEC §3–§6, §9): inversions and their cache, one object per editing method (`methods/`, a
registry by name), the edit request and plan, attention maps and preservation masks, the Editor (load,
cache, the shared pipeline body), and what `infer.py` runs (`run`)."""
