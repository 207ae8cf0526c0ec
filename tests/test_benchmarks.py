"""The one-call GPU suite runs end to end on the CPU (`--smoke`) and writes its Markdown table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_suite_smoke_writes_every_row(tmp_path) -> None:
    out = tmp_path / "suite.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    labels = [row.split(" | ")[0].lstrip("| ") for row in rows]
    sd1, xl = "tiny 128²: ", "tiny-xl 128²: "
    expected = [
        *(sd1 + f"fine-tune {m}" for m in ("full", "full + grad. checkpointing", "lora",
                                           "lora + grad. checkpointing")),
        *(sd1 + f"{m} inversion" for m in ("null_text", "direct", "negative_prompt")),
        sd1 + "P2P edit", sd1 + "virtual edit (SPEC §9), 2 steps, SPL",
        sd1 + "virtual edit (SPEC §9), 2 steps, no SPL",
        "3 SPL + CPL iterations at 128²",
        xl + "fine-tune lora (", xl + "fine-tune lora + grad. checkpointing", xl + "null_text inversion",
        xl + "direct inversion", xl + "P2P edit", xl + "virtual edit (SPEC §9), 2 steps, SPL",
        xl + "virtual edit (SPEC §9), 2 steps, no SPL",
        *(f"{flow} 128²: {row}" for flow in ("tiny-sd3", "tiny-flux") for row in (
            "random init on the device", "FlowEdit T 4, n_max 3, SPL in 1 steps + post-processing (float32)",
            "FlowEdit T 4, n_max 3, SPL in 1 steps + post-processing + model CPU offload")),
    ]
    assert len(labels) == len(expected) and all(a.startswith(b) for a, b in zip(labels, expected)), labels
    for row in rows:  # every measurement is a positive number
        value = float(re.search(r"\| ([0-9.]+) (s|steps/s)", row).group(1))
        assert value > 0, row


def test_shapes_bench_scores_a_method_against_ground_truth(tmp_path) -> None:
    """benchmarks/shapes_bench.py on the shipped model, one row, 2 steps: a table of fractions, IoUs in
    [0, 1] and finite PSNRs (the real table is in BENCHMARKS.md)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import shapes_bench

    text = shapes_bench.main(["--steps", "2", "--virtual-steps", "2", "--methods", "Direct + P2P",
                              "--out", str(tmp_path / "table.md")])
    assert (tmp_path / "table.md").read_text() == text
    row = next(line for line in text.splitlines() if line.startswith("| Direct + P2P |"))
    cells = [float(c) for c in row.strip("| ").split(" | ")[1:]]
    colour_ok, colour_iou, colour_psnr, shape_ok, shape_iou, shape_psnr, seconds = cells
    assert 0 <= colour_ok <= 1 and 0 <= shape_ok <= 1 and 0 <= colour_iou <= 1 and 0 <= shape_iou <= 1
    assert 5 < colour_psnr < 100 and 5 < shape_psnr < 100 and seconds > 0
