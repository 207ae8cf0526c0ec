"""Comparing evaluation runs: one table (`compare.md`, `compare.csv`) of their overall means and one
trade-off plot (`compare.png`; CLIP score vs LPIPS, or PSNR vs the SPL structure distance when those
weights are missing, and it says so)."""

from __future__ import annotations

import csv
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from editkit.errors import InputError
from editkit.files import atomic_path
from s2edit.evaluation.report import (
    METRICS,
    METRICS_CSV,
    Stat,
    md_table,
    pyplot,
    read_metrics_csv,
    summarize,
    zero_nan,
)

COMPARE_MD, COMPARE_CSV, COMPARE_PLOT = "compare.md", "compare.csv", "compare.png"


def trade_off_axes(summaries: Sequence[dict[str, dict[str, Stat]]]) -> tuple[str, str, str]:
    """(x metric, y metric, note) of the trade-off plot: LPIPS vs CLIP score when every run has them, else
    the SPL structure distance and/or PSNR, saying which was replaced."""
    def available(key: str) -> bool:
        return all(s[key]["all"].n > 0 for s in summaries)

    x = "lpips" if available("lpips") else "structure_distance_spl"
    y = "clip_score" if available("clip_score") else "psnr"
    replaced = [f"{wanted} → {METRICS[used][0]}" for wanted, used, preferred in
                (("LPIPS", x, "lpips"), ("CLIP score", y, "clip_score")) if used != preferred]
    note = ("" if not replaced else
            f"CLIP/LPIPS not computed in every run (no local weights): plotted {', '.join(replaced)}")
    return x, y, note


def compare_runs(runs: Sequence[str | Path], names: Sequence[str], out: str | Path) -> dict[str, Any]:
    """One table (compare.md, compare.csv) and one trade-off plot (compare.png) of several runs' overall
    means. Returns {"runs": …, "x": …, "y": …, "note": …}."""
    if len(runs) < 1:
        raise InputError("no runs to compare: pass runs=[outputs/eval_a, outputs/eval_b]")
    if names and len(names) != len(runs):
        raise InputError(f"names= has {len(names)} labels for {len(runs)} runs: give one per run")
    labels = list(names) or [Path(r).name or str(r) for r in runs]
    if len(set(labels)) != len(labels):
        raise InputError(f"run labels {labels} are not unique: pass names=[…]")
    all_rows = []
    for run in runs:
        path = Path(run) / METRICS_CSV
        if not path.is_file():
            raise InputError(f"run '{run}' has no {METRICS_CSV}: run evaluate.py data=… out={run} first")
        all_rows.append(read_metrics_csv(path))
    summaries = [summarize(rows) for rows in all_rows]
    out = Path(out)
    x, y, note = trade_off_axes(summaries)

    # 1. The table: one row per run, the overall mean ± std (n) of every metric
    keys = list(METRICS)
    header = ["run", "items", *(f"{METRICS[k][0]} {'↑' if METRICS[k][1] else '↓'}" for k in keys)]
    table = []
    for label, rows, summary in zip(labels, all_rows, summaries):
        cells = [s.text() if s.skipped or s.n == 0 else f"{s.text()} (n={s.n})"
                 for s in (summary[k]["all"] for k in keys)]
        table.append([label, str(len({r["id"] for r in rows})), *cells])
    lines = ["# Comparison", "", f"Runs: {', '.join(f'`{r}`' for r in runs)}. Overall mean ± sample std "
             "over non-NaN values (n = edits counted).", "", *md_table(header, table), ""]
    lines += [f"Trade-off plot: `{COMPARE_PLOT}`, {METRICS[x][0]} (x) against {METRICS[y][0]} (y)."
              + (f" {note}." if note else ""), ""]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / COMPARE_MD) as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(out / COMPARE_CSV) as tmp, open(tmp, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["run", "metric", "mean", "std", "n", "skipped"])
        for label, summary in zip(labels, summaries):
            for key in keys:
                s = summary[key]["all"]
                writer.writerow([label, key, s.mean, s.std, s.n, s.skipped])

    # 2. The plot: per-edit points (faint) and each run's mean ± std
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for index, (label, rows, summary) in enumerate(zip(labels, all_rows, summaries)):
        color = f"C{index % 10}"
        points = [(r[x], r[y]) for r in rows if _finite(r[x]) and _finite(r[y])]
        if points:
            ax.scatter(*zip(*points), s=10, alpha=0.25, color=color)
        sx, sy = summary[x]["all"], summary[y]["all"]
        if sx.n and sy.n:
            ax.errorbar(sx.mean, sy.mean, xerr=zero_nan(sx.std), yerr=zero_nan(sy.std), fmt="o",
                        color=color, capsize=3, label=label)
    ax.set_xlabel(f"{METRICS[x][0]} {'↑' if METRICS[x][1] else '↓'}")
    ax.set_ylabel(f"{METRICS[y][0]} {'↑' if METRICS[y][1] else '↓'}")
    title = "Edit quality trade-off (runs: mean ± std; dots: edits)"
    ax.set_title("\n".join([title, *textwrap.wrap(note, 80)]), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / COMPARE_PLOT) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return {"runs": labels, "x": x, "y": y, "note": note}


def _finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)
