"""Benchmark the editing stage: inversions (null_text, direct, negative_prompt), P2P edits, the virtual edit.

    python benchmarks/edit_bench.py [--presets tiny sd-v1-random] [--resolution 256] [--steps 20 3]
                                    [--inner-steps 10] [--early-stop 1e-5] [--spl-iterations 100]
                                    [--virtual-steps 15] [--device cpu|cuda] [--threads N] [--repeats 1]
                                    [--system-malloc]

The null-text inversion of `s2edit.editing.inversion` is compared, in the same run and on the same inputs,
with
`reference_null_text` below: the same algorithm (same early stop, same stored ∅_i, hence the same
result) written the straightforward way, i.e. the whole classifier-free-guidance batch [∅, P̃] through
the UNet (forward and backward) at every inner step, and a separate CFG pass to advance z̄. The fast
version computes ε_c once per step without a graph, back-propagates only the ∅ row, and advances with
the move it has just evaluated. The table reports seconds, the speed-up and the largest difference
between the two sets of ∅_i. A second table measures single UNet passes (1 and 2 rows, forward and
forward + backward to the text embedding) and the speed-up their costs predict (`pass_costs`): with
random weights every saving is a 1-row pass run instead of a 2-row one, so this is what the hardware
lets the fast version gain. `--early-stop` raises the NTI threshold to show the early-stopping
regime that trained weights reach and random weights never do.

Two more comparisons run in the same process on the same image: Direct Inversion against null-text
inversion (seconds, and the latent MSE of each reconstruction at guidance 7.5), and a first training-free
edit by virtual inversion (`--virtual-steps`, SPL on) against null-text inversion + P2P edit with SPL
(the preset's steps), end to end.

Models are random (no downloads): their UNet output layer is damped ×0.1 (as in the tests) so that the
DDIM trajectories are well conditioned and both implementations can be compared numerically; timing
is unaffected. On CPU the step counts are reduced (`--steps`, one per preset); on a GPU use
`--device cuda --resolution 512 --steps 50 50` to compare with the paper's A100 timings (SD v1-4,
512²: Null-text inversion ~113 s, one edit ~9 s).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editkit.images import load_image
from s2edit.core.denoiser import GuidedDenoiser
from s2edit.core.diffusion import DDIMSchedule, ddim_step
from s2edit.core.family import Conditioning, ModelFamily
from s2edit.core.loading import load_model
from s2edit.core.runtime import retain_freed_memory
from s2edit.core.settings import NullTextSettings, SPLSettings, VirtualSettings
from s2edit.editing.inversion import ddim_inversion, invert, reconstruct
from s2edit.editing.request import InversionRequest

IMAGE = Path(__file__).resolve().parents[1] / "examples" / "chelsea.png"
SOURCE, TARGET = "a photo of a cat", "a photo of a tiger"
GUIDANCE = 7.5
OUTPUT_DAMPING = 0.1  # see tests/test_inversion.py: a random UNet's DDIM trajectories are chaotic
PAPER_A100_S = {"null_text": 113.0, "edit": 9.0}  # S2Edit §4 / SPEC §8, SD v1-4 at 512²


# ----------------------------------------------------------------------------- straightforward version


@dataclass
class ReferenceResult:
    nulls: Conditioning | None  # ∅_i per step (N rows)
    losses: list[float] = field(default_factory=list)
    inner_steps: list[int] = field(default_factory=list)
    unet_calls: int = 0  # UNet row evaluations


def reference_null_text(
    sd: ModelFamily,
    image: torch.Tensor,
    prompt: str,
    steps: int,
    guidance: float,
    nti: NullTextSettings | None = None,
) -> ReferenceResult:
    """Null-text inversion as one would first write it: the full CFG batch at every inner step, every
    tensor of the unconditional input optimised (SD: the context; SDXL: the context and the pooled
    embedding)."""
    nti = nti or NullTextSettings()
    with torch.no_grad():
        z0 = sd.encode_image(image.to(sd.device)).float()
        cond = sd.encode_prompt([prompt]).float()
        null = sd.unconditional().float()
    schedule = DDIMSchedule.from_scheduler(sd.scheduler, steps)
    latents = ddim_inversion(GuidedDenoiser(sd), z0, cond, schedule, progress=False)
    n = len(schedule)
    z = latents[n : n + 1]
    result = ReferenceResult(None)
    stored = []

    def guided(z: torch.Tensor, t: torch.Tensor, null: Conditioning, alpha: float) -> torch.Tensor:
        out = sd.predict(torch.cat([z, z]), t, Conditioning.cat([null, cond]))
        result.unet_calls += 2
        eps_uncond, eps_cond = sd.to_epsilon(out, torch.cat([z, z]), alpha).chunk(2)
        return eps_uncond + guidance * (eps_cond - eps_uncond)

    for i in range(n):
        t, alpha, alpha_prev = (
            schedule.timesteps[i],
            float(schedule.alphas[i]),
            float(schedule.alphas_prev[i]),
        )
        null = null.map(lambda x: x.detach().clone().requires_grad_(True))  # Adam updates in place
        optimizer = torch.optim.Adam(null.tensors(), lr=nti.lr * (1.0 - i / 100.0))
        target = latents[n - 1 - i : n - i]
        updates = 0
        for _ in range(nti.inner_steps):  # the reference's order: loss, Adam step, then the early stop
            loss = F.mse_loss(ddim_step(z, guided(z, t, null, alpha), alpha, alpha_prev), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            if loss.item() < nti.early_stop + i * nti.early_stop_growth:
                break
        stored.append(null.detach().map(torch.clone))
        with torch.no_grad():
            z = ddim_step(z, guided(z, t, null.detach(), alpha), alpha, alpha_prev)
        result.losses.append(F.mse_loss(z, target).item())
        result.inner_steps.append(updates)
    result.nulls = Conditioning.stack(stored)
    return result


# ----------------------------------------------------------------------------- benchmark


def damped_model(preset: str, device: str) -> ModelFamily:
    sd = load_model(preset, device=device, seed=0)
    with torch.no_grad():
        sd.unet.conv_out.weight.mul_(OUTPUT_DAMPING)
        sd.unet.conv_out.bias.mul_(OUTPUT_DAMPING)
    for module in sd.components().values():
        module.requires_grad_(False)
    return sd


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, value


def pass_costs(sd: ModelFamily, image: torch.Tensor, args: argparse.Namespace) -> dict:
    """Seconds of one UNet pass with 1 and 2 rows, forward only and forward + backward to the text
    embedding (frozen weights), at the image's latent size; and the NTI speed-up they predict.

    Per denoising step with k Adam updates, the reference runs k 2-row forward+backward passes and a 2-row
    advance; the fast version a 1-row ε_c forward, k 1-row forward+backward passes and one 1-row forward
    (the advance). The ratio of those sums is what any implementation of this algorithm can gain over the
    reference on this hardware: it is bounded by cost(2 rows) / cost(1 row). Early stopping keeps at least
    one update per step (SPEC §3), the "stop 1" column.
    """
    latent = torch.zeros(1, sd.latent_channels, *(side // sd.vae_scale_factor for side in image.shape[-2:]))
    t = torch.tensor(500, device=args.device)

    with torch.no_grad():
        shapes = sd.unconditional()  # the conditioning's tensors (context; + pooled for SDXL)

    def one_pass(rows: int, backward: bool) -> None:
        z = latent.to(args.device).expand(rows, -1, -1, -1)
        cond = shapes.map(lambda x: torch.randn(rows, *x.shape[1:], device=args.device)
                          .requires_grad_(backward))
        with torch.set_grad_enabled(backward):
            out = sd.predict(z, t, cond)
            if backward:
                torch.autograd.grad(out.square().mean(), cond.tensors())

    costs = {}
    for rows in (1, 2):
        for backward in (False, True):
            one_pass(rows, backward)  # warm-up
            # the median of 5: single CPU passes vary by ±25 % on a shared machine, the minimum is too kind
            runs = [timed(partial(one_pass, rows, backward), args.device, 1)[0] for _ in range(5)]
            costs[rows, backward] = statistics.median(runs)
    def predicted(k: int) -> float:
        return (k * costs[2, True] + costs[2, False]) / (k * costs[1, True] + 2 * costs[1, False])

    return {
        "f1": costs[1, False],
        "f2": costs[2, False],
        "fb1": costs[1, True],
        "fb2": costs[2, True],
        "predicted_all": predicted(args.inner_steps),
        "predicted_stop1": predicted(1),
    }


def bench_preset(preset: str, steps: int, args: argparse.Namespace) -> dict:
    from s2edit.editing.editor import Editor

    sd = damped_model(preset, args.device)
    image = load_image(IMAGE, args.resolution, multiple=sd.size_multiple)
    row: dict = {"preset": preset, "size": f"{image.shape[-1]}x{image.shape[-2]}", "steps": steps}

    nti = NullTextSettings(inner_steps=args.inner_steps, early_stop=args.early_stop)

    def fast():
        return invert(sd, image, SOURCE, InversionRequest("null_text", steps, GUIDANCE, nti), progress=False)

    def reference():
        return reference_null_text(sd, image, SOURCE, steps, GUIDANCE, nti)

    row["null_text_s"], inversion = timed(fast, args.device, args.repeats)
    if args.skip_reference:
        row["reference_s"] = row["speedup"] = row["max_abs_diff"] = float("nan")
        row["same_updates"] = "—"
    else:
        row["reference_s"], ref = timed(reference, args.device, args.repeats)
        row["speedup"] = row["reference_s"] / row["null_text_s"]
        row["max_abs_diff"] = max(float((ours - theirs.cpu()).abs().max())
                                  for ours, theirs in zip(inversion.nulls.tensors(), ref.nulls.tensors()))
        row["same_updates"] = inversion.inner_steps == ref.inner_steps
    row["updates"] = sum(inversion.inner_steps)
    row["negative_prompt_s"], _ = timed(
        lambda: invert(sd, image, SOURCE, InversionRequest("negative_prompt", steps, GUIDANCE),
                       progress=False),
        args.device,
        args.repeats,
    )
    row["direct_s"], direct = timed(
        lambda: invert(sd, image, SOURCE, InversionRequest("direct", steps, GUIDANCE), progress=False),
        args.device,
        args.repeats,
    )
    row["direct_speedup"] = row["null_text_s"] / row["direct_s"]
    with torch.no_grad():
        row["null_text_error"] = float((reconstruct(sd, inversion).cpu() - inversion.z0).pow(2).mean())
        row["direct_error"] = float((reconstruct(sd, direct).cpu() - direct.z0).pow(2).mean())
    editor = Editor(sd, weights=preset, progress=False)
    row["edit_s"], _ = timed(
        lambda: editor.edit(inversion, [TARGET], spl=SPLSettings(structure=False, postprocess=False)),
        args.device,
        args.repeats,
    )
    spl = SPLSettings(iterations=args.spl_iterations)
    row["edit_spl_s"], result = timed(
        lambda: editor.edit(inversion, [TARGET], spl=spl), args.device, args.repeats
    )
    row["spl_steps"] = len(result.metrics["spl_in_loop"])
    virtual = VirtualSettings(steps=args.virtual_steps)
    row["virtual_s"], result = timed(
        lambda: editor.edit_virtual(image, SOURCE, [TARGET], virtual=virtual, spl=spl),
        args.device,
        args.repeats,
    )
    row["virtual_spl_steps"] = len(result.metrics["spl_in_loop"])
    row["first_edit_speedup"] = (row["null_text_s"] + row["edit_spl_s"]) / row["virtual_s"]
    row["costs"] = pass_costs(sd, image, args)
    return row


def print_header(*columns: str) -> None:
    """A Markdown table's header and separator lines."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "sd-v1-random"])
    parser.add_argument("--steps", nargs="+", type=int, default=[20, 3], help="DDIM steps, one per preset")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument(
        "--early-stop", type=float, default=1e-5, help="NTI threshold ε (random weights never reach 1e-5)"
    )
    parser.add_argument("--spl-iterations", type=int, default=100)
    parser.add_argument("--virtual-steps", type=int, default=15, help="steps of the virtual-inversion edit")
    parser.add_argument("--skip-reference", action="store_true", help="no straightforward NTI reference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc returning freed memory to the OS (default: s2edit.core.runtime."
             "retain_freed_memory)",
    )
    args = parser.parse_args()
    retained = False if args.system_malloc else retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = (args.steps * len(args.presets))[: len(args.presets)] if len(args.steps) == 1 else args.steps

    print(
        f"# edit_bench: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"device {args.device}, threads {torch.get_num_threads()}, inner steps ≤ {args.inner_steps}, "
        f"early stop {args.early_stop:g}, guidance {GUIDANCE}, SPL iterations {args.spl_iterations}, "
        f"freed memory retained {retained}"
    )
    print_header(
        "preset", "size", "steps", "null_text s", "reference s", "speed-up", "max abs Δ∅", "same updates",
        "negative_prompt s", "edit s", "edit + SPL s (in-loop steps)",
    )  # fmt: skip
    later = []
    rows = []
    for preset, n in zip(args.presets, steps):
        r = bench_preset(preset, n, args)
        rows.append(r)
        print(
            f"| {r['preset']} | {r['size']} | {r['steps']} | {r['null_text_s']:.2f} | "
            f"{r['reference_s']:.2f} | "
            f"{r['speedup']:.2f}× | {r['max_abs_diff']:.1e} | {r['same_updates']} | "
            f"{r['negative_prompt_s']:.2f} | {r['edit_s']:.2f} | {r['edit_spl_s']:.2f} ({r['spl_steps']}) |",
            flush=True,
        )
        later.append(r)
    print("\nDirect Inversion vs null-text (same run; reconstruction = latent MSE of z0 at guidance 7.5)")
    print_header("preset", "steps", "null_text s", "direct s", "speed-up", "null_text MSE", "direct MSE")
    for r in later:
        print(
            f"| {r['preset']} | {r['steps']} | {r['null_text_s']:.2f} | {r['direct_s']:.2f} | "
            f"{r['direct_speedup']:.1f}× | {r['null_text_error']:.2e} | {r['direct_error']:.2e} |"
        )
    print(
        f"\nFirst training-free edit: virtual inversion ({args.virtual_steps} steps, SPL) vs null-text "
        "inversion + P2P edit with SPL (the preset's steps)"
    )
    print_header("preset", "null_text + edit s", "virtual s (in-loop SPL steps)", "speed-up")
    for r in later:
        print(
            f"| {r['preset']} | {r['null_text_s'] + r['edit_spl_s']:.2f} | {r['virtual_s']:.2f} "
            f"({r['virtual_spl_steps']}) | {r['first_edit_speedup']:.1f}× |"
        )
    print(
        "\nUNet pass costs (s) and the NTI speed-up they predict (see pass_costs): every step spending all "
        f"{args.inner_steps} updates / every step stopping before its first update"
    )
    print_header(
        "preset", "1-row fwd", "2-row fwd", "1-row fwd+bwd", "2-row fwd+bwd", "predicted (all)",
        "predicted (stop 1)",
    )  # fmt: skip
    for r in rows:
        c = r["costs"]
        print(
            f"| {r['preset']} | {c['f1']:.3f} | {c['f2']:.3f} | {c['fb1']:.3f} | {c['fb2']:.3f} | "
            f"{c['predicted_all']:.2f}× | {c['predicted_stop1']:.2f}× |"
        )
    if args.device.startswith("cuda") and args.resolution == 512:
        print(
            f"paper (A100, SD v1-4, 512², 50 steps): null-text inversion {PAPER_A100_S['null_text']:.0f} s, "
            f"edit {PAPER_A100_S['edit']:.0f} s"
        )


if __name__ == "__main__":
    main()
