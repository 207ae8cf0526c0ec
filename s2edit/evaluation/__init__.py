"""Evaluation (SPEC §8): datasets (PIE-Bench, JSONL, CSV), metrics, the items and the resumable runner,
the report and the comparison of runs, and what `evaluate.py` runs (`run`)."""
