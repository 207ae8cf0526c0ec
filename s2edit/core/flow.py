"""Rectified-flow sampling pieces shared by the flow families (SD3, FLUX) and FlowEdit (SPEC §11).

Conventions (diffusers' `FlowMatchEulerDiscreteScheduler`): z_σ = (1 − σ)·x0 + σ·ε, the denoiser predicts
the velocity v ≈ ε − x0, and an Euler step is z ← z + (σ′ − σ)·v, from σ_0 ≈ 1 down to σ_T = 0.

:func:`flowedit` is FlowEdit (Kulikov et al., ICCV 2025; fallenshock/FlowEdit `FlowEdit_utils.py`): an
inversion-free edit that integrates the difference of the target and source velocities along coupled
noisy copies of the source latent. It is written against a velocity callable, so the same loop serves every
flow family and the tests can drive it with closed-form velocities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import torch

SKIP, EDIT, SAMPLE = "skip", "edit", "sample"  # what FlowEdit does at a step


def flow_sigmas(scheduler_config: Mapping[str, Any], steps: int, image_seq_len: int | None = None
                ) -> torch.Tensor:
    """σ_0 … σ_T (σ_T = 0), float32, as the family's pipeline sets its `FlowMatchEulerDiscreteScheduler`:
    `set_timesteps(steps)` (SD3: its static shift), or with a resolution-dependent shift μ when the config
    has `use_dynamic_shifting` (FLUX: sigmas = linspace(1, 1/T, T), μ from the packed image length)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
    if scheduler.config.use_dynamic_shifting:
        if image_seq_len is None:
            raise ValueError("a dynamically shifted schedule (FLUX) needs the packed image length")
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(),
                                mu=dynamic_shift(image_seq_len, scheduler.config))
    else:
        scheduler.set_timesteps(steps)
    return scheduler.sigmas.float().cpu()


def dynamic_shift(image_seq_len: int, config: Any) -> float:
    """FLUX's μ: linear in the packed image length between (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift) (diffusers' `calculate_shift`)."""
    get = config.get if isinstance(config, Mapping) else lambda key, default: getattr(config, key, default)
    base_len, max_len = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
    base_shift, max_shift = get("base_shift", 0.5), get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


# ------------------------------------------------------------------------------------- FLUX latent packing


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2 · W/2, 4C): 2×2 patches as tokens, channel-major within a patch (FLUX)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent sides must be even to pack 2×2 patches, got {h}×{w}")
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a (height, width) latent."""
    b, tokens, features = packed.shape
    if tokens != (height // 2) * (width // 2) or features % 4:
        raise ValueError(f"{tokens} tokens of {features} features do not unpack to a {height}×{width} latent")
    c = features // 4
    patches = packed.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def latent_image_ids(height: int, width: int) -> torch.Tensor:
    """FLUX's positional ids of a packed (height, width) latent: (H/2 · W/2, 3) = (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


# --------------------------------------------------------------------------------------------- FlowEdit


def flowedit_phases(steps: int, n_max: int, n_min: int) -> list[str]:
    """What FlowEdit does at each step i = 0 … T−1: skip while T − i > n_max, edit while T − i > n_min,
    then regular sampling (SPEC §11)."""
    if not 0 <= n_min <= n_max <= steps:
        raise ValueError(f"FlowEdit needs 0 ≤ n_min ≤ n_max ≤ steps, got n_min={n_min}, n_max={n_max}, "
                         f"steps={steps}")
    return [SKIP if steps - i > n_max else EDIT if steps - i > n_min else SAMPLE for i in range(steps)]


class Velocity(Protocol):
    def __call__(self, z_src: torch.Tensor | None, z_tar: torch.Tensor, sigma: float
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Guided velocities at noise level σ: the source row's for `z_src` (1, …) with the source prompt
        (None when `z_src` is None) and the target rows' for `z_tar` (K, …), one per target prompt."""


StepHook = Callable[[int, int, torch.Tensor], torch.Tensor]  # (executed step j, executed steps, z) → z


def step_noise(shape: tuple[int, ...], seed: int, step: int, sample: int) -> torch.Tensor:
    """ε of one step and noise sample, drawn on the CPU from (seed, step, sample): the same numbers on any
    device, and independent of which other steps run."""
    mixed = (int(seed) * 1_000_003 + step * 1_009 + sample) % (2**63 - 1)  # 63-bit item seeds too
    generator = torch.Generator().manual_seed(mixed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@torch.no_grad()
def flowedit(
    velocity: Velocity,
    x_src: torch.Tensor,
    sigmas: torch.Tensor,
    targets: int,
    *,
    n_max: int,
    n_min: int = 0,
    n_avg: int = 1,
    seed: int = 0,
    on_step: StepHook | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """FlowEdit of the source latent `x_src` (1, …) into `targets` edits (targets, …), float32.

    With T = len(sigmas) − 1: z_edit ← x_src; at each edit step i, for k < n_avg, ε_k (:func:`step_noise`),
    z_src = (1 − σ_i)·x_src + σ_i·ε_k, z_tar = z_edit + z_src − x_src, V_Δ = mean_k (v_tar − v_src), then
    z_edit ← z_edit + (σ_{i+1} − σ_i)·V_Δ. With n_min > 0 the last n_min steps sample regularly from
    x_tar = z_edit + (1 − σ_i)·x_src + σ_i·ε − x_src. Every target row shares the source row and the noise,
    so each equals its own single-target edit. z_tar is summed as z_src + (z_edit − x_src) (the reference
    sums z_edit + z_src − x_src): the same up to rounding, and exactly z_src while z_edit = x_src, so a target
    equal to the source gives V_Δ = 0 and the source back bit for bit. `on_step(j, n, z_edit)` may replace
    z_edit after executed
    edit step j of n (SPL in the loop); `progress(i)` is called after every step that ran.
    """
    steps = len(sigmas) - 1
    phases = flowedit_phases(steps, n_max, n_min)
    if n_avg < 1:
        raise ValueError(f"n_avg must be ≥ 1, got {n_avg}")
    x_src = x_src.float()
    shape = tuple(x_src.shape)
    executed = phases.count(EDIT)
    z_edit = x_src.expand(targets, *shape[1:]).clone()
    x_tar: torch.Tensor | None = None
    j = 0
    for i, phase in enumerate(phases):
        if phase == SKIP:
            continue
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if phase == EDIT:
            v_delta = torch.zeros_like(z_edit)
            for k in range(n_avg):
                noise = step_noise(shape, seed, i, k).to(x_src.device)
                z_src = (1 - sigma) * x_src + sigma * noise
                z_tar = z_src + (z_edit - x_src)  # exactly z_src while z_edit = x_src
                v_src, v_tar = velocity(z_src, z_tar, sigma)
                v_delta += (v_tar.float() - v_src.float()) / n_avg
            z_edit = z_edit + (sigma_next - sigma) * v_delta
            if on_step is not None:
                z_edit = on_step(j, executed, z_edit).float()
            j += 1
        else:
            if x_tar is None:
                noise = step_noise(shape, seed, i, 0).to(x_src.device)
                x_tar = (1 - sigma) * x_src + sigma * noise + (z_edit - x_src)
            _, v_tar = velocity(None, x_tar, sigma)
            x_tar = x_tar + (sigma_next - sigma) * v_tar.float()
        if progress is not None:
            progress(i)
    return z_edit if x_tar is None else x_tar
