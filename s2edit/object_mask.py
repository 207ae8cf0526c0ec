"""The object mask M_obj that confines the placeholder's cross-attention (SPEC §2, paper §3.2).

Read from the *pretrained* model: the image latent is noised at a few timesteps, the UNet runs with the
source prompt P (placeholder removed), and the object word's cross-attention over the "16×16" layers
(level 4: down and up), heads and timesteps is averaged, divided by its max and thresholded. A user mask
(`mask=path.png`) replaces it. Masks are kept at the latent grid, binary float (h, w); the spatial
control resizes them (nearest) to each attention layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from editkit.images import load_mask
from s2edit.attention import MASK_LEVEL, AttentionStore, controlled_attention, cross_attention_layers
from s2edit.models import StableDiffusion
from s2edit.tokenizer import word_token_indices

USER_MASK_THRESHOLD = 0.5  # a user mask is binarised after resampling to the latent grid


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) → (H, W) nearest resampling, the same rule as the spatial control uses per layer."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0]


@torch.no_grad()
def object_attention_map(
    sd: StableDiffusion,
    latents: torch.Tensor,
    prompt: str,
    word: str,
    timesteps: Sequence[int] = (200, 400, 600),
    level: int = MASK_LEVEL,
    seed: int = 0,
) -> torch.Tensor:
    """Mean cross-attention of `word` in `prompt` at `level`, normalised to max 1: (h, w) float32.

    latents: (1, C, H/8, W/8) clean image latent (VAE mean × scaling factor).
    """
    token_positions = word_token_indices(sd.tokenizer, prompt, word)  # refuses a missing word
    prompt_embeds = sd.encode_prompt([prompt])  # (1, L, D)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    unet_dtype = next(sd.unet.parameters()).dtype

    store = AttentionStore(levels=(level,), detach=True)
    with controlled_attention(sd.unet, store, layers=cross_attention_layers):
        for step, t in enumerate(timesteps):
            store.step = step
            timestep = torch.tensor([t], device=latents.device, dtype=torch.long)
            noisy = sd.scheduler.add_noise(latents, noise, timestep)
            sd.unet(noisy.to(unet_dtype), timestep, encoder_hidden_states=prompt_embeds.to(unet_dtype))
    maps = store.average(level=level)  # (1, h, w, K): mean over layers (down + up), heads, timesteps
    word_map = maps[0, :, :, token_positions].mean(dim=-1)  # a word of several BPE tokens: their mean
    return word_map / word_map.max().clamp_min(torch.finfo(word_map.dtype).tiny)


def object_mask(
    sd: StableDiffusion,
    latents: torch.Tensor,
    prompt: str,
    word: str,
    timesteps: Sequence[int] = (200, 400, 600),
    threshold: float = 0.3,
    level: int = MASK_LEVEL,
    seed: int = 0,
) -> torch.Tensor:
    """M_obj at the latent grid: binary (H/8, W/8) float32 from the object word's attention (SPEC §2)."""
    attention = object_attention_map(sd, latents, prompt, word, timesteps, level, seed)
    mask = (attention > threshold).float()  # (h, w) at the attention grid
    return resize_mask(mask, tuple(latents.shape[-2:]))


def load_object_mask(path: str | Path, latent_size: tuple[int, int]) -> torch.Tensor:
    """A user mask image → binary (h, w) float32 at the latent grid (white = the object)."""
    mask = load_mask(path, latent_size)  # antialiased resize to the latent grid; refuses empty masks
    binary = (mask >= USER_MASK_THRESHOLD).float()
    if binary.max() <= 0:  # only faint pixels: keep the brightest rather than an empty mask
        binary = (mask >= mask.max()).float()
    return binary
