"""Typed configuration of `python -m s2edit.shapes train` (issue 20): one schema, parsed from `key=value`
overrides and an optional `config=file.yaml` over `configs/shapes.yaml`'s defaults."""

# ruff: noqa: RUF009  (`setting` returns dataclasses.field(...))

from __future__ import annotations

from dataclasses import dataclass, field

from editkit.config import setting as _opt


@dataclass
class VAESettings:
    block_out_channels: list[int] = _opt([32, 32, 64], "AutoencoderKL channels per level (n levels: "
                                         "f = 2^(n−1))", ge=1)
    norm_num_groups: int = _opt(8, "group-norm groups (must divide every channel count)", ge=1)
    steps: int = _opt(700, "optimisation steps of encoder + decoder", ge=1, le=10**7)
    refit_steps: int = _opt(400, "then decoder-only steps on the frozen encoder's latent means", ge=0,
                            le=10**7)
    batch: int = _opt(24, "images per step", ge=1)
    lr: float = _opt(1e-3, "AdamW peak learning rate (warm-up, then cosine to 10 %)", gt=0)
    warmup: int = _opt(50, "linear warm-up steps", ge=0)
    kl_weight: float = _opt(1e-6, "weight of the KL term (per-image sum) next to the pixel MSE", ge=0)
    l1_weight: float = _opt(0.1, "weight of an L1 pixel term next to the MSE (sharper edges)", ge=0)


@dataclass
class UNetSettings:
    block_out_channels: list[int] = _opt([32, 64, 96], "UNet channels per level (cross-attention at every "
                                         "level but the lowest, and in the mid block)", ge=1)
    norm_num_groups: int = _opt(16, "group-norm groups (must divide every channel count)", ge=1)
    heads: int = _opt(4, "attention heads", ge=1)
    layers_per_block: int = _opt(1, "ResNet (+ transformer) layers per down block", ge=1)
    steps: int = _opt(4500, "optimisation steps of UNet + text encoder", ge=1, le=10**7)
    batch: int = _opt(24, "latents per step", ge=1)
    lr: float = _opt(5e-4, "AdamW peak learning rate (warm-up, then cosine to 10 %)", gt=0)
    warmup: int = _opt(100, "linear warm-up steps", ge=0)
    caption_dropout: float = _opt(0.1, "share of captions replaced by the empty prompt (for CFG)", ge=0, le=1)
    min_snr_gamma: float = _opt(5.0, "min-SNR-γ weighting of the ε-MSE", gt=0)
    attention_weight: float = _opt(0.1, "weight of EACH cross-attention region loss (word mass, pixel "
                                   "words) at EACH of the two finest levels (0 = off)", ge=0)
    ema_decay: float = _opt(0.999, "EMA decay of UNet and text-encoder weights (the EMA ships)", ge=0, lt=1)


@dataclass
class TextSettings:
    hidden_size: int = _opt(64, "CLIP text encoder width (= the UNet's cross_attention_dim)", ge=1)
    layers: int = _opt(2, "transformer layers", ge=1)
    heads: int = _opt(4, "attention heads (must divide hidden_size)", ge=1)
    token_seed: int = _opt(0, "seed of the frozen random token table (regenerated, not shipped)", ge=0,
                           le=2**63 - 1)


@dataclass
class QualitySettings:
    ddim_steps: int = _opt(50, "DDIM steps of the reconstruction and generation checks", ge=1)
    guidance: float = _opt(7.5, "classifier-free guidance scale of the generation check", ge=0)
    samples_per_caption: int = _opt(2, "generated images per caption (every colour × shape × background)",
                                    ge=0)
    reconstruction_images: int = _opt(24, "images of the DDIM inversion → reconstruction check", ge=0)
    attention_images: int = _opt(96, "images of the word-attention IoU check", ge=0)
    vae_images: int = _opt(300, "images of the VAE PSNR check (per colour and background)", ge=0)


@dataclass
class ShapesTrainConfig:
    out: str = _opt("outputs/shapes", "output folder: logs, checkpoints, model/ and quality.json; re-running "
                    "the same command continues from its checkpoints")
    seed: int = _opt(0, "seed of the training scenes, initialisation, noise and batches", ge=0, le=2**32 - 1)
    scenes: int = _opt(8000, "training scenes (held-out colour-shape pairs never appear)", ge=1)
    accelerator: str = _opt("cpu", "Lightning accelerator: cpu, gpu or auto", choices=("auto", "cpu", "gpu"))
    checkpoint_every: int = _opt(100, "save <out>/checkpoints/<stage>/last.ckpt every N steps", ge=1)
    log_every: int = _opt(25, "print one progress line every N steps (for log files)", ge=1)
    vae: VAESettings = field(default_factory=VAESettings)
    unet: UNetSettings = field(default_factory=UNetSettings)
    text: TextSettings = field(default_factory=TextSettings)
    quality: QualitySettings = field(default_factory=QualitySettings)
