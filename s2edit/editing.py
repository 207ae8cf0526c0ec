"""The editing pipeline (SPEC §3–§6, §9): load a model once, then invert (cached) and edit many times.

    editor = Editor.from_export("outputs/train/export")          # fine-tuned identity [I]
    editor = Editor.from_model("CompVis/stable-diffusion-v1-4")  # or training-free, the base model alone
    inversion = editor.invert("photo.png", "a photo of a [I] woman", method="direct")   # cached
    result = editor.edit(inversion, ["a photo of a [I] woman with bangs"], p2p=P2PSettings(...))
    result = editor.edit_virtual("photo.png", "a photo of a cat", ["a photo of a tiger"])  # no inversion
    result.images  # (targets, 3, H, W) in [-1, 1]

Two editing methods share one pipeline body (:meth:`Editor._run_plan`): plan → encode → loop with hooks
→ decode → post-process → metrics.

- ``p2p`` (:meth:`Editor.edit`): the batch [source P̃, target P*₁, …] is denoised from the inversion's
  z_T with classifier-free guidance, the unconditional input of every row being the inversion's ∅_i;
  Prompt-to-Prompt injection edits the targets; Direct Inversion's offsets keep the source on its
  trajectory.
- ``virtual`` (:meth:`Editor.edit_virtual`, SPEC §9): branches [source, targets…, mutual] start from one
  seeded noise and are denoised by InfEdit's virtual inversion on an LCM (or DDIM) schedule, no
  inversion at all.

Attention is routed through one controller chain: spatial control of the placeholders (S2Edit Eq. 3),
an attention store (maps as each layer computed them, before any injection), then the method's
attention control. SPL/CPL refine each target's x̂0 from `opt_schedule` on (a step hook) and the final
images once more against the input. Preservation masks (SPEC §6) come from a loss-free preview edit.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from editkit.errors import InputError
from editkit.images import load_image, load_mask
from s2edit.attention import AttentionStore, ColumnMask, ControllerChain, SpatialControl
from s2edit.diffusion import DDIMSampler, DDIMSchedule, VirtualSampler, is_lcm
from s2edit.engine import (
    CallbackHook,
    DenoisingRun,
    LocalBlendHook,
    OffsetHook,
    ProgressHook,
    RefineSettings,
    SPLHook,
    StepState,
    denoise,
    preservation_losses,
    refine_images,
)
from s2edit.export import load_export
from s2edit.inversion import Inversion, PlaceholderMask, load_or_invert, psnr, weights_fingerprint
from s2edit.maps import attention_maps, loss_masks, preservation_masks
from s2edit.models import StableDiffusion, load_stable_diffusion
from s2edit.plan import EditPlan, Placeholder, plan_edit
from s2edit.settings import (
    DEFAULT_MODEL,
    MaskSettings,
    NullTextSettings,
    P2PSettings,
    SPLSettings,
    VirtualSettings,
)
from s2edit.tokenizer import token_ids, word_token_indices

__all__ = ["EditResult", "Editor", "Placeholder", "resolve_device", "resolve_dtype"]

StepCallback = Callable[[StepState], "dict[str, torch.Tensor] | None"]


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' → cuda when available, else cpu; anything else as torch understands it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"device '{device}' is not a torch device (auto, cpu, cuda, cuda:1, …)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' was asked for, but CUDA is not available: use device=cpu")
    return resolved


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' → bf16 on GPU, fp32 on CPU; fp16 is refused (null-text optimisation fails in it, SPEC §3)."""
    choices = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in choices:
        raise InputError(
            f"precision '{precision}' must be auto, fp32 or bf16 (fp16 breaks null-text inversion)"
        )
    return choices[precision]


