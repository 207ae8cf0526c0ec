"""The editor (SPEC §3–§6, §9): load a model once, then invert (cached) and edit many times.

    editor = Editor.from_export("outputs/train/export")          # fine-tuned identity [I]
    editor = Editor.from_model("CompVis/stable-diffusion-v1-4")  # or training-free, the base model alone
    result = editor.run("cat.png", "a photo of a cat", ["a photo of a tiger"], EditRequest(method="virtual"))
    inversion = editor.invert("photo.png", "a photo of a [I] woman", InversionRequest(method="direct"))
    result = editor.edit(inversion, ["a photo of a [I] woman with bangs"], p2p=P2PSettings(...))
    result.images  # (targets, 3, H, W) in [-1, 1]

The editor keeps the model, the placeholders, the inversion cache and the pipeline body that every method
shares (:meth:`Editor.run_plan`): preview masks → the denoising loop with SPL in it → decode →
post-process → metrics. What differs between methods (how rows are laid out, inverting or not, the
attention control and LocalBlend) is the method's (:mod:`s2edit.editing.methods`). Attention is routed
through one controller chain: spatial control of the placeholders (S2Edit Eq. 3), an attention store
(maps as each layer computed them, before any injection), then the method's attention control.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from editkit.errors import InputError
from editkit.images import check_image_tensor, load_image
from s2edit.core.engine import (
    CallbackHook,
    DenoisingRun,
    ProgressHook,
    RefineSettings,
    SPLHook,
    StepCallback,
    StepState,
    denoise,
    postprocessed,
)
from s2edit.core.family import ModelFamily
from s2edit.core.loading import load_model
from s2edit.core.runtime import resolve_device, resolve_dtype
from s2edit.core.settings import DEFAULT_MODEL, MaskSettings, P2PSettings, SPLSettings, VirtualSettings
from s2edit.editing.cache import PlaceholderMask, load_or_invert, weights_fingerprint
from s2edit.editing.inversion import Inversion
from s2edit.editing.maps import attention_maps, loss_mask_pair, plan_masks
from s2edit.editing.methods import edit_method
from s2edit.editing.plan import EditPlan, Placeholder, export_placeholders, plan_edit
from s2edit.editing.request import EditRequest, InversionRequest
from s2edit.editing.result import EditResult, edit_metrics
from s2edit.training.export import load_export

__all__ = ["EditResult", "Editor", "Placeholder"]


class Editor:
    """A loaded model (base or fine-tuned) that inverts and edits images (see the module docstring).

    Args:
        model: the model family's components.
        placeholders: learned tokens with their object masks (empty for training-free editing).
        weights: fingerprint of the weights for the inversion cache (default: computed from them).
        cache_dir: where inversions are cached (None: no cache).
        renormalize: renormalise attention rows after spatial control (as in fine-tuning).
        progress: show progress bars.
        resolution: working size of images loaded from files (area ≈ resolution²); default: the model's
            native size (:meth:`from_export`: the size the export was trained at).

    One editor may serve several threads (a web app): runs on its model are serialised by `lock`, and
    every run builds its own controllers, schedules and stores.
    """

    def __init__(self, model: ModelFamily, placeholders: Sequence[Placeholder] = (),
                 weights: str | None = None, cache_dir: str | Path | None = None, renormalize: bool = False,
                 progress: bool = True, resolution: int | None = None) -> None:
        self.model = model
        self.resolution = resolution or model.native_resolution
        self.placeholders = list(placeholders)
        self.weights = weights or weights_fingerprint(*model.components().values())
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.renormalize = renormalize
        self.progress = progress
        self.lock = threading.RLock()
        for module in model.components().values():
            module.requires_grad_(False)

    @classmethod
    def from_export(cls, path: str | Path, *, device: str = "auto", precision: str = "auto",
                    base_model: str | None = None, cache_dir: str | Path | None = None,
                    progress: bool = True, lora: str | None = None) -> Editor:
        """Load an export folder of train.py; inversions are cached in `<path>/cache` by default. `lora`:
        where the LoRA file fused into the base during training lies now, if it moved."""
        torch_device = resolve_device(device)
        model, manifest = load_export(path, torch_device, resolve_dtype(precision, torch_device), base_model,
                                      base_lora=lora)
        return cls(
            model, export_placeholders(path, manifest), weights=manifest.weights_sha256,
            cache_dir=Path(path) / "cache" if cache_dir is None else cache_dir,
            renormalize=bool(manifest.config.get("spatial", {}).get("renormalize", False)),
            progress=progress, resolution=manifest.resolution,
        )

    @classmethod
    def from_model(cls, model: str = DEFAULT_MODEL, *, device: str = "auto", precision: str = "auto",
                   seed: int = 0, cache_dir: str | Path | None = None, progress: bool = True,
                   resolution: int | None = None, lora: str | None = None, offload: bool = False) -> Editor:
        """Training-free editing with a base model (hub id, diffusers folder, or a random preset), with a
        `lora` file fused into its UNet (e.g. LCM-LoRA); `offload`: model CPU offload (flow families)."""
        torch_device = resolve_device(device)
        dtype = resolve_dtype(precision, torch_device)
        loaded = load_model(model, device=torch_device, dtype=dtype, seed=seed, lora=lora, offload=offload)
        return cls(loaded, cache_dir=cache_dir, progress=progress, resolution=resolution)

    # ------------------------------------------------------------------------------------ inputs

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def load_image(self, path: str | Path, resolution: int | None = None) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] with area ≈ `resolution`² (default: :attr:`resolution`), aspect ratio
        kept, sides multiples of what the model needs (64 for SD)."""
        return load_image(path, resolution or self.resolution, multiple=self.model.size_multiple)

    def image(self, image: torch.Tensor | str | Path, resolution: int | None = None) -> torch.Tensor:
        """A path loaded at `resolution`, or a caller's (1, 3, H, W) tensor in [-1, 1], checked."""
        if isinstance(image, (str, Path)):
            return self.load_image(image, resolution)
        return check_image_tensor(image, self.model.size_multiple)

    def placeholder_masks(self, prompt: str) -> list[PlaceholderMask]:
        """(token position, mask) of every placeholder with a mask in `prompt` (spatial control)."""
        masks = []
        for placeholder in self.placeholders:
            if placeholder.mask is None:
                continue
            try:
                positions = self.model.word_positions(prompt, placeholder.text)[0]
            except InputError:
                continue
            masks += [(position, placeholder.mask) for position in positions]
        return masks

    def plan(self, source: str, targets: Sequence[str], request: EditRequest | None = None, *,
             method: str | None = None) -> EditPlan:
        """:func:`s2edit.editing.plan.plan_edit` with this editor's tokenizer and placeholders."""
        return plan_edit(self.tokenizer, self.placeholders, source, targets, request, method=method)

    def _checked_plan(self, plan: EditPlan, source: str | None = None) -> EditPlan:
        """A plan made elsewhere (e.g. with the offline tokenizer before the model was loaded): confirm it
        fits this edit and this model's tokenizer, else re-make it with the model's tokenizer."""
        if source is not None and plan.source != source:
            raise InputError(f"the plan's source prompt '{plan.source}' is not the source '{source}'")
        if plan.matches(self.tokenizer):
            return plan
        return self.plan(plan.source, plan.targets, plan.request, method=plan.method)

    # ------------------------------------------------------------------------------------ inversion

    def invert(self, image: torch.Tensor | str | Path, prompt: str, request: InversionRequest | None = None,
               *, spatial_control: bool = True, resolution: int | None = None) -> Inversion:
        """Invert an image (path or (1, 3, H, W) in [-1, 1]) under the source prompt P̃ (SPEC §3).

        Reuses the cache entry of an identical earlier call (`Inversion.cached`). With `spatial_control`
        the placeholders of `prompt` are masked exactly as in the edit's source branch. A path is loaded
        at `resolution` (default: :attr:`resolution`).
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"prompt={prompt!r} must be a non-empty string describing the image")
        edit_method("p2p").check_model(self.model)  # inversions retrace a UNet family's DDIM chain
        request = InversionRequest() if request is None else request
        if not isinstance(request, InversionRequest):
            raise InputError(f"request={request!r} must be an InversionRequest")
        self.model.token_ids(prompt)
        image = self.image(image, resolution)
        with self.lock:
            return load_or_invert(
                self.model, image, prompt, request, cache_dir=self.cache_dir, weights=self.weights,
                placeholder_masks=self.placeholder_masks(prompt) if spatial_control else (),
                renormalize=self.renormalize, progress=self.progress,
            )

    # ------------------------------------------------------------------------------------ edits

    def run(self, image: torch.Tensor | str | Path, source: str, targets: Sequence[str] | EditPlan,
            request: EditRequest | None = None, *, method: str | None = None, seed: int = 0,
            callback: StepCallback | None = None, resolution: int | None = None) -> EditResult:
        """Edit `image` from `source` towards each target prompt in one batch, with the request's method
        (`method`: a method settled by the caller, see :meth:`plan`); `targets` may be a plan made by
        :meth:`plan`. The same `seed` gives the same edit on any device. `callback(state)` runs after every
        step and may return new "latents" (like diffusers' `callback_on_step_end`)."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed={seed!r} must be an integer >= 0")
        if isinstance(targets, EditPlan):
            plan = self._checked_plan(targets, source)
        else:
            plan = self.plan(source, targets, request, method=method)
        method = edit_method(plan.method)
        method.check_model(self.model)
        image = self.image(image, resolution).to(self.model.device)
        return method.edit(self, image, plan, seed=seed, callback=callback)

    def edit(self, inversion: Inversion, targets: Sequence[str] | EditPlan, *, p2p: P2PSettings | None = None,
             spl: SPLSettings | None = None, masks: MaskSettings | None = None, spatial_control: bool = True,
             callback: StepCallback | None = None) -> EditResult:
        """Prompt-to-Prompt edit of an inverted image (SPEC §4–§6): invert once, edit many times."""
        if not isinstance(inversion, Inversion):
            raise InputError(f"inversion must be an Inversion from Editor.invert, got "
                             f"{type(inversion).__name__}")
        if isinstance(targets, EditPlan):
            plan = self._checked_plan(targets, inversion.prompt)
        else:
            request = EditRequest(method="p2p", steps=inversion.steps, inversion=inversion.method,
                                  spatial_control=spatial_control, **_given(p2p=p2p, spl=spl, mask=masks))
            plan = self.plan(inversion.prompt, targets, request, method="p2p")
        if plan.method != "p2p":
            raise InputError(f"the plan is for method '{plan.method}', not 'p2p'")
        return edit_method("p2p").edit_inversion(self, inversion, plan, callback)

    def edit_virtual(self, image: torch.Tensor | str | Path, source: str, targets: Sequence[str] | EditPlan,
                     *, virtual: VirtualSettings | None = None, spl: SPLSettings | None = None,
                     masks: MaskSettings | None = None, seed: int = 0, spatial_control: bool = True,
                     callback: StepCallback | None = None, resolution: int | None = None) -> EditResult:
        """Training-free edit by virtual inversion (InfEdit's DDCM, SPEC §9): :meth:`run` with
        `method=virtual` and these settings."""
        request = EditRequest(method="virtual", spatial_control=spatial_control,
                              **_given(virtual=virtual, spl=spl, mask=masks))
        return self.run(image, source, targets, request, method="virtual", seed=seed, callback=callback,
                        resolution=resolution)

    # ------------------------------------------------------------------------------------ for the methods

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Clean latents of (n, 3, H, W) images, float32."""
        with torch.no_grad():
            return self.model.encode_image(images.to(self.model.vae.dtype), generator).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (n, 3, H, W) in [-1, 1] of latents, float32."""
        with torch.no_grad():
            return self.model.decode_latents(latents.to(self.model.vae.dtype)).float()

    # ------------------------------------------------------------------------------------ the pipeline

    def run_plan(self, plan: EditPlan, make_run: Callable[[], DenoisingRun], source_image: torch.Tensor,
                 z0: torch.Tensor, callback: StepCallback | None, inversion_info: dict[str, Any] | None
                 ) -> EditResult:
        """The pipeline body shared by every method: masks → loop with hooks → decode → post-process →
        metrics. `source_image` (1, 3, H, W) is the input; `z0` its clean latent; `make_run` builds a
        fresh run of the method (the preview and the main run each get one)."""
        with self.lock:
            timings: dict[str, float] = {}
            start = time.perf_counter()

            # 1. SPL settings and references: the VAE round trip (in the loop), the input (post-processing)
            refine_settings = RefineSettings.from_spl(plan.spl)
            round_trip = self.decode(z0)
            timings["prepare"] = time.perf_counter() - start

            # 2. Preservation masks from a loss-free preview edit, when SPL changes the main run's path
            masks = self._preview_masks(plan, make_run, source_image, timings)

            # 3. Denoising loop with hooks: SPL in the loop, progress, the user's callback
            run = make_run()

            def loop_masks(state: StepState, decoded: torch.Tensor) -> tuple[Any, Any]:
                if plan.masks.wanted and not masks:  # in_loop: the maps so far, this step's x̂0 as guide
                    masks.update(plan_masks(plan, run.store, source_image, decoded))
                return loss_mask_pair(plan, masks)

            spl_hook = SPLHook(plan.spl_steps(), round_trip, refine_settings, self.decode, self.encode,
                               loop_masks)
            hooks = [spl_hook, ProgressHook(plan.steps, "editing", self.progress)]
            hooks += [CallbackHook(callback)] if callback is not None else []
            loop_start = time.perf_counter()
            state = denoise(self.model, run, hooks)
            timings["denoise"] = time.perf_counter() - loop_start - spl_hook.seconds
            timings["spl_in_loop"] = spl_hook.seconds

            # 4. Decode the source branch and the targets
            decode_start = time.perf_counter()
            latents = run.sampler.result(state.latents, state.x0)[[run.source_row, *run.target_rows]]
            decoded = self.decode(latents)
            reconstruction, raw = decoded[:1], decoded[1:]
            timings["decode"] = time.perf_counter() - decode_start

            # 5. Masks of this run (it is the loss-free preview when SPL never acted in the loop)
            mask_start = time.perf_counter()
            if plan.masks.wanted and not masks:
                masks.update(plan_masks(plan, run.store, source_image, raw))
            loss_masks = loss_mask_pair(plan, masks)
            timings["masks"] = time.perf_counter() - mask_start

            # 6. Post-processing against the input image
            post_start = time.perf_counter()
            final = postprocessed(source_image, raw, refine_settings, loss_masks,
                                  plan.spl.postprocess and plan.spl.active)
            timings["postprocess"] = time.perf_counter() - post_start

            # 7. Metrics and attention maps
            metrics = edit_metrics(plan.targets, source_image, round_trip, reconstruction, raw, final,
                                   refine_settings, loss_masks)
            metrics["spl_in_loop"] = spl_hook.records
            maps = attention_maps(run.store.average()[: len(plan.prompts)], plan.words, plan.word_positions)
            timings["total"] = time.perf_counter() - start
        return EditResult(
            method=plan.method, prompts=plan.prompts, images=final.cpu(), raw_images=raw.cpu(),
            reconstruction=reconstruction.cpu(), source=source_image.cpu(),
            masks={k: v.cpu() for k, v in masks.items()}, attention_maps=maps, metrics=metrics,
            timings=timings, latents=latents.cpu(),
            settings={plan.method: dataclasses.asdict(plan.settings), "spl": dataclasses.asdict(plan.spl),
                      "mask": dataclasses.asdict(plan.masks)},
            inversion=inversion_info,
            object_masks={p.text: p.mask for p in self.placeholders if p.mask is not None},
        )

    def _preview_masks(self, plan: EditPlan, make_run: Callable[[], DenoisingRun], source_image: torch.Tensor,
                       timings: dict[str, float]) -> dict[str, torch.Tensor]:
        """SPEC §6 masks from a full loss-free preview edit (its maps over all steps, its final images as
        target guides), when masks are wanted from a preview and SPL would change the main run's path;
        else {} (the masks then come from the main run itself)."""
        start = time.perf_counter()
        masks: dict[str, torch.Tensor] = {}
        if plan.masks.wanted and plan.masks.inputs == "preview" and plan.spl_steps():
            preview = make_run()
            state = denoise(self.model, preview, [ProgressHook(plan.steps, "preview", self.progress)])
            decoded = self.decode(preview.sampler.result(state.latents, state.x0)[preview.target_rows])
            masks = plan_masks(plan, preview.store, source_image, decoded)
        timings["preview"] = time.perf_counter() - start
        return masks


def _given(**settings: Any) -> dict[str, Any]:
    """The settings groups a caller gave (None: the defaults)."""
    return {name: value for name, value in settings.items() if value is not None}
