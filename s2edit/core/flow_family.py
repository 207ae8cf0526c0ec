"""Flow-matching families (SD3, FLUX; SPEC §11): a transformer that predicts the velocity v ≈ ε − x0 on
rectified-flow latents, behind the model-family interface.

What differs from the UNet families: the denoiser is `transformer` (no UNet inputs, no DDIM chain); prompt
encoding is the diffusers pipeline's own `encode_prompt` over the family's encoders (a pipeline object
shares the loaded modules, and gives model CPU offload its diffusers semantics); the schedule is the
model's `FlowMatchEulerDiscreteScheduler` (:func:`s2edit.core.flow.flow_sigmas`). Flow families edit
with FlowEdit only; identity fine-tuning and the inversion-based methods stay with the UNet families.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from editkit.errors import InputError
from s2edit.core.attention import AttentionLayer
from s2edit.core.detect import flow_refusal
from s2edit.core.family import Conditioning, ModelFamily, TextEncoding
from s2edit.core.flow import flow_sigmas
from s2edit.core.tokenizer import prompt_preview


def refuse_flow_family(model: ModelFamily | type[ModelFamily], what: str, source: str | None = None) -> None:
    """One line refusing a flow model (or family, before loading `source`) where only the UNet families
    work (`what`: the refused use)."""
    family = model if isinstance(model, type) else type(model)
    source = source if source is not None else getattr(model, "source", family.name)
    message = flow_refusal(family.name, source, what)
    if message is not None:
        raise InputError(message)


class FlowFamily(ModelFamily):
    """A rectified-flow transformer family (see the module docstring)."""

    denoiser: ClassVar[str] = "transformer"
    pipeline_class: ClassVar[str]  # the diffusers pipeline whose encode_prompt the family uses
    transformer_class: ClassVar[str]
    tokenizer_classes: ClassVar[tuple[str, ...]]  # transformers class of each tokenizer folder
    default_max_sequence_length: ClassVar[int] = 256  # T5 tokens (the pipelines' default)

    def __init__(self, *, transformer: torch.nn.Module, vae: torch.nn.Module,
                 text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence[Any],
                 scheduler_config: Mapping[str, Any], source: str,
                 pipeline_config: Mapping[str, Any] | None = None) -> None:
        super().__init__(unet=transformer, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                         scheduler=None, source=source, scheduler_config=scheduler_config,
                         pipeline_config=pipeline_config)
        self.transformer = transformer
        self._pipeline: Any = None
        self.offload_device: torch.device | None = None  # set by enable_offload

    # ------------------------------------------------------------------------------------ components

    def components(self) -> dict[str, torch.nn.Module]:
        encoders = dict(zip(self.text_encoder_names(), self.text_encoders))
        return {"transformer": self.transformer, "vae": self.vae, **encoders}

    def trainable_components(self) -> dict[str, torch.nn.Module]:
        """Nothing: flow families are edited with FlowEdit, which trains no weights."""
        return {}

    def tokenizer_names(self) -> list[str]:
        return ["tokenizer", *(f"tokenizer_{k + 1}" for k in range(1, len(self.tokenizers)))]

    def pipeline(self) -> Any:
        """The family's diffusers pipeline over the SAME modules (no copy): its `encode_prompt` encodes
        prompts, and `enable_model_cpu_offload` offloads. The scheduler is a fresh one from the config."""
        if self._pipeline is None:
            import diffusers

            scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
            parts = {**self.components(), **dict(zip(self.tokenizer_names(), self.tokenizers))}
            self._pipeline = getattr(diffusers, self.pipeline_class)(scheduler=scheduler, **parts,
                                                                     **self.pipeline_extras())
            self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    def pipeline_extras(self) -> dict[str, Any]:
        """Further pipeline constructor arguments (FLUX's image encoder slots)."""
        return {}

    @property
    def guidance_embedding(self) -> bool:
        """Whether the transformer takes the guidance scale as an input embedding (FLUX-dev) instead of
        classifier-free guidance rows (SD3)."""
        return False

    @property
    def max_sequence_length(self) -> int:
        return int(self.pipeline_config.get("max_sequence_length", self.default_max_sequence_length))

    def enable_offload(self, device: str | torch.device) -> FlowFamily:
        """Model CPU offload with diffusers' `enable_model_cpu_offload` semantics: every component waits on
        the CPU and moves whole to `device` when it runs (text encoders → transformer → VAE; VAE encode /
        decode included), the previous one going back. Peak accelerator memory ≈ the largest component.
        Returns self."""
        device = torch.device(device)
        self.pipeline().enable_model_cpu_offload(device=device)
        self.offload_device = torch.device(device.type, device.index or 0)
        return self

    @property
    def device(self) -> torch.device:
        """Where the model computes: the offload device when offloading, else the transformer's."""
        return self.offload_device if self.offload_device is not None else self.transformer.device

    @property
    def execution_device(self) -> torch.device:
        """Where inputs go (:attr:`device`)."""
        return self.device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> FlowFamily:
        if device is not None and self.offload_device is not None:
            raise TypeError(f"{self.label} is offloaded to {self.offload_device}: its components move there "
                            "by themselves")
        super().to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------------------------------ schedule

    @property
    def prediction_type(self) -> str:
        return "flow"

    def sigmas(self, steps: int, latent_size: tuple[int, int]) -> torch.Tensor:
        """σ_0 … σ_T of a `steps`-step schedule for a latent of `latent_size` (FLUX shifts by it)."""
        return flow_sigmas(self.scheduler_config, steps, self.image_seq_len(latent_size))

    def image_seq_len(self, latent_size: tuple[int, int]) -> int:
        """Image tokens of a latent: (h / p)(w / p) for patch side p."""
        patch = self.patch_size
        return (latent_size[0] // patch) * (latent_size[1] // patch)

    @property
    @abc.abstractmethod
    def patch_size(self) -> int:
        """Latent pixels per image-token side."""

    # ------------------------------------------------------------------------------------ prediction

    @abc.abstractmethod
    def velocity(self, z: torch.Tensor, sigma: float, cond: Conditioning,
                 guidance: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer's velocity for latents `z` (B, C, h, w) at noise level σ, one row per row of
        `cond` (`guidance`: FLUX's per-row guidance embedding), float32."""

    def unet_inputs(self, cond: Conditioning, latent_size: tuple[int, int]) -> dict[str, Any]:
        raise TypeError(f"{self.label} has a transformer, not a UNet")

    def predict(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        raise TypeError(f"{self.label} predicts velocities: use velocity()")

    def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
        """The pipeline's `encode_prompt` of the prompts (no gradients: flow families train nothing)."""
        for prompt in prompts:
            self.check_prompt(prompt)
        with torch.no_grad():
            context, pooled = self._encode(list(prompts))
        return TextEncoding(Conditioning(context, pooled), ())

    def check_prompt(self, prompt: str) -> None:
        """Refuse, in one line, a prompt longer than a text encoder takes: CLIP's 77 tokens, or T5's
        `max_sequence_length` (the diffusers pipelines would silently cut it, and the word maps with it)."""
        self.token_ids(prompt)
        t5 = self.tokenizers[-1]
        count = len(t5(prompt, truncation=False, verbose=False).input_ids)  # with T5's end token
        if count > self.max_sequence_length:
            raise InputError(f"prompt '{prompt_preview(prompt)}' is {count} T5 tokens long (with the end "
                             f"token), more than the {self.max_sequence_length} of model '{self.source}' "
                             "(max_sequence_length): shorten it")

    @abc.abstractmethod
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, L, D), pooled (B, P)) from the pipeline's encode_prompt."""

    # ------------------------------------------------------------------------------------ geometry

    @property
    def native_resolution(self) -> int:
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    @abc.abstractmethod
    def context_columns(self, prompt: str, word: str) -> list[int]:
        """`word`'s columns of the text context (the text keys of the joint attention) for `prompt`."""

    @abc.abstractmethod
    def read_joint_block(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                         **kwargs: Any) -> torch.Tensor:
        """(B, N_img, L): the image→text block of a joint block's softmax, averaged over heads
        (:mod:`s2edit.core.joint_attention`; `kwargs`: what the block's processor was called with)."""

    def attention_layers(self) -> dict[str, AttentionLayer]:
        """Flow families' joint attention is read by its own processors (word maps, SPEC §11), not by the
        UNet controllers."""
        return {}