@dataclass
class EditResult:
    """Everything one edit produces. Images are (B, 3, H, W) in [-1, 1] on the CPU."""

    method: str  # "p2p" or "virtual"
    prompts: list[str]  # [source, *targets]
    images: torch.Tensor  # (n, 3, H, W) the edits, post-processed when asked
    raw_images: torch.Tensor  # (n, 3, H, W) the decoded edits before post-processing
    reconstruction: torch.Tensor  # (1, 3, H, W) the source branch (p2p: the inversion's reconstruction)
    source: torch.Tensor  # (1, 3, H, W) the input image (preprocessed)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # name → (H, W) in [0, 1]
    attention_maps: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per prompt: word → (h, w)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    latents: torch.Tensor | None = None  # (1 + n, C, h, w) final latents [source, *targets]
    settings: dict[str, Any] = field(default_factory=dict)  # the typed settings used, as plain values
    inversion: dict[str, Any] | None = None  # how the source was inverted (p2p), None for virtual

    def to_report(self) -> dict[str, Any]:
        """The edit's part of infer.py's `report.json` (JSON-ready): method, prompts, settings, inversion,
        metrics and timings."""
        return {
            "method": self.method,
            "source": self.prompts[0],
            "targets": list(self.prompts[1:]),
            "edit_settings": self.settings,
            "inversion": self.inversion,
            "metrics": self.metrics,
            "timings": self.timings,
        }


