"""The report of an evaluation run, from its item folders on disk (so a resumed run reports the items of
earlier runs too): `metrics.csv` (one row per item and target), `summary.md` / `summary.json` (mean ±
sample std per metric, per edit type and overall, the count of edits used; NaN excluded), FID over the
set, and `plots/metrics_by_edit_type.png`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from editkit.files import atomic_path, write_json
from s2edit.evaluation.datasets import EDIT_TYPES, EditItem
from s2edit.evaluation.items import ITEM_ERROR, ITEM_REPORT, ITEMS_DIR, is_done, item_folder

METRICS_CSV = "metrics.csv"
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
PLOTS_DIR = "plots"
BY_EDIT_TYPE_PLOT = "metrics_by_edit_type.png"
SKIPPED = "skipped"

# metric key → (label, higher is better); the order of metrics.csv's columns and the summary's rows
METRICS: dict[str, tuple[str, bool]] = {
    "psnr": ("PSNR (dB)", True),
    "ssim": ("SSIM", True),
    "mse": ("MSE", False),
    "psnr_unedited": ("PSNR unedited (dB)", True),
    "ssim_unedited": ("SSIM unedited", True),
    "mse_unedited": ("MSE unedited", False),
    "mask_leak": ("mask leak", False),
    "structure_distance_spl": ("SPL structure distance", False),
    "lpips": ("LPIPS", False),
    "lpips_unedited": ("LPIPS unedited", False),
    "dists": ("DISTS", False),
    "dists_unedited": ("DISTS unedited", False),
    "structure_distance": ("DINO structure distance", False),
    "clip_score": ("CLIP score", True),
    "clip_score_edit_region": ("CLIP score edit region", True),
    "clip_score_source": ("CLIP score source", True),
    "reconstruction_psnr": ("reconstruction PSNR (dB)", True),
    "spl_loss_before": ("SPL loss before post-processing", False),
    "spl_loss_after": ("SPL loss after post-processing", False),
}
ROW_INFO = ("id", "target_index", "edit_type", "edit_type_name", "method", "seed", "source_prompt",
            "target_prompt", "item_seconds")
# the metrics a person looks at first: (preferred, fallback when the preferred one has no numbers)
PLOT_METRICS = (("psnr_unedited", "psnr"), ("ssim_unedited", "ssim"), ("lpips_unedited", "lpips"),
                ("structure_distance", "structure_distance_spl"), ("clip_score", "clip_score_edit_region"))


def _number(value: Any) -> float | None:
    """A metric value as a float (NaN included), or None for a skipped / missing one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and not value.startswith(SKIPPED):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def collect_items(items: Sequence[EditItem], items_dir: Path) -> tuple[list[dict], list[str], dict[str, str]]:
    """(reports of the finished items in dataset order, ids not finished, id → error of failed ones)."""
    reports, missing, failed = [], [], {}
    for item in items:
        folder = items_dir / item_folder(item.id)
        if is_done(folder):
            reports.append(json.loads((folder / ITEM_REPORT).read_text()))
        else:
            missing.append(item.id)
            if (folder / ITEM_ERROR).is_file():
                failed[item.id] = (folder / ITEM_ERROR).read_text().strip()
    return reports, missing, failed


