"""The edit plan: every check of an edit's inputs, done once, and the tables the run needs (SPEC §4–§6, §9).

    plan = plan_edit(tokenizer, placeholders, "a photo of a cat", ["a photo of a tiger"],
                     EditRequest(method="p2p", steps=50))

:func:`plan_edit` needs only a tokenizer that knows the placeholders, so scripts call it before loading a
model (refusals stay fast). It refuses every user mistake in one line naming the bad value, and builds the
method's tables (its token alignment, attention-control schedules, LocalBlend marks: the method's
:meth:`~s2edit.editing.methods.base.EditMethod.tables`), the spatial-control columns and the mask words'
token positions. The editor takes the plan and does not check again; it only confirms that the model's
tokenizer gives the same token ids (a plan made with another tokenizer is re-made). Attention controllers
hold per-run state, so the plan makes a fresh one for every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from editkit.errors import InputError
from editkit.images import load_mask
from s2edit.core.attention import AttentionController
from s2edit.core.engine import LocalBlend
from s2edit.core.family import ModelFamily
from s2edit.core.settings import MaskSettings, SPLSettings
from s2edit.core.tokenizer import token_ids, word_token_indices
from s2edit.editing.maps import map_words
from s2edit.editing.methods import METHODS, edit_method
from s2edit.editing.request import EditRequest, choose_method

if TYPE_CHECKING:
    from s2edit.training.export import ExportManifest


@dataclass
class Placeholder:
    """A learned token ([I], [A]) and the object mask of its spatial control (S2Edit Eq. 3).

    The plan needs only its text and the prompt it was learned with; the editor applies the mask."""

    text: str
    mask: torch.Tensor | None = None  # (H, W) in [0, 1], any resolution (resized to each layer)
    prompt: str = ""  # P̃ it was learned with
    image: str = ""  # the image it was learned from


def export_placeholders(folder: str | Path, manifest: ExportManifest) -> list[Placeholder]:
    """The learned tokens of an export folder, each with its object mask at the mask file's own size."""
    placeholders = []
    for token in manifest.tokens:
        mask_file = Path(folder) / token.mask
        with Image.open(mask_file) as image:
            size = (image.height, image.width)
        mask = load_mask(mask_file, size)
        placeholders.append(Placeholder(token.placeholder, mask, token.prompt, token.image))
    return placeholders


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
    request: EditRequest
    source: str
    targets: tuple[str, ...]
    steps: int
    tables: Any  # the method's own (alignment, schedules, LocalBlend marks)
    token_ids: tuple[tuple[int, ...], ...]  # per prompt [source, *targets], unpadded
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

    @property
    def spl(self) -> SPLSettings:
        return self.request.spl

    @property
    def masks(self) -> MaskSettings:
        return self.request.mask

    @property
    def settings(self) -> Any:
        """The method's own settings group."""
        return edit_method(self.method).settings(self.request)

    def matches(self, tokenizer: object) -> bool:
        """Whether `tokenizer` gives the token ids this plan was made with."""
        try:
            return all(tuple(token_ids(tokenizer, p)) == ids for p, ids in zip(self.prompts, self.token_ids))
        except InputError:
            return False

    def controller(self, model: ModelFamily) -> AttentionController:
        """A fresh attention controller of the method for `model`."""
        return edit_method(self.method).controller(self, model)

    def local_blend(self, model: ModelFamily) -> LocalBlend | None:
        return edit_method(self.method).local_blend(self, model)

    def spl_steps(self) -> list[int]:
        """Denoising steps with SPL in the loop: i/T >= opt_schedule (none when SPL is off)."""
        if not self.spl.active:
            return []
        return [i for i in range(self.steps) if i / self.steps >= self.spl.opt_schedule]


def present(tokenizer: object, prompt: str, word: str) -> list[int]:
    try:
        return word_token_indices(tokenizer, prompt, word)
    except InputError:
        return []


def require(tokenizer: object, prompt: str, word: str, option: str) -> list[int]:
    positions = present(tokenizer, prompt, word)
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
    in_source = [p for p in placeholders if present(tokenizer, source, p.text)]
    required = in_source or list(placeholders[:1])
    for target in targets:
        for placeholder in required:
            if not present(tokenizer, target, placeholder.text):
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
    controlled = [p.text for p in placeholders if present(tokenizer, prompts[0], p.text)]
    return tuple(
        SpatialColumn(row, position, text)
        for row, prompt in enumerate(prompts)
        for text in controlled
        for position in present(tokenizer, prompt, text)
    )


def plan_edit(
    tokenizer: object,
    placeholders: Sequence[Placeholder],
    source: str,
    targets: Sequence[str],
    request: EditRequest | None = None,
    *,
    method: str | None = None,
) -> EditPlan:
    """Check an edit once and build its plan (see the module docstring).

    `method`: the editing method when the caller has settled it (:func:`s2edit.editing.request.
    choose_method`, e.g. from a command line's given keys); default: the request's, with `auto` settled by
    the settings that differ from their defaults. Raises InputError naming the first bad value.
    """
    # 1. Request, method and prompts
    request = EditRequest() if request is None else request
    if not isinstance(request, EditRequest):
        raise InputError(f"request={request!r} must be an EditRequest")
    method = choose_method(request) if method is None else method
    if method not in METHODS:
        raise InputError(f"method='{method}' must be one of {', '.join(METHODS)}")
    steps = edit_method(method).steps(request)
    source, targets = _check_prompts(source, targets)
    prompts = [source, *targets]
    ids = tuple(tuple(token_ids(tokenizer, prompt)) for prompt in prompts)  # over-long prompts refused
    _check_placeholders(tokenizer, placeholders, source, targets)

    # 2. Preservation masks (SPEC §6)
    masks = request.mask
    if request.spl.uses_mask and not masks.wanted:
        raise InputError(
            "spl.structure_area/color_area=masked needs mask words: set mask.source_words and/or "
            "mask.target_words"
        )
    source_positions = [
        p for w in masks.source_words for p in require(tokenizer, source, w, "mask.source_words")
    ]
    target_positions = [
        tuple(p for w in masks.target_words for p in require(tokenizer, target, w, "mask.target_words"))
        for target in targets
    ]

    # 3. The method's tables: alignment, schedules, reweighting, LocalBlend
    tables = edit_method(method).tables(tokenizer, source, targets, request, steps)

    # 4. Spatial control and the words whose maps are saved
    words = tuple(tuple(map_words(prompt)) for prompt in prompts)
    word_positions = tuple(
        tuple(tuple(present(tokenizer, prompt, word)) for word in row_words)
        for prompt, row_words in zip(prompts, words)
    )
    kept = [
        (tuple(w for w, p in zip(row_words, row_positions) if p), tuple(p for p in row_positions if p))
        for row_words, row_positions in zip(words, word_positions)
    ]
    return EditPlan(
        method=method,
        request=request,
        source=source,
        targets=tuple(targets),
        steps=steps,
        tables=tables,
        token_ids=ids,
        spatial=_spatial_columns(tokenizer, placeholders, prompts),
        mask_source_positions=tuple(source_positions),
        mask_target_positions=tuple(target_positions),
        words=tuple(k[0] for k in kept),
        word_positions=tuple(k[1] for k in kept),
    )
