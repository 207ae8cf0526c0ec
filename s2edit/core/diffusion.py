"""Noise schedules, DDIM math, and the samplers that turn a noise prediction into steps (SPEC §3, §9).

The noise prediction itself comes from :class:`s2edit.core.denoiser.GuidedDenoiser`. A sampler is the
one place where a denoising update is written. The editing loop (:func:`s2edit.core.engine.denoise`)
only knows this interface:

    x0 = sampler.predict_x0(latents, noise, i)     # x̂0 of every row from the guided ε̂ at step i
    ... step hooks may replace x0 or latents ...
    latents = sampler.step(latents, x0, noise, i)   # the next, less noisy latents
    sampler.result(latents, x0)                     # what to decode once the last step is done

- :class:`DDIMSampler`: deterministic DDIM (inversion-based editing, SPEC §3–§4).
- :class:`VirtualSampler`: InfEdit's DDCM virtual inversion (SPEC §9): x̂0 of every branch is read off
  its difference to the source branch, anchored at the clean latent z0, and every step re-noises with
  fresh seeded noise shared by all branches.

All sampler math runs in float32 (the schedules in float64) whatever the UNet's dtype.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import LCMScheduler

LCM_ORIGINAL_STEPS = 50  # LCMScheduler.set_timesteps(N, original_inference_steps=50) (SPEC §9)


# ----------------------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class DDIMSchedule:
    """The discrete chain of one run: timesteps from noisy to clean and their ᾱ values.

    Step i goes from ``timesteps[i]`` (ᾱ = ``alphas[i]``) to the next, less noisy timestep
    (ᾱ = ``alphas_prev[i]``; after the last step the scheduler's ``final_alpha_cumprod``).
    """

    timesteps: torch.Tensor  # (N,) long, descending
    alphas: torch.Tensor  # (N,) float64
    alphas_prev: torch.Tensor  # (N,) float64
    prediction_type: str

    @classmethod
    def from_scheduler(cls, scheduler: Any, steps: int) -> DDIMSchedule:
        """Read the chain of `steps` steps from a diffusers DDIM scheduler (a copy of it: the model's own
        scheduler is never mutated, so concurrent runs cannot disturb each other)."""
        scheduler = type(scheduler).from_config(scheduler.config)
        scheduler.set_timesteps(steps)
        return cls._from_timesteps(scheduler, scheduler.timesteps)

    @classmethod
    def lcm(cls, scheduler_config: Mapping[str, Any], steps: int) -> DDIMSchedule:
        """LCM timesteps of a model whose scheduler is an LCMScheduler (read from diffusers, never
        hard-coded: they depend on its version); ᾱ from the same betas (SPEC §9)."""
        scheduler = LCMScheduler.from_config(dict(scheduler_config))
        scheduler.set_timesteps(steps, original_inference_steps=LCM_ORIGINAL_STEPS)
        return cls._from_timesteps(scheduler, scheduler.timesteps)

    @classmethod
    def _from_timesteps(cls, scheduler: Any, timesteps: torch.Tensor) -> DDIMSchedule:
        timesteps = timesteps.detach().cpu().long()
        alphas_cumprod = scheduler.alphas_cumprod.detach().cpu().double()
        final = torch.as_tensor(scheduler.final_alpha_cumprod).detach().cpu().double().reshape(1)
        alphas = alphas_cumprod[timesteps]
        return cls(timesteps, alphas, torch.cat([alphas[1:], final]), scheduler.config.prediction_type)

    def __len__(self) -> int:
        return len(self.timesteps)


def is_lcm(scheduler_config: Mapping[str, Any]) -> bool:
    """Whether a model's own scheduler config is an LCMScheduler's (SPEC §9)."""
    return scheduler_config.get("_class_name") == "LCMScheduler"


# ----------------------------------------------------------------------------------------- DDIM math


Alpha = float | torch.Tensor  # one ᾱ, or one per row as (B, 1, 1, 1) (steps batched together)


def _root(x: Alpha) -> Alpha:
    """√x of a number (math.sqrt, as the reference computes it) or elementwise of a tensor."""
    return math.sqrt(x) if isinstance(x, (int, float)) else x.sqrt()


def to_epsilon(output: torch.Tensor, z: torch.Tensor, alpha: Alpha, prediction_type: str) -> torch.Tensor:
    """The UNet's output as a noise prediction ε (v-prediction models: ε = √ᾱ·v + √(1−ᾱ)·z)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return _root(alpha) * output + _root(1 - alpha) * z
    if prediction_type == "sample":
        return (z - _root(alpha) * output) / _root(1 - alpha)
    raise ValueError(f"unsupported scheduler prediction_type '{prediction_type}'")


def predicted_x0(z: torch.Tensor, eps: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    """x̂0 = (z_t − √(1−ᾱ_t)·ε) / √ᾱ_t (SPEC §3)."""
    return (z - _root(1 - alpha) * eps) / _root(alpha)


def ddim_move(x0: torch.Tensor, eps: torch.Tensor, alpha_to: Alpha) -> torch.Tensor:
    """z = √ᾱ_to·x̂0 + √(1−ᾱ_to)·ε: the deterministic DDIM latent at noise level ᾱ_to."""
    return _root(alpha_to) * x0 + _root(1 - alpha_to) * eps


def ddim_step(z: torch.Tensor, eps: torch.Tensor, alpha_from: Alpha, alpha_to: Alpha) -> torch.Tensor:
    """Deterministic DDIM move from noise level ᾱ_from to ᾱ_to with the noise estimate ε (SPEC §3).

    Denoising uses (ᾱ_t, ᾱ_{t−Δ}); inversion the same formula with (ᾱ_{t−Δ}, ᾱ_t).
    """
    return ddim_move(predicted_x0(z, eps, alpha_from), eps, alpha_to)


def guided_noise(
    eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance: float | torch.Tensor
) -> torch.Tensor:
    """Classifier-free guidance: ε_∅ + w·(ε_c − ε_∅); `guidance` a number or one w per row (B,)."""
    if isinstance(guidance, torch.Tensor):
        guidance = guidance.to(eps_cond).reshape(-1, *([1] * (eps_cond.dim() - 1)))
    return eps_uncond + guidance * (eps_cond - eps_uncond)


# ----------------------------------------------------------------------------------------- samplers


class Sampler(abc.ABC):
    """Interface of the editing loop's update rule (see the module docstring)."""

    schedule: DDIMSchedule

    def __len__(self) -> int:
        return len(self.schedule)

    def alpha(self, i: int) -> float:
        return float(self.schedule.alphas[i])

    @abc.abstractmethod
    def predict_x0(self, latents: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x̂0 of every row at step i from the guided noise estimate."""

    @abc.abstractmethod
    def step(self, latents: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """The latents after step i, from x̂0 (maybe replaced by a hook) and the same ε̂."""

    def result(self, latents: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The latents to decode after the last step."""
        return latents


class DDIMSampler(Sampler):
    """Deterministic DDIM: x̂0 = (z − √(1−ᾱ_t)ε)/√ᾱ_t, z_{t−Δ} = √ᾱ_{t−Δ}·x̂0 + √(1−ᾱ_{t−Δ})·ε (SPEC §3).

    A hook that replaces x̂0 continues the step with the same ε̂ (SPEC §5, SPL in the loop)."""

    def __init__(self, schedule: DDIMSchedule) -> None:
        self.schedule = schedule

    def predict_x0(self, latents: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return predicted_x0(latents, noise, self.alpha(i))

    def step(self, latents: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return ddim_move(x0, noise, float(self.schedule.alphas_prev[i]))


class VirtualSampler(Sampler):
    """InfEdit's Denoising Diffusion Consistent Model step with virtual inversion (SPEC §9).

    Rows are branches [source, targets…, mutual] sharing one seeded noise. With ᾱ = ᾱ_t and ᾱ′ that of
    the next timestep (at the last step ᾱ′ = ᾱ):
        x̂0^S = z0,   x̂0^X = z0 + ((z^X − z^S) − √(1−ᾱ)(ε^X − ε^S)) / √ᾱ
        z^X ← √ᾱ′·x̂0^X + √(1−ᾱ′−σ²)·ε̃^X + σ·ξ_i,   σ² = η(1−ᾱ′),
        ε̃^X = (ε^X − ε^S) + (z^S − √ᾱ·z0)/√(1−ᾱ)
    ξ_i ~ N(0, I) is drawn fresh at every step from `generator` (on the CPU: the same seed gives the same
    edit on every device). At η = 1 (InfEdit, the SPL app) the direction term vanishes. With a single
    step the sampler returns x̂0 itself. The edit is x̂0 of the last step (:meth:`result`).

    Args:
        schedule: timesteps (LCM or DDIM) and their ᾱ.
        z0: (1, C, h, w) clean latent of the input image.
        generator: seeded CPU generator of the per-step noise.
        eta: η in [0, 1].
        source_row: row of the source branch.
    """

    def __init__(
        self,
        schedule: DDIMSchedule,
        z0: torch.Tensor,
        generator: torch.Generator,
        eta: float = 1.0,
        source_row: int = 0,
    ) -> None:
        self.schedule = schedule
        self.z0 = z0
        self.generator = generator
        self.eta = eta
        self.source_row = source_row

    def alpha_next(self, i: int) -> float:
        return float(self.schedule.alphas[min(i + 1, len(self) - 1)])

    def noise_like(self, latents: torch.Tensor) -> torch.Tensor:
        """One draw ξ ~ N(0, I) of a single latent, shared by every row: (1, C, h, w)."""
        xi = torch.randn((1, *latents.shape[1:]), generator=self.generator, dtype=torch.float32)
        return xi.to(latents.device)

    def predict_x0(self, latents: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        alpha = self.alpha(i)
        s = self.source_row
        z0 = self.z0.to(latents.device)
        return z0 + ((latents - latents[s : s + 1]) - math.sqrt(1 - alpha) * (noise - noise[s : s + 1])) / (
            math.sqrt(alpha)
        )

    def step(self, latents: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        if len(self) == 1:
            return x0
        alpha, alpha_next = self.alpha(i), self.alpha_next(i)
        variance = self.eta * (1 - alpha_next)  # σ²
        fresh = math.sqrt(variance) * self.noise_like(latents)
        direction = 1 - alpha_next - variance
        if direction <= 0:  # η = 1: pure re-noising
            return math.sqrt(alpha_next) * x0 + fresh
        s = self.source_row
        z0 = self.z0.to(latents.device)
        source_noise = (latents[s : s + 1] - math.sqrt(alpha) * z0) / math.sqrt(1 - alpha)  # ε of S
        eps = (noise - noise[s : s + 1]) + source_noise
        return math.sqrt(alpha_next) * x0 + math.sqrt(direction) * eps + fresh

    def result(self, latents: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return x0
