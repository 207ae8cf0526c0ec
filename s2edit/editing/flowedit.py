"""FlowEdit on a flow family (SPEC §11): its guided velocities around :func:`s2edit.core.flow.flowedit`.

SD3 guides with classifier-free guidance, "" as the negative: the rows of one transformer call per step are
[∅, c_src] at z_src and [∅, c_k] at z_tar_k for each target k (fallenshock/FlowEdit's [src_neg, src,
tar_neg, tar] order), v = v_∅ + w·(v_c − v_∅) with w_src for the source and w_tar for the targets.
FLUX-dev is guidance-distilled: w goes into its guidance embedding, one row per branch (the reference
makes two transformer calls per step; one batched call computes the same rows).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from editkit.errors import InputError
from s2edit.core.family import Conditioning
from s2edit.core.flow import StepHook, flowedit
from s2edit.core.flow_family import FlowFamily
from s2edit.core.joint_attention import JointMapStore
from s2edit.core.settings import FlowEditSettings

# The paper's settings per family (SPEC §11).
FAMILY_DEFAULTS: dict[str, FlowEditSettings] = {
    "sd3": FlowEditSettings(steps=50, n_max=33, n_min=0, n_avg=1, source_guidance=3.5, target_guidance=13.5),
    "flux": FlowEditSettings(steps=28, n_max=24, n_min=0, n_avg=1, source_guidance=1.5, target_guidance=5.5),
}


def resolved(settings: FlowEditSettings, family: str) -> FlowEditSettings:
    """`settings` with every None replaced by the family's default; values out of range are refused."""
    defaults = FAMILY_DEFAULTS[family]
    names = [f.name for f in dataclasses.fields(settings)]
    out = replace(settings, **{k: getattr(defaults, k) for k in names if getattr(settings, k) is None})
    if out.steps < 1 or out.n_avg < 1:
        raise InputError(f"flowedit.steps and flowedit.n_avg must be ≥ 1, got {out.steps} and {out.n_avg}")
    if not 0 <= out.n_min <= out.n_max <= out.steps:
        raise InputError(f"FlowEdit needs 0 ≤ flowedit.n_min ≤ flowedit.n_max ≤ flowedit.steps, got "
                         f"n_min={out.n_min}, n_max={out.n_max}, steps={out.steps}")
    return out


class GuidedVelocity:
    """The guided source / target velocities of one edit (the :class:`~s2edit.core.flow.Velocity` of
    :func:`~s2edit.core.flow.flowedit`), one transformer call per step.

    CFG (SD3): rows [∅, c_src] at z_src and [∅, c_k] at z_tar_k, v = v_∅ + w·(v_c − v_∅). Guidance
    embedding (FLUX-dev): one row per branch, [c_src] at z_src with guidance w_src and [c_k] at z_tar_k
    with w_tar, no unconditional rows."""

    def __init__(self, model: FlowFamily, source: Conditioning, targets: Conditioning,
                 settings: FlowEditSettings) -> None:
        self.model, self.settings = model, settings
        self.embedded = model.guidance_embedding
        self.empty = None if self.embedded else model.encode_prompt([""])
        self.source, self.targets = source, targets

    def conditional_rows(self, targets: int) -> list[int]:
        """The transformer-batch rows conditioned on [source, *targets] prompts at an edit step: every row
        with the guidance embedding, the second row of each [∅, c] pair with CFG."""
        return list(range(1 + targets)) if self.embedded else [2 * k + 1 for k in range(1 + targets)]

    def __call__(self, z_src: torch.Tensor | None, z_tar: torch.Tensor, sigma: float
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
        branches = ([(z_src, self.source, self.settings.source_guidance)] if z_src is not None else [])
        branches += [(z_tar[k:k + 1], self.targets[k], self.settings.target_guidance)
                     for k in range(z_tar.shape[0])]
        weights = torch.tensor([w for *_, w in branches], dtype=torch.float32)
        if self.embedded:
            latents = torch.cat([z for z, _, _ in branches])
            guided = self.model.velocity(latents, sigma, Conditioning.cat([c for _, c, _ in branches]),
                                         guidance=weights)
        else:
            latents = torch.cat([z.expand(2, *z.shape[1:]) for z, _, _ in branches])
            conds = Conditioning.cat([part for _, c, _ in branches for part in (self.empty, c)])
            v = self.model.velocity(latents, sigma, conds)
            v_uncond, v_cond = v[0::2], v[1::2]
            w = weights.to(v.device).view(-1, *[1] * (v.dim() - 1))
            guided = v_uncond + w * (v_cond - v_uncond)
        return (guided[:1], guided[1:]) if z_src is not None else (None, guided)


def flowedit_latents(model: FlowFamily, x_src: torch.Tensor, source: str, targets: Sequence[str],
                     settings: FlowEditSettings | None = None, *, seed: int = 0,
                     on_step: StepHook | None = None, progress: Callable[[int], None] | None = None,
                     maps: JointMapStore | None = None) -> torch.Tensor:
    """FlowEdit of the source latent `x_src` (1, C, h, w) from `source` into each of `targets`:
    (len(targets), C, h, w), float32. `maps`: reads the conditional rows' joint-attention blocks,
    [source, *targets], at every edit step (not in the sampling tail)."""
    if model.name not in FAMILY_DEFAULTS:
        raise InputError(f"FlowEdit runs on the flow families ({', '.join(FAMILY_DEFAULTS)}), not "
                         f"{model.label}")
    if not targets:
        raise InputError("FlowEdit needs at least one target prompt")
    settings = resolved(settings or FlowEditSettings(), model.name)
    velocity = GuidedVelocity(model, model.encode_prompt([source]), model.encode_prompt(list(targets)),
                              settings)
    sigmas = model.sigmas(settings.steps, tuple(x_src.shape[-2:]))
    run = velocity
    reading: Any = contextlib.nullcontext()
    if maps is not None:
        maps.rows = velocity.conditional_rows(len(targets))
        reading = maps.reading(model.transformer, model.read_joint_block)

        def run(z_src: torch.Tensor | None, z_tar: torch.Tensor, sigma: float
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
            maps.active = z_src is not None  # the sampling tail has no source row
            return velocity(z_src, z_tar, sigma)

    with reading:
        return flowedit(run, x_src.float(), sigmas, len(targets), n_max=settings.n_max,
                        n_min=settings.n_min, n_avg=settings.n_avg, seed=seed, on_step=on_step,
                        progress=progress)
