"""Prompt-to-Prompt editing from an inversion (SPEC §3–§4): the method `p2p`.

The source image is inverted (null-text, Direct, negative-prompt or plain DDIM inversion; cached), then
the batch of conditional rows [source, target_1, …, target_n] is denoised from the inversion's z_T with
classifier-free guidance, the unconditional input of every row being the inversion's ∅_i. During the
first steps each target takes the source's cross-attention maps (through a token mapping, so that
"a cat" → "a fluffy cat" keeps the cat where it was) and its self-attention maps (which carry the
layout). The unconditional half of the batch is never touched. Every rule is prompt-to-prompt's
(google/prompt-to-prompt, `seq_aligner.py`, `ptp_utils.py`, the notebook's controllers), pinned by tests
with hand-derived expectations:

- token alignment (refine, replace): :mod:`s2edit.editing.alignment`;
- cross-attention injection for steps i < int(cross_replace·(T+1)) (the per-word table has T+1 rows),
  self-attention for i < int(self_replace·T), in layers of at least the model's `self_replace_level`
  (SD: ≤ (latent/2)² queries);
- reweighting scales the mapped source maps, so it acts only inside the injection;
- LocalBlend reads the maps summed over all steps so far and starts at step int(blend_start·T);
- Direct Inversion's offsets are added to the source row after every step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from editkit.errors import InputError
from s2edit.core.attention import AttentionCall, AttentionController, AttentionStore, heads_view
from s2edit.core.diffusion import DDIMSampler, DDIMSchedule
from s2edit.core.engine import DenoisingRun, LocalBlendHook, OffsetHook, StepCallback
from s2edit.core.family import ModelFamily
from s2edit.core.settings import P2PSettings
from s2edit.core.tokenizer import word_token_indices
from s2edit.editing.alignment import refine_mapped, token_mapping
from s2edit.editing.inversion import Inversion
from s2edit.editing.methods.base import EditMethod
from s2edit.editing.plan import present

if TYPE_CHECKING:
    from s2edit.editing.editor import Editor
    from s2edit.editing.plan import EditPlan
    from s2edit.editing.request import EditRequest
    from s2edit.editing.result import EditResult

BLEND_POOL = 3  # LocalBlend: 3×3 max-pool of the word maps (P2P)


# ------------------------------------------------------------------------------- per-word schedules


def injection_steps(fraction: float, rows: int) -> int:
    """P2P's step count: int(fraction · rows), Python's truncation exactly as the reference computes it
    (cross-attention: rows = T + 1, the alpha table's length; self-attention and LocalBlend: rows = T)."""
    return int(fraction * rows)


def _check_fraction(name: str, value: float, meaning: str = "a fraction of the denoising steps") -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise InputError(f"{name}={value!r} must be {meaning} in [0, 1]")


def _word_positions(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], word: str, option: str
) -> list[list[int]]:
    """Token positions of `word` in each prompt ([] where absent); refused when it is in none of them."""
    positions = []
    for prompt in prompts:
        try:
            positions.append(word_token_indices(tokenizer, prompt, word))
        except InputError:
            positions.append([])
    if not any(positions):
        shown = " | ".join(f"'{p}'" for p in prompts)
        raise InputError(f"{option} word '{word}' is in no target prompt ({shown}): use a word of one")
    return positions


