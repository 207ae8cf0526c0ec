"""One-call GPU benchmark: every GPU row of BENCHMARKS.md in one command (< 8 minutes on one H100/H200).

    python benchmarks/gpu_suite.py [--out benchmarks/gpu_results.md] [--device cuda] [--skip sdxl flow …]
    python benchmarks/gpu_suite.py --smoke --out /tmp/smoke.md      # tiny models, 2 steps, CPU (CI test)

On the full-size random SD v1 (`sd-v1-random`, UNet output damped ×0.1 as in the tests so DDIM
trajectories stay well conditioned; timing is unaffected) at 512², bf16 on the GPU, it measures:

1. fine-tuning steps/s and peak memory: full and LoRA, with and without gradient checkpointing
   (Lightning `Trainer.fit`, bf16-mixed, the paper's single image);
2. null-text, direct and negative-prompt inversion at 50 steps (NTI: 10 inner steps; random weights
   never reach its early stop, so this is its worst case);
3. one P2P edit with in-loop SPL and post-processing (50 steps);
4. 100 SPL iterations (`spl.refine`, SPL + CPL) at 512² and 1024²;
5. the SPEC §9 virtual-inversion edit at 15 steps with SPL;

then the same on the full-size random SDXL (`sdxl-random`) at 1024² (SPEC §10): LoRA fine-tuning (the
SDXL default) with and without gradient checkpointing, null-text and Direct inversion, one P2P edit with
SPL, and the virtual edit;

then FlowEdit (SPEC §11) on the full-size random SD3-medium (`sd3-random`, 2.0 B transformer + T5-XXL) and
FLUX.1-dev (`flux-random`, 11.9 B + T5-XXL) architectures at 1024², bf16: one edit at the paper's settings
(SD3: T 50, n_max 33, CFG; FLUX: T 28, n_max 24, guidance embedding), with SPL in the loop and
post-processing, once on the GPU and once with model CPU offload (`offload=true`). The weights are drawn on
the GPU (seconds, not minutes, for 12 B parameters); no steps are cut.

It writes a Markdown table (with the machine, versions and the paper's A100 figures) to `--out` and
prints it. `--smoke` runs the same code on the tiny models (tiny, tiny-xl), 2 steps, 128², on the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from editkit.files import atomic_path  # noqa: E402

IMAGE = ROOT / "examples" / "chelsea.png"
TRAIN_IMAGE = ROOT / "examples" / "astronaut.png"
SOURCE, TARGET = "a photo of a cat", "a photo of a tiger"
SD1, SDXL, SD3, FLUX = "sd-v1-random", "sdxl-random", "sd3-random", "flux-random"
PAPER_A100 = {  # S2Edit §4 / SPEC §8, SD v1-4 at 512² on an A100
    "fine-tune full": "~95 s (200 steps)",
    "null_text inversion": "~113 s",
    "P2P edit + SPL": "~9 s (edit)",
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - start, value


def peak_gib(device: str) -> str:
    if not device.startswith("cuda"):
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class StepTimer(L.Callback):
    """Lightning callback: the time of each batch start and of the end of training."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.starts: list[float] = []

    def on_train_batch_start(self, *_: object) -> None:
        sync(self.device)
        self.starts.append(time.perf_counter())

    def on_train_end(self, *_: object) -> None:
        sync(self.device)
        self.starts.append(time.perf_counter())


# ----------------------------------------------------------------------------------------- sections


def fine_tuning(args: argparse.Namespace, rows: list[list[str]], model: str, resolution: int,
                methods: tuple[str, ...] = ("full", "lora")) -> None:
    """Steps/s of Lightning's fit after warm-up, and peak memory, per method, with and without gradient
    checkpointing."""
    from editkit.config import parse_config
    from s2edit.core.trainer import lightning_precision
    from s2edit.training import run as train
    from s2edit.training.config import TrainConfig

    warmup, steps = (1, 1) if args.smoke else (3, 10)
    for method in methods:
        for checkpointing in (False, True):
            reset_peak(args.device)
            argv = [
                f"model={model}", f"resolution={resolution}", f"finetune.method={method}",
                f"finetune.gradient_checkpointing={str(checkpointing).lower()}", "image_log_every=0",
                f"image={TRAIN_IMAGE}", f"max_steps={warmup + steps}",
                f"accelerator={'gpu' if args.device.startswith('cuda') else 'cpu'}",
            ]
            config = parse_config(TrainConfig, argv)
            precision = lightning_precision(config.precision, args.device.startswith("cuda"))
            timer = StepTimer(args.device)
            train.fit(config, train.check_inputs(config), callbacks=[timer], progress=False)
            per_step = (timer.starts[-1] - timer.starts[warmup]) / steps
            label = (f"{model} {resolution}²: fine-tune {method}"
                     f"{' + grad. checkpointing' if checkpointing else ''} ({precision})")
            paper_row = (model, method, checkpointing) == (SD1, "full", False)
            paper = PAPER_A100["fine-tune full"] if paper_row else ""
            speed = f"{1 / per_step:.2f} steps/s ({per_step:.3f} s/step)"
            rows.append([label, speed, peak_gib(args.device), paper])
            print(rows[-1], flush=True)


