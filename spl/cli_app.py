"""`python -m spl`: structure-preserving post-processing of an edited image against its source (SPEC §5).

    python -m spl source=photo.png edited=edit.png out=refined.png [color=true] [mask=area.png] ...

The edited image is resized to the source's working size, refined with SPL (+ CPL when `color=true`),
and saved atomically; one `report:` line gives the losses before and after. `out` must lie in an existing,
writable folder and never be one of the inputs (also through a symlink, a relative path or a hard link).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from editkit.config import parse_config, run_main, setting
from editkit.errors import InputError
from editkit.files import io_errors, refuse_overwriting_inputs
from editkit.images import load_image, load_mask, resize_to, save_image
from spl.losses import color_preservation_loss, structure_preservation_loss
from spl.refine import refine

PROG = "python -m spl"
REQUIRED = ("source", "edited", "out")
MAX_RESOLUTION = 2048  # as s2edit.config.MAX_RESOLUTION (spl/ never imports s2edit/; a test keeps them equal)


@dataclass
class SPLToolConfig:
    """Settings of the standalone SPL post-processing tool (defaults: SPEC §5, §7)."""

    source: str | None = setting(None, "reference image whose structure to keep (required)")
    edited: str | None = setting(None, "edited image to refine (required)")
    out: str | None = setting(None, "output image path, .png/.jpg/.webp, in an existing folder (required); "
                                    "never one of the inputs")
    resolution: int | None = setting(512, "working size: area ≈ resolution², sides multiples of 64; null = "
                                          "the source's own size", ge=64, le=MAX_RESOLUTION)
    structure_weight: float = setting(1e4, "λ_s, weight of the structure loss SPL", ge=0)
    color: bool = setting(False, "also apply the color preservation loss CPL")
    color_weight: float = setting(1e3, "λ_c, weight of CPL when color=true", ge=0)
    iterations: int = setting(100, "SGD iterations on the pixels", ge=0, le=100000)
    lr: float = setting(1.0, "SGD learning rate", gt=0)
    momentum: float = setting(0.9, "SGD momentum", ge=0, lt=1)
    radius: int = setting(5, "SPL window radius r (windows of (2r+1)²)", ge=0, le=1000)
    eps: float = setting(1e-4, "SPL ridge ε of the local linear models", gt=0)
    mask: str | None = setting(None, "optional mask image: the losses apply where it is white")
    mask_invert: bool = setting(False, "apply the losses where the mask is black")
    device: str = setting("auto", "where to compute", choices=("auto", "cpu", "cuda"))


def check_config(cfg: SPLToolConfig) -> None:
    """Refuse missing keys and outputs that cannot or must not be written, before loading anything
    (the ranges of the numbers are checked by `parse_config`, from the fields above)."""
    for key in REQUIRED:
        if not getattr(cfg, key):
            raise InputError(f"missing required key '{key}' "
                             f"(usage: {PROG} source=a.png edited=b.png out=c.png)")
    out = Path(cfg.out)
    if out.suffix.lower() not in Image.registered_extensions():
        raise InputError(f"out '{cfg.out}' has no image extension (use .png, .jpg or .webp)")
    if out.is_dir():
        raise InputError(f"out '{cfg.out}' is a directory; give a file name such as refined.png")
    refuse_overwriting_inputs("out", cfg.out, {"source": cfg.source, "edited": cfg.edited, "mask": cfg.mask},
                              files=[out])
    folder = out.parent
    if not folder.is_dir():
        cause = "is a file" if folder.exists() else "does not exist"
        raise InputError(f"out='{cfg.out}': its folder '{folder}' {cause}; create the folder or choose "
                         "another out=")
    if not os.access(folder, os.W_OK):
        raise InputError(f"out='{cfg.out}': its folder '{folder}' is not writable (read-only or no "
                         "permission); choose another out=")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("device=cuda was asked for but no CUDA device is available (use device=cpu)")


def main(argv: list[str]) -> None:
    # 1. Parse and check the settings.
    cfg = parse_config(SPLToolConfig, argv, prog=PROG, description=__doc__.strip().splitlines()[0])
    check_config(cfg)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")

    # 2. Load the images at one working size: the source's; the edited image is resized to it.
    source = load_image(cfg.source, resolution=cfg.resolution)                     # (1, 3, H, W)
    size = tuple(source.shape[-2:])
    edited = resize_to(load_image(cfg.edited, resolution=None, multiple=1), size)  # (1, 3, H, W)
    mask = None
    if cfg.mask:
        mask = load_mask(cfg.mask, size)                                            # (H, W) in [0, 1]
        if cfg.mask_invert:
            mask = 1.0 - mask
            if mask.max() <= 0:
                raise InputError(f"mask '{cfg.mask}' is all white, so mask_invert=true selects nothing")
        mask = mask.to(device)
    source, edited = source.to(device), edited.to(device)

    # 3. Refine and measure.
    color_weight = cfg.color_weight if cfg.color else 0.0
    start = time.perf_counter()
    refined = refine(source, edited, mask, structure_weight=cfg.structure_weight, color_weight=color_weight,
                     iterations=cfg.iterations, lr=cfg.lr, momentum=cfg.momentum, radius=cfg.radius,
                     eps=cfg.eps)
    seconds = time.perf_counter() - start
    spl_before = structure_preservation_loss(source, edited, mask, cfg.radius, cfg.eps).item()
    spl_after = structure_preservation_loss(source, refined, mask, cfg.radius, cfg.eps).item()
    cpl = ""
    if cfg.color:
        cpl_before = color_preservation_loss(source, edited, mask).item()
        cpl_after = color_preservation_loss(source, refined, mask).item()
        cpl = f" cpl {cpl_before:.4g} -> {cpl_after:.4g}"

    # 4. Save atomically (a full disk leaves no partial file: one line naming it) and report.
    with io_errors(cfg.out):
        out = save_image(refined.cpu(), cfg.out)
    print(f"report: spl {spl_before:.4g} -> {spl_after:.4g}{cpl} | {size[1]}x{size[0]}, {cfg.iterations} "
          f"iterations on {device.type}, {seconds:.1f} s | saved {out}")


def cli() -> None:
    """The `python -m spl` / `s2edit-spl` command."""
    run_main(main)