def _check_image_tensor(image: object, multiple: int) -> torch.Tensor:
    """An image tensor from a Python caller: (1, 3, H, W) floating point in [-1, 1], finite, sides
    multiples of `multiple`; refused in one line naming what is wrong."""
    if not isinstance(image, torch.Tensor):
        raise InputError(f"image must be a path or a (1, 3, H, W) tensor, got {type(image).__name__}")
    shape = tuple(image.shape)
    if image.dim() != 4 or shape[:2] != (1, 3) or any(side % multiple for side in shape[-2:]):
        raise InputError(
            f"image tensor of shape {shape} must be (1, 3, H, W) with H, W multiples of {multiple}"
        )
    if not image.is_floating_point():
        raise InputError(f"image tensor of dtype {image.dtype} must be floating point in [-1, 1] "
                         "(convert uint8 with x / 127.5 − 1)")
    if not bool(torch.isfinite(image).all()):
        raise InputError("image tensor contains NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < -1.001 or high > 1.001:
        raise InputError(f"image tensor values lie in [{low:.3g}, {high:.3g}], not in [-1, 1] "
                         "(a [0, 255] image must be scaled: x / 127.5 − 1)")
    image = image.detach().float()  # the caller's layout is kept: conv kernels round by memory layout
    return image.clamp(-1, 1) if low < -1 or high > 1 else image


def _check_guidance(name: str, value: object) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise InputError(f"{name}={value!r} must be a finite number > 0")
    return float(value)


def edit_metrics(
    plan: EditPlan,
    source_image: torch.Tensor,
    round_trip: torch.Tensor,
    reconstruction: torch.Tensor,
    raw: torch.Tensor,
    final: torch.Tensor,
    settings: RefineSettings,
    loss_masks: tuple[torch.Tensor | None, torch.Tensor | None],
) -> dict[str, Any]:
    """PSNR of the source branch and of the VAE round trip against the input, and per target the SPL (and
    CPL, when optimised) loss against the input before and after post-processing (SPEC §5)."""
    before = preservation_losses(source_image, raw, settings, *loss_masks)
    after = preservation_losses(source_image, final, settings, *loss_masks)
    return {
        "reconstruction_psnr": psnr(reconstruction, source_image),
        "vae_round_trip_psnr": psnr(round_trip, source_image),
        "targets": [
            {
                "prompt": target,
                "spl_loss_before": before["spl"][k],
                "spl_loss_after": after["spl"][k],
                "cpl_loss_before": before["cpl"][k],
                "cpl_loss_after": after["cpl"][k],
            }
            for k, target in enumerate(plan.targets)
        ],
    }


class Editor:
    """A loaded model (base or fine-tuned) that inverts and edits images (see the module docstring).

    Args:
        sd: the Stable Diffusion components.
        placeholders: learned tokens with their object masks (empty for training-free editing).
        weights: fingerprint of the weights for the inversion cache (default: computed from them).
        cache_dir: where inversions are cached (None: no cache).
        renormalize: renormalise attention rows after spatial control (as in fine-tuning).
        progress: show progress bars.
        resolution: working size of images loaded from files (area ≈ resolution²); default: the model's
            native size (:meth:`from_export`: the size the export was trained at).

    One editor may serve several threads (a web app): runs on its model are serialised by a lock, and
    every run builds its own controllers, schedules and stores.
    """

    def __init__(
        self,
        sd: StableDiffusion,
        placeholders: Sequence[Placeholder] = (),
        weights: str | None = None,
        cache_dir: str | Path | None = None,
        renormalize: bool = False,
        progress: bool = True,
        resolution: int | None = None,
    ) -> None:
        self.sd = sd
        self.resolution = resolution or sd.native_resolution
        self.placeholders = list(placeholders)
        self.weights = weights or weights_fingerprint(sd.unet, sd.text_encoder, sd.vae)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.renormalize = renormalize
        self.progress = progress
        self._lock = threading.RLock()
        for module in (sd.unet, sd.vae, sd.text_encoder):
            module.requires_grad_(False)

    # ------------------------------------------------------------------------------------ construction

    @classmethod
    def from_export(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        precision: str = "auto",
        base_model: str | None = None,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> Editor:
        """Load an export folder of train.py; inversions are cached in `<path>/cache` by default."""
        torch_device = resolve_device(device)
        sd, manifest = load_export(path, torch_device, resolve_dtype(precision, torch_device), base_model)
        placeholders = []
        for token in manifest.tokens:
            mask_file = Path(path) / token.mask
            with Image.open(mask_file) as image:
                size = (image.height, image.width)
            mask = load_mask(mask_file, size)
            placeholders.append(Placeholder(token.placeholder, mask, token.prompt, token.image))
        renormalize = bool(manifest.config.get("spatial", {}).get("renormalize", False))
        return cls(
            sd,
            placeholders,
            weights=manifest.weights_sha256,
            cache_dir=Path(path) / "cache" if cache_dir is None else cache_dir,
            renormalize=renormalize,
            progress=progress,
            resolution=manifest.resolution,
        )

    @classmethod
    def from_model(
        cls,
        model: str = DEFAULT_MODEL,
        *,
        device: str = "auto",
        precision: str = "auto",
        seed: int = 0,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        resolution: int | None = None,
    ) -> Editor:
        """Training-free editing with a base model (hub id, diffusers folder, 'tiny', 'tiny-lcm',
        'sd-v1-random')."""
        torch_device = resolve_device(device)
        sd = load_stable_diffusion(
            model, device=torch_device, dtype=resolve_dtype(precision, torch_device), seed=seed
        )
        return cls(sd, cache_dir=cache_dir, progress=progress, resolution=resolution)

    # ------------------------------------------------------------------------------------ helpers

    @property
    def tokenizer(self) -> Any:
        return self.sd.tokenizer

    def load_image(self, path: str | Path, resolution: int | None = None) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] with area ≈ `resolution`² (default: :attr:`resolution`), aspect ratio
        kept, sides multiples of what the model needs (64 for SD)."""
        return load_image(path, resolution or self.resolution, multiple=self.sd.size_multiple)

    def _image(self, image: torch.Tensor | str | Path, resolution: int | None = None) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            return self.load_image(image, resolution)
        return _check_image_tensor(image, self.sd.size_multiple)

    def placeholder_masks(self, prompt: str) -> list[PlaceholderMask]:
        """(token position, mask) of every placeholder with a mask in `prompt` (spatial control)."""
        masks = []
        for placeholder in self.placeholders:
            if placeholder.mask is None:
                continue
            try:
                positions = word_token_indices(self.tokenizer, prompt, placeholder.text)
            except InputError:
                continue
            masks += [(position, placeholder.mask) for position in positions]
        return masks

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.sd.decode_latents(latents.to(self.sd.vae.dtype)).float()

    def _encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.sd.encode_image(images.to(self.sd.vae.dtype), generator).float()

    # ------------------------------------------------------------------------------------ inversion

    def invert(
        self,
        image: torch.Tensor | str | Path,
        prompt: str,
        *,
        method: str = "null_text",
        steps: int = 50,
        guidance: float = 7.5,
        nti: NullTextSettings | None = None,
        spatial_control: bool = True,
        resolution: int | None = None,
    ) -> Inversion:
        """Invert an image (path or (1, 3, H, W) in [-1, 1]) under the source prompt P̃ (SPEC §3).

        `method`: null_text, direct, negative_prompt or ddim. Reuses the cache entry of an identical
        earlier call (`Inversion.cached`). With `spatial_control` the placeholders of `prompt` are
        masked exactly as in the edit's source branch. A path is loaded at `resolution` (default:
        :attr:`resolution`).
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"prompt={prompt!r} must be a non-empty string describing the image")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps={steps!r} must be a positive number of DDIM steps")
        guidance = _check_guidance("guidance", guidance)
        nti = nti if nti is not None else NullTextSettings()
        if not isinstance(nti, NullTextSettings):
            raise InputError(f"nti={nti!r} must be a NullTextSettings")
        token_ids(self.tokenizer, prompt)
        image = self._image(image, resolution)
        with self._lock:
            return load_or_invert(
                self.sd,
                image,
                prompt,
                self.cache_dir,
                self.weights,
                method,
                steps,
                guidance,
                nti,
                self.placeholder_masks(prompt) if spatial_control else (),
                self.renormalize,
                self.progress,
            )

    # ------------------------------------------------------------------------------------ plans

    def plan(
        self,
        source: str,
        targets: Sequence[str],
        *,
        method: str = "p2p",
        steps: int | None = 50,
        p2p: P2PSettings | None = None,
        virtual: VirtualSettings | None = None,
        spl: SPLSettings | None = None,
        masks: MaskSettings | None = None,
    ) -> EditPlan:
        """:func:`s2edit.plan.plan_edit` with this editor's tokenizer and placeholders."""
        return plan_edit(
            self.tokenizer, self.placeholders, source, targets, method=method, steps=steps,
            p2p=p2p, virtual=virtual, spl=spl, masks=masks,
        )

    def _checked_plan(self, plan: EditPlan, method: str, source: str) -> EditPlan:
        """A plan made elsewhere (e.g. with the offline tokenizer before the model was loaded): confirm it
        fits this edit and this model's tokenizer, else re-make it with the model's tokenizer."""
        if plan.method != method:
            raise InputError(f"the plan is for method '{plan.method}', not '{method}'")
        if plan.source != source:
            raise InputError(f"the plan's source prompt '{plan.source}' is not the source '{source}'")
        if plan.matches(self.tokenizer):
            return plan
        return self.plan(
            plan.source, plan.targets, method=plan.method, steps=plan.steps,
            p2p=plan.p2p, virtual=plan.virtual, spl=plan.spl, masks=plan.masks,
        )

    def _columns(self, plan: EditPlan, rows_of_prompt: Callable[[int], Sequence[int]]) -> list[ColumnMask]:
        """Spatial-control columns of the plan's placeholders, at the batch rows of each prompt row."""
        masks = {p.text: p.mask for p in self.placeholders if p.mask is not None}
        return [
            ColumnMask(row, column.position, masks[column.placeholder])
            for column in plan.spatial
            if column.placeholder in masks
            for row in rows_of_prompt(column.row)
        ]

    # ------------------------------------------------------------------------------------ p2p

    def edit(
        self,
        inversion: Inversion,
        targets: Sequence[str] | EditPlan,
        *,
        p2p: P2PSettings | None = None,
        spl: SPLSettings | None = None,
        masks: MaskSettings | None = None,
        spatial_control: bool = True,
        callback: StepCallback | None = None,
    ) -> EditResult:
        """Edit the inverted image towards each target prompt in one batch (SPEC §4–§6).

        `targets`: the target prompts, or a plan made by :meth:`plan` (then its settings are used).
        `callback(state)` runs after every step and may return new "latents" (like diffusers'
        `callback_on_step_end`).
        """
        if not isinstance(inversion, Inversion):
            raise InputError(
                f"inversion must be an Inversion from Editor.invert, got {type(inversion).__name__}"
            )
        if isinstance(targets, EditPlan):
            plan = self._checked_plan(targets, "p2p", inversion.prompt)
        else:
            plan = self.plan(inversion.prompt, targets, steps=inversion.steps, p2p=p2p, spl=spl, masks=masks)
        if plan.steps != inversion.steps:
            raise InputError(f"the plan has {plan.steps} steps but the inversion {inversion.steps}: "
                             "plan with the inversion's steps")
        device = self.sd.device
        n_rows = 1 + plan.n_targets

        def make_run() -> DenoisingRun:
            """[source, targets…] from z_T, ∅_i per step, P2P, Direct Inversion's offsets."""
            store = AttentionStore()
            columns: list[ColumnMask] = []
            if spatial_control:
                columns = self._columns(plan, lambda r: [n_rows + r])  # conditional half
                if inversion.null_is_prompt:  # ∅ = P̃: its placeholders are controlled as in inversion
                    columns += self._columns(plan, lambda r: range(n_rows) if r == 0 else [])
            cond = self.sd.encode_prompt(plan.prompts).float()
            hooks = [OffsetHook(inversion.offsets)] if inversion.offsets is not None else []
            blend = plan.local_blend()
            if blend is not None:
                hooks.append(LocalBlendHook(blend, store))
            return DenoisingRun(
                sampler=DDIMSampler(DDIMSchedule.from_scheduler(self.sd.scheduler, plan.steps)),
                latents=inversion.z_T.to(device).float().expand(n_rows, -1, -1, -1).clone(),
                cond=cond,
                uncond=lambda i: inversion.null_embedding(i).to(device).expand(n_rows, -1, -1),
                guidance=torch.full((n_rows,), float(inversion.guidance)),
                controller=ControllerChain(
                    [SpatialControl(columns, self.renormalize), store, plan.controller()]
                ),
                store=store,
                source_row=0,
                target_rows=list(range(1, n_rows)),
                hooks=hooks,
            )

        info = {
            "method": inversion.method,
            "cached": inversion.cached,
            "key": inversion.key,
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
            "compute_seconds": inversion.seconds,
            "steps": inversion.steps,
            "guidance": inversion.guidance,
            "updates": sum(inversion.inner_steps),
            "final_loss": inversion.losses[-1] if inversion.losses else None,
        }
        z0 = inversion.z0.to(device)
        return self._run_plan(plan, make_run, inversion.image.to(device), z0, callback, info)

    # ------------------------------------------------------------------------------------ virtual

    def edit_virtual(
        self,
        image: torch.Tensor | str | Path,
        source: str,
        targets: Sequence[str] | EditPlan,
        *,
        virtual: VirtualSettings | None = None,
        spl: SPLSettings | None = None,
        masks: MaskSettings | None = None,
        seed: int = 0,
        spatial_control: bool = True,
        callback: StepCallback | None = None,
        resolution: int | None = None,
    ) -> EditResult:
        """Training-free edit by virtual inversion (InfEdit's DDCM, SPEC §9): no inversion, `virtual.steps`
        steps (LCM timesteps on an LCM model), every target in one batch with the mutual branch.

        The same `seed` gives the same edit on any device. Arguments as :meth:`edit`; `image` a path
        (loaded at `resolution`) or a (1, 3, H, W) tensor in [-1, 1].
        """
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed={seed!r} must be an integer >= 0")
        if isinstance(targets, EditPlan):
            plan = self._checked_plan(targets, "virtual", source)
        else:
            plan = self.plan(source, targets, method="virtual", virtual=virtual, spl=spl, masks=masks)
        image = self._image(image, resolution).to(self.sd.device)
        settings = plan.virtual
        n_rows = plan.n_targets + 2  # [S, T…, M]
        if is_lcm(self.sd.scheduler_config):
            schedule = DDIMSchedule.lcm(self.sd.scheduler_config, plan.steps)
        else:
            schedule = DDIMSchedule.from_scheduler(self.sd.scheduler, plan.steps)
        sample_generator = torch.Generator().manual_seed(seed) if settings.image_latent == "sample" else None
        with self._lock:
            z0 = self._encode(image, sample_generator)  # (1, C, h, w)
            cond = self.sd.encode_prompt([*plan.prompts, plan.source]).float()
            empty = self.sd.encode_prompt([""]).float().expand(n_rows, -1, -1)
        guidance = torch.tensor(
            [settings.source_guidance, *[settings.target_guidance] * plan.n_targets, settings.source_guidance]
        )

        def make_run() -> DenoisingRun:
            """Branches from one seeded noise; the same seed gives the same noise in every run."""
            generator = torch.Generator().manual_seed(seed)
            if sample_generator is not None:  # the posterior sample came first in the seeded stream
                torch.randn(z0.shape, generator=generator)
            sampler = VirtualSampler(schedule, z0, generator, settings.eta, source_row=0)
            store = AttentionStore()
            columns: list[ColumnMask] = []
            if spatial_control:  # prompt row 0 is both S and M; uncond "" has no placeholder
                columns = self._columns(plan, lambda r: [n_rows, 2 * n_rows - 1] if r == 0 else [n_rows + r])
            blend = plan.local_blend()
            return DenoisingRun(
                sampler=sampler,
                latents=sampler.noise_like(z0).expand(n_rows, -1, -1, -1).clone(),
                cond=cond,
                uncond=lambda i: empty,
                guidance=guidance,
                controller=ControllerChain(
                    [SpatialControl(columns, self.renormalize), store, plan.controller()]
                ),
                store=store,
                source_row=0,
                target_rows=list(range(1, n_rows - 1)),
                hooks=[LocalBlendHook(blend, store)] if blend is not None else [],
            )

        return self._run_plan(plan, make_run, image, z0, callback, None)

    # ------------------------------------------------------------------------------------ the pipeline

    def _run_plan(
        self,
        plan: EditPlan,
        make_run: Callable[[], DenoisingRun],
        source_image: torch.Tensor,
        z0: torch.Tensor,
        callback: StepCallback | None,
        inversion_info: dict[str, Any] | None,
    ) -> EditResult:
        """The pipeline body shared by every method: masks → loop with hooks → decode → post-process →
        metrics. `source_image` (1, 3, H, W) is the input; `z0` its clean latent."""
        with self._lock:
            timings: dict[str, float] = {}
            start = time.perf_counter()

            # 1. SPL settings and references: the VAE round trip (in the loop), the input (post-processing)
            refine_settings = RefineSettings.from_spl(plan.spl)
            round_trip = self._decode(z0)
            timings["prepare"] = time.perf_counter() - start

            # 2. Preservation masks from a loss-free preview edit, when SPL changes the main run's path
            masks = self._preview_masks(plan, make_run, source_image, timings)

            # 3. Denoising loop with hooks: SPL in the loop, progress, the user's callback
            run = make_run()

            def loop_masks(state: StepState, decoded: torch.Tensor) -> tuple[Any, Any]:
                if plan.masks.wanted and not masks:  # in_loop: the maps so far, this step's x̂0 as guide
                    masks.update(self._masks(plan, run.store, state.step, source_image, decoded))
                return self._loss_masks(plan, masks)

            spl_hook = SPLHook(
                plan.spl_steps(), round_trip, refine_settings, self._decode, self._encode, loop_masks
            )
            hooks = [spl_hook, ProgressHook(plan.steps, "editing", self.progress)]
            hooks += [CallbackHook(callback)] if callback is not None else []
            loop_start = time.perf_counter()
            state = denoise(self.sd.unet, run, hooks)
            timings["denoise"] = time.perf_counter() - loop_start - spl_hook.seconds
            timings["spl_in_loop"] = spl_hook.seconds

            # 4. Decode the source branch and the targets
            decode_start = time.perf_counter()
            latents = run.sampler.result(state.latents, state.x0)[[run.source_row, *run.target_rows]]
            decoded = self._decode(latents)
            reconstruction, raw = decoded[:1], decoded[1:]
            timings["decode"] = time.perf_counter() - decode_start

            # 5. Masks of this run (it is the loss-free preview when SPL never acted in the loop)
            mask_start = time.perf_counter()
            if plan.masks.wanted and not masks:
                masks.update(self._masks(plan, run.store, None, source_image, raw))
            loss_masks = self._loss_masks(plan, masks)
            timings["masks"] = time.perf_counter() - mask_start

            # 6. Post-processing against the input image
            post_start = time.perf_counter()
            final = raw
            if plan.spl.postprocess and plan.spl.active:
                final = refine_images(source_image, raw, refine_settings, *loss_masks)
            timings["postprocess"] = time.perf_counter() - post_start

            # 7. Metrics and attention maps
            metrics = edit_metrics(
                plan, source_image, round_trip, reconstruction, raw, final, refine_settings, loss_masks
            )
            metrics["spl_in_loop"] = spl_hook.records
            maps = attention_maps(run.store.average()[: len(plan.prompts)], plan.words, plan.word_positions)
            timings["total"] = time.perf_counter() - start
        method_settings = plan.virtual if plan.method == "virtual" else plan.p2p
        return EditResult(
            method=plan.method, prompts=plan.prompts, images=final.cpu(), raw_images=raw.cpu(),
            reconstruction=reconstruction.cpu(), source=source_image.cpu(),
            masks={k: v.cpu() for k, v in masks.items()}, attention_maps=maps, metrics=metrics,
            timings=timings, latents=latents.cpu(),
            settings={plan.method: dataclasses.asdict(method_settings), "spl": dataclasses.asdict(plan.spl),
                      "mask": dataclasses.asdict(plan.masks)},
            inversion=inversion_info,
        )

    def _preview_masks(
        self,
        plan: EditPlan,
        make_run: Callable[[], DenoisingRun],
        source_image: torch.Tensor,
        timings: dict[str, float],
    ) -> dict[str, torch.Tensor]:
        """SPEC §6 masks from a full loss-free preview edit (its maps over all steps, its final images as
        target guides), when masks are wanted from a preview and SPL would change the main run's path;
        else {} (the masks then come from the main run itself)."""
        start = time.perf_counter()
        masks: dict[str, torch.Tensor] = {}
        if plan.masks.wanted and plan.masks.inputs == "preview" and plan.spl_steps():
            preview = make_run()
            state = denoise(self.sd.unet, preview, [ProgressHook(plan.steps, "preview", self.progress)])
            decoded = self._decode(preview.sampler.result(state.latents, state.x0)[preview.target_rows])
            masks = self._masks(plan, preview.store, None, source_image, decoded)
        timings["preview"] = time.perf_counter() - start
        return masks

    def _masks(
        self,
        plan: EditPlan,
        store: AttentionStore,
        until: int | None,
        source_image: torch.Tensor,
        target_guides: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """SPEC §6 masks from a run's stored maps (all steps, or those ≤ `until`) and target guides."""
        maps = store.average(until=until)[: len(plan.prompts)]  # (1 + n, h, w, K)
        return preservation_masks(
            maps, plan.mask_source_positions, plan.mask_target_positions, source_image, target_guides,
            plan.masks,
        )

    @staticmethod
    def _loss_masks(
        plan: EditPlan, masks: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(structure, color) loss masks (n, 1, H, W) of the areas set to `masked`, else None."""
        if not masks:
            return None, None
        batch = loss_masks(masks, plan.n_targets)
        structure = batch if plan.spl.structure_area == "masked" else None
        color = batch if plan.spl.color_area == "masked" else None
        return structure, color