def metric_rows(reports: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per (item, target): identification, then every metric (a float, NaN, or 'skipped')."""
    rows = []
    for report in reports:
        for target in report["targets"]:
            row: dict[str, Any] = {
                "id": report["id"], "target_index": target["index"], "edit_type": report["edit_type"],
                "edit_type_name": report["edit_type_name"], "method": report["method"],
                "seed": report["seed"],
                "source_prompt": report["source_prompt"], "target_prompt": target["prompt"],
                "item_seconds": report["timings"]["total"],
            }
            for key in METRICS:
                value = target["metrics"].get(key)
                row[key] = SKIPPED if isinstance(value, str) else (math.nan if value is None else value)
            rows.append(row)
    return rows


def write_metrics_csv(rows: Sequence[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=[*ROW_INFO, *METRICS])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in writer.fieldnames})


def read_metrics_csv(path: Path) -> list[dict[str, Any]]:
    """metrics.csv back as rows: metric cells as floats (NaN kept) or 'skipped'."""
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        for key in METRICS:
            cell = row.get(key, "")
            row[key] = SKIPPED if cell == SKIPPED else (_number(cell) if cell != "" else math.nan)
        edit_type = row.get("edit_type", "")
        row["edit_type"] = int(edit_type) if edit_type not in ("", None) else None
    return rows


@dataclass
class Stat:
    """mean ± sample std (n − 1) over the n non-NaN values; `skipped` holds the reason when no value is
    a number because the metric was skipped."""

    mean: float = math.nan
    std: float = math.nan
    n: int = 0
    skipped: bool = False

    def text(self, digits: int = 4) -> str:
        if self.skipped:
            return SKIPPED
        if self.n == 0:
            return "–"
        spread = f" ± {self.std:.{digits}g}" if self.n > 1 else ""
        return f"{self.mean:.{digits}g}{spread}"


def stat(values: Sequence[Any]) -> Stat:
    """Stat of metric values (floats, NaN, 'skipped'): NaN values are excluded from mean, std and n."""
    if values and all(isinstance(v, str) for v in values):
        return Stat(skipped=True)
    numbers = [float(v) for v in values if not isinstance(v, str) and not math.isnan(float(v))]
    if not numbers:
        return Stat()
    std = statistics.stdev(numbers) if len(numbers) > 1 else math.nan
    return Stat(statistics.fmean(numbers), std, len(numbers))


def edit_type_label(edit_type: int | None) -> str:
    if edit_type is None:
        return "no type"
    return f"{edit_type} {EDIT_TYPES.get(edit_type, '')}".strip()


def summarize(rows: Sequence[dict]) -> dict[str, dict[str, Stat]]:
    """metric → group ('all', then each edit type label in order) → Stat."""
    groups: dict[str, list[dict]] = {"all": list(rows)}
    for row in sorted(rows, key=lambda r: (r["edit_type"] is None, r["edit_type"] or 0)):
        groups.setdefault(edit_type_label(row["edit_type"]), []).append(row)
    return {key: {name: stat([r[key] for r in members]) for name, members in groups.items()}
            for key in METRICS}


def set_metrics(reports: Sequence[dict], items_dir: Path, items: Sequence[EditItem],
                weights: dict[str, Any]) -> dict[str, float | str]:
    """Metrics over the whole set: FID between the source images and the edits (or its skipped reason)."""
    from editkit.images import load_image
    from s2edit.evaluation.metrics import MetricSuite

    suite = MetricSuite(fid=weights.get("fid"), cache=weights.get("cache"), include=("fid",))
    if "fid" in suite.skipped():
        return {"fid": suite.skipped()["fid"]}
    folders = {item.id: items_dir / item_folder(item.id) for item in items}

    def images(kind: str) -> Iterator[torch.Tensor]:
        for report in reports:
            folder = folders[report["id"]]
            names = ["source.png"] if kind == "real" else [t["file"] for t in report["targets"]]
            for name in names:
                yield load_image(folder / name, resolution=None)

    return {"fid": suite.fid(images("real"), images("fake"))}


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def write_summary(out: Path, rows: Sequence[dict], summary: dict[str, dict[str, Stat]], *,
                  info: dict[str, Any], skipped: dict[str, str], missing: Sequence[str],
                  failed: dict[str, str], set_values: dict[str, float | str]) -> None:
    """summary.md (a person's view) and summary.json (the same numbers for tools)."""
    groups = list(next(iter(summary.values())))
    counts = {name: len({r["id"] for r in rows if name == "all" or edit_type_label(r["edit_type"]) == name})
              for name in groups}
    lines = [
        "# Evaluation summary", "",
        f"- dataset: `{info['data']}` — {info['items']} items; {info['done']} evaluated "
        f"({len(rows)} edits), {len(missing)} not finished" + (f", {len(failed)} failed" if failed else ""),
        f"- method: {info['method']} (model `{info['model']}`, seed {info['seed']}); settings: "
        f"`{info['config']}`",
        f"- item time: {info['item_seconds']:.1f} s in all, {info['seconds_per_item']:.2f} s per item",
        "",
        "Mean ± sample standard deviation over the edits whose value is a number (NaN = undefined for "
        "that edit, e.g. an edit mask covering the whole image, is excluded); `n` = edits counted. "
        "Unedited-region metrics: both images × (1 − edit mask) (PIE-Bench). ↑ higher is better, "
        "↓ lower is better.", "",
        "## Per edit type", "",
    ]
    header = ["metric", *(f"{g} ({counts[g]} item{'s' if counts[g] != 1 else ''})" for g in groups)]
    table = []
    for key, (label, higher) in METRICS.items():
        cells = []
        for group in groups:
            value = summary[key][group]
            cells.append(value.text() if value.skipped or value.n == 0 else f"{value.text()} (n={value.n})")
        table.append([f"{label} {'↑' if higher else '↓'}", *cells])
    lines += [*md_table(header, table), ""]
    lines += ["## Set metrics", ""]
    lines += md_table(["metric", "value"], [[name.upper(), str(value) if isinstance(value, str)
                                              else f"{value:.4g}"] for name, value in set_values.items()])
    lines.append("")
    sources = info.get("weights") or {}
    if sources:
        lines += ["## Metric weights", ""]
        lines += [f"- {name}: {source}" for name, source in sources.items()]
        lines.append("")
    if skipped:
        lines += ["## Skipped metrics", ""]
        lines += [f"- {name}: {reason}" for name, reason in skipped.items()]
        lines.append("")
    if failed:
        lines += ["## Failed items (retried by the next run)", ""]
        lines += [f"- `{item_id}`: {error}" for item_id, error in failed.items()]
        lines.append("")
    if missing and len(missing) != len(failed):
        unfinished = [i for i in missing if i not in failed]
        lines += ["## Not finished (rerun the same command to resume)", "",
                  ", ".join(f"`{i}`" for i in unfinished[:50]) + (" …" if len(unfinished) > 50 else ""), ""]
    with atomic_path(out / SUMMARY_MD) as tmp:
        tmp.write_text("\n".join(lines))
    as_json = {
        **info, "edits": len(rows), "missing": list(missing), "failed": failed, "skipped": skipped,
        "set_metrics": set_values,
        "metrics": {key: {group: dataclasses.asdict(value) for group, value in by_group.items()}
                    for key, by_group in summary.items()},
    }
    write_json(out / SUMMARY_JSON, as_json)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _shown_metrics(summary: dict[str, dict[str, Stat]], edits: int) -> list[str]:
    """Of each PLOT_METRICS pair: the preferred metric when at least half the edits have it (unedited-region
    metrics need edit masks), else the fallback when it has numbers."""
    shown = []
    for preferred, fallback in PLOT_METRICS:
        if summary[preferred]["all"].n * 2 >= max(edits, 1):
            shown.append(preferred)
        elif summary[fallback]["all"].n > 0:
            shown.append(fallback)
    return shown


def plot_by_edit_type(summary: dict[str, dict[str, Stat]], edits: int, path: Path) -> Path:
    """A bar chart per metric: mean ± std (n on the bar) for all edits and for each edit type; a group
    without values is marked n/a."""
    plt = pyplot()
    keys = _shown_metrics(summary, edits) or ["psnr"]
    groups = list(summary[keys[0]])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys) + 1, 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for index, group in enumerate(groups):
            s = summary[key][group]
            if s.n == 0:
                ax.text(index, 0, "n/a", ha="center", va="bottom", fontsize=7, color="gray")
                continue
            ax.bar(index, s.mean, yerr=zero_nan(s.std), color="#444444" if index == 0 else "#4C72B0",
                   capsize=3)
            ax.text(index, s.mean / 2, f"n={s.n}", ha="center", va="center", fontsize=6, color="white",
                    rotation=90)
        label, higher = METRICS[key]
        ax.set_title(f"{label} {'↑' if higher else '↓'}", fontsize=9)
        ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("Metrics per edit type (mean ± std; dark: all edits)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def write_report(items: Sequence[EditItem], out: Path, *, info: dict[str, Any],
                 weights: dict[str, Any]) -> dict[str, Any]:
    """metrics.csv, summary.md / summary.json and plots/ of a run, from the item folders on disk (so a
    resumed run reports the items of earlier runs too). Returns summary.json's content."""
    from s2edit.evaluation.metrics import weight_sources

    items_dir = out / ITEMS_DIR
    reports, missing, failed = collect_items(items, items_dir)
    rows = metric_rows(reports)
    write_metrics_csv(rows, out / METRICS_CSV)
    skipped: dict[str, str] = {}
    for report in reports:
        skipped.update(report.get("skipped_metrics", {}))
    item_seconds = sum(r["timings"]["total"] for r in reports)
    info = {**info, "weights": weight_sources(**weights), "items": len(items), "done": len(reports),
            "item_seconds": item_seconds, "seconds_per_item": item_seconds / max(len(reports), 1)}
    summary = summarize(rows)
    set_values = set_metrics(reports, items_dir, items, weights) if reports else {"fid": "no items"}
    skipped.update({k: v for k, v in set_values.items() if isinstance(v, str) and v.startswith(SKIPPED)})
    write_summary(out, rows, summary, info=info, skipped=skipped, missing=missing, failed=failed,
                  set_values=set_values)
    if rows:
        plot_by_edit_type(summary, len(rows), out / PLOTS_DIR / BY_EDIT_TYPE_PLOT)
    return json.loads((out / SUMMARY_JSON).read_text())


def zero_nan(value: float) -> float:
    """An error bar's length: 0 where the std is undefined (one edit)."""
    return 0.0 if math.isnan(value) else value
