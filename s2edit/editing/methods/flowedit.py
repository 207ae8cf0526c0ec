"""FlowEdit on flow models (SD3, FLUX; SPEC §11): the method `flowedit`.

Inversion-free: the input's latent is moved along the difference of the target and source velocities at
coupled noisy copies of it (:func:`s2edit.editing.flowedit.flowedit_latents`). SPL acts in the loop
**[choice]**: z_edit is a clean-image latent at every step, so at executed steps j with (j + 1)/n_exec ≥
`spl.opt_schedule` it is decoded, refined against the VAE round trip of the input and re-encoded; then the
decoded edits are post-processed against the input as for every method (SPEC §5). Its settings are the
`flowedit.*` keys; null ones take the family's paper defaults, settled when the model is known.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from tqdm.auto import tqdm

from editkit.errors import InputError
from s2edit.core.engine import (
    LocalBlend,
    RefineSettings,
    StepCallback,
    postprocessed,
    preservation_losses,
    refine_images,
)
from s2edit.core.family import ModelFamily
from s2edit.core.joint_attention import JointMapStore
from s2edit.core.settings import FlowEditSettings
from s2edit.editing.maps import attention_maps, loss_mask_pair, preservation_masks
from s2edit.editing.methods.base import EditMethod

if TYPE_CHECKING:
    from s2edit.core.attention import AttentionController
    from s2edit.editing.editor import Editor
    from s2edit.editing.plan import EditPlan
    from s2edit.editing.request import EditRequest
    from s2edit.editing.result import EditResult


def spl_flow_steps(executed: int, opt_schedule: float) -> list[int]:
    """Executed FlowEdit steps j (0 … executed − 1) with SPL in the loop: (j + 1)/n_exec ≥ opt_schedule."""
    return [j for j in range(executed) if (j + 1) / executed >= opt_schedule]


def joint_masks(model: Any, plan: EditPlan, store: JointMapStore, image: torch.Tensor, guides: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """SPEC §6 preservation masks from the joint-attention word maps (rows [source, *targets]): the mask
    words' columns of each row's image→text block, at the token grid (latent side / patch), upsampled by
    the guided filter on the input (source) and `guides` (targets) as for the UNet families."""
    block = store.average()  # (1 + n, N_img, L)
    height, width = _token_grid(model, image)
    maps = block.reshape(block.shape[0], height, width, block.shape[-1])
    source = [c for w in plan.masks.source_words for c in model.context_columns(plan.source, w)]
    targets = [[c for w in plan.masks.target_words for c in model.context_columns(target, w)]
               for target in plan.targets]
    return preservation_masks(maps, source, targets, image, guides, plan.masks)


def joint_word_maps(model: Any, plan: EditPlan, store: JointMapStore, image: torch.Tensor
                    ) -> list[dict[str, torch.Tensor]]:
    """Per prompt row [source, *targets], each word's joint-attention map at the token grid, divided by its
    maximum (the words whose tokens the text context holds)."""
    block = store.average()
    height, width = _token_grid(model, image)
    maps = block.reshape(block.shape[0], height, width, block.shape[-1])
    words, positions = [], []
    for prompt, row_words in zip(plan.prompts, plan.words):
        columns = {w: _columns_or_none(model, prompt, w) for w in row_words}
        words.append([w for w in row_words if columns[w]])
        positions.append([columns[w] for w in row_words if columns[w]])
    return attention_maps(maps, words, positions)


def _columns_or_none(model: Any, prompt: str, word: str) -> list[int]:
    """A word's context columns, or [] when the family's tokenizer does not split it out as a word."""
    try:
        return model.context_columns(prompt, word)
    except InputError:
        return []


def _token_grid(model: Any, image: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of image tokens of an image: its latent sides over the patch side."""
    factor = model.vae_scale_factor * model.patch_size
    return image.shape[-2] // factor, image.shape[-1] // factor


