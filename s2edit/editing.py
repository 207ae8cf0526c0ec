"""The editing pipeline (SPEC §3–§6): load a model once, then invert (cached) and edit many times.

    editor = Editor.from_export("outputs/train/export")          # fine-tuned identity [I]
    editor = Editor.from_model("CompVis/stable-diffusion-v1-4")  # or training-free, the base model alone
    inversion = editor.invert("photo.png", "a photo of a [I] woman")   # Null-text Inversion, cached
    result = editor.edit(inversion, ["a photo of a [I] woman with bangs"])
    result.images  # (targets, 3, H, W) in [-1, 1]

One edit denoises the batch [source P̃, target P*₁, …] from the inversion's z_T with classifier-free
guidance, the unconditional input of every row being the inversion's per-step ∅_i. Attention is routed
through one controller chain: spatial control of the placeholders (S2Edit Eq. 3), Prompt-to-Prompt
injection (only the conditional target rows are edited), and an attention store (LocalBlend, masks and
the attention maps handed back). From `opt_schedule` on, each target's predicted x0 is refined with
SPL/CPL against the VAE round trip of the source and re-encoded (SPL, SPEC §5); the final images are
refined once more against the input image.

Preservation masks (`area="masked"`, SPEC §6) come from the same run, without a separate preview pass:
until the first SPL step the run IS the loss-free edit (SPL has not touched any latent yet), so the
attention maps of those steps are the preview's maps; the guide of a target mask is that target's
decoded x̂0 at the first SPL step, the preview's current estimate of the edited image. Without in-loop
SPL the maps of all steps and the raw final edit are used, i.e. exactly the preview.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from editkit.errors import InputError
from editkit.images import load_image, load_mask
from s2edit.attention import AttentionStore, ColumnMask, ControllerChain, SpatialControl, controlled_attention
from s2edit.export import load_export
from s2edit.inversion import (
    DEFAULT_NTI,
    METHODS,
    DDIMSchedule,
    Inversion,
    NullTextSettings,
    PlaceholderMask,
    guided_noise,
    load_or_invert,
    predict_noise,
    predicted_x0,
    psnr,
    weights_fingerprint,
)
from s2edit.models import DEFAULT_MODEL, StableDiffusion, load_stable_diffusion
from s2edit.p2p import PromptToPrompt, build_p2p
from s2edit.tokenizer import token_ids, word_token_indices
from spl.losses import SPLReference, cpl_loss, spl_loss
from spl.masks import binarize_attention, upsample_mask
from spl.refine import refine

AREAS = ("whole", "masked")
MASK_LEVEL = 4  # the "16×16" cross-attention layers of SD at 512² (latent / 4): masks, LocalBlend, maps
WORD_PATTERN = re.compile(r"\[[^\]\s]+\]|[\w'-]+")  # words of a prompt for attention maps; keeps "[I]"


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
class Placeholder:
    """A learned token ([I], [A]) and the object mask of its spatial control (S2Edit Eq. 3)."""

    text: str
    mask: torch.Tensor | None  # (H, W) in [0, 1], any resolution (resized to each layer)
    prompt: str = ""  # P̃ it was learned with
    image: str = ""  # the image it was learned from


@dataclass
class EditResult:
    """Everything one edit produces. Images are (B, 3, H, W) in [-1, 1] on the CPU."""

    prompts: list[str]  # [source, *targets]
    images: torch.Tensor  # (n, 3, H, W) the edits, post-processed when asked
    raw_images: torch.Tensor  # (n, 3, H, W) the decoded edits before post-processing
    reconstruction: torch.Tensor  # (1, 3, H, W) the source branch: the inversion's reconstruction
    source: torch.Tensor  # (1, 3, H, W) the input image (preprocessed)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # name → (H, W) in [0, 1]
    attention_maps: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per prompt: word → (h, w)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    latents: torch.Tensor | None = None  # (1 + n, C, h, w) final latents [source, *targets]


def prompt_words(prompt: str) -> list[str]:
    """Distinct words of a prompt (placeholders such as "[I]" kept whole), in order."""
    return list(dict.fromkeys(WORD_PATTERN.findall(prompt)))


def word_maps(maps: torch.Tensor, positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """(h, w, K) token maps → (words, h, w): each word's map is the sum of its tokens' columns."""
    return torch.stack([maps[..., list(p)].sum(dim=-1) for p in positions])


def placeholders_in(tokenizer: Any, placeholders: Sequence[Placeholder], prompt: str) -> list[Placeholder]:
    """The placeholders that occur in `prompt`."""
    found = []
    for placeholder in placeholders:
        try:
            word_token_indices(tokenizer, prompt, placeholder.text)
        except InputError:
            continue
        found.append(placeholder)
    return found


def _require_word(tokenizer: Any, word: str, prompt: str, option: str) -> None:
    try:
        word_token_indices(tokenizer, prompt, word)
    except InputError:
        raise InputError(
            f"{option} word '{word}' is not in the prompt '{prompt}': use a word of that prompt"
        ) from None


def blend_words_per_prompt(
    tokenizer: Any, prompts: Sequence[str], words: Sequence[str]
) -> list[list[str]] | None:
    """The flat LocalBlend word list → the words present in each prompt [source, *targets] (P2P's form);
    a word in none of them is refused."""
    if not words:
        return None
    per_prompt: list[list[str]] = [[] for _ in prompts]
    for word in words:
        found = False
        for row, prompt in enumerate(prompts):
            try:
                word_token_indices(tokenizer, prompt, word)
            except InputError:
                continue
            per_prompt[row].append(word)
            found = True
        if not found:
            raise InputError(
                f"blend word '{word}' is in neither the source nor a target prompt ({' | '.join(prompts)}): "
                "use a word of them"
            )
    return per_prompt


def check_edit_inputs(
    tokenizer: Any,
    placeholders: Sequence[Placeholder],
    source: str,
    targets: Sequence[str],
    num_steps: int = 50,
    mode: str = "refine",
    cross_replace: float = 0.8,
    cross_replace_words: Mapping[str, float] | None = None,
    self_replace: float = 0.5,
    reweight: Mapping[str, float] | None = None,
    blend_words: Sequence[str] = (),
    blend_threshold: float = 0.3,
    blend_start: float = 0.2,
    iterations: int = 100,
    opt_schedule: float = 0.8,
    structure_weight: float = 1e4,
    color_weight: float = 1e3,
    area: str = "whole",
    mask_words_source: Sequence[str] = (),
    mask_words_target: Sequence[str] = (),
    mask_threshold: float = 0.5,
) -> PromptToPrompt:
    """Refuse every user mistake of an edit before any model call, naming the bad value (STYLE habit 5).

    Needs only a tokenizer that knows the placeholders, so scripts can call it before loading a model.
    Each target must contain the placeholders of the source prompt (or, when it has none, the
    checkpoint's first one). Returns the edit's Prompt-to-Prompt controller.
    """
    if isinstance(targets, str) or not targets or not all(str(t).strip() for t in targets):
        raise InputError(f"target={targets!r} must be one or more non-empty prompts")
    for prompt in (source, *targets):
        token_ids(tokenizer, prompt)  # over-long prompts are refused, never truncated
    required = placeholders_in(tokenizer, placeholders, source) or list(placeholders[:1])
    for target in targets:
        present = placeholders_in(tokenizer, placeholders, target)
        for placeholder in required:
            if placeholder not in present:
                raise InputError(
                    f"target '{target}' does not contain the placeholder {placeholder.text} of the "
                    f"checkpoint: write it where the subject is, as in '{placeholder.prompt}'"
                )
    if area not in AREAS:
        raise InputError(f"spl.area='{area}' must be one of {', '.join(AREAS)}")
    if area == "masked" and not (mask_words_source or mask_words_target):
        raise InputError(
            "spl.area=masked needs mask words: set spl.mask_words_source and/or spl.mask_words_target"
        )
    for word in mask_words_source:
        _require_word(tokenizer, word, source, "spl.mask_words_source")
    for word in mask_words_target:
        for target in targets:
            _require_word(tokenizer, word, target, "spl.mask_words_target")
    for name, value in (("spl.opt_schedule", opt_schedule), ("spl.mask_threshold", mask_threshold)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"{name}={value} must be in [0, 1]")
    if iterations < 0 or structure_weight < 0 or color_weight < 0:
        raise InputError(
            f"spl.iterations={iterations} and the SPL/CPL weights ({structure_weight}, {color_weight}) "
            "must be >= 0"
        )
    blend = blend_words_per_prompt(tokenizer, [source, *targets], blend_words)
    return build_p2p(
        tokenizer,
        source,
        list(targets),
        num_steps,
        mode,
        cross_replace,
        cross_replace_words,
        self_replace,
        reweight,
        blend,
        blend_threshold,
        blend_start,
    )


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
        """Training-free editing with a base model (hub id, diffusers folder, 'tiny', 'sd-v1-random')."""
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

    def placeholders_in(self, prompt: str) -> list[Placeholder]:
        return placeholders_in(self.tokenizer, self.placeholders, prompt)

    def placeholder_masks(self, prompt: str) -> list[PlaceholderMask]:
        """(token position, mask) of every placeholder with a mask in `prompt` (spatial control)."""
        return [
            (position, p.mask)
            for p in self.placeholders_in(prompt)
            if p.mask is not None
            for position in word_token_indices(self.tokenizer, prompt, p.text)
        ]

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.sd.decode_latents(latents.to(self.sd.vae.dtype)).float()

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.sd.encode_image(images.to(self.sd.vae.dtype)).float()

    # ------------------------------------------------------------------------------------ inversion

    def invert(
        self,
        image: torch.Tensor | str | Path,
        prompt: str,
        *,
        method: str = "null_text",
        steps: int = 50,
        guidance: float = 7.5,
        nti: NullTextSettings = DEFAULT_NTI,
        spatial_control: bool = True,
        resolution: int | None = None,
    ) -> Inversion:
        """Invert an image (path or (1, 3, H, W) in [-1, 1]) under the source prompt P̃ (SPEC §3).

        Reuses the cache entry of an identical earlier call (`Inversion.cached`). With `spatial_control`
        the placeholders of `prompt` are masked exactly as in the edit's source branch. A path is loaded
        at `resolution` (default: :attr:`resolution`).
        """
        if method not in METHODS:
            raise InputError(f"inversion method '{method}' must be one of {', '.join(METHODS)}")
        if steps < 1:
            raise InputError(f"steps={steps} must be >= 1")
        token_ids(self.tokenizer, prompt)
        if not isinstance(image, torch.Tensor):
            image = self.load_image(image, resolution)
        multiple = self.sd.size_multiple
        if image.dim() != 4 or image.shape[:2] != (1, 3) or any(side % multiple for side in image.shape[-2:]):
            raise InputError(
                f"image tensor of shape {tuple(image.shape)} must be (1, 3, H, W) with H, W "
                f"multiples of {multiple}"
            )
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

    # ------------------------------------------------------------------------------------ editing

    def check_inputs(
        self, source: str, targets: Sequence[str], num_steps: int = 50, **options: Any
    ) -> PromptToPrompt:
        """:func:`check_edit_inputs` with this editor's tokenizer and placeholders."""
        return check_edit_inputs(self.tokenizer, self.placeholders, source, targets, num_steps, **options)

    def _spatial_columns(self, prompts: Sequence[str], rows: Sequence[int], source: str) -> list[ColumnMask]:
        """Spatial control of the placeholders of the SOURCE prompt, wherever they occur in the batch.

        Their masks are drawn on the source image; a placeholder met only in targets (a compositional
        [A]) was learned on a reference image, so its mask does not fit this layout and is not applied.
        """
        controlled = {p.text for p in self.placeholders_in(source) if p.mask is not None}
        columns = []
        for prompt, row in zip(prompts, rows):
            for placeholder in self.placeholders_in(prompt):
                if placeholder.text in controlled:
                    positions = word_token_indices(self.tokenizer, prompt, placeholder.text)
                    columns += [ColumnMask(row, position, placeholder.mask) for position in positions]
        return columns

    def edit(
        self,
        inversion: Inversion,
        targets: Sequence[str],
        *,
        mode: str = "refine",
        cross_replace: float = 0.8,
        cross_replace_words: Mapping[str, float] | None = None,
        self_replace: float = 0.5,
        reweight: Mapping[str, float] | None = None,
        blend_words: Sequence[str] = (),
        blend_threshold: float = 0.3,
        blend_start: float = 0.2,
        spatial_control: bool = True,
        structure: bool = True,
        color: bool = False,
        structure_weight: float = 1e4,
        color_weight: float = 1e3,
        iterations: int = 100,
        spl_lr: float = 1.0,
        momentum: float = 0.9,
        opt_schedule: float = 0.8,
        postprocess: bool = True,
        radius: int = 5,
        eps: float = 1e-4,
        area: str = "whole",
        mask_words_source: Sequence[str] = (),
        mask_words_target: Sequence[str] = (),
        mask_threshold: float = 0.5,
        mask_invert: bool = False,
        mask_radius: int = 1,
        mask_eps: float = 1e-2,
    ) -> EditResult:
        """Edit the inverted image towards each target prompt in one batch (SPEC §4–§6).

        Prompt-to-Prompt: `mode` (refine | replace), `cross_replace` (+ per-word `cross_replace_words`),
        `self_replace`, `reweight`, LocalBlend (`blend_words`, `blend_threshold`, `blend_start`).
        SPL: `structure` / `color` switch the losses (weights, `iterations`, `spl_lr`, `momentum`, `radius`,
        `eps`), `opt_schedule` the first in-loop step (i/T ≥ it; 1 = never), `postprocess` the final
        refinement against the input; `area="masked"` applies them inside the cross-attention mask of
        `mask_words_source` / `mask_words_target` (or outside it with `mask_invert`).
        """
        timings: dict[str, float] = {}
        start = time.perf_counter()
        sd, device = self.sd, self.sd.device

        # 1. Check inputs
        targets = list(targets)
        prompts = [inversion.prompt, *targets]
        options = {
            "mode": mode,
            "cross_replace": cross_replace,
            "cross_replace_words": cross_replace_words,
            "self_replace": self_replace,
            "reweight": reweight,
            "blend_words": blend_words,
            "blend_threshold": blend_threshold,
            "blend_start": blend_start,
            "iterations": iterations,
            "opt_schedule": opt_schedule,
            "structure_weight": structure_weight,
            "color_weight": color_weight,
            "area": area,
            "mask_words_source": mask_words_source,
            "mask_words_target": mask_words_target,
            "mask_threshold": mask_threshold,
        }
        p2p = check_edit_inputs(
            self.tokenizer, self.placeholders, inversion.prompt, targets, inversion.steps, **options
        )
        n_rows, n_targets = len(prompts), len(targets)
        weights = {
            "structure_weight": structure_weight if structure else 0.0,
            "color_weight": color_weight if color else 0.0,
        }
        spl_on = iterations > 0 and any(weights.values())

        # 2. Encode the prompts
        with torch.no_grad():
            cond = sd.encode_prompt(prompts).float()  # (1 + n, L, D)
        null_rows = range(n_rows) if inversion.null_prompt == inversion.prompt else ()

        # 3. DDIM schedule and initial latents: every row starts from the inversion's z_T
        schedule = DDIMSchedule.from_scheduler(sd.scheduler, inversion.steps)
        num_steps = len(schedule)
        latents = inversion.z_T.to(device).float().expand(n_rows, -1, -1, -1).clone()  # (1 + n, C, h, w)
        spl_steps = [i for i in range(num_steps) if i / num_steps >= opt_schedule] if spl_on else []

        # 4. Attention control: spatial control, Prompt-to-Prompt, attention store (one chain, all layers)
        store = AttentionStore(levels=(MASK_LEVEL,))
        controllers = [p2p, store]
        if spatial_control:
            columns = self._spatial_columns(prompts, [n_rows + r for r in range(n_rows)], inversion.prompt)
            # ∅ = the source prompt itself (negative_prompt): its placeholder is controlled as in inversion
            columns += self._spatial_columns(
                [inversion.prompt] * len(null_rows), list(null_rows), inversion.prompt
            )
            controllers.insert(0, SpatialControl(columns, self.renormalize))
        controller = ControllerChain(controllers)
        controller.conditional_rows = slice(n_rows, 2 * n_rows)  # batch = [uncond × (1 + n), cond × (1 + n)]

        # 5. SPL reference: the VAE round trip of the source (the in-loop edits are decoded through it too)
        source_image = inversion.image.to(device)
        round_trip = self._decode(inversion.z0.to(device))
        masks: dict[str, torch.Tensor] = {}
        loss_mask: torch.Tensor | None = None  # (n, 1, H, W), None = whole image
        want_masks = bool(mask_words_source or mask_words_target)
        mask_args = (mask_words_source, mask_words_target, mask_threshold, mask_invert, mask_radius, mask_eps)
        in_loop: list[dict[str, Any]] = []
        timings["prepare"] = time.perf_counter() - start

        # 6. Denoising loop
        spl_seconds = 0.0
        loop_start = time.perf_counter()
        bar = tqdm(range(num_steps), desc="editing", disable=not self.progress, leave=False)
        with controlled_attention(sd.unet, controller), torch.no_grad():
            for i in bar:
                controller.step = i
                t = schedule.timesteps[i]
                alpha, alpha_prev = float(schedule.alphas[i]), float(schedule.alphas_prev[i])
                uncond = inversion.null_embedding(i).to(device).expand(n_rows, -1, -1)
                noise = predict_noise(
                    sd.unet,
                    torch.cat([latents, latents]),
                    t,
                    torch.cat([uncond, cond]),
                    alpha,
                    schedule.prediction_type,
                )
                noise = guided_noise(noise[:n_rows], noise[n_rows:], inversion.guidance)  # (1 + n, C, h, w)
                x0 = predicted_x0(latents, noise, alpha)

                # 6a. SPL in the loop (targets only): decode x̂0, refine against the source, re-encode
                if i in spl_steps:
                    spl_start = time.perf_counter()
                    decoded = self._decode(x0[1:])
                    if want_masks and not masks:
                        masks = self._masks(store, prompts, source_image, decoded, range(i + 1), *mask_args)
                        loss_mask = self._loss_mask(masks, n_targets) if area == "masked" else None
                    refined = refine(
                        round_trip,
                        decoded,
                        loss_mask,
                        iterations=iterations,
                        lr=spl_lr,
                        momentum=momentum,
                        radius=radius,
                        eps=eps,
                        **weights,
                    )
                    in_loop.append(
                        {
                            "step": i,
                            "before": self._losses(round_trip, decoded, loss_mask, radius, eps, weights),
                            "after": self._losses(round_trip, refined, loss_mask, radius, eps, weights),
                        }
                    )
                    x0 = torch.cat([x0[:1], self._encode(refined)])
                    spl_seconds += time.perf_counter() - spl_start

                # 6b. DDIM step with x̂0 (refined for the targets) and the same ε̂, then LocalBlend
                latents = math.sqrt(alpha_prev) * x0 + math.sqrt(1 - alpha_prev) * noise
                if p2p.local_blend is not None:
                    latents = p2p.local_blend(latents, store, step=i)
        timings["denoise"] = time.perf_counter() - loop_start - spl_seconds
        timings["spl_in_loop"] = spl_seconds

        # 7. Decode and post-process against the input image
        decode_start = time.perf_counter()
        decoded = self._decode(latents)  # (1 + n, 3, H, W)
        reconstruction, raw = decoded[:1], decoded[1:]
        timings["decode"] = time.perf_counter() - decode_start
        mask_start = time.perf_counter()
        if want_masks and not masks:
            masks = self._masks(store, prompts, source_image, raw, range(num_steps), *mask_args)
            loss_mask = self._loss_mask(masks, n_targets) if area == "masked" else None
        timings["masks"] = time.perf_counter() - mask_start
        post_start = time.perf_counter()
        final = raw
        if postprocess and spl_on:
            final = refine(
                source_image,
                raw,
                loss_mask,
                iterations=iterations,
                lr=spl_lr,
                momentum=momentum,
                radius=radius,
                eps=eps,
                **weights,
            )
        timings["postprocess"] = time.perf_counter() - post_start

        # 8. Metrics and attention maps
        before = self._losses(source_image, raw, loss_mask, radius, eps, weights)
        after = self._losses(source_image, final, loss_mask, radius, eps, weights)
        metrics: dict[str, Any] = {
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
                for k, target in enumerate(targets)
            ],
            "spl_in_loop": in_loop,
        }
        attention_maps = self._attention_maps(store, prompts)
        timings["total"] = time.perf_counter() - start
        return EditResult(
            prompts=prompts,
            images=final.cpu(),
            raw_images=raw.cpu(),
            reconstruction=reconstruction.cpu(),
            source=inversion.image,
            masks={k: v.cpu() for k, v in masks.items()},
            attention_maps=attention_maps,
            metrics=metrics,
            timings=timings,
            latents=latents.cpu(),
        )

    # ------------------------------------------------------------------------------------ edit helpers

    def _losses(
        self,
        source: torch.Tensor,
        edited: torch.Tensor,
        mask: torch.Tensor | None,
        radius: int,
        eps: float,
        weights: Mapping[str, float],
    ) -> dict[str, list[float | None]]:
        """Per image: L_SPL (and L_CPL when it is optimised) against `source`, unweighted (SPEC §5)."""
        losses: dict[str, list[float | None]] = {"spl": [], "cpl": []}
        for k in range(edited.shape[0]):
            image = edited[k : k + 1]
            image_mask = None if mask is None else mask[k : k + 1]
            reference = SPLReference.from_source(source, image_mask, radius, eps)
            losses["spl"].append(float(spl_loss(reference, image)))
            losses["cpl"].append(float(cpl_loss(reference, image)) if weights["color_weight"] else None)
        return losses

    def _masks(
        self,
        store: AttentionStore,
        prompts: Sequence[str],
        source_image: torch.Tensor,
        target_guides: torch.Tensor,
        steps: Sequence[int],
        words_source: Sequence[str],
        words_target: Sequence[str],
        threshold: float,
        invert: bool,
        radius: int,
        eps: float,
    ) -> dict[str, torch.Tensor]:
        """Preservation masks of SPEC §6 at image size: "source", "target_k" and the final "mask_k".

        Maps: mask words' cross-attention (conditional rows, "16×16" layers, heads, `steps`), each word /
        its max, OR of (> threshold); guided-filter upsampling with the source image (source mask) or the
        target's preview image (target mask). Final = max(source, target), then optionally 1 − it.
        """
        maps = store.average(MASK_LEVEL, steps=list(steps))  # (1 + n, h, w, K)

        def coarse(row: int, words: Sequence[str]) -> torch.Tensor:
            positions = [word_token_indices(self.tokenizer, prompts[row], w) for w in words]
            return binarize_attention(word_maps(maps[row], positions), threshold)  # (h, w)

        masks: dict[str, torch.Tensor] = {}
        size = tuple(source_image.shape[-2:])
        source_mask = None
        if words_source:
            source_mask = upsample_mask(coarse(0, words_source), source_image, radius, eps)
            masks["source"] = source_mask
        for k in range(len(prompts) - 1):
            final = source_mask if source_mask is not None else torch.zeros(size, device=source_image.device)
            if words_target:
                guide = target_guides[k : k + 1]
                target_mask = upsample_mask(coarse(k + 1, words_target), guide, radius, eps)
                masks[f"target_{k}"] = target_mask
                final = torch.maximum(final, target_mask)
            masks[f"mask_{k}"] = 1.0 - final if invert else final
        return masks

    @staticmethod
    def _loss_mask(masks: Mapping[str, torch.Tensor], n_targets: int) -> torch.Tensor:
        return torch.stack([masks[f"mask_{k}"] for k in range(n_targets)])[:, None]  # (n, 1, H, W)

    def _attention_maps(self, store: AttentionStore, prompts: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """Per prompt, each word's cross-attention ("16×16" layers, heads, all steps), divided by its max."""
        maps = store.average(MASK_LEVEL)  # (1 + n, h, w, K)
        result = []
        for row, prompt in enumerate(prompts):
            words = prompt_words(prompt)
            positions = [word_token_indices(self.tokenizer, prompt, w) for w in words]
            per_word = word_maps(maps[row], positions)  # (words, h, w)
            peak = per_word.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(per_word.dtype).tiny)
            per_word = per_word / peak
            result.append({w: m.cpu() for w, m in zip(words, per_word)})
        return result
