"""`python -m spl`: structure-preserving post-processing of an edited image against its source (SPEC §5).

    python -m spl source=photo.png edited=edit.png out=refined.png [color=true] [mask=area.png] ...

The edited image is resized to the source's working size, refined with SPL (+ CPL when `color=true`),
and saved atomically; one `report:` line gives the losses before and after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from editkit.config import parse_config
from editkit.errors import InputError
from editkit.images import load_image, load_mask, resize_to, save_image
from spl.losses import color_preservation_loss, structure_preservation_loss
from spl.refine import refine

PROG = "python -m spl"
REQUIRED = ("source", "edited", "out")


@dataclass
class SPLToolConfig:
    """Settings of the standalone SPL post-processing tool (defaults: SPEC §5, §7)."""

    source: str | None = field(
        default=None, metadata={"help": "reference image whose structure to keep (required)"})
    edited: str | None = field(default=None, metadata={"help": "edited image to refine (required)"})
    out: str | None = field(default=None, metadata={"help": "output image path, .png/.jpg/.webp (required)"})
    resolution: int | None = field(
        default=512, metadata={"help": "working size: area ≈ resolution², sides multiples of 64; null = "
                                       "the source's own size"})
    structure_weight: float = field(default=1e4, metadata={"help": "λ_s, weight of the structure loss SPL"})
    color: bool = field(default=False, metadata={"help": "also apply the color preservation loss CPL"})
    color_weight: float = field(default=1e3, metadata={"help": "λ_c, weight of CPL when color=true"})
    iterations: int = field(default=100, metadata={"help": "SGD iterations on the pixels"})
    lr: float = field(default=1.0, metadata={"help": "SGD learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    radius: int = field(default=5, metadata={"help": "SPL window radius r (windows of (2r+1)²)"})
    eps: float = field(default=1e-4, metadata={"help": "SPL ridge ε of the local linear models"})
    mask: str | None = field(
        default=None, metadata={"help": "optional mask image: the losses apply where it is white"})
    mask_invert: bool = field(default=False, metadata={"help": "apply the losses where the mask is black"})
    device: str = field(
        default="auto", metadata={"help": "where to compute", "choices": ["auto", "cpu", "cuda"]})


def check_config(cfg: SPLToolConfig) -> None:
    """Refuse missing or impossible values before loading anything, naming the key."""
    for key in REQUIRED:
        if not getattr(cfg, key):
            raise InputError(f"missing required key '{key}' "
                             f"(usage: {PROG} source=a.png edited=b.png out=c.png)")
    if Path(cfg.out).suffix.lower() not in Image.registered_extensions():
        raise InputError(f"out '{cfg.out}' has no image extension (use .png, .jpg or .webp)")
    if Path(cfg.out).is_dir():
        raise InputError(f"out '{cfg.out}' is a directory; give a file name such as refined.png")
    checks = {
        "iterations": cfg.iterations >= 0, "radius": cfg.radius >= 0, "eps": cfg.eps > 0,
        "structure_weight": cfg.structure_weight >= 0, "color_weight": cfg.color_weight >= 0,
        "lr": cfg.lr > 0, "momentum": 0 <= cfg.momentum < 1,
        "resolution": cfg.resolution is None or cfg.resolution >= 64,
    }
    for key, ok in checks.items():
        if not ok:
            raise InputError(f"config key '{key}' has an impossible value {getattr(cfg, key)!r}")
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

    # 4. Save atomically and report.
    out = save_image(refined.cpu(), cfg.out)
    print(f"report: spl {spl_before:.4g} -> {spl_after:.4g}{cpl} | {size[1]}x{size[0]}, {cfg.iterations} "
          f"iterations on {device.type}, {seconds:.1f} s | saved {out}")
