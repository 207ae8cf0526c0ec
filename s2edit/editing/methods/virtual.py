"""Training-free editing by virtual inversion (InfEdit's DDCM, SPEC §9): the method `virtual`.

No inversion: the branches [S, T_1 … T_n, M] start from one seeded noise and are denoised together by
:class:`~s2edit.core.diffusion.VirtualSampler` (LCM timesteps on an LCM model, else the DDIM chain), one
model call per step on all branches; each target's x̂0 is read off its difference to the source branch,
anchored at the input's latent. Each half of the classifier-free-guidance batch holds the branches
[S, T_1 … T_n, M]: the source prompt (S), the targets (T) and the "mutual" branch (M, source prompt).
With s = (i + 1)/N at step i:

- cross-attention (conditional half): while s ≤ cross_replace every T takes the source's maps through
  the refine alignment, α·A_S[index] + (1 − α)·A_T; M is never touched;
- self-attention (both halves, every layer): while s < self_replace, T attends with the source's queries
  and keys to its own values (softmax(Q_S K_Sᵀ)·V_T) and M repeats S; afterwards T runs freely and M
  attends with T's queries to the source's keys and values (softmax(Q_T K_Sᵀ)·V_S), mutual
  self-attention. With several targets M follows the first one (InfEdit has one target) [choice].

This is `gongms00/SPL`'s `AttentionRefine` / `self_attn_forward` (and InfEdit's), rewritten on the
project's processors: queries, keys and values are swapped in :meth:`edit_qkv` before the scores, so
self-attention keeps torch's fused kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from s2edit.core.attention import AttentionCall, AttentionController, AttentionStore, heads_view
from s2edit.core.diffusion import DDIMSchedule, VirtualSampler, is_lcm
from s2edit.core.engine import DenoisingRun, LocalBlendHook, StepCallback
from s2edit.core.family import ModelFamily
from s2edit.core.settings import VirtualSettings
from s2edit.editing.alignment import refine_mapped, token_mapping
from s2edit.editing.methods.base import EditMethod
from s2edit.editing.plan import present, require

if TYPE_CHECKING:
    from s2edit.editing.editor import Editor
    from s2edit.editing.plan import EditPlan
    from s2edit.editing.request import EditRequest
    from s2edit.editing.result import EditResult


class VirtualAttentionControl(AttentionController):
    """SPEC §9 attention control (see the module docstring).

    Args:
        num_steps: N.
        index: (targets, K) refine mapping of each target onto the source.
        alphas: (targets, K) 1 where a target token has a source partner (and on padding), 0 for new ones.
        cross_replace / self_replace: the schedules, fractions of N.
    """

    def __init__(
        self,
        num_steps: int,
        index: torch.Tensor,
        alphas: torch.Tensor,
        cross_replace: float = 0.8,
        self_replace: float = 0.8,
    ) -> None:
        super().__init__()
        self.num_steps = num_steps
        self.index = index.clamp_min(0)
        self.alphas = alphas
        self.cross_replace = cross_replace
        self.self_replace = self_replace

    @property
    def n_targets(self) -> int:
        return self.index.shape[0]

    @property
    def progress(self) -> float:
        return (self.step + 1) / self.num_steps

    def reads_probs(self, call: AttentionCall) -> bool:
        return call.is_cross and self.progress <= self.cross_replace

    def edit_qkv(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if call.is_cross:
            return query, key, value
        heads = call.heads
        rows = query.shape[0] // heads
        half = self.n_targets + 2
        if rows % half:
            raise ValueError(f"{rows} rows do not split into halves of {half} branches [S, T…, M]")
        q_rows, k_rows, v_rows = list(range(rows)), list(range(rows)), list(range(rows))  # source row of each
        for start in range(0, rows, half):
            s, m = start, start + half - 1
            targets = list(range(s + 1, m))
            if self.progress < self.self_replace:  # early: T ← softmax(Q_S K_Sᵀ)·V_T, M ← S
                for t in targets:
                    q_rows[t], k_rows[t] = s, s
                q_rows[m], k_rows[m], v_rows[m] = s, s, s
            else:  # late: T free, M ← softmax(Q_T K_Sᵀ)·V_S (mutual self-attention)
                q_rows[m], k_rows[m], v_rows[m] = targets[0], s, s

        def pick(x: torch.Tensor, picked: list[int]) -> torch.Tensor:
            return x.view(rows, heads, *x.shape[1:])[picked].reshape(x.shape)

        return pick(query, q_rows), pick(key, k_rows), pick(value, v_rows)

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if not call.is_cross or self.progress > self.cross_replace:
            return probs
        rows = list(self.rows(probs.shape[0] // call.heads))
        if len(rows) != self.n_targets + 2:
            raise ValueError(f"{len(rows)} conditional rows for branches [S, {self.n_targets} T, M]")
        maps = heads_view(probs, call.heads)  # (B, heads, Q, K)
        source, edited = maps[rows[0]], maps.clone()
        for k, row in enumerate(rows[1:-1]):
            edited[row] = refine_mapped(source, maps[row], self.index[k], self.alphas[k])
        return edited.reshape(probs.shape)


class VirtualLocalBlend:
    """InfEdit's LocalBlend on the branch latents [S, T…, M] after each step i > 0 (SPEC §9).

    Masks come from the maps summed over all steps so far at `level` (the model's mask level; mean over
    layers and heads, max
    over the words' tokens, nearest resize to the latent, / max, > threshold):
    - target blend words (in T's maps): z^T ← mask_e ? z^T : z^M, threshold max(0.15/√ᾱ_t, thresh_e);
    - source blend words that are not also target words (in S's maps): z^T ← mask_m ? z^S : z^T;
    - words in both, at step N − 2 only: z^T ← mask_me ? z^M : z^T (threshold thresh_e).

    Args:
        target_alphas: (targets, K) marks of the target blend words in each target prompt.
        source_alphas: (K,) marks of the source-only blend words in the source prompt.
        both_alphas: (targets, K) marks, in each target prompt, of blend words found in both prompts.
    """

    TEMPERATURE = 0.15

    def __init__(
        self,
        num_steps: int,
        target_alphas: torch.Tensor,
        source_alphas: torch.Tensor,
        both_alphas: torch.Tensor,
        level: int,
        thresh_e: float = 0.6,
        thresh_m: float = 0.6,
    ) -> None:
        self.num_steps = num_steps
        self.target_alphas = target_alphas
        self.source_alphas = source_alphas
        self.both_alphas = both_alphas
        self.thresh_e = thresh_e
        self.thresh_m = thresh_m
        self.level = level

    @staticmethod
    def mask(
        maps: torch.Tensor, alphas: torch.Tensor, size: tuple[int, int], threshold: float
    ) -> torch.Tensor:
        """(h, w, K) maps → (1, 1, H, W) boolean mask of the marked tokens (all False without tokens)."""
        tokens = alphas.nonzero().flatten().tolist()
        if not tokens:
            return torch.zeros(1, 1, *size, dtype=torch.bool, device=maps.device)
        words = maps[..., tokens].amax(dim=-1)[None, None]  # (1, 1, h, w): max over the words' tokens
        words = F.interpolate(words, size=size, mode="nearest")
        peak = words.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(words.dtype).tiny)
        return words / peak > threshold

    def __call__(self, latents: torch.Tensor, store: AttentionStore, step: int, alpha: float) -> torch.Tensor:
        """Blend the target rows of (2 + n, C, h, w) latents after step `step` (ᾱ of its timestep)."""
        if step == 0:
            return latents
        maps = store.average(self.level)  # (rows, h, w, K): the steps so far
        size = tuple(latents.shape[-2:])
        out = latents.clone()
        source, mutual = latents[0], latents[-1]
        thresh_e = max(self.TEMPERATURE / math.sqrt(alpha), self.thresh_e)
        for k in range(self.target_alphas.shape[0]):
            row = k + 1
            target = latents[row]
            if bool(self.target_alphas[k].any()):
                mask_e = self.mask(maps[row], self.target_alphas[k], size, thresh_e)[0]
                target = torch.where(mask_e, target, mutual)
            mask_m = self.mask(maps[0], self.source_alphas, size, self.thresh_m)[0]
            target = torch.where(mask_m, source, target)
            if step == self.num_steps - 2:
                mask_me = self.mask(maps[row], self.both_alphas[k], size, self.thresh_e)[0]
                target = torch.where(mask_me, mutual, target)
            out[row] = target
        return out


# ------------------------------------------------------------------------------------------ the method


@dataclass(frozen=True)
class VirtualTables:
    """What a virtual-inversion edit needs from its prompts: the refine alignment and the blend marks."""

    index: torch.Tensor  # (targets, K)
    alphas: torch.Tensor  # (targets, K)
    blend: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (target, source-only, both) marks


def blend_marks(
    tokenizer: Any, source: str, targets: Sequence[str], settings: VirtualSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """InfEdit's blend marks: target words in each target, source-only words in the source, words of
    both lists in each target."""
    if not (settings.blend_target or settings.blend_source):
        return None
    context = tokenizer.model_max_length
    target = torch.zeros(len(targets), context)
    both = torch.zeros(len(targets), context)
    source_only = torch.zeros(context)
    for word in settings.blend_target:
        for k, prompt in enumerate(targets):
            target[k, require(tokenizer, prompt, word, "virtual.blend_target")] = 1.0
    for word in settings.blend_source:
        positions = require(tokenizer, source, word, "virtual.blend_source")
        if word in settings.blend_target:
            for k, prompt in enumerate(targets):
                both[k, present(tokenizer, prompt, word)] = 1.0
        else:
            source_only[positions] = 1.0
    return target, source_only, both


class VirtualMethod(EditMethod):
    """Virtual inversion (see the module docstring). Rows [S, T…, M]; S and M take the source prompt."""

    name: ClassVar[str] = "virtual"
    owns: ClassVar[tuple[str, ...]] = ("virtual",)

    def steps(self, request: EditRequest) -> int:
        return request.virtual.steps

    def settings(self, request: EditRequest) -> VirtualSettings:
        return request.virtual

    def tables(self, tokenizer: Any, source: str, targets: Sequence[str], request: EditRequest,
               steps: int) -> VirtualTables:
        index, alphas, _ = token_mapping(tokenizer, source, targets, "refine")
        return VirtualTables(index, alphas, blend_marks(tokenizer, source, targets, request.virtual))

    def controller(self, plan: EditPlan, model: ModelFamily) -> VirtualAttentionControl:
        settings = plan.settings
        return VirtualAttentionControl(plan.steps, plan.tables.index, plan.tables.alphas,
                                       settings.cross_replace, settings.self_replace)

    def local_blend(self, plan: EditPlan, model: ModelFamily) -> VirtualLocalBlend | None:
        if plan.tables.blend is None:
            return None
        target, source, both = plan.tables.blend
        settings = plan.settings
        return VirtualLocalBlend(plan.steps, target, source, both, model.mask_level, settings.thresh_e,
                                 settings.thresh_m)

    def with_blend_words(self, request: EditRequest, source_word: str, target_word: str) -> EditRequest:
        """InfEdit's LocalBlend: the target word's region follows the target, the rest the mutual branch."""
        return replace(request, virtual=replace(request.virtual, blend_target=[target_word]))

    def edit(self, editor: Editor, image: torch.Tensor, plan: EditPlan, *, seed: int = 0,
             callback: StepCallback | None = None) -> EditResult:
        """Branches from one seeded noise: the same seed gives the same edit on any device."""
        model, settings = editor.model, plan.settings
        n_rows = plan.n_targets + 2  # [S, T…, M]
        lcm = settings.schedule == "lcm" or (settings.schedule == "auto" and is_lcm(model.scheduler_config))
        if lcm:  # the LCM timesteps of the model's betas (an LCM model, or an LCM-LoRA on any scheduler)
            schedule = DDIMSchedule.lcm(model.scheduler_config, plan.steps)
        else:
            schedule = DDIMSchedule.from_scheduler(model.scheduler, plan.steps)
        sample_generator = torch.Generator().manual_seed(seed) if settings.image_latent == "sample" else None
        with editor.lock:
            z0 = editor.encode(image, sample_generator)  # (1, C, h, w)
            cond = model.encode_prompt([*plan.prompts, plan.source]).float()
            empty = model.unconditional().float().expand(n_rows)
        guidance = torch.tensor(
            [settings.source_guidance, *[settings.target_guidance] * plan.n_targets, settings.source_guidance]
        )
        columns = []
        if plan.request.spatial_control:  # prompt row 0 is both S and M; "" has no placeholder
            columns = self.spatial_columns(editor, plan, lambda r: [0, n_rows - 1] if r == 0 else [r])

        def make_run() -> DenoisingRun:
            generator = torch.Generator().manual_seed(seed)
            if sample_generator is not None:  # the posterior sample came first in the seeded stream
                torch.randn(z0.shape, generator=generator)
            sampler = VirtualSampler(schedule, z0, generator, settings.eta, source_row=0)
            store = AttentionStore(levels=(model.mask_level,))
            blend = plan.local_blend(model)
            return DenoisingRun(
                sampler=sampler,
                latents=sampler.noise_like(z0).expand(n_rows, -1, -1, -1).clone(),
                cond=cond,
                uncond=lambda i: empty,
                guidance=guidance,
                controller=self.controller_chain(editor, store, plan, columns),
                store=store,
                source_row=0,
                target_rows=list(range(1, n_rows - 1)),
                hooks=[LocalBlendHook(blend, store)] if blend is not None else [],
            )

        return editor.run_plan(plan, make_run, image, z0, callback, None)
