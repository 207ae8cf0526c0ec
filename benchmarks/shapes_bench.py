"""Score every editing method on the shapes world (`model=shapes`): edits checked against ground truth.

    python benchmarks/shapes_bench.py [--per-combination 1] [--steps 25] [--methods …] [--out table.md]

The fixed held-out benchmark (`s2edit.shapes.world.benchmark_specs`: the colour-shape pairs training never
showed, on every background) is edited twice per scene: a colour swap ("a red square …" → "a green square
…") and a shape swap ("… red square …" → "… red triangle …"). Each edit is scored on the image, against the
scene's ground truth (`s2edit.shapes.scorers`):

- colour swap: success = the object (segmented against the known background) has the target colour AND
  still classifies as the source shape; its IoU with the source object (structure kept); PSNR outside the
  object;
- shape swap: success = the object classifies as the target shape AND keeps the source colour; its IoU with
  the ground-truth render of the edit; PSNR outside both objects;
- seconds per edit (half the scene's inversion counted in; the rows that share an inversion method
  compute it once, the later ones load it from the cache).

Rows: the prompt swap (DDIM inversion, no attention control), null-text / Direct inversion + P2P, with and
without SPL, Direct + P2P + LocalBlend, and the virtual-inversion editor with and without SPL. "+ SPL" is
SPEC §5 on the whole image for colour swaps; for shape swaps its preservation area is the background (the
background word's attention mask, SPEC §6), since a new shape must not be pulled back onto the old one.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editkit.files import atomic_path
from s2edit.core.settings import MaskSettings, P2PSettings, SPLSettings, VirtualSettings
from s2edit.editing.editor import Editor
from s2edit.editing.request import InversionRequest
from s2edit.shapes.data import images_to_model, model_to_images
from s2edit.shapes.scorers import classify_shape, dominant_colour, iou, psnr_outside, segment_object
from s2edit.shapes.world import COLOURS, SHAPES, SceneSpec, benchmark_specs, edited, render

NO_SPL = SPLSettings(structure=False, color=False)


@dataclass(frozen=True)
class Method:
    """One row: how a scene is edited (`inversion` None: the virtual editor)."""

    label: str
    inversion: str | None
    spl: bool = False
    p2p: P2PSettings | None = None  # None: the defaults (SPEC §4)
    blend: bool = False


METHODS = [
    Method("prompt swap (DDIM inversion, no attention control)", "ddim",
           p2p=P2PSettings(cross_replace=0.0, self_replace=0.0)),
    Method("null-text + P2P", "null_text"),
    Method("null-text + P2P + SPL", "null_text", spl=True),
    Method("Direct + P2P", "direct"),
    Method("Direct + P2P + SPL", "direct", spl=True),
    Method("Direct + P2P + LocalBlend", "direct", blend=True),
    Method("virtual (SPEC §9)", None),
    Method("virtual + SPL", None, spl=True),
]


@dataclass(frozen=True)
class Edit:
    kind: str  # "colour" or "shape"
    source: SceneSpec
    truth: SceneSpec  # the ground truth of the edit
    word: str  # the swapped source word
    new_word: str  # its replacement


def edits_of(spec: SceneSpec) -> list[Edit]:
    """The colour swap (to the next palette colour) and the shape swap (to the next shape) of a scene."""
    colours, shapes = list(COLOURS), list(SHAPES)
    colour = colours[(colours.index(spec.colour) + 1) % len(colours)]
    shape = shapes[(shapes.index(spec.shape) + 1) % len(shapes)]
    return [Edit("colour", spec, edited(spec, colour=colour), spec.colour, colour),
            Edit("shape", spec, edited(spec, shape=shape), spec.shape, shape)]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (1, 3, H, W) in [-1, 1]."""
    return images_to_model(torch.from_numpy(image)[None])


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] → (H, W, 3) uint8."""
    return model_to_images(image[None])[0].numpy()


def score(edit: Edit, image: np.ndarray) -> dict[str, float]:
    """Success, IoU and outside-PSNR of one edited image (see the module docstring)."""
    source, truth = render(edit.source), render(edit.truth)
    found = segment_object(image, edit.source.background)
    colour, shape = dominant_colour(image, found), classify_shape(found) if found.any() else None
    if edit.kind == "colour":
        success = colour == edit.truth.colour and shape == edit.source.shape
        overlap = iou(found, source.mask)
    else:
        success = shape == edit.truth.shape and colour == edit.source.colour
        overlap = iou(found, truth.mask)
    outside = psnr_outside(image, source.image, source.mask | truth.mask)
    return {"success": float(success), "iou": overlap, "psnr": min(outside, 99.0)}


def spl_for(edit: Edit, method: Method) -> tuple[SPLSettings, MaskSettings]:
    """SPL on the whole image for colour swaps; on the background (its word's mask) for shape swaps."""
    if not method.spl:
        return NO_SPL, MaskSettings()
    if edit.kind == "colour":
        return SPLSettings(), MaskSettings()
    background = [edit.source.background]
    return (SPLSettings(structure_area="masked"),
            MaskSettings(source_words=background, target_words=background))


def run_method(editor: Editor, method: Method, specs: list[SceneSpec], steps: int,
               virtual_steps: int) -> dict[str, list[dict[str, float]]]:
    """Every edit of every scene with one method: {"colour": [scores], "shape": [scores]}."""
    scores: dict[str, list[dict[str, float]]] = {"colour": [], "shape": []}
    for spec in specs:
        image = to_tensor(render(spec).image)
        start = time.perf_counter()
        inversion = (editor.invert(image, spec.caption, InversionRequest(method.inversion, steps))
                     if method.inversion is not None else None)
        invert_seconds = time.perf_counter() - start
        for edit in edits_of(spec):
            target = edit.source.caption.replace(f" {edit.word} ", f" {edit.new_word} ", 1)
            spl, masks = spl_for(edit, method)
            start = time.perf_counter()
            if inversion is None:
                result = editor.edit_virtual(image, spec.caption, [target], spl=spl, masks=masks,
                                             virtual=VirtualSettings(steps=virtual_steps))
            else:
                p2p = method.p2p or P2PSettings()
                if method.blend:
                    p2p = replace(p2p, blend_words=[edit.word, edit.new_word])
                result = editor.edit(inversion, [target], p2p=p2p, spl=spl, masks=masks)
            seconds = time.perf_counter() - start + invert_seconds / 2
            scores[edit.kind].append({**score(edit, to_uint8(result.images[0])), "seconds": seconds})
    return scores


def mean(rows: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in rows if math.isfinite(r[key])]
    return statistics.fmean(values) if values else math.nan


def table(results: dict[str, dict[str, list[dict[str, float]]]], header: str) -> str:
    lines = [header, "",
             "| method | colour swap: success | object IoU with the source | PSNR outside (dB) | shape swap: "
             "success | IoU with the truth | PSNR outside (dB) | s / edit |",
             "|---|---|---|---|---|---|---|---|"]
    for label, scores in results.items():
        c, s = scores["colour"], scores["shape"]
        lines.append(f"| {label} | {mean(c, 'success'):.2f} | {mean(c, 'iou'):.3f} | {mean(c, 'psnr'):.1f} | "
                     f"{mean(s, 'success'):.2f} | {mean(s, 'iou'):.3f} | {mean(s, 'psnr'):.1f} | "
                     f"{mean(c + s, 'seconds'):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--per-combination", type=int, default=1,
                        help="scenes per held-out pair and background (3 pairs × 3 backgrounds each)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of the inversions and P2P edits")
    parser.add_argument("--virtual-steps", type=int, default=15)
    parser.add_argument("--methods", nargs="*", default=None, help="row labels to run (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import tempfile

    cache = tempfile.mkdtemp(prefix="shapes_bench_")  # each inversion once: the ±SPL rows share it
    editor = Editor.from_model(args.model, device="cpu", progress=False, cache_dir=cache)
    specs = benchmark_specs(args.per_combination)
    methods = [m for m in METHODS if args.methods is None or m.label in args.methods]
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for method in methods:
        results[method.label] = run_method(editor, method, specs, args.steps, args.virtual_steps)
        print(f"{method.label}: done", file=sys.stderr, flush=True)
    header = (f"model={args.model}, {len(specs)} held-out scenes × (colour swap, shape swap), "
              f"{args.steps} DDIM steps (virtual: {args.virtual_steps}); {platform.machine()}, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads")
    text = table(results, header)
    if args.out is not None:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
