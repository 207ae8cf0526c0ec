"""Stable Diffusion XL: a UNet with added text-and-time conditioning, TWO CLIP text encoders (SPEC §10).

Prompt encoding follows diffusers' SDXL pipeline (`encode_prompt`): each encoder's PENULTIMATE hidden
state (no final layer norm), concatenated on the channel axis (768 + 1280 = 2048 for SDXL), is the
cross-attention context; encoder 2's projected EOS output is the pooled embedding. The unconditional
input is all zeros when the model says `force_zeros_for_empty_prompt` (SDXL base does), else the encoding
of "". Every UNet call also gets `time_ids = (H, W, 0, 0, H, W)` at the working size, the same for every
row. Encoder 2's tokenizer pads with "!", so only the padding differs between the two tokenizers: a
word's token positions are the same in both.

Two choices of this project (SPEC §10): the pooled embedding is taken at the first end token, never at
the largest id (transformers' rule for configs with `eos_token_id: 2`, which an added placeholder token
would win); fine-tuning trains the UNet and the placeholder rows of both encoders, not the encoders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from s2edit.core.attention import AttentionLayer, unet_attention_layers
from s2edit.core.family import IMAGE_PER_MASK_SIDE, Conditioning, ModelFamily, TextEncoding
from s2edit.core.tokenizer import EOS_TOKEN, eos_index

ADDED_CONDITIONING = "text_time"  # the UNet's `addition_embed_type` of SDXL
OPENCLIP_PAD = "!"  # SDXL's tokenizer_2 pads with "!" (id 0)


class StableDiffusionXL(ModelFamily):
    """SDXL base (and fine-tunes of it; with an LCM scheduler or LCM-LoRA, the virtual editor's LCM
    timesteps). See the module docstring."""

    name: ClassVar[str] = "sdxl"
    default_model: ClassVar[str] = "stabilityai/stable-diffusion-xl-base-1.0"
    label: ClassVar[str] = "SDXL"
    text_encoder_classes: ClassVar[tuple[str, ...]] = ("CLIPTextModel", "CLIPTextModelWithProjection")
    tokenizer_pads: ClassVar[tuple[str, ...]] = (EOS_TOKEN, OPENCLIP_PAD)
    # SDXL ships an Euler scheduler; inversion and editing run the DDIM chain of its betas (SPEC §10)
    ddim_overrides: ClassVar[Mapping[str, Any]] = {"timestep_spacing": "leading", "steps_offset": 1}
    lora_loader: ClassVar[str] = "StableDiffusionXLLoraLoaderMixin"
    default_finetune: ClassVar[str] = "lora"  # SPEC §10 [choice]: LoRA on the UNet (rank 16, lr 1e-4)

    @classmethod
    def matches(cls, pipeline: str, configs: Mapping[str, Mapping[str, Any]]) -> bool:
        """An SDXL pipeline class, or a UNet with SDXL's added text-and-time conditioning."""
        unet = configs.get("unet", {})
        added = unet.get("addition_embed_type")
        return pipeline.startswith("StableDiffusionXL") or added == ADDED_CONDITIONING

    # ------------------------------------------------------------------------------------ components

    def trainable_components(self) -> dict[str, torch.nn.Module]:
        """Fine-tuning trains the UNet (LoRA by default, SPEC §10); of the text encoders only the
        placeholder rows learn."""
        return {"unet": self.unet}

    # ------------------------------------------------------------------------------------ text

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """diffusers' SDXL pipelines default to True when model_index.json does not say."""
        return bool(self.pipeline_config.get("force_zeros_for_empty_prompt", True))

    def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
        """Context (B, L, Σ D_k): the penultimate hidden states of both encoders, concatenated; pooled
        (B, P): encoder 2's text projection at its end token; hidden: each encoder's last hidden state
        after its final layer norm (the semantic loss's, SPEC §10)."""
        contexts, hidden = [], []
        for index, encoder in enumerate(self.text_encoders):
            ids = self.tokenize(prompts, index)
            output = encoder(ids, output_hidden_states=True)
            contexts.append(output.hidden_states[-2])  # penultimate layer, no final layer norm
            hidden.append(output.last_hidden_state)
        end = eos_index(ids.cpu(), self.tokenizers[-1].eos_token_id).to(ids.device)
        rows = torch.arange(len(prompts), device=ids.device)
        pooled = self.text_encoders[-1].text_projection(hidden[-1][rows, end])
        return TextEncoding(Conditioning(torch.cat(contexts, dim=-1), pooled), tuple(hidden))

    def unconditional(self) -> Conditioning:
        """Zeros for context and pooled (`force_zeros_for_empty_prompt`), else the encoding of ""."""
        if not self.force_zeros_for_empty_prompt:
            return self.encode_prompt([""])
        encoder = self.text_encoders[-1]
        width = sum(e.config.hidden_size for e in self.text_encoders)
        options = {"dtype": encoder.dtype, "device": encoder.device}
        return Conditioning(torch.zeros(1, self.tokenizer.model_max_length, width, **options),
                            torch.zeros(1, encoder.config.projection_dim, **options))

    def time_ids(self, latent_size: tuple[int, int], rows: int, like: torch.Tensor) -> torch.Tensor:
        """(rows, 6): original size, crop top-left, target size = (H, W, 0, 0, H, W) at the working size."""
        height, width = (side * self.vae_scale_factor for side in latent_size)
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=like.dtype, device=like.device)
        return ids.expand(rows, -1)

    def unet_inputs(self, cond: Conditioning, latent_size: tuple[int, int]) -> dict[str, Any]:
        if cond.pooled is None:
            raise ValueError("SDXL conditioning needs the pooled text embedding")
        added = {"text_embeds": cond.pooled, "time_ids": self.time_ids(latent_size, len(cond), cond.context)}
        return {"encoder_hidden_states": cond.context, "added_cond_kwargs": added}

    # ------------------------------------------------------------------------------------ latents

    @property
    def upcast_vae(self) -> bool:
        """The SDXL VAE overflows in half precision: its config's `force_upcast` runs it in float32."""
        return bool(getattr(self.vae.config, "force_upcast", False))

    # ------------------------------------------------------------------------------------ attention

    def attention_layers(self) -> dict[str, AttentionLayer]:
        return unet_attention_layers(self.unet)

    @property
    def self_replace_level(self) -> int:
        """Self-attention is replaced only where the map side is at most image/32 (32² at 1024², as the
        public SDXL P2P port): never at the 64² layers."""
        return IMAGE_PER_MASK_SIDE // self.vae_scale_factor

    @property
    def fused_self_attention(self) -> bool:
        """SPEC §10: softmax(Q_S K_Sᵀ)·V_T with the fused kernel, never a materialised map."""
        return True
