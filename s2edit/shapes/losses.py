"""Loss terms of the shapes model: min-SNR-weighted ε-MSE and two cross-attention region losses.

Attention maps are (B, h, w, K): head- and layer-averaged cross-attention probabilities of one level
(rows sum to 1 over the K text tokens). `object` is (B, h, w) in [0, 1], the object's share of each cell;
`object_tokens` / `background_tokens` are (B, K) bool: the colour and shape words' tokens, and the
background colour word's token. `rows` (B,) float weighs the batch rows (0 for a dropped caption).
"""

from __future__ import annotations

import torch


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights for ε-prediction (Hang et al. 2023, Eq. 7): min(SNR(t), γ) / SNR(t)."""
    alpha = alphas_cumprod[timesteps].float()
    snr = alpha / (1 - alpha)
    return torch.clamp(snr, max=gamma) / snr


def add_noise(latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (DDPM Eq. 4), sampled with `noise`."""
    alpha = alphas_cumprod[timesteps].to(latents.dtype).view(-1, 1, 1, 1)
    return alpha.sqrt() * latents + (1 - alpha).sqrt() * noise


def epsilon_loss(predicted: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_b w_b · mean((ε̂_b − ε_b)²) / B (all rows count: caption dropout trains the unconditional ε)."""
    per_row = (predicted.float() - noise.float()).pow(2).flatten(1).mean(dim=1)
    return (weights * per_row).mean()


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp(min=1e-8)


def word_region_loss(maps: torch.Tensor, object: torch.Tensor, object_tokens: torch.Tensor,
                     background_tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(a) Each word's attention mass outside its region: 1 − Σ_p m_p A_pk / Σ_p A_pk, averaged over the
    words' tokens, where m is the object for colour/shape tokens and 1 − object for the background word."""
    spatial = maps.flatten(1, 2)  # (B, P, K)
    share = spatial / spatial.sum(dim=1, keepdim=True).clamp(min=1e-8)  # each token's map sums to 1
    region = object.flatten(1).unsqueeze(-1)  # (B, P, 1)
    inside_object = (share * region).sum(dim=1)  # (B, K)
    inside_background = (share * (1 - region)).sum(dim=1)
    miss = object_tokens * (1 - inside_object) + background_tokens * (1 - inside_background)
    tokens = (object_tokens | background_tokens).float() * rows.unsqueeze(-1)
    return _weighted_mean(miss, tokens)


def pixel_region_loss(maps: torch.Tensor, object: torch.Tensor, object_tokens: torch.Tensor,
                      background_tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(b) Each cell's attention that misses its region's words: object cells should attend to the colour
    and shape tokens, background cells to the background word: mean of m (1 − A·obj) + (1 − m)(1 − A·bg)."""
    on_object = (maps * object_tokens[:, None, None, :]).sum(dim=-1)  # (B, h, w)
    on_background = (maps * background_tokens[:, None, None, :]).sum(dim=-1)
    miss = object * (1 - on_object) + (1 - object) * (1 - on_background)
    cells = rows.view(-1, 1, 1).expand_as(miss)
    return _weighted_mean(miss, cells)
