"""Box and guided filters with clipped windows (SPEC §5, §6).

Window ω_k of radius r is the (2r+1)×(2r+1) square centred on pixel k, clipped to the image: a box mean
is the mean over the pixels of ω_k that lie inside the image. Sums are separable (one axis at a time) and
come from prefix sums (per row along W, per block of 2r+1 rows along H), so the cost per pixel does not
depend on r.

Why not a 2-D summed-area table (SPEC §5): a 2-D table of a 512² image in [0, 1] holds values up to
~2.6e5, whose float32 spacing (~0.03) swamps the variance of an 11×11 window (μ_II − μ_I², a difference of
nearly equal numbers, compared with ε = 1e-4). One axis at a time, a running sum spans at most one row
(≤ W·max|x|) or one block of 2r+1 rows, and float32 keeps the window sums accurate to ~1e-5 absolute.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["box_filter", "box_sum", "guided_filter", "window_count"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32 (SPEC: filters in fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _window_bounds(n: int, radius: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Exclusive-prefix indices (lo, hi) such that the clipped window of j is [lo_j, hi_j)."""
    j = torch.arange(n, device=device)
    return (j - radius).clamp(min=0), (j + radius + 1).clamp(max=n)


def _box_sum_2d(x: Tensor, radius: int) -> Tensor:
    """Separable clipped-window sum over the last two axes, O(1) per pixel whatever r. (..., H, W).

    1. Row pass (along W, contiguous): with the running sum C of a row, Z = [0 ×(r+1), C, C[W−1] ×r] gives
       the window sum of column j as Z[j + 2r + 1] − Z[j]. A running sum spans one row, not the image.
    2. Column pass (along H): torch's scan along a strided axis is several times slower on CPU than
       whole-row additions, so it uses block-local prefix sums (the sum analogue of van Herk /
       Gil-Werman): pad with r+1 zero rows in front (zero rows behind), cut into blocks of w = 2r+1 rows,
       prefix-sum inside each block (C). The window of row j ends at padded row e = j + w = q·w + k
       (block q ≥ 1, offset k) and covers the tail of block q−1 after k plus the head of block q:
           sum_j = C[q, k] + (C[q−1, w−1] − C[q−1, k]).
       No running sum spans more than one block.
    Each pass writes straight into the next one's padded buffer to save memory traffic.
    A radius wider than an axis is clipped to it (the windows are clipped anyway).
    """
    height, width = x.shape[-2:]
    lead = x.shape[:-2]
    r_w, r_h = min(radius, width - 1), min(radius, height - 1)
    w_h = 2 * r_h + 1

    # 1. Row pass into Z (..., H, W + 2r + 1).
    z = x.new_empty((*lead, height, width + 2 * r_w + 1))
    z[..., : r_w + 1].zero_()
    torch.cumsum(x, dim=-1, out=z[..., r_w + 1 : r_w + 1 + width])
    z[..., r_w + 1 + width :] = z[..., r_w + width : r_w + width + 1]
    n_blocks = (height - 1) // w_h + 2                         # covers the last end e = H − 1 + w
    column = x.new_empty((*lead, n_blocks * w_h, width))
    column[..., : r_h + 1, :].zero_()
    column[..., r_h + 1 + height :, :].zero_()
    torch.sub(z[..., 2 * r_w + 1 :], z[..., :width], out=column[..., r_h + 1 : r_h + 1 + height, :])

    # 2. Column pass: in-place prefix sums inside each block of w rows, then the two-block difference.
    blocks = column.unflatten(-2, (n_blocks, w_h))             # (..., n_blocks, w, W)
    for k in range(1, w_h):
        blocks[..., k, :] += blocks[..., k - 1, :]
    previous = blocks[..., :-1, :, :]                          # C[q−1, k]
    out = blocks[..., 1:, :, :] - previous                     # C[q, k] − C[q−1, k]
    out += previous[..., w_h - 1 :, :]                         # + C[q−1, w−1]
    return out.flatten(-3, -2)[..., :height, :]


