"""FLUX.1: a rectified-flow transformer on 16-channel latents packed as 2×2 patches, conditioned on T5 and
CLIP-L's pooled output, guidance-distilled (FLUX-dev: the guidance scale is an input embedding, no CFG).

Prompts are encoded by diffusers' `FluxPipeline.encode_prompt`: T5's last hidden state is the context
(max_sequence_length tokens), CLIP-L's pooled output the pooled embedding, and the text positional ids are
zeros. Latents stay (B, 16, h, w) everywhere in this project; the family packs them for each transformer
call and unpacks its output (a permutation, so FlowEdit's Euler updates are unchanged by it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from s2edit.core.family import Conditioning
from s2edit.core.flow import latent_image_ids, pack_latents, unpack_latents
from s2edit.core.flow_family import FlowFamily
from s2edit.core.joint_attention import flux_image_text_block
from s2edit.core.tokenizer import EOS_TOKEN

PACK = 2  # latent pixels per packed token side
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline's default latent side (1024² images)


class Flux(FlowFamily):
    """FLUX.1 dev / schnell (see the module docstring)."""

    name: ClassVar[str] = "flux"
    default_model: ClassVar[str] = "black-forest-labs/FLUX.1-dev"
    label: ClassVar[str] = "FLUX.1"
    pipeline_class: ClassVar[str] = "FluxPipeline"
    transformer_class: ClassVar[str] = "FluxTransformer2DModel"
    text_encoder_classes: ClassVar[tuple[str, ...]] = ("CLIPTextModel", "T5EncoderModel")
    tokenizer_classes: ClassVar[tuple[str, ...]] = ("CLIPTokenizer", "T5TokenizerFast")
    tokenizer_pads: ClassVar[tuple[str, ...]] = (EOS_TOKEN,)
    default_max_sequence_length: ClassVar[int] = 512

    @classmethod
    def matches(cls, pipeline: str, configs: Mapping[str, Mapping[str, Any]]) -> bool:
        transformer_class = configs.get("transformer", {}).get("_class_name")
        return pipeline.startswith("Flux") or transformer_class == cls.transformer_class

    def pipeline_extras(self) -> dict[str, Any]:
        return {"image_encoder": None, "feature_extractor": None}

    @property
    def patch_size(self) -> int:
        return PACK * int(self.transformer.config.patch_size)

    def context_columns(self, prompt: str, word: str) -> list[int]:
        """`word`'s columns in the context: its T5 token positions (the context is T5's hidden states)."""
        return self.word_positions(prompt, word)[1]

    def read_joint_block(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                         **kwargs: Any) -> torch.Tensor:
        """FLUX's double-stream softmax over [text; image] keys, after the rotary embedding."""
        return flux_image_text_block(attn, hidden_states, encoder_hidden_states, **kwargs)

    @property
    def guidance_embedding(self) -> bool:
        """FLUX-dev takes the guidance scale as an input (guidance-distilled); schnell takes none."""
        return bool(self.transformer.config.guidance_embeds)

    @property
    def native_resolution(self) -> int:
        """The pipeline's default size: `default_sample_size` latent pixels (128: 1024² images)."""
        side = int(self.pipeline_config.get("default_sample_size", DEFAULT_SAMPLE_SIZE))
        return side * self.vae_scale_factor

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        context, pooled, _ = self.pipeline().encode_prompt(
            prompt=prompts, prompt_2=None, device=self.execution_device,
            max_sequence_length=self.max_sequence_length)
        return context, pooled

    def velocity(self, z: torch.Tensor, sigma: float, cond: Conditioning,
                 guidance: torch.Tensor | None = None) -> torch.Tensor:
        """FLUX's transformer on the packed latents at timestep σ (the model scales it by 1000), with the
        per-row `guidance` when the model has a guidance embedding (FLUX-dev)."""
        if self.guidance_embedding and guidance is None:
            raise ValueError("FLUX-dev needs a guidance value per row (its guidance embedding)")
        device, dtype = self.execution_device, self.transformer.dtype
        rows, _, height, width = z.shape
        packed = pack_latents(z).to(device=device, dtype=dtype)
        out = self.transformer(
            hidden_states=packed,
            timestep=torch.full((rows,), sigma, device=device, dtype=dtype),
            guidance=None if not self.guidance_embedding else guidance.to(device=device, dtype=torch.float32),
            pooled_projections=cond.pooled.to(device=device, dtype=dtype),
            encoder_hidden_states=cond.context.to(device=device, dtype=dtype),
            txt_ids=torch.zeros(cond.context.shape[1], 3, device=device, dtype=dtype),
            img_ids=latent_image_ids(height, width).to(device=device, dtype=dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out.float(), height, width)
