"""Pixel optimisation of an edited image against its source with SPL (+ CPL) (SPEC §5, `refine`)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from spl.losses import SPLReference, cpl_loss_and_grad, spl_loss_and_grad

__all__ = ["refine"]


def _check_inputs(source: Tensor, edited: Tensor, iterations: int) -> None:
    if edited.dim() != 4 or edited.shape[1] != 3:
        raise ValueError(f"edited must be (B, 3, H, W), got shape {tuple(edited.shape)}")
    if source.dim() != 4 or source.shape[1] != 3 or source.shape[-2:] != edited.shape[-2:]:
        raise ValueError(f"source must be (B, 3, H, W) of the edited image's size "
                         f"{tuple(edited.shape[-2:])}, got shape {tuple(source.shape)}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")


def refine(source: Tensor, edited: Tensor, mask: Tensor | None = None, structure_weight: float = 1e4,
           color_weight: float = 0.0, iterations: int = 100, lr: float = 1.0, momentum: float = 0.9,
           radius: int = 5, eps: float = 1e-4,
           color_mask: Tensor | Literal["same"] | None = "same") -> Tensor:
    """Optimise the pixels of `edited` to minimise λ_s·L_SPL(S, X) + λ_c·L_CPL(S, X) (SPEC §5).

    source, edited: (B, 3, H, W) in [-1, 1] (source batch 1 or B); mask: (H, W) or (B, 1, H, W) in [0, 1],
    where the losses apply; `color_mask` gives CPL its own area (the SPL app's separate preservation
    areas; default: the same mask as SPL).
    X starts as a fp32 copy of `edited` (float64 stays float64) and takes `iterations` steps of SGD
    (lr, momentum) with a fresh optimiser; a term whose weight is 0 is skipped; NaN gradients become 0;
    X is clamped to [-1, 1] only at the end. The gradients are the closed forms of
    `spl_loss_and_grad` / `cpl_loss_and_grad` (equal to autograd's, tested), and the source statistics are
    computed once per call. Returns the refined image with `edited`'s dtype and device.
    """
    # 1. Check inputs and compute the S-only statistics once.
    _check_inputs(source, edited, iterations)
    dtype = torch.float64 if edited.dtype == torch.float64 else torch.float32
    source = source.to(device=edited.device, dtype=dtype)
    reference = SPLReference.from_source(source, mask, radius, eps)
    color_reference = reference
    if not (isinstance(color_mask, str) and color_mask == "same") and color_mask is not mask and color_weight:
        color_reference = SPLReference.from_source(source, color_mask, radius, eps)

    # 2. X is a leaf in the compute dtype; torch's SGD keeps the momentum buffer (fresh per call).
    x = edited.detach().to(dtype).clone()
    optimizer = torch.optim.SGD([x], lr=lr, momentum=momentum)

    # 3. Optimisation loop with closed-form gradients. The SPL gradient is the same for R, G and B (it
    #    flows through the gray mean), so it stays one channel and is broadcast, not copied.
    if structure_weight == 0 and color_weight == 0:
        iterations = 0
    with torch.no_grad():
        for _ in range(iterations):
            grad = None
            if structure_weight != 0:
                grad = structure_weight * spl_loss_and_grad(reference, x, need_loss=False)[1][:, :1]
            if color_weight != 0:
                color_grad = color_weight * cpl_loss_and_grad(color_reference, x, need_loss=False)[1]
                grad = color_grad if grad is None else color_grad.add_(grad)
            grad = torch.nan_to_num_(grad, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
            x.grad = grad.expand_as(x)
            optimizer.step()

    # 4. Clamp once, at the end, and hand back in the caller's dtype.
    return x.clamp_(-1.0, 1.0).to(edited.dtype)