def editing(args: argparse.Namespace, rows: list[list[str]], model: str, resolution: int,
            inversions_of: tuple[str, ...] = ("null_text", "direct", "negative_prompt")) -> None:
    """Inversions, one P2P edit with SPL, and the virtual edit, on one damped model."""
    from editkit.images import load_image
    from s2edit.core.loading import load_model
    from s2edit.core.runtime import resolve_dtype
    from s2edit.core.settings import SPLSettings, VirtualSettings
    from s2edit.editing.editor import Editor
    from s2edit.editing.request import InversionRequest

    reset_peak(args.device)
    device = torch.device(args.device)
    sd = load_model(model, device=device, dtype=resolve_dtype("auto", device), seed=0)
    with torch.no_grad():
        sd.unet.conv_out.weight.mul_(0.1)
        sd.unet.conv_out.bias.mul_(0.1)
    editor = Editor(sd, weights=model, progress=False)
    image = load_image(IMAGE, resolution, multiple=sd.size_multiple)
    at = f"{model} {resolution}²"
    steps = 2 if args.smoke else 50
    dtype = str(sd.dtype).removeprefix("torch.")
    inversions = {}
    for method in inversions_of:
        reset_peak(args.device)
        seconds, inversions[method] = timed(
            lambda m=method: editor.invert(image, SOURCE, InversionRequest(m, steps)),
            args.device,
        )
        paper = PAPER_A100["null_text inversion"] if (model, method) == (SD1, "null_text") else ""
        label = f"{at}: {method} inversion, {steps} steps ({dtype})"
        rows.append([label, f"{seconds:.1f} s", peak_gib(args.device), paper])
        print(rows[-1], flush=True)
    reset_peak(args.device)
    seconds, result = timed(
        lambda: editor.edit(inversions["null_text"], [TARGET], spl=SPLSettings()), args.device
    )
    spl_steps = len(result.metrics["spl_in_loop"])
    paper = PAPER_A100["P2P edit + SPL"] if model == SD1 else ""
    rows.append([f"{at}: P2P edit, {steps} steps, SPL in {spl_steps} steps + post-processing",
                 f"{seconds:.1f} s", peak_gib(args.device), paper])
    print(rows[-1], flush=True)
    virtual = VirtualSettings(steps=2 if args.smoke else 15)
    for spl in (SPLSettings(), SPLSettings(structure=False, postprocess=False)):
        reset_peak(args.device)
        seconds, result = timed(
            lambda s=spl: editor.edit_virtual(image, SOURCE, [TARGET], virtual=virtual, spl=s), args.device
        )
        what = f"SPL in {len(result.metrics['spl_in_loop'])} steps + post" if spl.active else "no SPL"
        target = "target < 2 s at 512² (H100/H200)" if model == SD1 else ""
        rows.append([f"{at}: virtual edit (SPEC §9), {virtual.steps} steps, {what}", f"{seconds:.2f} s",
                     peak_gib(args.device), target])
        print(rows[-1], flush=True)


def spl_iterations(args: argparse.Namespace, rows: list[list[str]]) -> None:
    """100 iterations of `spl.refine` (SPL + CPL) at 512² and 1024²."""
    from spl.refine import refine

    iterations = 3 if args.smoke else 100
    for side in ((128,) if args.smoke else (512, 1024)):
        reset_peak(args.device)
        generator = torch.Generator().manual_seed(0)
        source, edited = (torch.rand(2, 1, 3, side, side, generator=generator) * 2 - 1).to(args.device)
        refine(source, edited, iterations=2, color_weight=1e3)  # warm-up
        seconds, _ = timed(lambda s=source, e=edited: refine(s, e, iterations=iterations, color_weight=1e3),
                           args.device)
        label = f"{iterations} SPL + CPL iterations at {side}²"
        rows.append([label, f"{seconds:.3f} s", peak_gib(args.device), ""])
        print(rows[-1], flush=True)


