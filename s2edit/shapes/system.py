"""Lightning systems of the shapes model: the VAE stage (joint, then decoder-only refit) and the
UNet + text-encoder stage (ε-MSE with min-SNR weights, caption dropout, cross-attention region losses, EMA).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from s2edit.core.attention import AttentionStore, controlled_attention, unet_attention_layers
from s2edit.shapes.data import images_to_model
from s2edit.shapes.losses import (
    add_noise,
    epsilon_loss,
    min_snr_weights,
    pixel_region_loss,
    word_region_loss,
)
from s2edit.shapes.model import build_text_encoder, build_unet, build_vae

ATTENTION_LEVELS = (1, 2)  # latent size / grid size: 16² and 8² for a 16² latent
FINAL_LR_SHARE = 0.1


def warmup_cosine(step: int, warmup: int, total: int, final: float = FINAL_LR_SHARE) -> float:
    """Learning-rate factor: linear warm-up to 1 over `warmup` steps, then cosine down to `final`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def _adamw(parameters: list[torch.nn.Parameter], lr: float, warmup: int, total: int) -> dict[str, Any]:
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def psnr_db(mse: torch.Tensor, peak: float = 2.0) -> torch.Tensor:
    """PSNR of images in [−1, 1] (peak-to-peak 2) from their MSE."""
    return 10 * torch.log10(peak**2 / mse.clamp(min=1e-12))


