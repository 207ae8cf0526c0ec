"""The object mask M_obj that confines the placeholder's cross-attention (SPEC §2, paper §3.2).

Read from the *pretrained* model: the image latent is noised at a few timesteps, the UNet runs with the
source prompt P (placeholder removed), and the object word's cross-attention over the "16×16" layers
(the model's mask level: down and up), heads and timesteps is averaged, divided by its max and
thresholded. A user mask
(`mask=path.png`) replaces it. Masks are kept at the latent grid, binary float (h, w); the spatial
control resizes them (nearest) to each attention layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from editkit.images import load_mask
from s2edit.core.attention import AttentionStore
from s2edit.core.family import ModelFamily

USER_MASK_THRESHOLD = 0.5  # a user mask is binarised after resampling to the latent grid


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) → (H, W) nearest resampling, the same rule as the spatial control uses per layer."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0]


@torch.no_grad()
def object_attention_map(
    model: ModelFamily,
    latents: torch.Tensor,
    prompt: str,
    word: str,
    timesteps: Sequence[int] = (200, 400, 600),
    seed: int = 0,
) -> torch.Tensor:
    """Mean cross-attention of `word` in `prompt` at the model's mask level, normalised to max 1: (h, w)
    float32.

    latents: (1, C, H/8, W/8) clean image latent (VAE mean × scaling factor).
    """
    token_positions = model.word_positions(prompt, word)[0]  # refuses a missing word
    cond = model.encode_prompt([prompt])
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)

    store = AttentionStore(levels=(model.mask_level,), detach=True)
    with model.attention_control(store, cross_only=True):
        for step, t in enumerate(timesteps):
            store.step = step
            timestep = torch.tensor([t], device=latents.device, dtype=torch.long)
            model.predict(model.scheduler.add_noise(latents, noise, timestep), timestep, cond)
    maps = store.average()  # (1, h, w, K): mean over layers (down + up), heads, timesteps
    word_map = maps[0, :, :, token_positions].mean(dim=-1)  # a word of several BPE tokens: their mean
    return word_map / word_map.max().clamp_min(torch.finfo(word_map.dtype).tiny)


def object_mask(
    model: ModelFamily,
    latents: torch.Tensor,
    prompt: str,
    word: str,
    timesteps: Sequence[int] = (200, 400, 600),
    threshold: float = 0.3,
    seed: int = 0,
) -> torch.Tensor:
    """M_obj at the latent grid: binary (H/8, W/8) float32 from the object word's attention (SPEC §2)."""
    attention = object_attention_map(model, latents, prompt, word, timesteps, seed)
    mask = (attention > threshold).float()  # (h, w) at the attention grid
    return resize_mask(mask, tuple(latents.shape[-2:]))


def load_object_mask(path: str | Path, latent_size: tuple[int, int]) -> torch.Tensor:
    """A user mask image → binary (h, w) float32 at the latent grid (white = the object)."""
    mask = load_mask(path, latent_size)  # antialiased resize to the latent grid; refuses empty masks
    binary = (mask >= USER_MASK_THRESHOLD).float()
    if binary.max() <= 0:  # only faint pixels: keep the brightest rather than an empty mask
        binary = (mask >= mask.max()).float()
    return binary
