"""Quality checks of a trained shapes model (issue 20): VAE PSNR per colour and background, DDIM
reconstruction PSNR through VAE + UNet, word-attention IoU at 16², and generation scored by the scorers.

Every check takes plain modules (eval mode) and returns numbers; `quality_report` runs them all.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from s2edit.core.attention import AttentionStore, controlled_attention, unet_attention_layers
from s2edit.core.tokenizer import word_token_indices
from s2edit.shapes.data import (
    all_captions,
    caption_tables,
    images_to_model,
    model_to_images,
    pooled_coverage,
    render_tensors,
)
from s2edit.shapes.scorers import classify_shape, dominant_colour, iou, psnr, segment_object
from s2edit.shapes.world import BACKGROUNDS, COLOURS, HELD_OUT_PAIRS, SHAPES, random_specs, training_pairs

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]


def ddim_timesteps(num_train_timesteps: int, steps: int, offset: int = 1) -> list[int]:
    """DDIM's "leading" timesteps, high to low (diffusers with steps_offset=1: 981, 961, …, 1)."""
    stride = num_train_timesteps // steps
    return [i * stride + offset for i in reversed(range(steps))]


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """Deterministic DDIM move from ᾱ_from to ᾱ_to (Song et al. 2021, Eq. 12 with σ = 0); it also runs
    upward (ᾱ_to < ᾱ_from) for DDIM inversion."""
    x0 = (x - (1 - alpha_from) ** 0.5 * eps) / alpha_from**0.5
    return alpha_to**0.5 * x0 + (1 - alpha_to) ** 0.5 * eps


