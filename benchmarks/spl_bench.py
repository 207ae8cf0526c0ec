"""Benchmark `spl.refine` against a straightforward implementation of the same formula (SPEC §5).

    python benchmarks/spl_bench.py [--sizes 512 1024] [--iterations 10] [--repeats 5] [--device cpu|cuda]
                                   [--threads N]

Inputs: skimage's astronaut resized to size², edited = warm tint + 5×5 blur. Time: best ms per iteration
over `repeats` float32 runs, the implementations interleaved. Memory: a fresh child process per
implementation runs the loop once (CPU: growth of ru_maxrss; CUDA: growth of
torch.cuda.max_memory_allocated) and compares its result with `refine` run in float64 (same iterations).
The straightforward version recomputes all statistics and the loss from scratch each iteration
(separable cumulative-sum box means with gathers, S statistics included) and backpropagates with autograd.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spl.refine import refine

STRUCTURE_WEIGHT = 1e4


# ----------------------------------------------------------------------------- straightforward version
def plain_box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Clipped-window mean: one cumulative sum per axis, window = C[hi] − C[lo] by gathers."""
    for dim in (-2, -1):
        n = x.shape[dim]
        j = torch.arange(n, device=x.device)
        lo, hi = (j - radius).clamp(min=0), (j + radius + 1).clamp(max=n)
        prefix = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.cumsum(dim)], dim=dim)
        length = (hi - lo).to(x.dtype)
        length = length if dim == -1 else length[:, None]
        x = (prefix.index_select(dim, hi) - prefix.index_select(dim, lo)) / length
    return x


def plain_spl(source: torch.Tensor, edited: torch.Tensor, radius: int = 5, eps: float = 1e-4) -> torch.Tensor:
    """L_SPL of SPEC §5 written directly, every statistic recomputed."""
    i = ((source + 1) / 2).mean(1, keepdim=True)
    p = ((edited + 1) / 2).mean(1, keepdim=True)
    mean_i, mean_p = plain_box_mean(i, radius), plain_box_mean(p, radius)
    mean_ii, mean_pp, mean_ip = (plain_box_mean(t, radius) for t in (i * i, p * p, i * p))
    cov = mean_ip - mean_i * mean_p
    a = (cov / (mean_ii - mean_i**2 + eps)).detach()
    b = (mean_p - a * mean_i).detach()
    a_rev = (cov / (mean_pp - mean_p**2 + eps)).detach()
    b_rev = (mean_i - a_rev * mean_p).detach()
    d_fwd = mean_pp + a * a * mean_ii + b * b - 2 * a * mean_ip - 2 * b * mean_p + 2 * a * b * mean_i
    d_rev = mean_ii + a_rev * a_rev * mean_pp + b_rev * b_rev - 2 * a_rev * mean_ip - 2 * b_rev * mean_i \
        + 2 * a_rev * b_rev * mean_p
    return (d_fwd + d_rev).mean()


def plain_refine(source: torch.Tensor, edited: torch.Tensor, iterations: int) -> torch.Tensor:
    x = edited.detach().float().clone().requires_grad_()
    optimizer = torch.optim.SGD([x], lr=1.0, momentum=0.9)
    for _ in range(iterations):
        optimizer.zero_grad()
        (STRUCTURE_WEIGHT * plain_spl(source.float(), x)).backward()
        x.grad.nan_to_num_(nan=0.0)
        optimizer.step()
    return x.detach().clamp(-1, 1)


IMPLEMENTATIONS = {
    "spl.refine": lambda s, e, n: refine(s, e, structure_weight=STRUCTURE_WEIGHT, iterations=n),
    "straightforward": plain_refine,
}


