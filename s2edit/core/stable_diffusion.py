"""Stable Diffusion v1.x and v2.x: a UNet, a VAE and ONE CLIP text encoder (SPEC §2–§9).

Both versions share the architecture and every rule of the model-family interface; v2 swaps CLIP ViT-L
for OpenCLIP ViT-H (hidden size 1024, tokenizer padding with "!") and its 768² models predict v instead of
ε, which the scheduler config says. The context is the text encoder's last hidden state after its final
layer norm; there is no added conditioning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from s2edit.core.attention import AttentionLayer, unet_attention_layers
from s2edit.core.family import Conditioning, ModelFamily, TextEncoding

OPENCLIP_H_WIDTH = 1024  # SD 2.x text encoder (OpenCLIP ViT-H/14) hidden size; SD 1.x's CLIP ViT-L is 768


class StableDiffusion(ModelFamily):
    """SD 1.x (see the module docstring)."""

    name: ClassVar[str] = "sd1"
    default_model: ClassVar[str] = "CompVis/stable-diffusion-v1-4"  # SPEC §7 base model

    @classmethod
    def matches(cls, pipeline: str, configs: Mapping[str, Mapping[str, Any]]) -> bool:
        """Whether a diffusers folder (its pipeline class name and component configs) holds this family:
        any UNet + one CLIP text encoder folder (StableDiffusionPipeline, LatentConsistencyModelPipeline,
        …) that is not SD 2.x."""
        return not StableDiffusion2.is_v2(configs)

    def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
        """Context = the last hidden state after the final layer norm (B, L, D), also the semantic loss's."""
        hidden = self.text_encoder(self.tokenize(prompts)).last_hidden_state
        return TextEncoding(Conditioning(hidden), (hidden,))

    def unet_inputs(self, cond: Conditioning, latent_size: tuple[int, int]) -> dict[str, Any]:
        return {"encoder_hidden_states": cond.context}

    def attention_layers(self) -> dict[str, AttentionLayer]:
        return unet_attention_layers(self.unet)


class StableDiffusion2(StableDiffusion):
    """SD 2.x: OpenCLIP ViT-H text encoder; ε- (base, 512²) or v-prediction (768²), as its scheduler says."""

    name: ClassVar[str] = "sd2"
    default_model: ClassVar[str] = "stabilityai/stable-diffusion-2-1"

    @staticmethod
    def is_v2(configs: Mapping[str, Mapping[str, Any]]) -> bool:
        """An OpenCLIP-H text encoder, or a v-predicting scheduler, marks SD 2.x."""
        width = configs.get("text_encoder", {}).get("hidden_size")
        prediction = configs.get("scheduler", {}).get("prediction_type")
        return width == OPENCLIP_H_WIDTH or prediction == "v_prediction"

    @classmethod
    def matches(cls, pipeline: str, configs: Mapping[str, Mapping[str, Any]]) -> bool:
        return cls.is_v2(configs)
