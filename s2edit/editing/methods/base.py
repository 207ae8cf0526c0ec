"""What an editing method is: the part of an edit that differs between methods.

A method owns its settings (the request keys only it reads), its plan tables (checked once, before any
model runs), its attention controller and LocalBlend, how its denoising rows are laid out, and how it gets
from an image to a :class:`~s2edit.core.engine.DenoisingRun` (inverting it, or not). Everything else (the
preview masks, the loop with SPL, decoding, post-processing, metrics) is the editor's shared pipeline
body (:meth:`s2edit.editing.editor.Editor.run_plan`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from editkit.errors import InputError
from s2edit.core.attention import (
    AttentionController,
    AttentionStore,
    ColumnMask,
    ControllerChain,
    SpatialControl,
)
from s2edit.core.detect import method_refusal
from s2edit.core.engine import LocalBlend, StepCallback
from s2edit.core.family import ModelFamily

if TYPE_CHECKING:
    from s2edit.editing.editor import Editor
    from s2edit.editing.plan import EditPlan
    from s2edit.editing.request import EditRequest
    from s2edit.editing.result import EditResult


class EditMethod(abc.ABC):
    """One editing method (registered in :data:`s2edit.editing.methods.METHODS`)."""

    name: ClassVar[str]
    owns: ClassVar[tuple[str, ...]]  # request keys (and key groups) that only this method reads

    def check_model(self, model: ModelFamily | type[ModelFamily], source: str | None = None) -> None:
        """Refuse, in one line, a model (or a family, for `model=` `source` before loading) of a family
        the method does not run on (flowedit: the flow families; the others: the UNet families)."""
        family = model if isinstance(model, type) else type(model)
        source = source if source is not None else getattr(model, "source", family.name)
        message = method_refusal(self.name, family.name, source)
        if message is not None:
            raise InputError(message)

    @abc.abstractmethod
    def steps(self, request: EditRequest) -> int:
        """The denoising steps of an edit."""

    @abc.abstractmethod
    def settings(self, request: EditRequest) -> Any:
        """The method's own settings group (reported with the edit)."""

    @abc.abstractmethod
    def tables(self, tokenizer: Any, source: str, targets: Sequence[str], request: EditRequest,
               steps: int) -> Any:
        """The method's plan tables (alignment, schedules, LocalBlend marks); every user mistake in its
        settings is refused here in one line."""

    @abc.abstractmethod
    def controller(self, plan: EditPlan, model: ModelFamily) -> AttentionController:
        """A fresh attention controller of one run (controllers hold per-run state)."""

    @abc.abstractmethod
    def local_blend(self, plan: EditPlan, model: ModelFamily) -> LocalBlend | None:
        """The method's LocalBlend of one run, or None when no blend words are given."""

    @abc.abstractmethod
    def with_blend_words(self, request: EditRequest, source_word: str, target_word: str) -> EditRequest:
        """`request` with LocalBlend on an edit of `source_word` into `target_word` (a dataset item's)."""

    @abc.abstractmethod
    def edit(
        self,
        editor: Editor,
        image: torch.Tensor,
        plan: EditPlan,
        *,
        seed: int = 0,
        callback: StepCallback | None = None,
    ) -> EditResult:
        """Edit `image` ((1, 3, H, W) in [-1, 1], at the working size) as `plan` says."""

    # ------------------------------------------------------------------------------------ shared by methods

    @staticmethod
    def spatial_columns(editor: Editor, plan: EditPlan, rows_of_prompt: Callable[[int], Sequence[int]]
                        ) -> list[ColumnMask]:
        """Spatial control (S2Edit Eq. 3) of the plan's placeholders that have a mask, at the conditional
        rows `rows_of_prompt(k)` that prompt k of the plan (0 = source) conditions."""
        masks = {p.text: p.mask for p in editor.placeholders if p.mask is not None}
        return [ColumnMask(row, column.position, masks[column.placeholder])
                for column in plan.spatial if column.placeholder in masks
                for row in rows_of_prompt(column.row)]

    @staticmethod
    def controller_chain(editor: Editor, store: AttentionStore, plan: EditPlan, columns: Sequence[ColumnMask],
                         unconditional: Sequence[tuple[int, torch.Tensor]] = ()) -> ControllerChain:
        """Spatial control, then the store (maps before any edit), then the method's attention control."""
        return ControllerChain([SpatialControl(columns, editor.renormalize, unconditional), store,
                                plan.controller(editor.model)])