class FlowEditMethod(EditMethod):
    """SPEC §11 (see the module docstring)."""

    name: ClassVar[str] = "flowedit"
    owns: ClassVar[tuple[str, ...]] = ("flowedit",)

    def steps(self, request: EditRequest) -> int:
        """T when given; 0 = the family's default (known once the model is loaded)."""
        return request.flowedit.steps or 0

    def settings(self, request: EditRequest) -> FlowEditSettings:
        return request.flowedit

    def tables(self, tokenizer: Any, source: str, targets: Sequence[str], request: EditRequest,
               steps: int) -> None:
        """FlowEdit has no attention control or LocalBlend: nothing to build; its settings are checked."""
        settings = request.flowedit
        if settings.n_max is not None and settings.steps is not None and settings.n_max > settings.steps:
            raise InputError(f"flowedit.n_max={settings.n_max} exceeds flowedit.steps={settings.steps}")
        return None

    def controller(self, plan: EditPlan, model: ModelFamily) -> AttentionController:
        raise TypeError("FlowEdit uses no attention controller")

    def local_blend(self, plan: EditPlan, model: ModelFamily) -> LocalBlend | None:
        return None

    def with_blend_words(self, request: EditRequest, source_word: str, target_word: str) -> EditRequest:
        raise InputError("item blend words: method=flowedit has no LocalBlend (use item_blend=false)")

    def edit(self, editor: Editor, image: torch.Tensor, plan: EditPlan, *, seed: int = 0,
             callback: StepCallback | None = None) -> EditResult:
        from s2edit.editing.flowedit import flowedit_latents, resolved
        from s2edit.editing.result import EditResult, edit_metrics

        if callback is not None:
            raise InputError("method=flowedit takes no step callback (its steps are not DDIM steps)")
        model = editor.model
        settings = resolved(plan.settings, model.name)
        for prompt in plan.prompts:
            model.check_prompt(prompt)  # before any step: T5's limit is the model's
        with editor.lock:
            timings: dict[str, float] = {}
            start = time.perf_counter()
            refine_settings = RefineSettings.from_spl(plan.spl)
            x_src = editor.encode(image)
            round_trip = editor.decode(x_src)
            timings["prepare"] = time.perf_counter() - start

            executed = settings.n_max - settings.n_min
            spl_steps = set(spl_flow_steps(executed, plan.spl.opt_schedule)) if plan.spl.active else set()
            records: list[dict[str, Any]] = []
            spl_seconds = 0.0
            store = JointMapStore()
            masks: dict[str, torch.Tensor] = {}

            def make_masks(guides: torch.Tensor) -> None:
                """SPEC §6 masks from the word maps read so far, the edits `guides` guiding the targets."""
                if plan.masks.wanted and not masks:
                    masks.update(joint_masks(model, plan, store, image, guides))

            def spl_in_loop(j: int, n: int, z: torch.Tensor) -> torch.Tensor:
                nonlocal spl_seconds
                if j not in spl_steps:
                    return z
                hook_start = time.perf_counter()
                decoded = editor.decode(z)
                if plan.spl.uses_mask:
                    make_masks(decoded)  # the maps so far, this step's edits as guides (once)
                loss_masks = loss_mask_pair(plan, masks)
                refined = refine_images(round_trip, decoded, refine_settings, *loss_masks)
                records.append({
                    "step": j,
                    "before": preservation_losses(round_trip, decoded, refine_settings, *loss_masks),
                    "after": preservation_losses(round_trip, refined, refine_settings, *loss_masks),
                })
                spl_seconds += time.perf_counter() - hook_start
                return editor.encode(refined)

            bar = tqdm(total=settings.n_max, desc="flowedit", disable=not editor.progress, leave=False)
            loop_start = time.perf_counter()
            latents = flowedit_latents(model, x_src, plan.source, plan.targets, settings, seed=seed,
                                       on_step=spl_in_loop, progress=lambda i: bar.update(1), maps=store)
            bar.close()
            timings["denoise"] = time.perf_counter() - loop_start - spl_seconds
            timings["spl_in_loop"] = spl_seconds

            decode_start = time.perf_counter()
            raw = editor.decode(latents)
            timings["decode"] = time.perf_counter() - decode_start
            mask_start = time.perf_counter()
            make_masks(raw)
            loss_masks = loss_mask_pair(plan, masks)
            word_maps = joint_word_maps(model, plan, store, image)
            timings["masks"] = time.perf_counter() - mask_start
            post_start = time.perf_counter()
            final = postprocessed(image, raw, refine_settings, loss_masks,
                                  plan.spl.postprocess and plan.spl.active)
            timings["postprocess"] = time.perf_counter() - post_start
            metrics = edit_metrics(plan.targets, image, round_trip, round_trip, raw, final, refine_settings,
                                   loss_masks)
            metrics["spl_in_loop"] = records
            timings["total"] = time.perf_counter() - start
        return EditResult(
            method=self.name, prompts=plan.prompts, images=final.cpu(), raw_images=raw.cpu(),
            reconstruction=round_trip.cpu(), source=image.cpu(), metrics=metrics, timings=timings,
            masks={k: v.cpu() for k, v in masks.items()}, attention_maps=word_maps,
            latents=torch.cat([x_src, latents]).cpu(),
            settings={self.name: dataclasses.asdict(settings), "spl": dataclasses.asdict(plan.spl),
                      "mask": dataclasses.asdict(plan.masks), "family": model.name},
        )
