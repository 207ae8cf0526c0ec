"""Stable Diffusion 3 / 3.5: a joint-attention transformer (MMDiT) on 16-channel rectified-flow latents,
conditioned on CLIP-L + CLIP-G + T5 (SPEC §11).

Prompts are encoded by diffusers' `StableDiffusion3Pipeline.encode_prompt`: both CLIPs' penultimate hidden
states concatenated on the channel axis and zero-padded to T5's width, followed on the token axis by T5's
last hidden state (77 + max_sequence_length tokens); pooled = the two CLIPs' projected outputs,
concatenated. Classifier-free guidance uses the encoding of "" as the negative (SPEC §11).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from s2edit.core.family import Conditioning
from s2edit.core.flow_family import FlowFamily
from s2edit.core.joint_attention import image_text_block
from s2edit.core.tokenizer import EOS_TOKEN

OPENCLIP_PAD = "!"  # SD3's tokenizer_2 (OpenCLIP bigG) pads with "!"


class StableDiffusion3(FlowFamily):
    """SD3 medium / SD3.5 (see the module docstring)."""

    name: ClassVar[str] = "sd3"
    default_model: ClassVar[str] = "stabilityai/stable-diffusion-3-medium-diffusers"
    label: ClassVar[str] = "Stable Diffusion 3"
    pipeline_class: ClassVar[str] = "StableDiffusion3Pipeline"
    transformer_class: ClassVar[str] = "SD3Transformer2DModel"
    text_encoder_classes: ClassVar[tuple[str, ...]] = ("CLIPTextModelWithProjection",
                                                       "CLIPTextModelWithProjection", "T5EncoderModel")
    tokenizer_classes: ClassVar[tuple[str, ...]] = ("CLIPTokenizer", "CLIPTokenizer", "T5TokenizerFast")
    tokenizer_pads: ClassVar[tuple[str, ...]] = (EOS_TOKEN, OPENCLIP_PAD)

    @classmethod
    def matches(cls, pipeline: str, configs: Mapping[str, Mapping[str, Any]]) -> bool:
        transformer_class = configs.get("transformer", {}).get("_class_name")
        return pipeline.startswith("StableDiffusion3") or transformer_class == cls.transformer_class

    def context_columns(self, prompt: str, word: str) -> list[int]:
        """`word`'s columns in the joint context: its CLIP-L token positions (the first 77 columns hold the
        CLIPs' states), then its T5 token positions, from the T5 tokenizer's offsets, after them."""
        clip, _, t5 = self.word_positions(prompt, word)
        return [*clip, *(self.tokenizers[0].model_max_length + k for k in t5)]

    def read_joint_block(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                         **kwargs: Any) -> torch.Tensor:
        """SD3's joint softmax over [image; text] keys."""
        return image_text_block(attn, hidden_states, encoder_hidden_states, **kwargs)

    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        context, _, pooled, _ = self.pipeline().encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.execution_device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return context, pooled

    def velocity(self, z: torch.Tensor, sigma: float, cond: Conditioning,
                 guidance: torch.Tensor | None = None) -> torch.Tensor:
        """SD3's transformer at timestep 1000·σ (its scheduler's `num_train_timesteps` scale)."""
        if guidance is not None:
            raise ValueError("SD3 takes classifier-free guidance, not a guidance embedding")
        device, dtype = self.execution_device, self.transformer.dtype
        timestep = torch.full((z.shape[0],), sigma * self.scheduler_config.get("num_train_timesteps", 1000),
                              device=device, dtype=dtype)
        out = self.transformer(hidden_states=z.to(device=device, dtype=dtype), timestep=timestep,
                               encoder_hidden_states=cond.context.to(device=device, dtype=dtype),
                               pooled_projections=cond.pooled.to(device=device, dtype=dtype),
                               return_dict=False)[0]
        return out.float()
