"""Benchmark the evaluation runner: its overhead over a plain loop, and 1 vs 2 processes.

    python benchmarks/eval_bench.py [--items 8] [--resolution 128] [--steps 4] [--spl-iterations 10]
                                    [--model tiny] [--threads 1] [--repeats 2] [--skip-processes]

1. Overhead, in this process on the same items and settings: `evaluate.run` (Lightning `Trainer.predict`,
   the prediction writer, atomic files and DONE markers) against a plain Python loop over `Editor` doing
   the same edits with the same per-item seeds, the same metrics and the same image + metrics.json files.
   Both are timed from their first item's start to their last item's files (steady state, items/s) and
   end to end (model load and Trainer set-up included; the runner's summary/plots excluded). The edits of
   both must be identical (checked). Target: < 5 % overhead.
2. Processes: `python evaluate.py` as subprocesses, 1 process × `--threads` thread(s) against
   `devices=2 strategy=ddp accelerator=cpu` (2 processes × `--threads`), and 1 process × 2·threads:
   the whole command's wall time (imports, process start, model loads) and the items' steady-state
   throughput (first item start to last item end over all processes, from each item's metrics.json).

Prints Markdown tables. The model is the random tiny SD (no downloads): the numbers measure the runner,
not edit quality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editkit.config import parse_config  # noqa: E402
from editkit.files import atomic_path  # noqa: E402
from editkit.images import save_image  # noqa: E402
from s2edit.evaluation.config import EvaluateConfig  # noqa: E402

EXAMPLES = ROOT / "examples"
PROMPTS = [  # (image, source, target): cycled to make --items items
    ("chelsea.png", "a photo of a cat", "a photo of a tiger"),
    ("coffee.png", "a photo of a cup of coffee", "a photo of a cup of tea"),
    ("astronaut.png", "a photo of a woman in an orange spacesuit", "a photo of a woman in a red spacesuit"),
    ("chelsea.png", "a photo of a cat", "a photo of a cat in the snow"),
]


def write_dataset(folder: Path, items: int) -> Path:
    path = folder / "bench.jsonl"
    lines = []
    for i in range(items):
        image, source, target = PROMPTS[i % len(PROMPTS)]
        lines.append(json.dumps({"id": f"item{i:03d}", "image": str(EXAMPLES / image), "source": source,
                                 "target": target, "edit_type": i % 10}))
    path.write_text("\n".join(lines) + "\n")
    return path


def config_args(args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    return [f"data={data}", f"model={args.model}", f"resolution={args.resolution}",
            f"virtual.steps={args.steps}", f"spl.iterations={args.spl_iterations}", "progress=false",
            "accelerator=cpu", f"out={out}"]


def item_span(out: Path) -> tuple[float, int]:
    """(seconds from the first item's start to the last item's end, items) from the metrics.json files."""
    reports = [json.loads(p.read_text()) for p in (out / "items").glob("*/metrics.json")]
    return max(r["finished_at"] for r in reports) - min(r["started_at"] for r in reports), len(reports)


# ----------------------------------------------------------------------------- 1. overhead, in process


def runner(args: argparse.Namespace, data: Path, out: Path) -> dict:
    """evaluate.run end to end, less its report (metrics.csv, summary, plots: timed again afterwards)."""
    from s2edit.evaluation import run as evaluate
    from s2edit.evaluation.datasets import read_dataset
    from s2edit.evaluation.report import write_report

    cfg = parse_config(EvaluateConfig, config_args(args, data, out))
    start = time.perf_counter()
    evaluate.run(cfg)
    total = time.perf_counter() - start
    start = time.perf_counter()
    write_report(read_dataset(data), out, info={"data": str(data), "method": "virtual", "model": args.model,
                                               "seed": 0, "config": ""}, weights={})
    report = time.perf_counter() - start
    # from the first item's start to the last item's DONE marker (its files are written after finished_at)
    last_done = max(p.stat().st_mtime for p in (out / "items").glob("*/DONE"))
    first_start = min(json.loads(p.read_text())["started_at"] for p in (out / "items").glob("*/metrics.json"))
    return {"total": total - report, "span": last_done - first_start, "report": report}


def plain_loop(args: argparse.Namespace, data: Path, out: Path) -> dict:
    """The same work as a plain loop: Editor + MetricSuite, images and metrics.json per item."""
    from s2edit.core.settings import SPLSettings, VirtualSettings
    from s2edit.editing.editor import Editor
    from s2edit.evaluation.datasets import read_dataset
    from s2edit.evaluation.items import item_seed
    from s2edit.evaluation.metrics import MetricSuite

    start = time.perf_counter()
    editor = Editor.from_model(args.model, device="cpu", progress=False, resolution=args.resolution)
    suite = MetricSuite()
    virtual, spl = VirtualSettings(steps=args.steps), SPLSettings(iterations=args.spl_iterations)
    first = time.time()
    for item in read_dataset(data):
        seed = item_seed(item.id, 0)
        with torch.enable_grad():
            image = editor.load_image(item.image_path)
            result = editor.edit_virtual(image, item.source_prompt, list(item.targets), virtual=virtual,
                                         spl=spl, seed=seed)
        metrics = [suite.per_item(result.source, result.images[k: k + 1], t, None, item.source_prompt)
                   for k, t in enumerate(item.targets)]
        folder = out / item.id
        save_image(result.source, folder / "source.png")
        save_image(result.reconstruction, folder / "reconstruction.png")
        for k in range(len(item.targets)):
            save_image(result.images[k: k + 1], folder / f"edit_{k}.png")
        with atomic_path(folder / "metrics.json") as tmp:
            tmp.write_text(json.dumps({"id": item.id, "seed": seed, "metrics": metrics}))
    return {"total": time.perf_counter() - start, "span": time.time() - first}


def same_edits(runner_out: Path, loop_out: Path) -> bool:
    return all((runner_out / "items" / p.parent.name / "edit_0.png").read_bytes() == p.read_bytes()
               for p in loop_out.glob("*/edit_0.png"))


# ----------------------------------------------------------------------------- 2. processes


def subprocess_run(args: argparse.Namespace, data: Path, out: Path, threads: int, extra: list[str]) -> dict:
    # passive OpenMP waits: spinning threads of 2 processes (or a busy machine) otherwise steal each
    # other's cores (README: OMP_WAIT_POLICY=PASSIVE)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    command = [sys.executable, str(ROOT / "evaluate.py"), *config_args(args, data, out), *extra]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"evaluate.py failed:\n{result.stderr[-3000:]}")
    span, n = item_span(out)
    return {"wall": wall, "span": span, "items": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="virtual-inversion steps per edit")
    parser.add_argument("--spl-iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=2, help="in-process repeats (median reported)")
    parser.add_argument("--skip-processes", action="store_true", help="only the in-process comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from s2edit.core.runtime import retain_freed_memory

    retain_freed_memory()  # as evaluate.py does; the plain loop gets it too
    tmp = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    data = write_dataset(tmp, args.items)
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, model {args.model}, "
          f"{args.items} items at {args.resolution}², {args.steps} virtual steps, {args.spl_iterations} SPL "
          f"iterations; {time.strftime('%Y-%m-%d')}; load average {os.getloadavg()[0]:.2f} at start")

    # 1. Overhead
    plain_loop(args, data, tmp / "warmup")  # first-call costs (allocator, lazy imports) out of the way
    runs, loops = [], []
    for r in range(args.repeats):  # interleaved, so that drifts of a shared machine hit both
        runs.append(runner(args, data, tmp / f"runner{r}"))
        loops.append(plain_loop(args, data, tmp / f"loop{r}"))
    identical = same_edits(tmp / "runner0", tmp / "loop0")
    span_r, span_l = (statistics.median(x["span"] for x in xs) for xs in (runs, loops))
    total_r, total_l = (statistics.median(x["total"] for x in xs) for xs in (runs, loops))
    n = args.items
    print(f"\n## Runner overhead ({args.threads} thread(s), median of {args.repeats}; edits identical: "
          f"{identical})\n")
    print("| | plain loop over Editor | evaluate.py runner | overhead |")
    print("|---|---|---|---|")
    print(f"| items/s, first item start → last item written | {n / span_l:.3f} | {n / span_r:.3f} | "
          f"{100 * (span_r / span_l - 1):+.1f} % |")
    print(f"| seconds end to end (model load, Trainer set-up) | {total_l:.2f} | {total_r:.2f} | "
          f"{100 * (total_r / total_l - 1):+.1f} % |")
    report = statistics.median(x["report"] for x in runs)
    print(f"\nNot counted above: the runner's metrics.csv + summary + plot: {report:.2f} s once per run.")

    if args.skip_processes:
        return

    # 2. Processes
    cases = [("1 process", args.threads, []),
             ("2 processes (ddp)", args.threads, ["devices=2", "strategy=ddp"]),
             (f"1 process, {2 * args.threads} threads", 2 * args.threads, [])]
    results = []
    for label, threads, extra in cases:
        results.append((label, threads, subprocess_run(args, data, tmp / label.replace(" ", "_"), threads,
                                                       extra)))
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end (other processes skew the numbers)")
    base = results[0][2]
    print(f"\n## Processes (`python evaluate.py`, {n} items)\n")
    print("| case | threads/process | command wall s | items/s (steady state) | speed-up (steady) |")
    print("|---|---|---|---|---|")
    for label, threads, r in results:
        print(f"| {label} | {threads} | {r['wall']:.1f} | {r['items'] / r['span']:.3f} | "
              f"{base['span'] / r['span']:.2f}× |")


if __name__ == "__main__":
    main()