def cross_replace_schedule(
    tokenizer: PreTrainedTokenizerBase,
    targets: Sequence[str],
    num_steps: int,
    cross_replace: float = 0.8,
    words: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """(T+1, targets, context) table: 1 where target token k takes the source's map at step i.

    As P2P's `get_time_words_attention_alpha`: every token is injected for i < int(cross_replace·(T+1));
    a word in `words` gets its own fraction instead (in each target prompt that contains it; a word in
    no target prompt is refused). Row i is read at step i; the last row is never reached.
    """
    _check_fraction("cross_replace", cross_replace)
    context = tokenizer.model_max_length
    rows = num_steps + 1
    schedule = torch.zeros(rows, len(targets), context)
    schedule[: injection_steps(cross_replace, rows)] = 1.0
    for word, fraction in (words or {}).items():
        _check_fraction(f"cross_replace_words['{word}']", fraction)
        for k, positions in enumerate(_word_positions(tokenizer, targets, word, "cross_replace_words")):
            schedule[:, k, positions] = 0.0
            schedule[: injection_steps(fraction, rows), k, positions] = 1.0
    return schedule


def reweight_table(
    tokenizer: PreTrainedTokenizerBase, targets: Sequence[str], reweight: Mapping[str, float] | None
) -> torch.Tensor | None:
    """(targets, context) factors of the injected source maps' columns (1 = unchanged)."""
    if not reweight:
        return None
    table = torch.ones(len(targets), tokenizer.model_max_length)
    for word, value in reweight.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"reweight['{word}']={value!r} must be a finite number")
        for k, positions in enumerate(_word_positions(tokenizer, targets, word, "reweight")):
            table[k, positions] = float(value)
    return table


# ------------------------------------------------------------------------------------ the controller


