"""SPL / CPL against per-window brute force, exact affine cases and autograd (SPEC §5)."""

from __future__ import annotations

import pytest
import torch

from spl.filters import box_filter
from spl.losses import (
    SPLReference,
    color_preservation_loss,
    cpl_loss_and_grad,
    spl_loss_and_grad,
    spl_window_map,
    structure_preservation_loss,
)

RADII = [1, 2, 5, 20]  # 20 > both sides of the 9×13 test images


def preprocess_brute(image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[-1, 1] → [0, 1], times the mask; float64."""
    x = (image.double() + 1) / 2
    if mask is not None:
        x = x * (mask.double() if mask.dim() == 4 else mask.double()[None, None])
    return x


def brute_spl(source: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor | None, radius: int,
              eps: float) -> torch.Tensor:
    """L_SPL by explicit loops: each clipped window fits its own two ridge regressions (detached) and
    averages the squared residuals over its pixels; then the mean over all window centres."""
    gray_s = preprocess_brute(source, mask).mean(1)                    # (B, H, W)
    gray_e = preprocess_brute(edited, mask).mean(1)
    batch, height, width = gray_e.shape
    total = gray_e.new_zeros(())
    for n in range(batch):
        for i in range(height):
            for j in range(width):
                rows = slice(max(0, i - radius), i + radius + 1)
                cols = slice(max(0, j - radius), j + radius + 1)
                s = gray_s[n, rows, cols].flatten()
                e = gray_e[n, rows, cols].flatten()
                s_d, e_d = s.detach(), e.detach()
                cov = ((s_d - s_d.mean()) * (e_d - e_d.mean())).mean()
                a = cov / (s_d.var(unbiased=False) + eps)
                b = e_d.mean() - a * s_d.mean()
                a_rev = cov / (e_d.var(unbiased=False) + eps)
                b_rev = s_d.mean() - a_rev * e_d.mean()
                total = total + ((a * s + b - e) ** 2).mean() + ((a_rev * e + b_rev - s) ** 2).mean()
    return total / (batch * height * width)


def brute_cpl(source: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """L_CPL with the SPEC's YCbCr formulas written out."""
    def cb_cr(x: torch.Tensor) -> torch.Tensor:
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        y = 0.299 * r + 0.587 * g + 0.114 * b
        return torch.stack([0.564 * (b - y) + 0.5, 0.713 * (r - y) + 0.5], dim=1)

    return ((cb_cr(preprocess_brute(edited, mask)) - cb_cr(preprocess_brute(source, mask))) ** 2).mean()


def random_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(seed)
    source = torch.rand(2, 3, 9, 13, generator=gen, dtype=torch.float64) * 2 - 1
    edited = (0.6 * source + 0.4 * (torch.rand(2, 3, 9, 13, generator=gen, dtype=torch.float64) * 2 - 1))
    masks = {
        "none": None,
        "hw": torch.rand(9, 13, generator=gen, dtype=torch.float64),
        "b1hw": (torch.rand(2, 1, 9, 13, generator=gen, dtype=torch.float64) > 0.3).double(),
    }
    return source, edited, masks


@pytest.mark.parametrize("mask_kind", ["none", "hw", "b1hw"])
def test_spl_matches_brute_force(mask_kind: str) -> None:
    source, edited, masks = random_pair()
    mask = masks[mask_kind]
    for radius in RADII:
        for eps in (1e-4, 1e-2):
            expected = brute_spl(source, edited, mask, radius, eps)
            actual = structure_preservation_loss(source, edited, mask, radius=radius, eps=eps)
            assert actual.dtype == torch.float64
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
            loss, _ = spl_loss_and_grad(SPLReference.from_source(source, mask, radius, eps), edited)
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("mask_kind", ["none", "hw", "b1hw"])
def test_cpl_matches_brute_force(mask_kind: str) -> None:
    source, edited, masks = random_pair(1)
    mask = masks[mask_kind]
    expected = brute_cpl(source, edited, mask)
    torch.testing.assert_close(color_preservation_loss(source, edited, mask), expected, rtol=1e-5, atol=0)
    loss, _ = cpl_loss_and_grad(SPLReference.from_source(source, mask), edited)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("mask_kind", ["none", "hw", "b1hw"])
def test_gradients_match_autograd_of_brute_force(mask_kind: str) -> None:
    """∂L/∂E three ways: autograd of the brute force (coefficients detached), autograd of the library
    loss, and the closed form used by `refine`."""
    source, edited, masks = random_pair(2)
    mask = masks[mask_kind]
    for radius in (1, 5):
        e_brute = edited.clone().requires_grad_()
        brute_spl(source, e_brute, mask, radius, 1e-4).backward()
        e_lib = edited.clone().requires_grad_()
        structure_preservation_loss(source, e_lib, mask, radius=radius).backward()
        _, closed_form = spl_loss_and_grad(SPLReference.from_source(source, mask, radius), edited)
        scale = e_brute.grad.abs().max()
        torch.testing.assert_close(e_lib.grad, e_brute.grad, rtol=0, atol=1e-9 * scale)
        torch.testing.assert_close(closed_form, e_brute.grad, rtol=0, atol=1e-9 * scale)

    e_brute = edited.clone().requires_grad_()
    brute_cpl(source, e_brute, mask).backward()
    e_lib = edited.clone().requires_grad_()
    color_preservation_loss(source, e_lib, mask).backward()
    _, closed_form = cpl_loss_and_grad(SPLReference.from_source(source, mask), edited)
    torch.testing.assert_close(e_lib.grad, e_brute.grad, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(closed_form, e_brute.grad, rtol=1e-9, atol=1e-15)


def affine_distance(var_i: torch.Tensor, slope: float, eps: float) -> torch.Tensor:
    """Exact D_fwd + D_rev of a window where P = slope·I + offset (the ridge ε keeps it from being 0):
    a = slope·σ²/(σ² + ε) leaves residual (a − slope)(I − μ_I), a' = slope·σ²/(slope²σ² + ε) leaves
    (a'·slope − 1)(I − μ_I)."""
    fwd = (slope * eps / (var_i + eps)) ** 2 * var_i
    rev = (eps / (slope**2 * var_i + eps)) ** 2 * var_i
    return fwd + rev


def test_global_affine_edit_has_zero_structure_loss() -> None:
    torch.manual_seed(3)
    source = torch.rand(2, 3, 24, 31, dtype=torch.float64) * 2 - 1
    edited = 0.5 * source + 0.1                      # gray(E') = 0.5·gray(S') + 0.3 exactly
    # With a vanishing ridge the local models are exact: L = 0 (up to rounding).
    assert structure_preservation_loss(source, edited, eps=1e-12) < 1e-12
    # With ε = 1e-4 every window's value is the closed form above.
    gray = ((source + 1) / 2).mean(1, keepdim=True)
    var_i = box_filter(gray * gray, 5) - box_filter(gray, 5) ** 2
    expected = affine_distance(var_i, 0.5, 1e-4)
    ref = SPLReference.from_source(source)
    torch.testing.assert_close(spl_window_map(ref, edited), expected, rtol=1e-6, atol=1e-15)
    # …which is tiny compared with an unrelated image.
    unrelated = torch.rand(2, 3, 24, 31, dtype=torch.float64) * 2 - 1
    assert structure_preservation_loss(source, edited) < 1e-3 * structure_preservation_loss(source, unrelated)


def test_piecewise_affine_edit_is_zero_away_from_the_seam() -> None:
    """Two different affine maps left and right: windows inside one half obey that half's closed form
    (exactly zero with a vanishing ridge); windows that straddle the seam do not."""
    torch.manual_seed(4)
    radius, seam = 3, 16
    source = torch.rand(1, 3, 20, 32, dtype=torch.float64) * 0.8 - 0.4
    edited = torch.where(torch.arange(32) < seam, 0.5 * source + 0.1, 1.5 * source - 0.3)
    inside = (torch.arange(32) < seam - radius) | (torch.arange(32) >= seam + radius)   # window in one half
    straddles = ~inside

    exact = spl_window_map(SPLReference.from_source(source, radius=radius, eps=1e-12), edited)[0, 0]
    assert exact[:, inside].abs().max() < 1e-12
    assert exact[:, straddles].min() > 1e-4

    gray = ((source + 1) / 2).mean(1, keepdim=True)
    var_i = (box_filter(gray * gray, radius) - box_filter(gray, radius) ** 2)[0, 0]
    window = spl_window_map(SPLReference.from_source(source, radius=radius), edited)[0, 0]
    left, right = torch.arange(32) < seam - radius, torch.arange(32) >= seam + radius
    for side, slope in ((left, 0.5), (right, 1.5)):
        expected = affine_distance(var_i[:, side], slope, 1e-4)
        torch.testing.assert_close(window[:, side], expected, rtol=1e-6, atol=0)


def test_cpl_ignores_luminance_and_sees_chroma() -> None:
    """Adding the same value to R, G and B moves Y only (.299 + .587 + .114 = 1): CPL = 0 exactly."""
    torch.manual_seed(5)
    source = torch.rand(1, 3, 8, 8, dtype=torch.float64) * 1.6 - 0.8
    assert color_preservation_loss(source, source + 0.15) < 1e-20
    tinted = source.clone()
    tinted[:, 0] += 0.2
    assert color_preservation_loss(source, tinted) > 1e-3


def test_mask_restricts_the_losses() -> None:
    """Outside a binary mask both images are zeroed, so edits there cost nothing."""
    torch.manual_seed(6)
    source = torch.rand(1, 3, 16, 16) * 2 - 1
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1
    edited = source.clone()
    edited[..., 8:] = torch.rand(1, 3, 16, 8) * 2 - 1
    assert structure_preservation_loss(source, edited, mask) < 1e-6
    assert color_preservation_loss(source, edited, mask) == 0
    assert structure_preservation_loss(source, edited) > 1e-3


def test_float32_inputs_run_in_float32_and_shapes_are_checked() -> None:
    source = torch.rand(1, 3, 10, 12) * 2 - 1
    assert structure_preservation_loss(source, source.flip(-1)).dtype == torch.float32
    assert structure_preservation_loss(source.half(), source.half()).dtype == torch.float32
    with pytest.raises(ValueError, match="mask"):
        structure_preservation_loss(source, source, torch.ones(5, 5))
    with pytest.raises(ValueError, match="edited"):
        SPLReference.from_source(source).prepare(torch.rand(1, 3, 10, 11))