def window_count(height: int, width: int, radius: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Number of in-image pixels of each clipped window, (H, W)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    lo_h, hi_h = _window_bounds(height, radius, device)
    lo_w, hi_w = _window_bounds(width, radius, device)
    return ((hi_h - lo_h)[:, None] * (hi_w - lo_w)[None, :]).to(dtype)


def _check(x: Tensor, radius: int) -> None:
    if x.dim() < 2:
        raise ValueError(f"box filter needs a tensor (..., H, W), got shape {tuple(x.shape)}")
    if int(radius) != radius or radius < 0:
        raise ValueError(f"box filter radius must be an integer >= 0, got {radius!r}")


class _BoxSum(torch.autograd.Function):
    """Clipped-window sum with its own adjoint: i ∈ ω_k ⇔ k ∈ ω_i, so the operator is symmetric."""

    @staticmethod
    def forward(ctx, x: Tensor, radius: int) -> Tensor:
        ctx.radius = radius
        return _box_sum_2d(x, radius)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _BoxSum.apply(grad, ctx.radius), None


def box_sum(x: Tensor, radius: int) -> Tensor:
    """Sum of x over each clipped (2r+1)² window. x: (..., H, W) → same shape (fp32 inside).

    Self-adjoint, which also gives the adjoint of the box mean: box_filterᵀ(g) = box_sum(g / window_count).
    Differentiable (its backward is itself). float64 stays float64; other floating dtypes are computed in
    float32 and returned in their own dtype.
    """
    _check(x, radius)
    y = _BoxSum.apply(x.to(_compute_dtype(x.dtype)), int(radius))
    return y.to(x.dtype) if x.is_floating_point() else y


def box_filter(x: Tensor, radius: int) -> Tensor:
    """Mean of x over each clipped (2r+1)² window (SPEC §5, §6). x: (..., H, W) → same shape.

    Separable prefix sums (see `_box_sum_2d`), O(1) per pixel whatever r, divided by the
    number of in-image pixels of each window. float64 stays float64; other floating dtypes are computed
    in float32 and returned in their own dtype. Differentiable.
    """
    _check(x, radius)
    y = x.to(_compute_dtype(x.dtype))
    height, width = y.shape[-2:]
    y = _BoxSum.apply(y, int(radius)) / window_count(height, width, radius, device=y.device, dtype=y.dtype)
    return y.to(x.dtype) if x.is_floating_point() else y


def guided_filter(guide: Tensor, src: Tensor, radius: int, eps: float) -> Tensor:
    """He et al. guided filter with a gray guide (SPEC §6).

    guide: (B, 1, H, W) (or (1, 1, H, W), broadcast over the batch); src: (B, C, H, W) → (B, C, H, W).
        a = cov(I, p) / (var(I) + ε),  b = μ_p − a μ_I,  q = box(a)·I + box(b)     (clipped windows)
    """
    if guide.dim() != 4 or guide.shape[1] != 1:
        raise ValueError(f"guided_filter needs a gray guide (B, 1, H, W), got shape {tuple(guide.shape)}")
    if src.dim() != 4 or src.shape[-2:] != guide.shape[-2:]:
        raise ValueError(f"guided_filter needs src (B, C, H, W) of the guide's size "
                         f"{tuple(guide.shape[-2:])}, got shape {tuple(src.shape)}")
    dtype = _compute_dtype(torch.promote_types(guide.dtype, src.dtype))
    i, p = guide.to(dtype), src.to(dtype)
    mean_i = box_filter(i, radius)                                   # (B, 1, H, W)
    var_i = box_filter(i * i, radius) - mean_i * mean_i              # (B, 1, H, W)
    mean_p = box_filter(p, radius)                                   # (B, C, H, W)
    cov_ip = box_filter(i * p, radius) - mean_i * mean_p             # (B, C, H, W)
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    q = box_filter(a, radius) * i + box_filter(b, radius)
    return q.to(src.dtype) if src.is_floating_point() else q