# ----------------------------------------------------------------------------- inputs and measurement
def make_inputs(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Astronaut photo at size², and an edit: warm tint + 5×5 blur. float64, [-1, 1]."""
    from skimage import data

    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].double() / 127.5 - 1
    source = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    tint = torch.tensor([1.15, 0.95, 0.7], dtype=torch.float64).view(1, 3, 1, 1)
    edited = F.avg_pool2d((source + 1) * tint - 1, 5, stride=1, padding=2, count_include_pad=False)
    return source.clamp(-1, 1), edited.clamp(-1, 1)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def memory_worker(name: str, inputs: Path, iterations: int, device: str) -> dict:
    """Runs in a child process: peak memory of one float32 run and its error vs float64.

    The inputs come from a file so that nothing but the measured loop has run in this process: the
    growth of ru_maxrss during the run is then the loop's peak memory.
    """
    source, edited = (t.to(device) for t in torch.load(inputs))
    s32, e32 = source.float(), edited.float()
    run = IMPLEMENTATIONS[name]
    run(s32[..., :32, :32], e32[..., :32, :32], 1)  # load kernels and thread pools outside the measurement
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = run(s32, e32, iterations)
    if device == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    reference = refine(source, edited, structure_weight=STRUCTURE_WEIGHT, iterations=iterations)  # float64
    return {"peak_mib": peak_mib, "max_abs_vs_f64": (out.double() - reference).abs().max().item()}


def best_times(source: torch.Tensor, edited: torch.Tensor, iterations: int, repeats: int,
               device: str) -> dict[str, float]:
    """Best ms per iteration of each implementation, runs interleaved so that a busy spell of a shared
    machine hits both alike."""
    best = dict.fromkeys(IMPLEMENTATIONS, float("inf"))
    for run in IMPLEMENTATIONS.values():
        run(source[..., :32, :32], edited[..., :32, :32], 1)  # warm-up
    for _ in range(repeats):
        for name, run in IMPLEMENTATIONS.items():
            _sync(device)
            start = time.perf_counter()
            run(source, edited, iterations)
            _sync(device)
            best[name] = min(best[name], 1000 * (time.perf_counter() - start) / iterations)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--precision-iterations", type=int, default=100,
                        help="also report float32 vs float64 after this many iterations at the first size "
                             "(0: skip)")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "INPUTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker:
        name, inputs = args.worker
        print(json.dumps(memory_worker(name, Path(inputs), args.iterations, args.device)))
        return

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu}"
    print(f"# device: {device_name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.iterations} iterations, best of {args.repeats} interleaved runs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| size | implementation | ms / iteration | speed-up | peak memory (MiB) "
          "| max abs diff vs float64 |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            source, edited = make_inputs(size)
            inputs = Path(tmp) / f"inputs_{size}.pt"
            torch.save((source, edited), inputs)
            memory = {}
            for name in IMPLEMENTATIONS:
                command = [sys.executable, __file__, "--worker", name, str(inputs), "--iterations",
                           str(args.iterations), "--device", args.device]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                completed = subprocess.run(command, capture_output=True, text=True, check=True)
                memory[name] = json.loads(completed.stdout.strip().splitlines()[-1])
            s32, e32 = source.float().to(args.device), edited.float().to(args.device)
            times = best_times(s32, e32, args.iterations, args.repeats, args.device)
            for name, ms in times.items():
                print(f"| {size}² | {name} | {ms:.1f} | {times['straightforward'] / ms:.2f}× | "
                      f"{memory[name]['peak_mib']:.0f} | {memory[name]['max_abs_vs_f64']:.1e} |", flush=True)

    if args.precision_iterations:
        n, size = args.precision_iterations, args.sizes[0]
        source, edited = (t.to(args.device) for t in make_inputs(size))
        reference = refine(source, edited, structure_weight=STRUCTURE_WEIGHT, iterations=n)
        errors = {name: (run(source.float(), edited.float(), n).double() - reference).abs().max().item()
                  for name, run in IMPLEMENTATIONS.items()}
        print(f"\nafter {n} iterations at {size}², max abs diff vs float64: "
              + ", ".join(f"{name} {error:.1e}" for name, error in errors.items()))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
