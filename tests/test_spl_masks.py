"""Attention-mask binarisation and guided-filter upsampling (SPEC §6)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from spl.filters import guided_filter
from spl.masks import binarize_attention, upsample_mask


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Many small ops per stage; on a shared 2-core machine OpenMP barriers stall whenever another
    process holds a core, so the module runs single-threaded (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def disk(height: int, width: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return (((yy - 0.45 * height) ** 2 + (xx - 0.55 * width) ** 2) < (0.28 * min(height, width)) ** 2).float()


def rotated_square(height: int, width: int, angle: float = 0.5) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    u = (xx - 0.5 * width) * math.cos(angle) + (yy - 0.5 * height) * math.sin(angle)
    v = -(xx - 0.5 * width) * math.sin(angle) + (yy - 0.5 * height) * math.cos(angle)
    half = 0.25 * min(height, width)
    return ((u.abs() < half) & (v.abs() < half)).float()


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("shape", [disk, rotated_square])
@pytest.mark.parametrize(("coarse", "fine"), [((16, 16), (512, 512)), ((16, 24), (512, 768))])
def test_guided_upsampling_beats_bilinear(shape, coarse: tuple[int, int], fine: tuple[int, int]) -> None:
    """A 16×16 attention-like mask (area average of the true shape) upsampled with the photo as guide
    follows the shape's edges better than plain bilinear upsampling."""
    truth = shape(*fine)                                                 # (H, W) in {0, 1}
    image = (0.2 + 0.6 * truth)[None, None].expand(1, 3, *fine) * 2 - 1  # sharp shape, flat background
    mask = F.adaptive_avg_pool2d(truth[None, None], coarse)[0, 0]        # (h, w) soft
    guided = upsample_mask(mask, image)
    bilinear = F.interpolate(mask[None, None], size=fine, mode="bilinear", align_corners=False)[0, 0]
    assert guided.shape == fine
    assert guided.min() >= 0 and guided.max() <= 1
    guided_iou, bilinear_iou = iou(guided > 0.5, truth > 0.5), iou(bilinear > 0.5, truth > 0.5)
    assert guided_iou > bilinear_iou, (guided_iou, bilinear_iou)


def test_stages_match_spec() -> None:
    """16×16 → 64×64 is two ×2 stages: r = 1 then r = 2, gray guide area-downsampled to 32² first."""
    torch.manual_seed(0)
    mask = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    guide = torch.rand(1, 3, 64, 64, dtype=torch.float64) * 2 - 1
    gray = ((guide + 1) / 2).mean(1, keepdim=True)
    m = F.interpolate(mask, size=(32, 32), mode="bilinear", align_corners=False)
    g32 = F.interpolate(gray, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    m = guided_filter(g32, m, 1, 1e-2).clamp(0, 1)
    m = F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False)
    expected = guided_filter(gray, m, 2, 1e-2).clamp(0, 1)
    torch.testing.assert_close(upsample_mask(mask, guide), expected)


def test_non_power_of_two_and_batches() -> None:
    torch.manual_seed(1)
    guide = torch.rand(2, 3, 100, 150) * 2 - 1
    out = upsample_mask(torch.rand(2, 1, 16, 16), guide, mode="bicubic")
    assert out.shape == (2, 1, 100, 150) and out.min() >= 0 and out.max() <= 1
    # an RGB guide and its gray mean (both in [-1, 1]) give the same mask
    mask = torch.rand(16, 16, dtype=torch.float64)
    rgb = guide[:1].double()
    torch.testing.assert_close(upsample_mask(mask, rgb), upsample_mask(mask, rgb.mean(1, keepdim=True)))
    assert upsample_mask(mask.double(), guide[:1]).dtype == torch.float64
    with pytest.raises(ValueError, match="guide batch"):
        upsample_mask(mask, guide)                                       # 2-D mask, two guides
    with pytest.raises(ValueError, match="mode"):
        upsample_mask(mask, guide[:1], mode="nearest")


def test_binarize_attention() -> None:
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0], maps[0, 1, 1] = 10.0, 6.0      # word 0: 0.6 of its max at (1, 1)
    maps[1, 2, 2], maps[1, 3, 3] = 0.2, 0.05      # word 1: faint overall, but its own max counts
    # word 2 is all zeros: no NaN, no pixels
    out = binarize_attention(maps, threshold=0.5)
    expected = torch.zeros(4, 4)
    expected[0, 0] = expected[1, 1] = expected[2, 2] = 1
    assert torch.equal(out, expected)
    stricter = expected.clone()
    stricter[1, 1] = 0                            # 0.6 of word 0's max is below 0.7
    assert torch.equal(binarize_attention(maps, threshold=0.7), stricter)
    batched = binarize_attention(torch.stack([maps, maps.flip(-1)]), 0.5)
    assert batched.shape == (2, 4, 4) and torch.equal(batched[1], expected.flip(-1))
