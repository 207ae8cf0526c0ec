"""The model-family interface: everything the editing and training code may ask of a backbone.

A family is one class (Stable Diffusion v1 and v2 in :mod:`s2edit.core.stable_diffusion`) that owns the
loaded components and answers, in the model's own terms:

- tokenizers (one or more) and each word's token positions per tokenizer; adding a placeholder token to
  every tokenizer and text encoder;
- prompt encoding: the cross-attention context plus any added conditioning (:class:`Conditioning`), the
  unconditional equivalent, and the text encoders' hidden states for the semantic loss;
- the latent scale and shift, VAE encode/decode (upcast where the family needs it);
- the prediction type (ε, v) and its conversion to ε;
- the native resolution and the multiple image sides must have;
- which attention layers are cross-attention, at which resolution, and at which level masks,
  LocalBlend and self-attention replacement work.

A new backbone is one family file, one line in :data:`s2edit.core.loading.FAMILIES` and a `tiny-*` preset.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch

from editkit.errors import ReportedError
from s2edit.core.attention import AttentionController, AttentionLayer, controlled_attention
from s2edit.core.diffusion import to_epsilon
from s2edit.core.tokenizer import EOS_TOKEN, add_placeholder_token, token_ids, word_token_indices


class NonFiniteError(ReportedError):
    """A model produced NaN or infinite values where an image or latent was expected."""


IMAGE_PER_MASK_SIDE = 32  # masks, LocalBlend and saved maps use the layers of side image/32 (SPEC §4, §10)


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, one row per prompt.

    `context` is the cross-attention input; `pooled` the added text embedding of families that take one
    (SDXL's `text_embeds`; None for SD1/SD2). Conditions that depend on the working size (SDXL's time ids)
    are not part of it: the family adds them per call (:meth:`ModelFamily.unet_inputs`).
    """

    context: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor | None = None  # (B, P)

    def __len__(self) -> int:
        return self.context.shape[0]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """The same conditioning with `fn` applied to each of its tensors."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if getattr(self, f.name) is not None})

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None]

    def float(self) -> Conditioning:
        return self.map(lambda x: x.float())

    def detach(self) -> Conditioning:
        return self.map(lambda x: x.detach())

    def to(self, *args: Any, **kwargs: Any) -> Conditioning:
        return self.map(lambda x: x.to(*args, **kwargs))

    def expand(self, rows: int) -> Conditioning:
        """One row repeated `rows` times (a view)."""
        return self.map(lambda x: x.expand(rows, *x.shape[1:]))

    def __getitem__(self, index: int | slice | Sequence[int]) -> Conditioning:
        """Rows of the batch; an integer keeps the row axis ((1, …))."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self.map(lambda x: x[index])

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Rows of several conditionings, in order."""
        first = items[0]
        return replace(first, **{
            f.name: torch.cat([getattr(item, f.name) for item in items])
            for f in fields(first) if getattr(first, f.name) is not None
        })

    @staticmethod
    def stack(items: Sequence[Conditioning]) -> Conditioning:
        """Single-row conditionings → one with a row each (as `torch.stack` of their first rows)."""
        return Conditioning.cat([item[0] for item in items])


@dataclass
class TextEncoding:
    """A prompt batch as the text encoders see it: the denoiser's conditioning, and each encoder's last
    hidden state after its final layer norm (what the semantic loss compares, SPEC §2, §10)."""

    conditioning: Conditioning
    hidden: tuple[torch.Tensor, ...]  # per text encoder (B, L, D_k)

    def __getitem__(self, index: slice) -> TextEncoding:
        """Rows of the batch. A tensor that is both the context and a hidden state (SD's) gets ONE view,
        so autograd sums its gradients in one place, as if the caller had sliced it once."""
        views: dict[int, torch.Tensor] = {}

        def rows(x: torch.Tensor) -> torch.Tensor:
            if id(x) not in views:
                views[id(x)] = x[index]
            return views[id(x)]

        return TextEncoding(self.conditioning.map(rows), tuple(rows(h) for h in self.hidden))


class ModelFamily(abc.ABC):
    """A loaded backbone (see the module docstring). Subclasses set `name` and implement the abstract
    methods; the shared behaviour of UNet families is written here once."""

    name: ClassVar[str]  # "sd1", "sd2", …
    denoiser: ClassVar[str] = "unet"  # the denoiser's component (folder) name: "unet" or "transformer"
    default_model: ClassVar[str]  # the hub id that stands for the family
    label: ClassVar[str] = "Stable Diffusion"  # how messages name it
    # transformers class of each text encoder, in order (the folders text_encoder, text_encoder_2, …)
    text_encoder_classes: ClassVar[tuple[str, ...]] = ("CLIPTextModel",)
    # the padding token of each offline tokenizer of a random preset (OpenCLIP tokenizers pad with "!")
    tokenizer_pads: ClassVar[tuple[str, ...]] = (EOS_TOKEN,)
    # DDIM settings the family's sampling chain fixes, whatever the folder's scheduler says (SPEC §10)
    ddim_overrides: ClassVar[Mapping[str, Any]] = {}
    # what `finetune.method=auto` trains: "full" (the S2Edit paper's) or "lora" adapters
    default_finetune: ClassVar[str] = "full"
    # diffusers' LoRA loader whose key conversions fit the family's files (`lora=`, s2edit.core.lora)
    lora_loader: ClassVar[str] = "StableDiffusionLoraLoaderMixin"

    def __init__(
        self,
        *,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoders: Sequence[torch.nn.Module],
        tokenizers: Sequence[Any],
        scheduler: Any,
        source: str,
        scheduler_config: Mapping[str, Any] | None = None,
        pipeline_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.unet = unet
        self.vae = vae
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.scheduler = scheduler  # the DDIM chain of the model's betas (SPEC §3, §10)
        self.source = source  # what `model=` named: a hub id, a folder or a preset
        self.scheduler_config = dict(scheduler_config or {})  # the model's own (e.g. an LCMScheduler's)
        self.pipeline_config = dict(pipeline_config or {})  # model_index.json's settings (no components)

    @classmethod
    @abc.abstractmethod
    def matches(cls, pipeline: str, configs: Mapping[str, Mapping[str, Any]]) -> bool:
        """Whether a diffusers folder holds this family, from its pipeline class name (model_index.json's
        `_class_name`, "" when absent) and component configs ("unet", "scheduler", "text_encoder")."""

    # ------------------------------------------------------------------------------------ components

    @property
    def tokenizer(self) -> Any:
        """The first tokenizer: its token positions are the prompts' positions (all CLIP BPE agree)."""
        return self.tokenizers[0]

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text_encoders[0]

    def text_encoder_names(self) -> list[str]:
        """Component names of the text encoders (diffusers' folder names)."""
        return ["text_encoder", *(f"text_encoder_{k + 1}" for k in range(1, len(self.text_encoders)))]

    def components(self) -> dict[str, torch.nn.Module]:
        """Every weight-holding component by its diffusers name."""
        encoders = dict(zip(self.text_encoder_names(), self.text_encoders))
        return {"unet": self.unet, "vae": self.vae, **encoders}

    def trainable_components(self) -> dict[str, torch.nn.Module]:
        """What fine-tuning may train: the denoiser and the text encoders (never the VAE)."""
        return {name: module for name, module in self.components().items() if name != "vae"}

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ModelFamily:
        """Move every component to `device` / cast it to `dtype` (in place); returns self."""
        for module in self.components().values():
            if device is not None:
                module.to(device)
            if dtype is not None and dtype != module.dtype:  # diffusers warns on any `.to(dtype=...)`
                module.to(dtype)
        return self

    def eval(self) -> ModelFamily:
        for module in self.components().values():
            module.eval()
        return self

    # ------------------------------------------------------------------------------------ tokens

    def tokenize(self, prompts: Sequence[str], index: int = 0) -> torch.Tensor:
        """(B, L) ids of tokenizer `index`, padded to the context length, on its text encoder's device;
        over-long prompts are refused in one line."""
        for prompt in prompts:
            self.token_ids(prompt)
        tokenizer = self.tokenizers[index]
        return tokenizer(
            list(prompts), padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt",
        ).input_ids.to(self.text_encoders[index].device)

    def token_ids(self, prompt: str) -> list[int]:
        """The first tokenizer's ids of `prompt` (start/end included, unpadded); an over-long prompt is
        refused in one line instead of being truncated."""
        return token_ids(self.tokenizer, prompt)

    def word_positions(self, prompt: str, word: str) -> list[list[int]]:
        """`word`'s token positions in `prompt`, per tokenizer (InputError when it is not in it)."""
        return [word_token_indices(tokenizer, prompt, word) for tokenizer in self.tokenizers]

    def add_placeholder(self, placeholder: str, init_word: str | None = None) -> int:
        """Add `placeholder` as ONE new token to every tokenizer, with a row in every text encoder
        initialised from that encoder's row(s) of `init_word` (SPEC §2, §10). Returns its id, which is
        the same in every tokenizer."""
        ids = {add_placeholder_token(tokenizer, encoder, placeholder, init_word)
               for tokenizer, encoder in zip(self.tokenizers, self.text_encoders)}
        if len(ids) != 1:
            raise ValueError(f"placeholder {placeholder} got different ids {sorted(ids)} in the tokenizers")
        return ids.pop()

    # ------------------------------------------------------------------------------------ text

    @abc.abstractmethod
    def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
        """The prompts' conditioning and hidden states (differentiable: wrap it in `torch.no_grad()`
        where the text encoders are frozen)."""

    def encode_prompt(self, prompts: str | Sequence[str]) -> Conditioning:
        """The conditioning of each prompt, in the text encoders' dtype."""
        return self.encode_text([prompts] if isinstance(prompts, str) else list(prompts)).conditioning

    def unconditional(self) -> Conditioning:
        """The unconditional input of classifier-free guidance (one row): the encoding of ""."""
        return self.encode_prompt([""])

    @abc.abstractmethod
    def unet_inputs(self, cond: Conditioning, latent_size: tuple[int, int]) -> dict[str, Any]:
        """The denoiser's conditioning keyword arguments for a latent of `latent_size`."""

    def predict(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's raw output (ε, v, …) for latents `z` (1 or B rows, broadcast to the B rows of
        `cond`) at timestep(s) `t`, in float32. Gradients flow when enabled."""
        dtype = self.dtype
        if z.shape[0] != len(cond):
            z = z.expand(len(cond), *z.shape[1:])
        inputs = self.unet_inputs(cond.to(dtype), tuple(z.shape[-2:]))
        return self.unet(z.to(dtype), t.to(z.device), **inputs).sample.float()

    # ------------------------------------------------------------------------------------ prediction

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: "epsilon" or "v_prediction" (the scheduler config's)."""
        return self.scheduler.config.prediction_type

    def to_epsilon(self, output: torch.Tensor, z: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
        """The denoiser's output as a noise prediction ε at noise level ᾱ."""
        return to_epsilon(output, z, alpha, self.prediction_type)

    # ------------------------------------------------------------------------------------ latents

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def latent_scale(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def latent_shift(self) -> float:
        return getattr(self.vae.config, "shift_factor", None) or 0.0  # None / absent for SD1.x and SD2.x

    @property
    def upcast_vae(self) -> bool:
        """Whether the VAE must run in float32 in half-precision runs (the SDXL VAE overflows, SPEC §10)."""
        return False

    def _vae_dtype(self) -> torch.dtype:
        return torch.float32 if self.upcast_vae else self.vae.dtype

    def encode_image(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, C, H/f, W/f) latent: (posterior MEAN − shift) × scale (SPEC §2–§3),
        in the image's dtype; with a (CPU) `generator`, a posterior sample instead (InfEdit's choice)."""
        if image.shape[-1] % self.size_multiple or image.shape[-2] % self.size_multiple:
            size = tuple(image.shape[-2:])
            raise ValueError(f"image size {size} is not a multiple of {self.size_multiple}")
        with self._vae_in(self._vae_dtype()) as vae:
            posterior = vae.encode(image.to(device=vae.device, dtype=vae.dtype)).latent_dist
            latent = posterior.mean
            if generator is not None:
                noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32)
                latent = latent + posterior.std * noise.to(latent)
        return ((latent - self.latent_shift) * self.latent_scale).to(image.dtype)

    def decode_latents(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """(B, C, h, w) latent → (B, 3, h·f, w·f) image in [-1, 1] (clamped unless `clamp=False`), in the
        latents' dtype. A NaN or infinite value is an error (SPEC §10), never a saved picture."""
        with self._vae_in(self._vae_dtype()) as vae:
            scaled = latents.to(device=vae.device, dtype=vae.dtype) / self.latent_scale + self.latent_shift
            image = vae.decode(scaled).sample.to(latents.dtype)
        if not bool(torch.isfinite(image).all()):
            where = "latents" if not bool(torch.isfinite(latents).all()) else f"VAE ({self._vae_dtype()})"
            raise NonFiniteError(f"decoding gave NaN or infinite pixels (from the {where}): check the "
                                 "model's weights, or run in fp32 (precision=fp32)")
        return image.clamp(-1, 1) if clamp else image

    @contextlib.contextmanager
    def _vae_in(self, dtype: torch.dtype) -> Iterator[torch.nn.Module]:
        """The VAE, cast to `dtype` while inside (back to its own dtype afterwards)."""
        own = self.vae.dtype
        if dtype != own:
            self.vae.to(dtype)
        try:
            yield self.vae
        finally:
            if dtype != own:
                self.vae.to(own)

    # ------------------------------------------------------------------------------------ geometry

    @property
    def native_resolution(self) -> int:
        """The image size the denoiser was trained at (diffusers' default height): sample_size × VAE
        factor."""
        sample_size = self.unet.config.sample_size
        side = sample_size if isinstance(sample_size, int) else max(sample_size)
        return side * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor × the UNet's down-sampling (64 for SD)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    # ------------------------------------------------------------------------------------ attention

    @abc.abstractmethod
    def attention_layers(self) -> dict[str, AttentionLayer]:
        """Every attention layer of the denoiser: processor name → kind (cross or self) and level."""

    @property
    def mask_level(self) -> int:
        """The level (latent side / map side) of the layers whose maps masks, LocalBlend and the saved
        word maps use: side = image/32 (the "16×16" layers of SD at 512², 32² of SDXL at 1024²), or
        image/`image_per_mask_side` where the model's pipeline config says so (the 64² shapes model: its
        16² layers)."""
        per_side = int(self.pipeline_config.get("image_per_mask_side", IMAGE_PER_MASK_SIDE))
        return max(1, per_side // self.vae_scale_factor)

    @property
    def self_replace_level(self) -> int:
        """Prompt-to-Prompt replaces self-attention only in layers of at least this level (SPEC §4, §10)."""
        return 2

    @property
    def fused_self_attention(self) -> bool:
        """Whether self-attention replacement swaps queries and keys before the fused kernel (no map is
        materialised) rather than editing explicit maps as P2P's reference does (SD1/SD2: explicit)."""
        return False

    def attention_control(
        self, controller: AttentionController, cross_only: bool = False
    ) -> contextlib.AbstractContextManager[AttentionController]:
        """Route the attention layers the controller wants (or every cross-attention layer with
        `cross_only`) through it while inside; the other layers keep their own fused processors."""
        layers = self.attention_layers()
        select = (lambda name: layers[name].is_cross) if cross_only else None
        return controlled_attention(self.unet, layers, controller, select)