class VAESystem(L.LightningModule):
    """AutoencoderKL on pixel MSE + L1 + a small KL term; `decoder_only` refits the decoder on the
    frozen encoder's latent means (what the UNet's latents are)."""

    def __init__(self, vae_config: dict[str, Any], lr: float, warmup: int, steps: int, kl_weight: float,
                 l1_weight: float, decoder_only: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vae = build_vae(vae_config)
        if decoder_only:
            for part in (self.vae.encoder, self.vae.quant_conv):
                part.requires_grad_(False)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = images_to_model(batch[0])
        hp = self.hparams
        with torch.no_grad() if hp.decoder_only else contextlib.nullcontext():
            posterior = self.vae.encode(x).latent_dist
            latents = posterior.mode() if hp.decoder_only else posterior.sample()
        reconstruction = self.vae.decode(latents).sample
        mse = F.mse_loss(reconstruction, x)
        l1 = F.l1_loss(reconstruction, x)
        kl = posterior.kl().mean() if not hp.decoder_only else torch.zeros((), device=x.device)
        loss = mse + hp.l1_weight * l1 + hp.kl_weight * kl
        if not torch.isfinite(loss):
            raise FloatingPointError(f"VAE loss became {loss.item()} at step {self.global_step}")
        self.log_dict({"vae/loss": loss, "vae/mse": mse, "vae/psnr": psnr_db(mse.detach()), "vae/kl": kl},
                      prog_bar=True, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [p for p in self.vae.parameters() if p.requires_grad]
        return _adamw(trainable, self.hparams.lr, self.hparams.warmup, self.hparams.steps)


@torch.no_grad()
def ema_update(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """θ_ema ← decay · θ_ema + (1 − decay) · θ for every trainable parameter; buffers copied."""
    for (_, a), (_, p) in zip(average.named_parameters(), model.named_parameters()):
        if p.requires_grad:
            a.lerp_(p.detach(), 1 - decay)
    for a, b in zip(average.buffers(), model.buffers()):
        a.copy_(b)


class DiffusionSystem(L.LightningModule):
    """UNet + CLIP text encoder on precomputed latents, with their EMA copies (what ships)."""

    def __init__(self, unet_config: dict[str, Any], text_config: dict[str, Any], token_seed: int,
                 alphas_cumprod: list[float], caption_ids: list[list[int]], empty_ids: list[int],
                 object_tokens: list[list[bool]], background_tokens: list[list[bool]], lr: float,
                 warmup: int, steps: int, caption_dropout: float, min_snr_gamma: float,
                 attention_weight: float, ema_decay: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.unet = build_unet(unet_config)
        self.text_encoder = build_text_encoder(text_config, token_seed)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.ema_text_encoder = copy.deepcopy(self.text_encoder).requires_grad_(False).eval()
        self.register_buffer("alphas_cumprod", torch.tensor(alphas_cumprod, dtype=torch.float64).float())
        self.register_buffer("caption_ids", torch.tensor(caption_ids, dtype=torch.long))
        self.register_buffer("empty_ids", torch.tensor(empty_ids, dtype=torch.long))
        self.register_buffer("object_tokens", torch.tensor(object_tokens, dtype=torch.bool))
        self.register_buffer("background_tokens", torch.tensor(background_tokens, dtype=torch.bool))
        self.attention_store = AttentionStore(levels=ATTENTION_LEVELS, detach=False)
        self._installed: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self) -> None:
        if self.hparams.attention_weight > 0:
            self._installed = contextlib.ExitStack()
            self._installed.enter_context(
                controlled_attention(self.unet, unet_attention_layers(self.unet), self.attention_store)
            )

    def teardown(self, stage: str) -> None:  # after fit, also when it stopped on an error
        if self._installed is not None:
            self._installed.close()
            self._installed = None

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms = self._step(batch)
        for name, value in terms.items():
            if not torch.isfinite(value):
                raise FloatingPointError(f"loss term '{name}' became {value.item()} at step "
                                         f"{self.global_step}: lower unet.lr")
        self.log_dict({f"unet/{k}": v for k, v in terms.items()}, prog_bar=True, batch_size=batch[0].shape[0])
        return terms["loss"]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # the EMA follows each optimiser step here, before any callback (the checkpoint) sees the batch end
        super().optimizer_step(*args, **kwargs)
        decay = min(self.hparams.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        ema_update(self.ema_unet, self.unet, decay)
        ema_update(self.ema_text_encoder, self.text_encoder, decay)

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [p for m in (self.unet, self.text_encoder) for p in m.parameters() if p.requires_grad]
        return _adamw(trainable, self.hparams.lr, self.hparams.warmup, self.hparams.steps)

    # ------------------------------------------------------------------------------------------- the step

    def _step(self, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        latents, captions, object_16, object_8 = batch
        hp = self.hparams
        size = latents.shape[0]
        # 1. Captions, a share of them dropped to the empty prompt (classifier-free guidance)
        keep = torch.rand(size, device=self.device) >= hp.caption_dropout
        ids = torch.where(keep[:, None], self.caption_ids[captions], self.empty_ids)
        text = self.text_encoder(ids).last_hidden_state
        # 2. Noise at uniform timesteps; ε-prediction
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, len(self.alphas_cumprod), (size,), device=self.device)
        noisy = add_noise(latents, noise, self.alphas_cumprod, timesteps)
        self.attention_store.reset()
        predicted = self.unet(noisy, timesteps, text).sample
        weights = min_snr_weights(self.alphas_cumprod, timesteps, hp.min_snr_gamma)
        terms = {"eps": epsilon_loss(predicted, noise, weights)}
        loss = terms["eps"]
        # 3. Cross-attention region losses of the captioned rows at 16² and 8²
        if hp.attention_weight > 0:
            rows = keep.float()
            object_tokens, background_tokens = self.object_tokens[captions], self.background_tokens[captions]
            for level, region in zip(ATTENTION_LEVELS, (object_16, object_8)):
                maps = self.attention_store.average(level).float()
                words = word_region_loss(maps, region, object_tokens, background_tokens, rows)
                pixels = pixel_region_loss(maps, region, object_tokens, background_tokens, rows)
                terms[f"words_{maps.shape[1]}"], terms[f"pixels_{maps.shape[1]}"] = words, pixels
                loss = loss + hp.attention_weight * (words + pixels)
            self.attention_store.reset()
        terms["loss"] = loss
        return terms
