"""Structure and Color Preservation Losses (SPEC §5).

S (source / reference) and E (edited) are (B, 3, H, W) images in [-1, 1]. Both are preprocessed the same
way: fp32 (float64 stays float64), mapped to [0, 1], multiplied by the optional soft mask m, and reduced to
gray by the plain mean of R, G, B: I = gray(S'), P = gray(E').

SPL compares S and E through local linear models in every clipped (2r+1)² window ω_k:
    forward (E explained by S):  a_k  = c/(σ²_I + ε),  b_k  = μ_P − a_k μ_I
    reverse (S explained by E):  a'_k = c/(σ²_P + ε),  b'_k = μ_I − a'_k μ_P,     c = μ_IP − μ_I μ_P
with a, b, a', b' DETACHED, and
    D_fwd(k) = μ_PP + a²μ_II + b² − 2aμ_IP − 2bμ_P + 2abμ_I
    D_rev(k) = μ_II + a'²μ_PP + b'² − 2a'μ_IP − 2b'μ_I + 2a'b'μ_P
    L_SPL    = mean over all B·H·W window centres of (D_fwd + D_rev)        (no division by mask area)

The statistics of S alone (I, μ_I, μ_II, the chroma of S') do not change while E is optimised: they live in
an `SPLReference`, built once per optimisation and reused by `refine` (SPEC §5, "compute once").
Besides the autograd-differentiable losses, `spl_loss_and_grad` / `cpl_loss_and_grad` return the exact
gradient w.r.t. E in closed form, which `refine` uses because it is several times cheaper than autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spl.filters import box_filter, box_sum, window_count

__all__ = [
    "SPLReference",
    "color_preservation_loss",
    "cpl_loss",
    "cpl_loss_and_grad",
    "preprocess",
    "spl_loss",
    "spl_loss_and_grad",
    "spl_window_map",
    "structure_preservation_loss",
]

# SPEC §5 CPL: Cb = .564(B − Y) + .5, Cr = .713(R − Y) + .5 with Y = .299R + .587G + .114B.
# Both chroma channels are linear in (R, G, B); the rows below are their coefficients (the +.5 cancels in
# the CPL difference and is added back only where the chroma values themselves are returned).
_LUMA = (0.299, 0.587, 0.114)
_CHROMA_ROWS = (
    (-0.564 * _LUMA[0], -0.564 * _LUMA[1], 0.564 * (1.0 - _LUMA[2])),  # Cb
    (0.713 * (1.0 - _LUMA[0]), -0.713 * _LUMA[1], -0.713 * _LUMA[2]),  # Cr
)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (losses run in fp32, SPEC/STYLE)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _mask_4d(mask: Tensor | None, image: Tensor) -> Tensor | None:
    """Mask (H, W) or (B|1, 1, H, W) in [0, 1] → (B|1, 1, H, W) in the image's dtype and device."""
    if mask is None:
        return None
    height, width = image.shape[-2:]
    if mask.dim() == 2:
        mask = mask[None, None]
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (height, width):
        raise ValueError(f"mask must be (H, W) or (B, 1, H, W) with H, W = {height}, {width}; "
                         f"got shape {tuple(mask.shape)}")
    return mask.to(device=image.device, dtype=image.dtype)


