"""S2Edit identity fine-tuning as a LightningModule (SPEC §2, paper §3.1–3.3, §4.1).

The system around a plain Stable Diffusion: the placeholder token(s) are added and initialised, the UNet
and text encoder train (or LoRA adapters on them), the VAE stays frozen. Every step:

    L = L_recon + λ_sem·L_sem + λ_attn·L_attn                     (Eq. 2, + the masked-attention loss)

with the placeholder's cross-attention multiplied by the object mask in every cross-attention layer
(Eq. 3). Among the token embedding rows only the placeholders' rows train (textual-inversion style: the
other rows are restored after each optimiser step), in both modes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from editkit.errors import ReportedError
from editkit.files import slug
from s2edit.attention import (
    AttentionController,
    AttentionStore,
    ColumnMask,
    ControllerChain,
    SpatialControl,
    controlled_attention,
    cross_attention_layers,
)
from s2edit.config import TrainConfig
from s2edit.data import PreparedPair
from s2edit.diffusion import DDIMSampler, DDIMSchedule, to_epsilon
from s2edit.export import ExportManifest, ExportToken, add_lora_adapters, base_model_probe, write_export
from s2edit.losses import (
    diffusion_target,
    gather_positions,
    masked_attention_loss,
    reconstruction_loss,
    semantic_loss,
)
from s2edit.models import StableDiffusion, load_stable_diffusion
from s2edit.object_mask import MASK_LEVEL, resize_mask
from s2edit.tokenizer import add_placeholder_token

RECONSTRUCTION_STEPS = 10  # DDIM steps of the logged reconstruction sample
RECONSTRUCTION_STRENGTH = 0.5  # it starts from the input latent noised to half of the schedule
LOSS_TERMS = ("loss", "recon", "semantic", "attention")


class NonFiniteLossError(ReportedError):
    """A loss term became NaN or infinite: training stops with the step and the term named."""


def config_from_hparams(config: TrainConfig | dict[str, Any]) -> TrainConfig:
    """A TrainConfig from itself or from its dict form (what `save_hyperparameters` stores)."""
    if isinstance(config, TrainConfig):
        return config
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), config))


def placeholder_specs(config: TrainConfig) -> list[tuple[str, str]]:
    """(placeholder, init word) of every token to learn: [I] from the object word, [A] from its own."""
    specs = [(config.placeholder, config.init_word or config.object)]
    if config.reference is not None:
        specs.append((config.reference_placeholder, config.reference_object or config.init_word))
    return specs


class S2EditModule(L.LightningModule):
    """Fine-tunes Stable Diffusion on one image (or two, compositional) with semantic and spatial control."""

    def __init__(self, config: TrainConfig | dict[str, Any]) -> None:
        super().__init__()
        config = config_from_hparams(config)
        self.save_hyperparameters({"config": dataclasses.asdict(config)})

        # 1. Base model; the components are registered as submodules (checkpointed, moved by Lightning)
        self.sd: StableDiffusion = load_stable_diffusion(config.model)
        self.unet = self.sd.unet
        self.text_encoder = self.sd.text_encoder
        self.vae = self.sd.vae
        self.base_probe = base_model_probe(self.sd)  # lets the export loader detect a different base

        # 2. Placeholder tokens, initialised from a word's embedding (SPEC §2)
        self.token_ids = {
            placeholder: add_placeholder_token(self.sd.tokenizer, self.text_encoder, placeholder, init_word)
            for placeholder, init_word in placeholder_specs(config)
        }

        # 3. What trains: whole UNet + text encoder (paper), or LoRA adapters; always the new token rows
        self.method = config.finetune.method
        self.lora_rank = config.finetune.lora_rank
        self.vae.requires_grad_(False).eval()
        self.unet.train()
        self.text_encoder.train()
        if self.method == "lora":
            self.unet.requires_grad_(False)
            self.text_encoder.requires_grad_(False)
            add_lora_adapters(self.unet, self.text_encoder, config.finetune.lora_rank)
        else:
            self.unet.requires_grad_(True)
            self.text_encoder.requires_grad_(True)
        embeddings = self.text_encoder.get_input_embeddings().weight
        embeddings.requires_grad_(True)
        learned_rows = torch.tensor(sorted(self.token_ids.values()), dtype=torch.long)
        self.register_buffer("learned_rows", learned_rows, persistent=False)
        self.register_buffer("original_embeddings", embeddings.detach().clone(), persistent=False)
        if config.finetune.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.text_encoder.gradient_checkpointing_enable()

        # 4. Hyper-parameters of the step
        self.lr = config.finetune.lora_lr if self.method == "lora" else config.finetune.lr
        self.weight_decay = config.finetune.weight_decay
        self.semantic_weight = config.semantic.weight
        self.semantic_embedding = config.semantic.embedding
        self.spatial_control = config.spatial.control
        self.renormalize = config.spatial.renormalize
        self.attention_weight = config.spatial.loss_weight
        self.image_log_every = config.image_log_every
        self.base_model = config.model
        self.resolution = config.resolution or self.sd.native_resolution
        self.num_train_timesteps = self.sd.scheduler.config.num_train_timesteps
        # One controller object routes every cross-attention layer for the whole fit (installed in
        # on_fit_start: gradient checkpointing re-runs the forward during backward, outside any step scope)
        self.attention_store = AttentionStore(levels=(MASK_LEVEL,), detach=self.attention_weight == 0)
        self.attention = ControllerChain([])
        self._installed: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self) -> None:
        if self.device.type == "cuda":  # frozen parts may be half precision (STYLE habit 3)
            self.vae.to(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        self._installed = contextlib.ExitStack()
        self._installed.enter_context(
            controlled_attention(self.unet, self.attention, layers=cross_attention_layers)
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms = self._step(batch)
        for name in sorted(terms, key=lambda n: n == "loss"):  # name the culprit term, not the sum
            value = terms[name]
            if not torch.isfinite(value.detach()).all():
                raise NonFiniteLossError(
                    f"loss term '{name}' became {value.item()} at step {self.global_step}: training stopped "
                    f"(lower the learning rate, or check the base model's weights)"
                )
        batch_size = batch["latents"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, prog_bar=True, batch_size=batch_size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
        if self._log_images_now():
            self._log_images(batch)
        return terms["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # only the placeholders' embedding rows learn; zero the others before clipping and the step
        grad = self.text_encoder.get_input_embeddings().weight.grad
        if grad is not None:
            learned = grad[self.learned_rows].clone()  # whole-tensor ops: faster than masked indexing
            grad.zero_()
            grad[self.learned_rows] = learned

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # AdamW's decoupled weight decay moves every row: restore the frozen ones exactly
        embeddings = self.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            learned = embeddings[self.learned_rows].clone()
            embeddings.copy_(self.original_embeddings)
            embeddings[self.learned_rows] = learned

    def on_fit_end(self) -> None:
        if self._installed is not None:  # restore the UNet's own processors
            self._installed.close()
            self._installed = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)  # constant lr

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # frozen weights (VAE; the base model under LoRA) are rebuilt from the base model on resume
        frozen = self._frozen_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        own = self.state_dict()
        for key in self._frozen_state_keys():
            checkpoint["state_dict"].setdefault(key, own[key])

    # ------------------------------------------------------------------------------------ the step

    def attention_controllers(self, batch: dict[str, torch.Tensor]) -> list[AttentionController]:
        """This step's controllers, in order: record the level-4 maps (raw: L_attn sees them before the
        mask), then Eq. 3 spatial control of each row's placeholder column."""
        self.attention_store.reset()
        columns = []
        if self.spatial_control:
            columns = [
                ColumnMask(row, int(batch["placeholder_position"][row]), batch["mask"][row])
                for row in range(batch["latents"].shape[0])
            ]
        return [self.attention_store, SpatialControl(columns, renormalize=self.renormalize)]

    @contextlib.contextmanager
    def routed(self) -> Iterator[None]:
        """The UNet's cross-attention goes through `self.attention` (already so during a fit)."""
        if self._installed is not None:
            yield
        else:
            with controlled_attention(self.unet, self.attention, layers=cross_attention_layers):
                yield

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids → (B, L, D) last hidden state after the final layer norm (what the UNet sees)."""
        return self.text_encoder(input_ids)[0]

    def _step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One fine-tuning step's loss terms: loss, recon, semantic, attention."""
        latents = batch["latents"]  # (B, C, h, w), cached VAE latents
        batch_size = latents.shape[0]

        # 1. Noise the latents at t ~ U[0, T)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.num_train_timesteps, (batch_size,), device=latents.device)
        noisy = self.sd.scheduler.add_noise(latents, noise, timesteps)

        # 2. Text: P̃ conditions the UNet; P gives e_P at its (explicit) EOS position
        hidden = self.encode_text(torch.cat([batch["input_ids"], batch["source_input_ids"]]))
        prompt_states, source_states = hidden[:batch_size], hidden[batch_size:]  # (B, L, D) each

        # 3. UNet under spatial control, every cross-attention layer (Eq. 3)
        # the controllers stay set until the next step: gradient checkpointing re-runs this in backward
        self.attention.controllers = self.attention_controllers(batch)
        self.attention.step = self.global_step  # forwarded to every member
        with self.routed():
            prediction = self.unet(noisy, timesteps, encoder_hidden_states=prompt_states).sample
        target = diffusion_target(self.sd.scheduler, latents, noise, timesteps)
        recon = reconstruction_loss(prediction, target)

        # 4. Semantic loss, Eq. 1
        e_prompt = gather_positions(source_states, batch["source_eos_position"])
        if self.semantic_embedding == "token":
            e_placeholder = self.text_encoder.get_input_embeddings().weight[batch["token_id"]]
        else:
            e_placeholder = gather_positions(prompt_states, batch["placeholder_position"])
        semantic = semantic_loss(e_prompt, e_placeholder)

        # 5. Masked-attention loss on the placeholder's level-4 map
        attention = torch.zeros((), device=latents.device)
        if self.attention_weight > 0:
            maps = self.attention_store.average(level=MASK_LEVEL)  # (B, h, w, K)
            rows = torch.arange(batch_size, device=maps.device)
            placeholder_maps = maps[rows, :, :, batch["placeholder_position"]]  # (B, h, w)
            masks = torch.stack([resize_mask(m, tuple(maps.shape[1:3])) for m in batch["mask"]])
            attention = masked_attention_loss(placeholder_maps, masks)

        loss = recon + self.semantic_weight * semantic + self.attention_weight * attention
        return {"loss": loss, "recon": recon, "semantic": semantic, "attention": attention}

    # ------------------------------------------------------------------------------------ export

    def export(self, out: str | Path, pairs: list[PreparedPair]) -> Path:
        """Write the fine-tuned weights, tokens and masks to `<out>/export/` (atomically)."""
        tokens = [
            ExportToken(
                placeholder=p.pair.placeholder, token_id=p.token_id, prompt=p.pair.prompt,
                source_prompt=p.pair.source_prompt, object=p.pair.object, image=p.pair.image,
                image_sha256=p.image_sha256, mask="",
            )
            for p in pairs
        ]
        manifest = ExportManifest(
            base_model=self.base_model,
            method=self.method,
            resolution=self.resolution,
            tokens=tokens,
            config=dict(self.hparams["config"]),
            lora_rank=self.lora_rank if self.method == "lora" else None,
            base_probe=self.base_probe,
        )
        image_sizes = [tuple(p.pixels.shape[-2:]) for p in pairs]
        masks = [resize_mask(p.mask, size) for p, size in zip(pairs, image_sizes)]
        return write_export(out, self.sd, manifest, masks)

    # ------------------------------------------------------------------------------------ helpers

    def _frozen_state_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if not p.requires_grad}

    def _log_images_now(self) -> bool:
        if self.image_log_every <= 0 or self.logger is None:
            return False
        step = self.global_step
        return step % self.image_log_every == 0 or step + 1 == self.trainer.max_steps

    @torch.no_grad()
    def reconstruct(
        self, latents: torch.Tensor, input_ids: torch.Tensor, columns: list[ColumnMask]
    ) -> torch.Tensor:
        """A cheap reconstruction sample: the latent noised halfway, then a short DDIM denoise with P̃.

        latents: (1, C, h, w); input_ids: (1, L). Returns (1, 3, H, W) in [-1, 1].
        """
        total_steps = math.ceil(RECONSTRUCTION_STEPS / RECONSTRUCTION_STRENGTH)
        sampler = DDIMSampler(DDIMSchedule.from_scheduler(self.sd.scheduler, total_steps))
        first = total_steps - RECONSTRUCTION_STEPS
        generator = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        alpha = sampler.alpha(first)
        z = math.sqrt(alpha) * latents.float() + math.sqrt(1 - alpha) * noise.float()  # q(z_t | z_0)
        states = self.encode_text(input_ids)
        training_controllers = self.attention.controllers
        self.attention.controllers = [SpatialControl(columns, renormalize=self.renormalize)]
        try:
            with self.routed():
                for i in range(first, total_steps):
                    t, alpha = sampler.schedule.timesteps[i].to(z.device), sampler.alpha(i)
                    output = self.unet(z.to(latents.dtype), t, encoder_hidden_states=states).sample
                    eps = to_epsilon(output.float(), z, alpha, sampler.schedule.prediction_type)
                    z = sampler.step(z, sampler.predict_x0(z, eps, i), eps, i)
        finally:
            self.attention.controllers = training_controllers
        return self.sd.decode_latents(z.to(self.vae.dtype)).float()

    @torch.no_grad()
    def _log_images(self, batch: dict[str, torch.Tensor]) -> None:
        """Input, reconstruction sample, M_obj and the placeholder / object-word attention maps."""
        writer = self.logger.experiment
        step = self.global_step
        maps = self.attention_store.average(level=MASK_LEVEL).float()  # (B, h, w, K) of this step
        for row in range(batch["latents"].shape[0]):
            index = int(batch["pair_index"][row])
            pair = self.trainer.datamodule.prepared[index] if self.trainer.datamodule else None
            name = slug(next(k for k, v in self.token_ids.items() if v == int(batch["token_id"][row])))
            size = tuple(batch["latents"].shape[-2:])
            image_size = (size[0] * self.sd.vae_scale_factor, size[1] * self.sd.vae_scale_factor)
            if pair is not None:
                writer.add_image(f"input/{name}", to_unit(pair.pixels[0]), step)
            columns = []
            if self.spatial_control:
                columns = [ColumnMask(0, int(batch["placeholder_position"][row]), batch["mask"][row])]
            one = slice(row, row + 1)
            sample = self.reconstruct(batch["latents"][one], batch["input_ids"][one], columns)
            writer.add_image(f"reconstruction/{name}", to_unit(sample[0]), step)
            writer.add_image(f"mask/{name}", resize_mask(batch["mask"][row], image_size)[None], step)
            placeholder_map = maps[row, :, :, int(batch["placeholder_position"][row])]
            object_weights = batch["object_tokens"][row].to(maps)
            object_map = (maps[row] * object_weights).sum(-1) / object_weights.sum().clamp_min(1)
            for tag, attention in (("placeholder", placeholder_map), ("object", object_map)):
                attention = attention / attention.max().clamp_min(torch.finfo(attention.dtype).tiny)
                writer.add_image(f"attention_{tag}/{name}", resize_mask(attention, image_size)[None], step)


