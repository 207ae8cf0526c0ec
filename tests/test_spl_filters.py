"""Box and guided filters against brute-force loops over clipped windows (SPEC §5, §6)."""

from __future__ import annotations

import pytest
import torch

from spl.filters import box_filter, box_sum, guided_filter, window_count

SHAPES = [(1, 1), (1, 7), (6, 1), (2, 3), (9, 13), (16, 5)]
RADII = [0, 1, 2, 5, 20]


def brute_box(x: torch.Tensor, radius: int, reduce: str = "mean") -> torch.Tensor:
    """Explicit loop over window centres; the window is clipped to the image."""
    height, width = x.shape[-2:]
    out = torch.empty_like(x)
    for i in range(height):
        for j in range(width):
            window = x[..., max(0, i - radius) : i + radius + 1, max(0, j - radius) : j + radius + 1]
            out[..., i, j] = window.mean(dim=(-2, -1)) if reduce == "mean" else window.sum(dim=(-2, -1))
    return out


def brute_guided(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """He et al. written window by window: per-window ridge fit of src on guide, then averaged models."""
    height, width = guide.shape[-2:]
    a = torch.empty(src.shape, dtype=src.dtype)
    b = torch.empty(src.shape, dtype=src.dtype)
    for i in range(height):
        for j in range(width):
            rows = slice(max(0, i - radius), i + radius + 1)
            cols = slice(max(0, j - radius), j + radius + 1)
            g = guide[:, :, rows, cols].flatten(2)                   # (B, 1, n)
            p = src[:, :, rows, cols].flatten(2)                     # (B, C, n)
            g_mean, p_mean = g.mean(-1), p.mean(-1)
            cov = ((g - g_mean[..., None]) * (p - p_mean[..., None])).mean(-1)
            var = ((g - g_mean[..., None]) ** 2).mean(-1)
            a[:, :, i, j] = cov / (var + eps)
            b[:, :, i, j] = p_mean - a[:, :, i, j] * g_mean
    return brute_box(a, radius) * guide + brute_box(b, radius)


@pytest.mark.parametrize("shape", SHAPES)
def test_box_filter_matches_brute_force(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, *shape, dtype=torch.float64)
    for radius in RADII:
        torch.testing.assert_close(box_filter(x, radius), brute_box(x, radius), rtol=0, atol=1e-12)
        torch.testing.assert_close(box_sum(x, radius), brute_box(x, radius, "sum"), rtol=0, atol=1e-11)


def test_box_filter_float32_close_to_float64_and_keeps_dtype() -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 2, 300, 257, dtype=torch.float64)
    for radius in (1, 5, 40):
        out = box_filter(x.float(), radius)
        assert out.dtype == torch.float32
        # a row's running sum reaches ~W/2 = 128, where float32 spacing is ~8e-6
        torch.testing.assert_close(out.double(), box_filter(x, radius), rtol=0, atol=1e-5)
    assert box_filter(x.to(torch.bfloat16), 3).dtype == torch.bfloat16


def test_radius_larger_than_image_is_the_global_mean() -> None:
    x = torch.rand(2, 1, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(box_filter(x, 50), x.mean(dim=(-2, -1), keepdim=True).expand_as(x))
    assert torch.equal(window_count(5, 8, 50), torch.full((5, 8), 40.0))


def test_window_count_and_adjoint() -> None:
    """<box_filter(x), g> = <x, box_sum(g / n)>: the adjoint used by the closed-form SPL gradient."""
    torch.manual_seed(1)
    x, g = torch.rand(2, 3, 7, 11, dtype=torch.float64), torch.rand(2, 3, 7, 11, dtype=torch.float64)
    for radius in (0, 1, 3, 9):
        counts = window_count(7, 11, radius, dtype=torch.float64)
        torch.testing.assert_close(counts, brute_box(torch.ones(7, 11, dtype=torch.float64), radius, "sum"))
        lhs = (box_filter(x, radius) * g).sum()
        rhs = (x * box_sum(g / counts, radius)).sum()
        torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=0)


def test_box_filter_autograd() -> None:
    x = torch.rand(1, 2, 6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: box_filter(t, 2), (x,))
    assert torch.autograd.gradgradcheck(lambda t: box_sum(t, 1), (x,))


def test_box_filter_rejects_bad_radius() -> None:
    with pytest.raises(ValueError, match="radius"):
        box_filter(torch.rand(1, 1, 4, 4), -1)
    with pytest.raises(ValueError, match="radius"):
        box_filter(torch.rand(1, 1, 4, 4), 1.5)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 1), (8, 11)])
def test_guided_filter_matches_brute_force(shape: tuple[int, int]) -> None:
    torch.manual_seed(2)
    guide = torch.rand(2, 1, *shape, dtype=torch.float64)
    src = torch.rand(2, 3, *shape, dtype=torch.float64)
    for radius, eps in [(0, 1e-2), (1, 1e-2), (2, 1e-4), (12, 1e-1)]:
        torch.testing.assert_close(guided_filter(guide, src, radius, eps),
                                   brute_guided(guide, src, radius, eps), rtol=1e-10, atol=1e-12)


def test_guided_filter_preserves_edges_that_a_box_filter_blurs() -> None:
    """A step edge in both guide and input survives the guided filter (small ε), unlike a box mean."""
    step = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    step[..., 8:] = 1.0
    out = guided_filter(step, step, radius=3, eps=1e-4)
    assert (out - step).abs().max() < 1e-3
    assert (box_filter(step, 3) - step).abs().max() > 0.3
