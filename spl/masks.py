"""Cross-attention masks: binarisation and guided-filter upsampling (SPEC §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from spl.filters import guided_filter

__all__ = ["binarize_attention", "upsample_mask"]


def binarize_attention(maps: Tensor, threshold: float = 0.5) -> Tensor:
    """OR over words of (word map / its max > threshold) (SPEC §6). maps: (..., K, h, w) → (..., h, w).

    Each of the K words' maps is divided by its own spatial max (an all-zero map stays zero). Returns a
    float tensor of 0/1 in the maps' floating dtype (float32 for integer input).
    """
    if maps.dim() < 3:
        raise ValueError(f"binarize_attention needs maps (..., K, h, w), got shape {tuple(maps.shape)}")
    maps = maps if maps.is_floating_point() else maps.float()
    peak = maps.amax(dim=(-2, -1), keepdim=True)                      # (..., K, 1, 1)
    normalised = maps / peak.clamp_min(torch.finfo(maps.dtype).tiny)
    return (normalised > threshold).any(dim=-3).to(maps.dtype)


def _gray_guide(guide: Tensor) -> Tensor:
    """Guide in [-1, 1], (B, 3, H, W) or (B, 1, H, W) → gray (B, 1, H, W) in [0, 1], fp32 (fp64 stays)."""
    if guide.dim() != 4 or guide.shape[1] not in (1, 3):
        raise ValueError(f"guide must be (B, 3, H, W) or (B, 1, H, W), got shape {tuple(guide.shape)}")
    dtype = torch.float64 if guide.dtype == torch.float64 else torch.float32
    return ((guide.to(dtype) + 1.0) / 2.0).mean(dim=1, keepdim=True)  # plain mean of R, G, B (SPEC §5)


def _stage_sizes(coarse: tuple[int, int], fine: tuple[int, int]) -> list[tuple[int, int]]:
    """×2 per stage from `coarse` towards `fine`, each side capped at its target; the last stage is `fine`.

    16×24 → 512×768 gives 32×48, 64×96, …, 512×768; a ratio that is not a power of two ends with a
    smaller last step (16×16 → 500×700: …, 256×256, 500×512, 500×700).
    """
    (h, w), (height, width) = coarse, fine
    sizes = []
    while (h, w) != (height, width):
        h, w = min(2 * h, height) if h < height else height, min(2 * w, width) if w < width else width
        sizes.append((h, w))
    return sizes or [fine]


def upsample_mask(mask: Tensor, guide: Tensor, radius: int = 1, eps: float = 1e-2, radius_step: int = 1,
                  mode: str = "bilinear") -> Tensor:
    """Progressive ×2 guided-filter upsampling of a coarse mask to the guide's size (SPEC §6).

    mask: (h, w) or (B, 1, h, w) in [0, 1]; guide: image in [-1, 1], RGB (B, 3, H, W) or gray (B, 1, H, W).
    Per stage: resize the mask ×2 (`mode`: "bilinear" or "bicubic"; the last stage lands exactly on H×W),
    area-downsample the gray guide (antialiased) to the stage size, guided filter with radius
    r = radius + stage·radius_step and `eps`, clamp to [0, 1].
    Returns (B, 1, H, W), or (H, W) for a 2-D mask, in the mask's floating dtype (fp32 inside).
    """
    # 1. Check inputs.
    if mask.dim() not in (2, 4) or (mask.dim() == 4 and mask.shape[1] != 1):
        raise ValueError(f"mask must be (h, w) or (B, 1, h, w), got shape {tuple(mask.shape)}")
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"mode must be 'bilinear' or 'bicubic', got {mode!r}")
    gray = _gray_guide(guide)                                          # (Bg, 1, H, W)
    out_dtype = mask.dtype if mask.is_floating_point() else gray.dtype
    m = (mask[None, None] if mask.dim() == 2 else mask).to(device=gray.device, dtype=gray.dtype)
    if (mask.dim() == 2 and gray.shape[0] != 1) or m.shape[0] not in (1, gray.shape[0]):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the guide batch {gray.shape[0]}; "
                         "use a (B, 1, h, w) mask for a batch of guides")

    # 2. ×2 stages: resize the mask, shrink the guide to match, guided filter, clamp.
    for stage, size in enumerate(_stage_sizes(tuple(m.shape[-2:]), tuple(gray.shape[-2:]))):
        m = F.interpolate(m, size=size, mode=mode, align_corners=False)
        stage_guide = gray if size == tuple(gray.shape[-2:]) else \
            F.interpolate(gray, size=size, mode="bilinear", antialias=True, align_corners=False)
        m = guided_filter(stage_guide, m, radius + stage * radius_step, eps).clamp_(0.0, 1.0)

    m = m.to(out_dtype)
    return m[0, 0] if mask.dim() == 2 else m
