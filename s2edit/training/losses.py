"""Loss terms of S2Edit identity fine-tuning (SPEC §2; paper Eq. 1–2).

Pure tensor functions, computed in float32 whatever the autocast dtype of their inputs:

- :func:`reconstruction_loss`: the diffusion objective, ε- or v-prediction as the scheduler says.
- :func:`semantic_loss`: Eq. 1, |cos(e_P, e_[I])|, the placeholder kept orthogonal to the prompt's meaning.
- :func:`masked_attention_loss`: the placeholder's max-normalised attention map pulled towards the
  object mask (Break-A-Scene style; SPEC §2 [choice]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin


def diffusion_target(
    scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict for `latents` noised with `noise` at `timesteps` (B, C, h, w)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)  # √ᾱ·ε − √(1−ᾱ)·x0
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def reconstruction_loss(model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_recon = mean squared error between the UNet output and its target (float32)."""
    return F.mse_loss(model_output.float(), target.float())


def semantic_loss(prompt_embedding: torch.Tensor, placeholder_embedding: torch.Tensor) -> torch.Tensor:
    """Eq. 1: L_sem = |cos(e_P, e_[I])|, averaged over the batch.

    prompt_embedding: (B, D) e_P, the source prompt's last hidden state at its EOS position.
    placeholder_embedding: (B, D) e_[I], the placeholder's last hidden state (or embedding row).
    """
    cosine = F.cosine_similarity(prompt_embedding.float(), placeholder_embedding.float(), dim=-1)  # (B,)
    return cosine.abs().mean()


def masked_attention_loss(attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_attn = MSE(A[I] / max(A[I]), M), per map, averaged over the batch.

    attention: (B, h, w) the placeholder's cross-attention (layers and heads averaged), ≥ 0.
    mask: (B, h, w) or (h, w) object mask in [0, 1] at the same grid.
    """
    attention = attention.float()
    peak = attention.flatten(1).amax(dim=1).clamp_min(torch.finfo(attention.dtype).tiny)  # (B,)
    normalised = attention / peak[:, None, None]
    return F.mse_loss(normalised, mask.float().expand_as(normalised))


def gather_positions(hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pick one token vector per row: (B, L, D), (B,) long → (B, D)."""
    rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    return hidden_states[rows, positions.to(hidden_states.device)]