def to_unit(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [-1, 1] → [0, 1] float32 on CPU (TensorBoard images)."""
    return ((image.detach().float().cpu() + 1) / 2).clamp(0, 1)


class ResumeCheckpoint(L.Callback):
    """Keeps `<dir>/last.ckpt` resumable: every N steps, at the end, and when training stops on an error
    or Ctrl-C. Written to `.last.ckpt.tmp` then renamed, so a crash or a full disk mid-write keeps the
    previous one; a temporary file a killed run left is removed when the next run starts, never read."""

    def __init__(self, dirpath: str | Path, every_n_steps: int = 0) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.tmp.unlink(missing_ok=True)  # the run owns <out> (train.py holds its lock)

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._saved_step:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            trainer.save_checkpoint(self.tmp, weights_only=False)  # optimizer and loop state too: resumable
            os.replace(self.tmp, self.path)
        except OSError as err:
            if err.errno is None:
                raise
            raise OSError(err.errno, err.strerror, str(self.path)) from err  # the checkpoint, not the temp
        finally:
            with contextlib.suppress(OSError):
                self.tmp.unlink(missing_ok=True)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, error: BaseException) -> None:
        if trainer.lightning_module is not None and trainer.optimizers:
            # best effort: when the disk is full this fails too, and the error to report is the first one
            with contextlib.suppress(OSError):
                self._save(trainer)
