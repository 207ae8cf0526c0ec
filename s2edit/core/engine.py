"""The editing loop and its step hooks (SPEC §4, §5, §9).

One loop serves every editing method. A method hands it a :class:`DenoisingRun`: a sampler (the update
rule), the initial latents of its branches, their conditioning and guidance scales, an attention
controller and its own hooks. Each step:

    ε̂ = CFG(model([z, z], t, [∅_i, c]))           the guided denoiser: one call on [uncond…, cond…]
    x̂0 = sampler.predict_x0(z, ε̂, i)
    hook.before_update(state) for every hook       may replace state.x0 (SPL) or state.latents
    z = sampler.step(z, x̂0, ε̂, i)
    hook.after_update(state) for every hook        may replace state.latents (offsets, LocalBlend, …)

Hooks are how the loop is extended: in-loop SPL/CPL refinement, Direct Inversion's offsets, LocalBlend,
progress, and a user callback (like diffusers' `callback_on_step_end`). A new method or a new hook needs
no change here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from s2edit.core.attention import AttentionController, AttentionStore
from s2edit.core.denoiser import GuidedDenoiser
from s2edit.core.diffusion import Sampler
from s2edit.core.family import Conditioning, ModelFamily
from s2edit.core.settings import SPLSettings
from spl.losses import SPLReference, cpl_loss, spl_loss
from spl.refine import refine


@dataclass
class StepState:
    """What a hook sees at step i. Before the update `latents` is z_t, after it the new latents."""

    step: int
    num_steps: int
    timestep: torch.Tensor
    alpha: float  # ᾱ of `timestep`
    latents: torch.Tensor  # (rows, C, h, w)
    noise: torch.Tensor  # (rows, C, h, w) guided ε̂
    x0: torch.Tensor  # (rows, C, h, w) predicted clean latents
    source_row: int
    target_rows: list[int]


class StepHook:
    """Extends the loop (see the module docstring); both methods do nothing by default."""

    def before_update(self, state: StepState) -> None:
        """After x̂0 is known, before the latent update: may replace `state.x0` or `state.latents`."""

    def after_update(self, state: StepState) -> None:
        """After the update: may replace `state.latents`."""


@dataclass
class DenoisingRun:
    """Everything a method hands to :func:`denoise` (rows = the method's branches)."""

    sampler: Sampler
    latents: torch.Tensor  # (rows, C, h, w) float32 initial latents
    cond: Conditioning  # (rows, …) conditioning of each branch
    uncond: Callable[[int], Conditioning]  # step → (rows, …) unconditional input
    guidance: torch.Tensor  # (rows,) classifier-free guidance per row
    controller: AttentionController  # the method's attention control (fresh per run)
    source_row: int
    target_rows: list[int]
    hooks: list[StepHook] = field(default_factory=list)  # the method's own, run before any other
    store: AttentionStore | None = None  # maps before any edit (LocalBlend, masks, saved maps)


@torch.no_grad()
def denoise(model: ModelFamily, run: DenoisingRun, hooks: Sequence[StepHook] = ()) -> StepState:
    """Run the whole loop; returns the last step's state (latents after the update, x̂0 of the step)."""
    sampler, latents = run.sampler, run.latents
    denoiser = GuidedDenoiser(model, run.controller)
    all_hooks = [*run.hooks, *hooks]
    state: StepState | None = None
    with denoiser.controlled():
        for i in range(len(sampler)):
            run.controller.step = i
            t, alpha = sampler.schedule.timesteps[i], sampler.alpha(i)
            noise = denoiser.guided(latents, t, alpha, run.cond, run.uncond(i), run.guidance)
            state = StepState(
                i, len(sampler), t, alpha, latents, noise, sampler.predict_x0(latents, noise, i),
                run.source_row, list(run.target_rows),
            )
            for hook in all_hooks:
                hook.before_update(state)
            state.latents = sampler.step(state.latents, state.x0, state.noise, i)
            for hook in all_hooks:
                hook.after_update(state)
            latents = state.latents
    if state is None:
        raise ValueError("the sampler has no steps")
    return state


# ----------------------------------------------------------------------------------------- hooks


class ProgressHook(StepHook):
    """A tqdm bar over the steps."""

    def __init__(self, total: int, desc: str = "editing", enabled: bool = True) -> None:
        self.bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False)

    def after_update(self, state: StepState) -> None:
        self.bar.update(1)
        if state.step + 1 == state.num_steps:
            self.bar.close()


StepCallback = Callable[[StepState], "dict[str, torch.Tensor] | None"]


class CallbackHook(StepHook):
    """A user callback after each update, like diffusers' `callback_on_step_end`: `fn(state)` may return
    a dict with new "latents" (and/or "x0") that replace the state's."""

    def __init__(self, fn: StepCallback) -> None:
        self.fn = fn

    def after_update(self, state: StepState) -> None:
        changed = self.fn(state) or {}
        unknown = set(changed) - {"latents", "x0"}
        if unknown:
            raise ValueError(f"a step callback may return 'latents' and 'x0', not {sorted(unknown)}")
        for name, value in changed.items():
            current = getattr(state, name)
            if value.shape != current.shape:
                raise ValueError(f"step callback returned {name} of shape {tuple(value.shape)}, "
                                 f"expected {tuple(current.shape)}")
            setattr(state, name, value.to(current))


