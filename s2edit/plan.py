"""The edit plan: every check of an edit's inputs, done once, and the tables the run needs (SPEC §4–§6, §9).

    plan = plan_edit(tokenizer, placeholders, "a photo of a cat", ["a photo of a tiger"],
                     method="p2p", steps=50, p2p=P2PSettings(), spl=SPLSettings(), masks=MaskSettings())

:func:`plan_edit` needs only a tokenizer that knows the placeholders, so scripts call it before loading a
model (refusals stay fast). It refuses every user mistake in one line naming the bad value, and builds
the token alignment, the attention-control tables, the spatial-control columns, the LocalBlend marks and
the mask words' token positions. `Editor.edit` takes the plan and does not check again; it only confirms
that the model's tokenizer gives the same token ids (a plan made with another tokenizer is re-made).
Attention controllers hold per-run state, so the plan makes a fresh one for every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from editkit.errors import InputError
from s2edit.attention import AttentionController
from s2edit.maps import map_words
from s2edit.p2p import (
    LocalBlend,
    PromptToPrompt,
    blend_alphas,
    cross_replace_schedule,
    reweight_table,
    token_mapping,
)
from s2edit.settings import MaskSettings, P2PSettings, SPLSettings, VirtualSettings
from s2edit.tokenizer import token_ids, word_token_indices
from s2edit.virtual import VirtualAttentionControl, VirtualLocalBlend

EDIT_METHODS = ("p2p", "virtual")


@dataclass
class Placeholder:
    """A learned token ([I], [A]) and the object mask of its spatial control (S2Edit Eq. 3).

    The plan needs only its text and the prompt it was learned with; the editor applies the mask."""

    text: str
    mask: torch.Tensor | None = None  # (H, W) in [0, 1], any resolution (resized to each layer)
    prompt: str = ""  # P̃ it was learned with
    image: str = ""  # the image it was learned from


@dataclass(frozen=True)
class SpatialColumn:
    """Spatial control of one placeholder token: prompt row (0 = source, 1 + k = target k), position."""

    row: int
    position: int
    placeholder: str


@dataclass(frozen=True)
class EditPlan:
    """What one edit of `source` → `targets` needs besides the model and the image (see the module)."""

    method: str
    source: str
    targets: tuple[str, ...]
    steps: int
    p2p: P2PSettings
    virtual: VirtualSettings
    spl: SPLSettings
    masks: MaskSettings
    token_ids: tuple[tuple[int, ...], ...]  # per prompt [source, *targets], unpadded
    index: torch.Tensor | None  # (targets, K) refine alignment
    alphas: torch.Tensor | None  # (targets, K)
    mapper: torch.Tensor | None  # (targets, K, K) replace mapper
    cross_schedule: torch.Tensor | None  # (T+1, targets, K), p2p only
    reweight: torch.Tensor | None  # (targets, K), p2p only
    blend: torch.Tensor | None  # p2p LocalBlend marks (prompts, K)
    virtual_blend: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (target, source-only, both)
    spatial: tuple[SpatialColumn, ...]
    mask_source_positions: tuple[int, ...]
    mask_target_positions: tuple[tuple[int, ...], ...]  # per target
    words: tuple[tuple[str, ...], ...] = field(default=())  # per prompt: words whose maps are saved
    word_positions: tuple[tuple[tuple[int, ...], ...], ...] = field(default=())

    @property
    def prompts(self) -> list[str]:
        return [self.source, *self.targets]

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    def matches(self, tokenizer: object) -> bool:
        """Whether `tokenizer` gives the token ids this plan was made with."""
        try:
            return all(tuple(token_ids(tokenizer, p)) == ids for p, ids in zip(self.prompts, self.token_ids))
        except InputError:
            return False

    def controller(self) -> AttentionController:
        """A fresh attention controller of the method (P2P, or §9's virtual control)."""
        if self.method == "virtual":
            return VirtualAttentionControl(
                self.steps, self.index, self.alphas, self.virtual.cross_replace, self.virtual.self_replace
            )
        return PromptToPrompt(
            self.steps,
            self.cross_schedule,
            self.p2p.self_replace,
            index=self.index,
            alphas=self.alphas,
            mapper=self.mapper,
            reweight=self.reweight,
        )

    def local_blend(self) -> LocalBlend | VirtualLocalBlend | None:
        if self.method == "virtual":
            if self.virtual_blend is None:
                return None
            target, source, both = self.virtual_blend
            return VirtualLocalBlend(
                self.steps, target, source, both, self.virtual.thresh_e, self.virtual.thresh_m
            )
        if self.blend is None:
            return None
        return LocalBlend(self.blend, self.steps, self.p2p.blend_threshold, self.p2p.blend_start)

    def spl_steps(self) -> list[int]:
        """Denoising steps with SPL in the loop: i/T >= opt_schedule (none when SPL is off)."""
        if not self.spl.active:
            return []
        return [i for i in range(self.steps) if i / self.steps >= self.spl.opt_schedule]


def _present(tokenizer: object, prompt: str, word: str) -> list[int]:
    try:
        return word_token_indices(tokenizer, prompt, word)
    except InputError:
        return []


def _require(tokenizer: object, prompt: str, word: str, option: str) -> list[int]:
    positions = _present(tokenizer, prompt, word)
    if not positions:
        raise InputError(f"{option} word '{word}' is not in the prompt '{prompt}': use a word of that prompt")
    return positions


def _check_prompts(source: object, targets: object) -> tuple[str, list[str]]:
    if not isinstance(source, str) or not source.strip():
        raise InputError(f"source prompt {source!r} must be a non-empty string describing the image")
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets:
        raise InputError(f"targets={targets!r} must be a list of one or more target prompts")
    for target in targets:
        if not isinstance(target, str) or not target.strip():
            raise InputError(f"target prompt {target!r} must be a non-empty string")
    return source, list(targets)


def _check_placeholders(
    tokenizer: object, placeholders: Sequence[Placeholder], source: str, targets: Sequence[str]
) -> None:
    """Each target contains the source prompt's placeholders (or, when it has none, the first one)."""
    in_source = [p for p in placeholders if _present(tokenizer, source, p.text)]
    required = in_source or list(placeholders[:1])
    for target in targets:
        for placeholder in required:
            if not _present(tokenizer, target, placeholder.text):
                raise InputError(
                    f"target '{target}' does not contain the placeholder {placeholder.text} of the "
                    f"checkpoint: write it where the subject is, as in '{placeholder.prompt}'"
                )


def _spatial_columns(
    tokenizer: object, placeholders: Sequence[Placeholder], prompts: Sequence[str]
) -> tuple[SpatialColumn, ...]:
    """Spatial control of the placeholders of the SOURCE prompt, wherever they occur in the prompts.

    Their masks are drawn on the source image; a placeholder met only in targets (a compositional [A])
    was learned on a reference image, so its mask does not fit this layout and is not applied.
    """
    controlled = [p.text for p in placeholders if _present(tokenizer, prompts[0], p.text)]
    return tuple(
        SpatialColumn(row, position, text)
        for row, prompt in enumerate(prompts)
        for text in controlled
        for position in _present(tokenizer, prompt, text)
    )


def _p2p_blend(tokenizer: object, prompts: Sequence[str], words: Sequence[str]) -> torch.Tensor | None:
    """The flat LocalBlend word list → marks of the words present in each prompt (P2P's per-prompt form);
    a word in none of them is refused."""
    if not words:
        return None
    per_prompt: list[list[str]] = [[] for _ in prompts]
    for word in words:
        rows = [row for row, prompt in enumerate(prompts) if _present(tokenizer, prompt, word)]
        if not rows:
            raise InputError(
                f"blend word '{word}' is in neither the source nor a target prompt ({' | '.join(prompts)}): "
                "use a word of them"
            )
        for row in rows:
            per_prompt[row].append(word)
    return blend_alphas(tokenizer, prompts, per_prompt)


def _virtual_blend(
    tokenizer: object, source: str, targets: Sequence[str], settings: VirtualSettings
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
            target[k, _require(tokenizer, prompt, word, "virtual.blend_target")] = 1.0
    for word in settings.blend_source:
        positions = _require(tokenizer, source, word, "virtual.blend_source")
        if word in settings.blend_target:
            for k, prompt in enumerate(targets):
                both[k, _present(tokenizer, prompt, word)] = 1.0
        else:
            source_only[positions] = 1.0
    return target, source_only, both


def plan_edit(
    tokenizer: object,
    placeholders: Sequence[Placeholder],
    source: str,
    targets: Sequence[str],
    *,
    method: str = "p2p",
    steps: int | None = None,
    p2p: P2PSettings | None = None,
    virtual: VirtualSettings | None = None,
    spl: SPLSettings | None = None,
    masks: MaskSettings | None = None,
) -> EditPlan:
    """Check an edit once and build its plan (see the module docstring).

    `steps`: the p2p method's denoising steps (the inversion's); the virtual method uses
    `virtual.steps`. Raises InputError naming the first bad value.
    """
    # 1. Types and prompts
    p2p, virtual = p2p or P2PSettings(), virtual or VirtualSettings()
    spl, masks = spl or SPLSettings(), masks or MaskSettings()
    for name, value, kind in (("p2p", p2p, P2PSettings), ("virtual", virtual, VirtualSettings),
                              ("spl", spl, SPLSettings), ("masks", masks, MaskSettings)):
        if not isinstance(value, kind):
            raise InputError(f"{name}={value!r} must be a {kind.__name__}")
    if method not in EDIT_METHODS:
        raise InputError(f"method='{method}' must be one of {', '.join(EDIT_METHODS)}")
    steps = virtual.steps if method == "virtual" else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps={steps!r} must be a positive number of denoising steps")
    source, targets = _check_prompts(source, targets)
    prompts = [source, *targets]
    ids = tuple(tuple(token_ids(tokenizer, prompt)) for prompt in prompts)  # over-long prompts refused
    _check_placeholders(tokenizer, placeholders, source, targets)

    # 2. Preservation masks (SPEC §6)
    if spl.uses_mask and not masks.wanted:
        raise InputError(
            "spl.structure_area/color_area=masked needs mask words: set mask.source_words and/or "
            "mask.target_words"
        )
    source_positions = [
        p for w in masks.source_words for p in _require(tokenizer, source, w, "mask.source_words")
    ]
    target_positions = [
        tuple(p for w in masks.target_words for p in _require(tokenizer, target, w, "mask.target_words"))
        for target in targets
    ]

    # 3. Attention control: alignment, schedules, reweighting, LocalBlend
    mode = p2p.mode if method == "p2p" else "refine"
    index, alphas, mapper = token_mapping(tokenizer, source, targets, mode)
    cross_schedule = reweight = blend = virtual_blend = None
    if method == "p2p":
        cross_schedule = cross_replace_schedule(
            tokenizer, targets, steps, p2p.cross_replace, p2p.cross_replace_words
        )
        reweight = reweight_table(tokenizer, targets, p2p.reweight)
        blend = _p2p_blend(tokenizer, prompts, p2p.blend_words)
    else:
        virtual_blend = _virtual_blend(tokenizer, source, targets, virtual)

    # 4. Spatial control and the words whose maps are saved
    words = tuple(tuple(map_words(prompt)) for prompt in prompts)
    word_positions = tuple(
        tuple(tuple(_present(tokenizer, prompt, word)) for word in row_words)
        for prompt, row_words in zip(prompts, words)
    )
    kept = [
        (tuple(w for w, p in zip(row_words, row_positions) if p), tuple(p for p in row_positions if p))
        for row_words, row_positions in zip(words, word_positions)
    ]
    return EditPlan(
        method=method,
        source=source,
        targets=tuple(targets),
        steps=steps,
        p2p=p2p,
        virtual=virtual,
        spl=spl,
        masks=masks,
        token_ids=ids,
        index=index,
        alphas=alphas,
        mapper=mapper,
        cross_schedule=cross_schedule,
        reweight=reweight,
        blend=blend,
        virtual_blend=virtual_blend,
        spatial=_spatial_columns(tokenizer, placeholders, prompts),
        mask_source_positions=tuple(source_positions),
        mask_target_positions=tuple(target_positions),
        words=tuple(k[0] for k in kept),
        word_positions=tuple(k[1] for k in kept),
    )