def preprocess(image: Tensor, mask: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """SPEC §5 preprocessing: (B, 3, H, W) in [-1, 1] → fp32 (or `dtype`) in [0, 1], times the mask."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an RGB image batch (B, 3, H, W), got shape {tuple(image.shape)}")
    x = (image.to(dtype or _compute_dtype(image)) + 1.0) / 2.0
    m = _mask_4d(mask, x)
    return x if m is None else x * m


def _gray(x: Tensor) -> Tensor:
    """Plain mean of R, G, B (SPEC §5). (B, 3, H, W) → (B, 1, H, W)."""
    return x.mean(dim=1, keepdim=True)


def _chroma(x: Tensor) -> Tensor:
    """(Cb, Cr) without the +.5 offset. (B, 3, H, W) → (B, 2, H, W)."""
    rows = torch.tensor(_CHROMA_ROWS, dtype=x.dtype, device=x.device)  # (2, 3)
    return torch.einsum("oc,bchw->bohw", rows, x)


@dataclass(frozen=True)
class SPLReference:
    """Everything SPL/CPL need from the source S alone, computed once per optimisation (SPEC §5).

    Tensors are (Bs, ·, H, W) in fp32 (float64 for a float64 source); an edited batch of size B must have
    B == Bs or Bs == 1 (one source for several edits).
    """

    gray: Tensor            # I = gray(S'), (Bs, 1, H, W)
    mean: Tensor            # μ_I, (Bs, 1, H, W)
    mean_sq: Tensor         # μ_II, (Bs, 1, H, W)
    chroma: Tensor          # (Cb, Cr) of S' without offset, (Bs, 2, H, W)
    count: Tensor           # pixels per clipped window, (H, W)
    mask: Tensor | None     # (Bs|1, 1, H, W) or None
    radius: int
    eps: float

    @classmethod
    def from_source(cls, source: Tensor, mask: Tensor | None = None, radius: int = 5,
                    eps: float = 1e-4) -> SPLReference:
        """Preprocess S and box-filter its S-only statistics. source: (B, 3, H, W) in [-1, 1]."""
        s = preprocess(source, mask)                                   # (B, 3, H, W) in [0, 1]
        gray = _gray(s)                                                # (B, 1, H, W)
        stats = box_filter(torch.cat([gray, gray * gray], dim=1), radius)  # (B, 2, H, W): μ_I, μ_II
        height, width = s.shape[-2:]
        return cls(gray=gray, mean=stats[:, :1], mean_sq=stats[:, 1:], chroma=_chroma(s),
                   count=window_count(height, width, radius, device=s.device, dtype=s.dtype),
                   mask=_mask_4d(mask, s), radius=radius, eps=eps)

    def check_edited(self, edited: Tensor) -> None:
        """E must be (B, 3, H, W) at the source's size, with B equal to the source batch (or source B = 1)."""
        if edited.dim() != 4 or tuple(edited.shape[1:]) != (3, *self.gray.shape[-2:]):
            raise ValueError(f"edited must be (B, 3, {self.gray.shape[-2]}, {self.gray.shape[-1]}) like the "
                             f"source, got shape {tuple(edited.shape)}")
        if self.gray.shape[0] not in (1, edited.shape[0]):
            raise ValueError(f"source batch {self.gray.shape[0]} does not match edited batch "
                             f"{edited.shape[0]}")

    def prepare(self, edited: Tensor) -> Tensor:
        """Preprocess E exactly like S. (B, 3, H, W) in [-1, 1] → (B, 3, H, W) in [0, 1], masked."""
        self.check_edited(edited)
        return preprocess(edited, self.mask, dtype=_compute_dtype(edited, self.gray))

    def prepare_gray(self, edited: Tensor) -> Tensor:
        """P = gray(E') without the RGB intermediate: mean_c((E_c + 1)/2)·m = (mean_c(E) + 1)/2·m."""
        self.check_edited(edited)
        p = (_gray(edited.to(_compute_dtype(edited, self.gray))) + 1.0) / 2.0  # (B, 1, H, W)
        return p if self.mask is None else p * self.mask


def _models(ref: SPLReference, mean_p: Tensor, mean_pp: Tensor, mean_ip: Tensor
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Detached per-window coefficients (a, b, a', b') of the forward and reverse models (SPEC §5)."""
    mean_i = ref.mean
    mean_p, mean_pp, mean_ip = mean_p.detach(), mean_pp.detach(), mean_ip.detach()
    cov = mean_ip - mean_i * mean_p
    var_i = ref.mean_sq - mean_i * mean_i
    var_p = mean_pp - mean_p * mean_p
    a = cov / (var_i + ref.eps)
    b = mean_p - a * mean_i
    a_rev = cov / (var_p + ref.eps)
    b_rev = mean_i - a_rev * mean_p
    return a, b, a_rev, b_rev


def _edited_stats(ref: SPLReference, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """μ_P, μ_PP, μ_IP in one box-filter call. p: (B, 1, H, W) → three (B, 1, H, W)."""
    i = ref.gray.expand_as(p)
    stats = box_filter(torch.cat([p, p * p, i * p], dim=1), ref.radius)  # (B, 3, H, W)
    return stats[:, 0:1], stats[:, 1:2], stats[:, 2:3]


def _window_distances(ref: SPLReference, coeffs: tuple[Tensor, Tensor, Tensor, Tensor], mean_p: Tensor,
                      mean_pp: Tensor, mean_ip: Tensor) -> Tensor:
    """D_fwd + D_rev per window centre, the expanded closed forms of SPEC §5. → (B, 1, H, W)."""
    a, b, a_rev, b_rev = coeffs
    mean_i, mean_ii = ref.mean, ref.mean_sq
    d_fwd = mean_pp + a * a * mean_ii + b * b - 2 * a * mean_ip - 2 * b * mean_p + 2 * a * b * mean_i
    d_rev = mean_ii + a_rev * a_rev * mean_pp + b_rev * b_rev - 2 * a_rev * mean_ip - 2 * b_rev * mean_i \
        + 2 * a_rev * b_rev * mean_p
    return d_fwd + d_rev


def spl_window_map(ref: SPLReference, edited: Tensor) -> Tensor:
    """D_fwd(k) + D_rev(k) for every window centre k (SPEC §5); L_SPL is its mean. → (B, 1, H, W).

    Differentiable w.r.t. `edited` by autograd (a, b, a', b' detached). Useful to see where structure
    differs, and to test the local linear model window by window.
    """
    p = ref.prepare_gray(edited)                                     # (B, 1, H, W)
    mean_p, mean_pp, mean_ip = _edited_stats(ref, p)
    coeffs = _models(ref, mean_p, mean_pp, mean_ip)
    return _window_distances(ref, coeffs, mean_p, mean_pp, mean_ip)


def spl_loss(ref: SPLReference, edited: Tensor) -> Tensor:
    """L_SPL(S, E) for a precomputed reference; differentiable w.r.t. `edited` by autograd (SPEC §5)."""
    return spl_window_map(ref, edited).mean()


def spl_loss_and_grad(ref: SPLReference, edited: Tensor, need_loss: bool = True
                      ) -> tuple[Tensor | None, Tensor]:
    """L_SPL and its exact gradient w.r.t. `edited` (B, 3, H, W), without autograd.

    With a, b, a', b' held constant, L is linear in μ_PP, μ_P, μ_IP. Per centre k (N = B·H·W centres):
        ∂L/∂μ_PP = (1 + a'²)/N,   ∂L/∂μ_P = (2a'b' − 2b)/N,   ∂L/∂μ_IP = −2(a + a')/N.
    A box mean's adjoint is box_sum(g / count) (symmetric clipped windows), so
        ∂L/∂P = 2P·box_sum(g_PP/n) + box_sum(g_P/n) + I·box_sum(g_IP/n),
    and P = mean_c((E_c + 1)/2 · m) gives ∂L/∂E_c = ∂L/∂P · m / 6 for every channel c.
    Returns (loss or None when need_loss=False, gradient in the compute dtype).
    """
    with torch.no_grad():
        p = ref.prepare_gray(edited)                                 # (B, 1, H, W)
        mean_p, mean_pp, mean_ip = _edited_stats(ref, p)
        coeffs = _models(ref, mean_p, mean_pp, mean_ip)
        a, b, a_rev, b_rev = coeffs
        n_centres = p.shape[0] * p.shape[-2] * p.shape[-1]
        g = torch.cat([1 + a_rev * a_rev, 2 * (a_rev * b_rev - b), -2 * (a + a_rev)], dim=1)  # (B, 3, H, W)
        adj = box_sum(g / (ref.count * n_centres), ref.radius)            # (B, 3, H, W)
        grad_p = 2 * p * adj[:, 0:1] + adj[:, 1:2] + ref.gray * adj[:, 2:3]  # (B, 1, H, W)
        grad_p = grad_p / 6 if ref.mask is None else grad_p * (ref.mask / 6)
        grad = grad_p.expand(-1, 3, -1, -1)                              # (B, 3, H, W)
        loss = _window_distances(ref, coeffs, mean_p, mean_pp, mean_ip).mean() if need_loss else None
    return loss, grad


def cpl_loss(ref: SPLReference, edited: Tensor) -> Tensor:
    """L_CPL = MSE over the Cb, Cr channels of the preprocessed images (SPEC §5); autograd-differentiable."""
    diff = _chroma(ref.prepare(edited)) - ref.chroma                    # (B, 2, H, W)
    return (diff * diff).mean()


def cpl_loss_and_grad(ref: SPLReference, edited: Tensor, need_loss: bool = True
                      ) -> tuple[Tensor | None, Tensor]:
    """L_CPL and its exact gradient w.r.t. `edited`: ∂L/∂E = Mᵀ·2(chroma(E') − chroma(S'))/N · m/2."""
    with torch.no_grad():
        diff = _chroma(ref.prepare(edited)) - ref.chroma                # (B, 2, H, W)
        rows = torch.tensor(_CHROMA_ROWS, dtype=diff.dtype, device=diff.device)  # (2, 3)
        # 2·diff/N from the mean of squares, times 1/2 from E' = (E + 1)/2.
        grad = torch.einsum("oc,bohw->bchw", rows, diff) / diff.numel()  # (B, 3, H, W)
        if ref.mask is not None:
            grad = grad * ref.mask
        loss = (diff * diff).mean() if need_loss else None
    return loss, grad


def structure_preservation_loss(source: Tensor, edited: Tensor, mask: Tensor | None = None, radius: int = 5,
                                eps: float = 1e-4) -> Tensor:
    """L_SPL(S, E) of SPEC §5. source, edited: (B, 3, H, W) in [-1, 1]; mask (H, W) or (B, 1, H, W) in [0, 1].

    Differentiable w.r.t. `edited` (a, b, a', b' detached). Returns a scalar in fp32 (float64 for float64).
    """
    return spl_loss(SPLReference.from_source(source, mask, radius, eps), edited)


def color_preservation_loss(source: Tensor, edited: Tensor, mask: Tensor | None = None) -> Tensor:
    """L_CPL(S, E) of SPEC §5: MSE between the Cb, Cr channels of the preprocessed images (Y dropped)."""
    s = preprocess(source, mask, dtype=_compute_dtype(source, edited))
    e = preprocess(edited, mask, dtype=s.dtype)
    diff = _chroma(e) - _chroma(s)
    return (diff * diff).mean()