class PromptToPrompt(AttentionController):
    """Edits the target rows' attention from the source row's (conditional rows only).

    Args:
        num_steps: T, the number of denoising steps; `step` must stay in 0…T−1.
        cross_schedule: (T+1, targets, K) per-step, per-token injection switch (cross_replace_schedule).
        self_replace: fraction of the steps with self-attention injection (i < int(self_replace·T)).
        index: (targets, K) refine mapping (source position per target position, −1 new) with
        alphas: (targets, K) 1 where a target token has a source partner, 0 for new tokens; or
        mapper: (targets, K, K) replace mapping (`mapper[s, t]`); exactly one of index and mapper.
        reweight: (targets, K) factors of the mapped source maps (P2P `AttentionReweight`).
        self_level: self-attention is replaced only in layers of at least this level (the model's).
        fused_self: replace it by swapping queries and keys before the fused kernel (the model's choice:
            SDXL's large maps are never materialised) instead of editing explicit maps (P2P's way).

    Per target k and step i, with own maps A_k, mapped source maps M_k = refine: α·A_S[index] + (1−α)·A_k,
    replace: A_S·mapper, times the reweight factors, and the time-word switch a_i:
    A_k ← a_i·M_k + (1 − a_i)·A_k.
    """

    def __init__(
        self,
        num_steps: int,
        cross_schedule: torch.Tensor,
        self_replace: float = 0.5,
        index: torch.Tensor | None = None,
        alphas: torch.Tensor | None = None,
        mapper: torch.Tensor | None = None,
        reweight: torch.Tensor | None = None,
        self_level: int = 2,
        fused_self: bool = False,
    ) -> None:
        super().__init__()
        if (index is None) == (mapper is None) or (index is None) != (alphas is None):
            raise ValueError("give a refine index with its alphas, or a replace mapper")
        self.num_steps = num_steps
        self.cross_schedule = cross_schedule
        self.self_steps = injection_steps(self_replace, num_steps)
        self.index = index.clamp_min(0) if index is not None else None  # new tokens: α = 0 anyway
        self.alphas = alphas
        self.mapper = mapper
        self.reweight = reweight
        self.self_level = self_level
        self.fused_self = fused_self

    @property
    def num_targets(self) -> int:
        return self.cross_schedule.shape[1]

    def wants(self, is_cross: bool, level: int) -> bool:
        return is_cross or (level >= self.self_level and self.self_steps > 0)

    def reads_probs(self, call: AttentionCall) -> bool:
        if call.is_cross:
            return bool(self.cross_schedule[self.step].any())
        return self._injects_self(call) and not self.fused_self

    def _injects_self(self, call: AttentionCall) -> bool:
        return not call.is_cross and call.level >= self.self_level and self.step < self.self_steps

    def edit_qkv(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused self-attention injection: each target row attends with the source row's queries and keys
        to its own values, softmax(Q_S K_Sᵀ)·V_T = P2P's replaced maps times V_T, by the fused kernel
        without materialising a map (SPEC §10)."""
        if not (self.fused_self and self._injects_self(call)):
            return query, key, value
        rows = list(self.rows(query.shape[0] // call.heads))
        if len(rows) != 1 + self.num_targets:
            raise ValueError(f"{len(rows)} conditional rows for 1 source + {self.num_targets} target prompts")
        query, key = (self._from_source(x, rows, call.heads) for x in (query, key))
        return query, key, value

    @staticmethod
    def _from_source(x: torch.Tensor, rows: list[int], heads: int) -> torch.Tensor:
        """(B·heads, N, d) with the target rows' entries replaced by the source row's."""
        per_row = x.view(-1, heads, *x.shape[1:])
        edited = per_row.clone()
        edited[rows[1:]] = per_row[rows[0]]
        return edited.view(x.shape)

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if not 0 <= self.step < self.num_steps:
            raise ValueError(f"step {self.step} is outside the {self.num_steps} denoising steps of this edit")
        rows = list(self.rows(probs.shape[0] // call.heads))
        if len(rows) != 1 + self.num_targets:
            raise ValueError(f"{len(rows)} conditional rows for 1 source + {self.num_targets} target prompts")
        if call.is_cross:
            return self._edit_cross(probs, call, rows)
        if self._injects_self(call):
            return self._inject_self(probs, call, rows)
        return probs

    def _mapped(self, source: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
        """The source maps (heads, Q, K) rearranged into target k's token order, reweighted."""
        if self.index is not None:
            mapped = refine_mapped(source, target, self.index[k], self.alphas[k])
        else:
            mapped = source @ self.mapper[k].to(source)  # Σ_s source[..., s]·mapper[s, t]
        if self.reweight is not None:
            mapped = mapped * self.reweight[k].to(mapped)  # no renormalisation (SPEC §4)
        return mapped

    def _edit_cross(self, probs: torch.Tensor, call: AttentionCall, rows: list[int]) -> torch.Tensor:
        maps = heads_view(probs, call.heads)  # (B, heads, Q, K)
        context = self.cross_schedule.shape[-1]
        if maps.shape[-1] != context:
            raise ValueError(f"cross-attention over {maps.shape[-1]} tokens, but a mapping for {context}")
        source, edited = maps[rows[0]], maps.clone()
        for k, row in enumerate(rows[1:]):
            switch = self.cross_schedule[self.step, k]  # (K,), on the CPU: no device sync
            if bool(switch.any()):
                switch = switch.to(maps)
                target = maps[row]
                edited[row] = switch * self._mapped(source, target, k) + (1 - switch) * target
        return edited.reshape(probs.shape)

    def _inject_self(self, probs: torch.Tensor, call: AttentionCall, rows: list[int]) -> torch.Tensor:
        maps = heads_view(probs, call.heads)  # (B, heads, Q, Q)
        edited = maps.clone()
        edited[rows[1:]] = maps[rows[0]]
        return edited.reshape(probs.shape)


# -------------------------------------------------------------------------------------- local blend


class LocalBlend:
    """Keep the source latent outside the edited words' region (P2P LocalBlend, SPEC §4).

    `word_alphas` (prompts, K) marks the blend words' tokens in each prompt [source, targets…]. Called
    by the denoising loop after each step with the conditional latents (1 + n, C, h, w) and the
    AttentionStore of the run: the mask comes from the words' maps at `level` (the model's mask level:
    the "16×16" layers of SD at 512²) summed over all steps so far (the normalisation by the maximum
    makes sum and mean the same).
    """

    def __init__(
        self,
        word_alphas: torch.Tensor,
        num_steps: int,
        level: int,
        threshold: float = 0.3,
        start: float = 0.2,
    ) -> None:
        self.word_alphas = word_alphas
        self.threshold = threshold
        self.start_step = injection_steps(start, num_steps)
        self.level = level

    def masks(self, maps: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """(prompts, h, w, K) head- and layer-averaged maps → (prompts, 1, H, W) binary word masks."""
        words = (maps * self.word_alphas.to(maps)[:, None, None, :]).sum(dim=-1)[:, None]  # (P, 1, h, w)
        words = F.max_pool2d(words, BLEND_POOL, stride=1, padding=BLEND_POOL // 2)
        words = F.interpolate(words, size=latent_size, mode="nearest")  # P2P's resize
        peak = words.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(words.dtype).tiny)
        return words / peak > self.threshold

    def __call__(
        self, latents: torch.Tensor, store: AttentionStore, step: int, alpha: float | None = None
    ) -> torch.Tensor:
        """z[target] = z[source] + mask·(z[target] − z[source]), mask = target words ∪ source words.
        (`alpha`, the step's ᾱ, is unused: P2P's thresholds do not depend on it.)"""
        if step < self.start_step:
            return latents
        maps = store.average(self.level)  # (P, h, w, K): the steps so far
        if maps.shape[0] != latents.shape[0]:
            raise ValueError(f"{maps.shape[0]} stored attention rows for {latents.shape[0]} latents")
        masks = self.masks(maps, tuple(latents.shape[-2:]))
        mask = (masks[1:] | masks[:1]).to(latents.dtype)  # (n, 1, H, W)
        source = latents[:1]
        return torch.cat([source, source + mask * (latents[1:] - source)])


def blend_alphas(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], blend_words: Sequence[Sequence[str]]
) -> torch.Tensor:
    """(prompts, K) marks of each prompt's blend words (one word list per prompt, source first)."""
    if len(blend_words) != len(prompts) or any(isinstance(w, str) for w in blend_words):
        raise InputError(
            f"blend_words={list(blend_words)!r} must hold one list of words per prompt "
            f"(source first, then each of the {len(prompts) - 1} targets), e.g. [['cat'], ['dog']]"
        )
    alphas = torch.zeros(len(prompts), tokenizer.model_max_length)
    for row, (prompt, words) in enumerate(zip(prompts, blend_words)):
        for word in words:
            alphas[row, word_token_indices(tokenizer, prompt, word)] = 1.0  # InputError if absent
    if not bool(alphas.any()):
        raise InputError("blend_words names no word at all: give at least one, or leave LocalBlend off")
    return alphas

# ------------------------------------------------------------------------------------------ the method


@dataclass(frozen=True)
class P2PTables:
    """What a Prompt-to-Prompt edit needs from its prompts (one refine alignment, or a replace mapper)."""

    index: torch.Tensor | None  # (targets, K) refine alignment
    alphas: torch.Tensor | None  # (targets, K)
    mapper: torch.Tensor | None  # (targets, K, K) replace mapper
    cross_schedule: torch.Tensor  # (T+1, targets, K)
    reweight: torch.Tensor | None  # (targets, K)
    blend: torch.Tensor | None  # LocalBlend marks (prompts, K)


def blend_marks(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], words: Sequence[str]
) -> torch.Tensor | None:
    """The flat LocalBlend word list → marks of the words present in each prompt (P2P's per-prompt form);
    a word in none of them is refused."""
    if not words:
        return None
    per_prompt: list[list[str]] = [[] for _ in prompts]
    for word in words:
        rows = [row for row, prompt in enumerate(prompts) if present(tokenizer, prompt, word)]
        if not rows:
            raise InputError(
                f"blend word '{word}' is in neither the source nor a target prompt ({' | '.join(prompts)}): "
                "use a word of them"
            )
        for row in rows:
            per_prompt[row].append(word)
    return blend_alphas(tokenizer, prompts, per_prompt)