def flow_editing(args: argparse.Namespace, rows: list[list[str]], model: str, resolution: int) -> None:
    """One FlowEdit edit with SPL on a flow model, on the GPU and then with model CPU offload."""
    from editkit.images import load_image
    from s2edit.core.loading import random_model
    from s2edit.core.runtime import resolve_dtype
    from s2edit.core.settings import FlowEditSettings, SPLSettings
    from s2edit.editing.editor import Editor
    from s2edit.editing.flowedit import resolved
    from s2edit.editing.request import EditRequest

    reset_peak(args.device)
    device = torch.device(args.device)
    seconds, flow = timed(lambda: random_model(model, seed=0, device=device).eval()
                          .to(dtype=resolve_dtype("auto", device)), args.device)
    at = f"{model} {resolution}²"
    dtype = str(flow.dtype).removeprefix("torch.")
    rows.append([f"{at}: random init on the device + cast ({dtype})", f"{seconds:.1f} s",
                 peak_gib(args.device), ""])
    print(rows[-1], flush=True)
    editor = Editor(flow, weights=model, progress=False)
    image = load_image(IMAGE, resolution, multiple=flow.size_multiple)
    settings = FlowEditSettings(steps=4, n_max=3) if args.smoke else FlowEditSettings()
    spl = SPLSettings(iterations=3) if args.smoke else SPLSettings()
    request = EditRequest(method="flowedit", flowedit=settings, spl=spl)
    paper = resolved(settings, flow.name)
    for offload in (False, True):
        if offload:
            flow.enable_offload(device)
        reset_peak(args.device)
        seconds, result = timed(lambda: editor.run(image, SOURCE, [TARGET], request, method="flowedit"),
                                args.device)
        how = " + model CPU offload" if offload else ""
        label = (f"{at}: FlowEdit T {paper.steps}, n_max {paper.n_max}, SPL in "
                 f"{len(result.metrics['spl_in_loop'])} steps + post-processing{how} ({dtype})")
        rows.append([label, f"{seconds:.1f} s", peak_gib(args.device), ""])
        print(rows[-1], flush=True)


# ----------------------------------------------------------------------------------------- main


def table(args: argparse.Namespace, rows: list[list[str]], seconds: float) -> str:
    import diffusers
    import lightning

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    lines = [
        f"### GPU suite ({'smoke: tiny models, 2 steps, 128², CPU' if args.smoke else 'full-size models'})",
        "",
        f"{datetime.date.today().isoformat()}, {device}, torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, lightning {lightning.__version__}; {args.model} at {args.resolution}², "
        f"{args.sdxl_model} at {args.sdxl_resolution}², {args.sd3_model} and {args.flux_model} at "
        f"{args.flow_resolution}²; whole suite {seconds:.0f} s.",
        "",
        "| measurement | result | peak GPU memory (GiB) | paper (A100, SD v1-4, 512²) / target |",
        "|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu_results.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--model", default=SD1)
    parser.add_argument("--sdxl-model", default=SDXL)
    parser.add_argument("--sdxl-resolution", type=int, default=1024)
    parser.add_argument("--sd3-model", default=SD3)
    parser.add_argument("--flux-model", default=FLUX)
    parser.add_argument("--flow-resolution", type=int, default=1024)
    parser.add_argument("--smoke", action="store_true", help="tiny models, 2 steps, 128², for CI on a CPU")
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "edit", "spl", "sdxl", "flow"])
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.resolution, args.sdxl_model, args.sdxl_resolution = "tiny", 128, "tiny-xl", 128
        args.sd3_model, args.flux_model, args.flow_resolution = "tiny-sd3", "tiny-flux", 128
    start = time.perf_counter()
    rows: list[list[str]] = []
    sections = {
        "train": lambda: fine_tuning(args, rows, args.model, args.resolution),
        "edit": lambda: editing(args, rows, args.model, args.resolution),
        "spl": lambda: spl_iterations(args, rows),
        "sdxl": lambda: (fine_tuning(args, rows, args.sdxl_model, args.sdxl_resolution, methods=("lora",)),
                         editing(args, rows, args.sdxl_model, args.sdxl_resolution,
                                 inversions_of=("null_text", "direct"))),
        "flow": lambda: (flow_editing(args, rows, args.sd3_model, args.flow_resolution),
                         flow_editing(args, rows, args.flux_model, args.flow_resolution)),
    }
    for name, section in sections.items():
        if name not in args.skip:
            section()
    text = table(args, rows, time.perf_counter() - start)
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