def ddim_sample(denoise: Denoiser, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """x_T → x_0 with `steps` DDIM steps; the last step lands on ᾱ_0 (SD1: set_alpha_to_one false)."""
    timesteps = ddim_timesteps(len(alphas_cumprod), steps)
    for i, t in enumerate(timesteps):
        target = timesteps[i + 1] if i + 1 < len(timesteps) else 0
        x = ddim_step(x, denoise(x, t), float(alphas_cumprod[t]), float(alphas_cumprod[target]))
    return x


def ddim_invert(denoise: Denoiser, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """x_0 → x_T: the same steps run upward, ε read at the current point (the usual approximation)."""
    timesteps = ddim_timesteps(len(alphas_cumprod), steps)[::-1]
    source = 0
    for t in timesteps:
        x = ddim_step(x, denoise(x, source), float(alphas_cumprod[source]), float(alphas_cumprod[t]))
        source = t
    return x


def guided_denoiser(unet: UNet2DConditionModel, text: torch.Tensor, empty: torch.Tensor,
                    guidance: float) -> Denoiser:
    """ε̂ = ε(∅) + g (ε(c) − ε(∅)) (classifier-free guidance); g = 1 runs the conditional branch only."""
    def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
        if guidance == 1.0:
            return unet(x, t, text).sample
        both = unet(torch.cat([x, x]), t, torch.cat([empty.expand_as(text), text])).sample
        unconditional, conditional = both.chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    return denoise


def _encode_text(text_encoder: CLIPTextModel, ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(ids).last_hidden_state


def _latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    return vae.encode(images_to_model(images)).latent_dist.mode() * vae.config.scaling_factor


def _decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    return model_to_images(vae.decode(latents / vae.config.scaling_factor).sample)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


@torch.no_grad()
def vae_psnr(vae: AutoencoderKL, count: int, seed: int) -> dict[str, Any]:
    """PSNR (dB) of VAE reconstructions of fresh scenes of every pair: overall, per colour, per background."""
    data = render_tensors(random_specs(count, seed, [(c, s) for c in COLOURS for s in SHAPES]))
    reconstructed = torch.cat([_decode(vae, _latents(vae, chunk)) for chunk in data.images.split(64)])
    scores = [psnr(a.numpy(), b.numpy()) for a, b in zip(data.images, reconstructed)]
    captions = [all_captions()[i] for i in data.captions]
    by: dict[str, dict[str, list[float]]] = {"colour": defaultdict(list), "background": defaultdict(list)}
    for text, score in zip(captions, scores):
        words = text.split()
        by["colour"][words[1]].append(score)
        by["background"][words[-2]].append(score)
    return {"psnr": _mean(scores), "min_psnr": float(np.min(scores)),
            **{f"psnr_by_{k}": {name: _mean(v) for name, v in sorted(g.items())} for k, g in by.items()}}


@torch.no_grad()
def reconstruction_psnr(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                        tokenizer: CLIPTokenizer, alphas_cumprod: torch.Tensor, count: int, steps: int,
                        seed: int) -> float:
    """Mean PSNR (dB) of images DDIM-inverted under their caption and sampled back, through VAE + UNet."""
    data = render_tensors(random_specs(count, seed, training_pairs()))
    tables = caption_tables(tokenizer)
    text = _encode_text(text_encoder, tables.ids[data.captions])
    denoise = guided_denoiser(unet, text, text[:0], 1.0)
    noise = ddim_invert(denoise, _latents(vae, data.images), alphas_cumprod, steps)
    images = _decode(vae, ddim_sample(denoise, noise, alphas_cumprod, steps))
    return _mean([psnr(a.numpy(), b.numpy()) for a, b in zip(data.images, images)])


@torch.no_grad()
def attention_iou(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                  tokenizer: CLIPTokenizer, alphas_cumprod: torch.Tensor, count: int, seed: int,
                  timestep: int = 300, level: int = 1) -> dict[str, float]:
    """IoU of each colour / shape word's top-k cells of its 16² cross-attention map (k = the object's cell
    count) with the ground-truth object cells, on noised latents of fresh scenes at `timestep`."""
    data = render_tensors(random_specs(count, seed, training_pairs()))
    tables = caption_tables(tokenizer)
    latents = _latents(vae, data.images)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    alpha = alphas_cumprod[timestep]
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    text = _encode_text(text_encoder, tables.ids[data.captions])
    store = AttentionStore(levels=(level,))
    with controlled_attention(unet, unet_attention_layers(unet), store):
        unet(noisy, timestep, text)
    maps = store.average(level)  # (N, h, w, K)
    truth = pooled_coverage(data.coverage, maps.shape[1]) >= 0.5
    scores: dict[str, list[float]] = {"colour": [], "shape": []}
    captions = all_captions()
    for row in range(len(maps)):
        text = captions[int(data.captions[row])]
        words = text.split()
        for kind, word in (("colour", words[1]), ("shape", words[2])):
            positions = word_token_indices(tokenizer, text, word)
            word_map = maps[row][..., positions].mean(dim=-1).flatten()
            k = int(truth[row].sum())
            chosen = torch.zeros_like(word_map, dtype=torch.bool)
            chosen[word_map.topk(max(k, 1)).indices] = True
            scores[kind].append(iou(chosen.numpy(), truth[row].flatten().numpy()))
    return {f"{kind}_iou": _mean(v) for kind, v in scores.items()}


@torch.no_grad()
def generation_scores(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                      tokenizer: CLIPTokenizer, alphas_cumprod: torch.Tensor, per_caption: int, steps: int,
                      guidance: float, seed: int, batch: int = 64) -> dict[str, Any]:
    """Sample every caption `per_caption` times (DDIM, CFG) and score colour and shape with the scorers;
    accuracies for the training pairs ("seen") and the held-out pairs apart."""
    tables = caption_tables(tokenizer)
    combos = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    rows = [i for i in range(len(combos)) for _ in range(per_caption)]
    generator = torch.Generator().manual_seed(seed)
    channels, size = unet.config.in_channels, unet.config.sample_size
    noise = torch.randn(len(rows), channels, size, size, generator=generator)
    empty = _encode_text(text_encoder, tables.empty_ids[None])
    results: dict[str, dict[str, list[float]]] = {"seen": defaultdict(list), "held_out": defaultdict(list)}
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        text = _encode_text(text_encoder, tables.ids[part])
        denoise = guided_denoiser(unet, text, empty, guidance)
        images = _decode(vae, ddim_sample(denoise, noise[start:start + batch], alphas_cumprod, steps))
        for index, image in zip(part, images.numpy()):
            colour, shape, background = combos[index]
            mask = segment_object(image, background)
            group = results["held_out" if (colour, shape) in HELD_OUT_PAIRS else "seen"]
            colour_ok = dominant_colour(image, mask) == colour
            shape_ok = classify_shape(mask) == shape
            group["colour"].append(float(colour_ok))
            group["shape"].append(float(shape_ok))
            group["both"].append(float(colour_ok and shape_ok))
    return {name: {f"{k}_accuracy": _mean(v) for k, v in group.items()} | {"images": len(group["colour"])}
            for name, group in results.items()}


def quality_report(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                   tokenizer: CLIPTokenizer, alphas_cumprod: torch.Tensor, *, seed: int, ddim_steps: int = 50,
                   guidance: float = 7.5, samples_per_caption: int = 2, reconstruction_images: int = 24,
                   attention_images: int = 96, vae_images: int = 300) -> dict[str, Any]:
    """Every check, on scenes drawn with seeds apart from the training seed's."""
    report: dict[str, Any] = {}
    if vae_images:
        report["vae"] = vae_psnr(vae, vae_images, seed + 101)
    if reconstruction_images:
        report["ddim_reconstruction_psnr"] = reconstruction_psnr(
            unet, vae, text_encoder, tokenizer, alphas_cumprod, reconstruction_images, ddim_steps, seed + 102)
    if attention_images:
        report["attention_16"] = attention_iou(unet, vae, text_encoder, tokenizer, alphas_cumprod,
                                               attention_images, seed + 103)
    if samples_per_caption:
        report["generation"] = generation_scores(unet, vae, text_encoder, tokenizer, alphas_cumprod,
                                                 samples_per_caption, ddim_steps, guidance, seed + 104)
    return report