class OffsetHook(StepHook):
    """Direct Inversion (Ju et al. 2024): after step i, add offset_i to the SOURCE row only (SPEC §3)."""

    def __init__(self, offsets: torch.Tensor, row: int = 0) -> None:
        self.offsets = offsets  # (N, C, h, w)
        self.row = row

    def after_update(self, state: StepState) -> None:
        latents = state.latents.clone()
        latents[self.row] += self.offsets[state.step].to(latents)
        state.latents = latents


class LocalBlend(Protocol):
    """A method's LocalBlend: the latents after step `step` (ᾱ of its timestep), blended on the maps of
    `store` (P2P's, SPEC §4; InfEdit's, SPEC §9)."""

    def __call__(self, latents: torch.Tensor, store: AttentionStore, step: int, alpha: float) -> torch.Tensor:
        ...


class LocalBlendHook(StepHook):
    """A method's LocalBlend after each update, on the run's stored maps."""

    def __init__(self, blend: LocalBlend, store: AttentionStore) -> None:
        self.blend = blend
        self.store = store

    def after_update(self, state: StepState) -> None:
        state.latents = self.blend(state.latents, self.store, state.step, state.alpha)


@dataclass(frozen=True)
class RefineSettings:
    """The arguments of `spl.refine` for one edit (SPEC §5); weights are 0 for a loss that is off."""

    structure_weight: float
    color_weight: float
    iterations: int
    lr: float
    momentum: float
    radius: int
    eps: float

    @classmethod
    def from_spl(cls, spl: SPLSettings) -> RefineSettings:
        return cls(
            structure_weight=spl.structure_weight if spl.structure else 0.0,
            color_weight=spl.color_weight if spl.color else 0.0,
            iterations=spl.iterations, lr=spl.lr, momentum=spl.momentum, radius=spl.radius, eps=spl.eps,
        )


def refine_images(
    reference: torch.Tensor,
    images: torch.Tensor,
    settings: RefineSettings,
    structure_mask: torch.Tensor | None,
    color_mask: torch.Tensor | None,
) -> torch.Tensor:
    """SPL/CPL pixel optimisation of `images` (n, 3, H, W) against `reference` (1, 3, H, W) (SPEC §5)."""
    return refine(
        reference,
        images,
        structure_mask,
        structure_weight=settings.structure_weight,
        color_weight=settings.color_weight,
        iterations=settings.iterations,
        lr=settings.lr,
        momentum=settings.momentum,
        radius=settings.radius,
        eps=settings.eps,
        color_mask=color_mask,
    )


def postprocessed(
    reference: torch.Tensor,
    raw: torch.Tensor,
    settings: RefineSettings,
    loss_masks: tuple[torch.Tensor | None, torch.Tensor | None],
    enabled: bool,
) -> torch.Tensor:
    """The decoded edits `raw` after SPL post-processing against the input `reference` (SPEC §5), or
    `raw` itself when post-processing is off (`enabled`: spl.postprocess and a loss is active)."""
    return refine_images(reference, raw, settings, *loss_masks) if enabled else raw


def preservation_losses(
    reference: torch.Tensor,
    images: torch.Tensor,
    settings: RefineSettings,
    structure_mask: torch.Tensor | None,
    color_mask: torch.Tensor | None,
) -> dict[str, list[float | None]]:
    """Per image: L_SPL (and L_CPL when it is optimised) against `reference`, unweighted (SPEC §5)."""
    losses: dict[str, list[float | None]] = {"spl": [], "cpl": []}
    for k in range(images.shape[0]):
        image = images[k : k + 1]
        structure = None if structure_mask is None else structure_mask[k : k + 1]
        losses["spl"].append(float(spl_loss(SPLReference.from_source(reference, structure, settings.radius,
                                                                     settings.eps), image)))
        if settings.color_weight:
            color = None if color_mask is None else color_mask[k : k + 1]
            reference_color = SPLReference.from_source(reference, color, settings.radius, settings.eps)
            losses["cpl"].append(float(cpl_loss(reference_color, image)))
        else:
            losses["cpl"].append(None)
    return losses


class SPLHook(StepHook):
    """SPL/CPL in the loop (SPEC §5, §9): at the given steps, each target's x̂0 is decoded, refined against
    `reference` (the VAE round trip of the source) and re-encoded, before the update continues with it.

    `masks` is called once, at the first SPL step, with (state, decoded targets) and returns the
    (structure, color) loss masks (n, 1, H, W) or None each; `records` collects the losses per step.
    """

    def __init__(
        self,
        steps: Sequence[int],
        reference: torch.Tensor,
        settings: RefineSettings,
        decode: Callable[[torch.Tensor], torch.Tensor],
        encode: Callable[[torch.Tensor], torch.Tensor],
        masks: Callable[[StepState, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None]],
    ) -> None:
        self.steps = set(steps)
        self.reference = reference
        self.settings = settings
        self.decode, self.encode = decode, encode
        self.masks = masks
        self.loss_masks: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
        self.records: list[dict[str, Any]] = []
        self.seconds = 0.0

    def before_update(self, state: StepState) -> None:
        if state.step not in self.steps:
            return
        start = time.perf_counter()
        rows = state.target_rows
        decoded = self.decode(state.x0[rows])
        if self.loss_masks is None:
            self.loss_masks = self.masks(state, decoded)
        refined = refine_images(self.reference, decoded, self.settings, *self.loss_masks)
        self.records.append({
            "step": state.step,
            "before": preservation_losses(self.reference, decoded, self.settings, *self.loss_masks),
            "after": preservation_losses(self.reference, refined, self.settings, *self.loss_masks),
        })
        x0 = state.x0.clone()
        x0[rows] = self.encode(refined)
        state.x0 = x0
        self.seconds += time.perf_counter() - start
