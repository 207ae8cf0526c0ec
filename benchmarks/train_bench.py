"""Benchmark S2Edit fine-tuning steps: Lightning's loop against a plain PyTorch loop doing the same step.

    python benchmarks/train_bench.py [--cases tiny:256:full sd-v1-random:256:lora] [--steps 3] [--warmup 1]
                                     [--rounds 2] [--device cpu|cuda] [--threads N]

A case is `model:resolution:method`. Each case runs in a fresh child process (so peak memory is its own):
it builds `S2EditModule` exactly as `train.py` does (examples/astronaut.png, default prompt), then
1. Lightning: `Trainer.fit` for warmup + steps steps (no logger, checkpoints or progress bar: those are
   I/O, not loop overhead); seconds per step = time between successive batch starts after the warmup.
2. Plain: the same module's `_step`, backward, embedding-row masking, grad clipping, AdamW step and row
   restore in a `for` loop over the same cached batch; same warmup and step count.
The two loops alternate for `rounds` rounds (a fresh Trainer and optimizer each round), so load from
other processes hits both alike. It reports the fastest and the median seconds per measured step of each,
Lightning's overhead in percent (from the fastest: the least disturbed by other processes), and peak memory
(CPU: the process's peak RSS, model loading included; CUDA: max allocated over both loops).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CASES = ("tiny:256:full", "tiny:256:lora", "sd-v1-random:256:lora")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(case: str, steps: int, warmup: int, rounds: int, device: str, threads: int | None) -> dict:
    """One case in this process; returns its measurements."""
    import lightning as L
    import torch

    from editkit.config import parse_config
    from s2edit.core.trainer import lightning_precision, make_trainer
    from s2edit.training import run as train
    from s2edit.training.config import TrainConfig
    from s2edit.training.data import S2EditDataModule
    from s2edit.training.module import S2EditModule

    if threads:
        torch.set_num_threads(threads)
    model, resolution, method = case.split(":")
    total = warmup + steps
    argv = [f"model={model}", f"resolution={resolution}", f"finetune.method={method}", "image_log_every=0",
            f"image={ROOT / 'examples' / 'astronaut.png'}", f"max_steps={total}",
            f"accelerator={'gpu' if device.startswith('cuda') else 'cpu'}"]
    config = parse_config(TrainConfig, argv)
    pairs = train.check_inputs(config)
    precision = lightning_precision(config.precision, device.startswith("cuda"))
    torch.manual_seed(0)
    started = time.perf_counter()
    module = S2EditModule(config)
    build_s = time.perf_counter() - started
    datamodule = S2EditDataModule(pairs, module.model, module.token_ids, total, module.resolution)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    class StepTimer(L.Callback):
        """Time between successive batch starts: everything the loop does per step."""

        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, *args: object) -> None:
            _sync(device)
            self.starts.append(time.perf_counter())

        def on_train_end(self, *args: object) -> None:
            _sync(device)
            self.starts.append(time.perf_counter())

    def lightning_loop() -> list[float]:
        timer = StepTimer()
        trainer = make_trainer(accelerator=config.accelerator, precision=precision, max_steps=total,
                               grad_clip=config.finetune.grad_clip, callbacks=[timer], progress=False)
        trainer.fit(module, datamodule=datamodule)
        return [b - a for a, b in zip(timer.starts[:-1], timer.starts[1:])][warmup:]

    def plain_loop() -> list[float]:
        """The same step on the same module and (cached) batch, as a `for` loop."""
        batch = {k: v.to(module.device) if isinstance(v, torch.Tensor) else v
                 for k, v in next(iter(datamodule.train_dataloader())).items()}
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=module.lr, weight_decay=module.weight_decay)
        autocast = torch.autocast(module.device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
        module.on_fit_start()  # installs the attention controllers for the loop, as in a fit
        times = []
        for index in range(total):
            _sync(device)
            start = time.perf_counter()
            with autocast:
                terms = module._step(batch)
            terms["loss"].backward()
            module.on_before_optimizer_step(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.finetune.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            module.on_train_batch_end(None, batch, index)
            assert torch.isfinite(terms["loss"]).item()
            _sync(device)
            times.append(time.perf_counter() - start)
        module.on_fit_end()
        return times[warmup:]

    lightning_steps, plain_steps = [], []
    for _ in range(rounds):
        lightning_steps += lightning_loop()
        plain_steps += plain_loop()
    lightning_s, plain_s = min(lightning_steps), min(plain_steps)
    return {
        "case": case,
        "size": "x".join(map(str, datamodule.prepared[0].pixels.shape[-2:])),
        "build_s": build_s,
        "lightning_s": lightning_s,
        "plain_s": plain_s,
        "lightning_median_s": statistics.median(lightning_steps),
        "plain_median_s": statistics.median(plain_steps),
        "overhead_pct": 100 * (lightning_s - plain_s) / plain_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
        "trainable_m": sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="model:resolution:method")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per loop")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two loops")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()

    if args.one:
        print(json.dumps(run_case(args.one, args.steps, args.warmup, args.rounds, args.device, args.threads)))
        return

    rows = []
    for case in args.cases:
        command = [sys.executable, __file__, "--one", case, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--rounds", str(args.rounds), "--device", args.device]
        if args.threads:
            command += ["--threads", str(args.threads)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            print(f"{case}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))

    threads = rows[0]["threads"] if rows else "?"
    print(f"# {platform.machine()}, {args.device}, {threads} threads; {args.rounds} rounds of {args.warmup} "
          f"warmup + {args.steps} measured steps per loop; s/step = fastest (median)")
    print("| case (model:res:method) | image | trainable | Lightning s/step | plain s/step | overhead "
          "| peak memory |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        memory = f"{r['peak_rss_mb']:.0f} MB RSS" if r["gpu_mb"] is None else f"{r['gpu_mb']:.0f} MB GPU"
        print(f"| {r['case']} | {r['size']} | {r['trainable_m']:.1f} M "
              f"| {r['lightning_s']:.3f} ({r['lightning_median_s']:.3f}) "
              f"| {r['plain_s']:.3f} ({r['plain_median_s']:.3f}) | {r['overhead_pct']:+.1f} % | {memory} |")


if __name__ == "__main__":
    main()