class PromptToPromptMethod(EditMethod):
    """Inversion + Prompt-to-Prompt (see the module docstring). Rows [source, targets…]."""

    name: ClassVar[str] = "p2p"
    owns: ClassVar[tuple[str, ...]] = ("inversion", "steps", "guidance", "nti", "p2p")

    def steps(self, request: EditRequest) -> int:
        return request.steps

    def settings(self, request: EditRequest) -> P2PSettings:
        return request.p2p

    def tables(self, tokenizer: Any, source: str, targets: Sequence[str], request: EditRequest,
               steps: int) -> P2PTables:
        settings = request.p2p
        index, alphas, mapper = token_mapping(tokenizer, source, targets, settings.mode)
        return P2PTables(
            index=index, alphas=alphas, mapper=mapper,
            cross_schedule=cross_replace_schedule(tokenizer, targets, steps, settings.cross_replace,
                                                  settings.cross_replace_words),
            reweight=reweight_table(tokenizer, targets, settings.reweight),
            blend=blend_marks(tokenizer, [source, *targets], settings.blend_words),
        )

    def controller(self, plan: EditPlan, model: ModelFamily) -> PromptToPrompt:
        tables = plan.tables
        return PromptToPrompt(plan.steps, tables.cross_schedule, plan.settings.self_replace,
                              index=tables.index, alphas=tables.alphas, mapper=tables.mapper,
                              reweight=tables.reweight, self_level=model.self_replace_level,
                              fused_self=model.fused_self_attention)

    def local_blend(self, plan: EditPlan, model: ModelFamily) -> LocalBlend | None:
        if plan.tables.blend is None:
            return None
        settings = plan.settings
        return LocalBlend(plan.tables.blend, plan.steps, model.mask_level, settings.blend_threshold,
                          settings.blend_start)

    def with_blend_words(self, request: EditRequest, source_word: str, target_word: str) -> EditRequest:
        """P2P's LocalBlend keeps the regions of both words' maps (the union of the two masks)."""
        return replace(request, p2p=replace(request.p2p, blend_words=[source_word, target_word]))

    def edit(self, editor: Editor, image: torch.Tensor, plan: EditPlan, *, seed: int = 0,
             callback: StepCallback | None = None) -> EditResult:
        """Invert `image` under the source prompt (cached), then edit the inversion."""
        request, start = plan.request, time.perf_counter()
        inversion = editor.invert(image, plan.source, request.inversion_request(),
                                  spatial_control=request.spatial_control)
        seconds = time.perf_counter() - start
        result = self.edit_inversion(editor, inversion, plan, callback)
        result.inversion_seconds = seconds
        return result

    def edit_inversion(self, editor: Editor, inversion: Inversion, plan: EditPlan,
                       callback: StepCallback | None = None) -> EditResult:
        """Edit an inverted image: [source, targets…] from z_T, ∅_i per step, Prompt-to-Prompt, Direct
        Inversion's offsets on the source row."""
        if plan.steps != inversion.steps:
            raise InputError(f"the plan has {plan.steps} steps but the inversion {inversion.steps}: "
                             "plan with the inversion's steps")
        model = editor.model
        device = model.device
        n_rows = 1 + plan.n_targets
        columns, unconditional = [], []
        if plan.request.spatial_control:
            columns = self.spatial_columns(editor, plan, lambda r: [r])
            if inversion.null_is_prompt:  # ∅ = P̃: its placeholders are controlled as in the inversion
                source_columns = self.spatial_columns(editor, plan, lambda r: [0] if r == 0 else [])
                unconditional = [(c.token, c.mask) for c in source_columns]
        schedule = DDIMSchedule.from_scheduler(model.scheduler, plan.steps)

        def make_run() -> DenoisingRun:
            store = AttentionStore(levels=(model.mask_level,))
            hooks = [OffsetHook(inversion.offsets)] if inversion.offsets is not None else []
            blend = plan.local_blend(model)
            if blend is not None:
                hooks.append(LocalBlendHook(blend, store))
            return DenoisingRun(
                sampler=DDIMSampler(schedule),
                latents=inversion.z_T.to(device).float().expand(n_rows, -1, -1, -1).clone(),
                cond=model.encode_prompt(plan.prompts).float(),
                uncond=lambda i: inversion.null(i).to(device).expand(n_rows),
                guidance=torch.full((n_rows,), float(inversion.guidance)),
                controller=self.controller_chain(editor, store, plan, columns, unconditional),
                store=store,
                source_row=0,
                target_rows=list(range(1, n_rows)),
                hooks=hooks,
            )

        info = inversion.report(editor.cache_dir)
        image, z0 = inversion.image.to(device), inversion.z0.to(device)
        return editor.run_plan(plan, make_run, image, z0, callback, info)
