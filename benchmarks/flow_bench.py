"""Benchmark FlowEdit (SPEC §11) on the tiny flow presets: the batched implementation against the
reference's loop, and what reading the word maps costs.

    python benchmarks/flow_bench.py [--presets tiny-sd3 tiny-flux] [--resolution 128] [--targets 3]
                                    [--steps 0] [--repeats 3] [--threads N] [--device cpu|cuda]

`reference_flowedit` below is fallenshock/FlowEdit's loop (`FlowEdit_utils.py`) written the straightforward
way, one target at a time: SD3 makes one transformer call per step with the rows [∅, c_src, ∅, c_tar];
FLUX makes two calls per step (the source, then the target, each with its own guidance value). The
project's :func:`s2edit.editing.flowedit.flowedit_latents` edits all K targets in ONE call per step
([∅, c_src] + K × [∅, c_k] for SD3; 1 + K rows for FLUX), the source rows shared. Both draw the same
noise (:func:`s2edit.core.flow.step_noise`), so their edits agree to float rounding: the table shows the
largest difference. Columns: seconds of the K reference edits, of one batched edit and the speed-up; then
the batched edit while the joint-attention word maps are read (as `method=flowedit` always does, for
the §6 masks and the saved maps) and that overhead. Times are the minimum of `--repeats` interleaved runs.
`--steps 0` runs each family's paper settings (SD3: T 50, n_max 33; FLUX: T 28, n_max 24).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_suite import timed
from editkit.images import load_image
from s2edit.core.family import Conditioning
from s2edit.core.flow import EDIT, flowedit_phases, step_noise
from s2edit.core.flow_family import FlowFamily
from s2edit.core.joint_attention import JointMapStore
from s2edit.core.loading import load_model
from s2edit.core.runtime import retain_freed_memory
from s2edit.core.settings import FlowEditSettings
from s2edit.editing.flowedit import flowedit_latents, resolved

IMAGE = Path(__file__).resolve().parents[1] / "examples" / "chelsea.png"
SOURCE = "a photo of a cat"
TARGETS = ("a photo of a tiger", "a photo of a dog", "a photo of a cat in the snow", "a painting of a cat")


@torch.no_grad()
def reference_flowedit(model: FlowFamily, x_src: torch.Tensor, source: str, target: str,
                       settings: FlowEditSettings, seed: int = 0) -> torch.Tensor:
    """One target, the reference's structure: Algorithm 1 of FlowEdit with its transformer calls."""
    s = resolved(settings, model.name)
    sigmas = model.sigmas(s.steps, tuple(x_src.shape[-2:]))
    src, tar = model.encode_prompt([source]), model.encode_prompt([target])
    empty = None if model.guidance_embedding else model.encode_prompt([""])
    x_src = x_src.float()
    z_edit = x_src.clone()
    for i, phase in enumerate(flowedit_phases(s.steps, s.n_max, s.n_min)):
        if phase != EDIT:
            continue
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        v_delta = torch.zeros_like(z_edit)
        for k in range(s.n_avg):
            noise = step_noise(tuple(x_src.shape), seed, i, k).to(x_src.device)
            zt_src = (1 - sigma) * x_src + sigma * noise
            zt_tar = z_edit + zt_src - x_src
            if model.guidance_embedding:  # FLUX: two calls, one per branch
                v_src = model.velocity(zt_src, sigma, src, guidance=torch.tensor([s.source_guidance]))
                v_tar = model.velocity(zt_tar, sigma, tar, guidance=torch.tensor([s.target_guidance]))
            else:  # SD3: one call, rows [∅, c_src, ∅, c_tar]
                v = model.velocity(torch.cat([zt_src, zt_src, zt_tar, zt_tar]), sigma,
                                   Conditioning.cat([empty, src, empty, tar]))
                v_src = v[0:1] + s.source_guidance * (v[1:2] - v[0:1])
                v_tar = v[2:3] + s.target_guidance * (v[3:4] - v[2:3])
            v_delta += (v_tar - v_src) / s.n_avg
        z_edit = z_edit + (sigma_next - sigma) * v_delta
    return z_edit


def bench_preset(preset: str, args: argparse.Namespace) -> dict:
    model = load_model(preset, device=args.device)
    image = load_image(IMAGE, args.resolution, multiple=model.size_multiple).to(args.device)
    with torch.no_grad():
        x_src = model.encode_image(image).float()
    paper = not args.steps
    settings = FlowEditSettings() if paper else FlowEditSettings(steps=args.steps, n_max=args.steps * 2 // 3)
    targets = list(TARGETS[: args.targets])

    def reference() -> torch.Tensor:
        return torch.cat([reference_flowedit(model, x_src, SOURCE, t, settings) for t in targets])

    def batched() -> torch.Tensor:
        return flowedit_latents(model, x_src, SOURCE, targets, settings)

    def with_maps() -> torch.Tensor:
        return flowedit_latents(model, x_src, SOURCE, targets, settings, maps=JointMapStore())

    times: dict[str, list[float]] = {"reference": [], "batched": [], "maps": []}
    results: dict[str, torch.Tensor] = {}
    batched()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("reference", reference), ("batched", batched), ("maps", with_maps)):
            seconds, results[name] = timed(fn, args.device)
            times[name].append(seconds)
    best = {name: min(values) for name, values in times.items()}
    s = resolved(settings, model.name)
    return {
        "preset": preset, "size": "×".join(map(str, image.shape[-2:])), "steps": f"{s.steps}/{s.n_max}",
        "targets": len(targets), **best,
        "diff": float((results["reference"] - results["batched"]).abs().max()),
        "maps_diff": float((results["maps"] - results["batched"]).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny-sd3", "tiny-flux"])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--targets", type=int, default=3, choices=range(1, len(TARGETS) + 1))
    parser.add_argument("--steps", type=int, default=12, help="T (n_max = 2T/3); 0: the paper's settings")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}\n")
    print("| preset | image | T/n_max | targets | K reference edits (s) | one batched edit (s) | speed-up "
          "| max abs diff | batched + word maps (s) | maps overhead | diff with maps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        r = bench_preset(preset, args)
        print(f"| {r['preset']} | {r['size']} | {r['steps']} | {r['targets']} | {r['reference']:.2f} | "
              f"{r['batched']:.2f} | {r['reference'] / r['batched']:.2f}× | {r['diff']:.1e} | "
              f"{r['maps']:.2f} | {r['maps'] / r['batched'] - 1:+.0%} | {r['maps_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
