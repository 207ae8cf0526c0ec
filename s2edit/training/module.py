"""S2Edit identity fine-tuning as a LightningModule (SPEC §2, paper §3.1–3.3, §4.1).

The system around a plain model family: the placeholder token(s) are added to every tokenizer and text
encoder and initialised, the denoiser and text encoder(s) train (or LoRA adapters on them), the VAE stays
frozen. Every step:

    L = L_recon + λ_sem·L_sem + λ_attn·L_attn                     (Eq. 2, + the masked-attention loss)

with the placeholder's cross-attention multiplied by the object mask in every cross-attention layer
(Eq. 3); with several text encoders, L_sem is the mean of each encoder's term (SPEC §10). Among the
token embedding rows only the placeholders' rows train (textual-inversion style: the other rows are
restored after each optimiser step), in both modes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from editkit.errors import ReportedError
from editkit.files import file_sha256, slug
from editkit.images import to_unit
from s2edit.core.attention import (
    AttentionController,
    AttentionStore,
    ColumnMask,
    ControllerChain,
    SpatialControl,
)
from s2edit.core.diffusion import DDIMSampler, DDIMSchedule
from s2edit.core.family import Conditioning, ModelFamily
from s2edit.core.flow_family import refuse_flow_family
from s2edit.core.loading import load_model
from s2edit.training.config import TrainConfig
from s2edit.training.data import PreparedPair
from s2edit.training.export import (
    ExportManifest,
    ExportToken,
    add_lora_adapters,
    base_model_probe,
    write_export,
)
from s2edit.training.losses import (
    diffusion_target,
    gather_positions,
    masked_attention_loss,
    reconstruction_loss,
    semantic_loss,
)
from s2edit.training.object_mask import resize_mask

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
    """Fine-tunes a model on one image (or two, compositional) with semantic and spatial control."""

    def __init__(self, config: TrainConfig | dict[str, Any]) -> None:
        super().__init__()
        config = config_from_hparams(config)
        self.save_hyperparameters({"config": dataclasses.asdict(config)})

        # 1. Base model; its components are registered as submodules by their names (unet,
        #    text_encoder, …, then vae: checkpointed and moved by Lightning, the optimiser's order)
        self.model: ModelFamily = load_model(config.model, lora=config.lora)
        refuse_flow_family(self.model, "identity fine-tuning")
        for name, component in {**self.model.trainable_components(), **self.model.components()}.items():
            self.add_module(name, component)
        self.base_probe = base_model_probe(self.model)  # lets the export loader detect a different base

        # 2. Placeholder tokens, initialised from a word's embedding in every text encoder (SPEC §2)
        self.token_ids = {
            placeholder: self.model.add_placeholder(placeholder, init_word)
            for placeholder, init_word in placeholder_specs(config)
        }

        # 3. What trains: the family's trainable components whole (paper) or LoRA adapters on them; always
        #    the new token rows of every text encoder
        method = config.finetune.method
        self.method = self.model.default_finetune if method == "auto" else method
        self.lora_rank = config.finetune.lora_rank
        trainable = self.model.trainable_components()
        for name, component in self.model.components().items():
            if name not in trainable:  # the VAE, and text encoders of families that keep them frozen
                component.requires_grad_(False).eval()
        for component in trainable.values():
            component.train()
            component.requires_grad_(self.method != "lora")
        if self.method == "lora":
            add_lora_adapters(self.model, config.finetune.lora_rank)
        learned_rows = torch.tensor(sorted(self.token_ids.values()), dtype=torch.long)
        self.register_buffer("learned_rows", learned_rows, persistent=False)
        for k, embeddings in enumerate(self.embedding_tables()):
            embeddings.requires_grad_(True)
            self.register_buffer(f"original_embeddings_{k}", embeddings.detach().clone(), persistent=False)
        if config.finetune.gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()
            for encoder in self.model.text_encoders:
                encoder.gradient_checkpointing_enable()

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
        self.base_lora = str(Path(config.lora).expanduser().resolve()) if config.lora else None
        self.resolution = config.resolution or self.model.native_resolution
        self.num_train_timesteps = self.model.scheduler.config.num_train_timesteps
        # One controller object routes every cross-attention layer for the whole fit (installed in
        # on_fit_start: gradient checkpointing re-runs the forward during backward, outside any step scope)
        self.attention_store = AttentionStore(levels=(self.model.mask_level,),
                                              detach=self.attention_weight == 0)
        self.attention = ControllerChain([])
        self._installed: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self) -> None:
        if self.device.type == "cuda" and not self.model.upcast_vae:  # frozen parts may be half precision
            self.model.vae.to(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        self._installed = contextlib.ExitStack()
        self._installed.enter_context(self.model.attention_control(self.attention, cross_only=True))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
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
        for embeddings in self.embedding_tables():
            grad = embeddings.grad
            if grad is not None:
                learned = grad[self.learned_rows].clone()  # whole-tensor ops: faster than masked indexing
                grad.zero_()
                grad[self.learned_rows] = learned

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # AdamW's decoupled weight decay moves every row: restore the frozen ones exactly
        with torch.no_grad():
            for k, embeddings in enumerate(self.embedding_tables()):
                learned = embeddings[self.learned_rows].clone()
                embeddings.copy_(getattr(self, f"original_embeddings_{k}"))
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

    def attention_controllers(self, batch: dict[str, Any]) -> list[AttentionController]:
        """This step's controllers, in order: record the mask-level maps (raw: L_attn sees them before the
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
        """The denoiser's cross-attention goes through `self.attention` (already so during a fit)."""
        if self._installed is not None:
            yield
        else:
            with self.model.attention_control(self.attention, cross_only=True):
                yield

    def embedding_tables(self) -> list[torch.nn.Parameter]:
        """The token embedding table of each text encoder."""
        return [encoder.get_input_embeddings().weight for encoder in self.model.text_encoders]

    def _step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One fine-tuning step's loss terms: loss, recon, semantic, attention."""
        latents = batch["latents"]  # (B, C, h, w), cached VAE latents
        batch_size = latents.shape[0]

        # 1. Noise the latents at t ~ U[0, T)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.num_train_timesteps, (batch_size,), device=latents.device)
        noisy = self.model.scheduler.add_noise(latents, noise, timesteps)

        # 2. Text: P̃ conditions the denoiser; P gives e_P at its (explicit) EOS position
        encoding = self.model.encode_text([*batch["prompt"], *batch["source_prompt"]])
        prompt, source = encoding[:batch_size], encoding[batch_size:]

        # 3. Denoiser under spatial control, every cross-attention layer (Eq. 3)
        # the controllers stay set until the next step: gradient checkpointing re-runs this in backward
        self.attention.controllers = self.attention_controllers(batch)
        self.attention.step = self.global_step  # forwarded to every member
        with self.routed():
            inputs = self.model.unet_inputs(prompt.conditioning, tuple(noisy.shape[-2:]))
            prediction = self.model.unet(noisy, timesteps, **inputs).sample
        target = diffusion_target(self.model.scheduler, latents, noise, timesteps)
        recon = reconstruction_loss(prediction, target)

        # 4. Semantic loss, Eq. 1 (the mean over text encoders, SPEC §10)
        terms = []
        for prompt_states, source_states, embeddings in zip(prompt.hidden, source.hidden,
                                                            self.embedding_tables()):  # (B, L, D_k) each
            e_prompt = gather_positions(source_states, batch["source_eos_position"])
            if self.semantic_embedding == "token":
                e_placeholder = embeddings[batch["token_id"]]
            else:
                e_placeholder = gather_positions(prompt_states, batch["placeholder_position"])
            terms.append(semantic_loss(e_prompt, e_placeholder))
        semantic = sum(terms[1:], terms[0]) / len(terms)

        # 5. Masked-attention loss on the placeholder's map at the mask level
        attention = torch.zeros((), device=latents.device)
        if self.attention_weight > 0:
            maps = self.attention_store.average()  # (B, h, w, K)
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
            base_lora=self.base_lora,
            base_lora_sha256=file_sha256(Path(self.base_lora)) if self.base_lora else None,
            method=self.method,
            resolution=self.resolution,
            tokens=tokens,
            config=dict(self.hparams["config"]),
            lora_rank=self.lora_rank if self.method == "lora" else None,
            base_probe=self.base_probe,
        )
        image_sizes = [tuple(p.pixels.shape[-2:]) for p in pairs]
        masks = [resize_mask(p.mask, size) for p, size in zip(pairs, image_sizes)]
        return write_export(out, self.model, manifest, masks)

    # ------------------------------------------------------------------------------------ helpers

    def _frozen_state_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if not p.requires_grad}

    def _log_images_now(self) -> bool:
        if self.image_log_every <= 0 or self.logger is None:
            return False
        step = self.global_step
        return step % self.image_log_every == 0 or step + 1 == self.trainer.max_steps

    @torch.no_grad()
    def reconstruct(self, latents: torch.Tensor, prompt: str, columns: list[ColumnMask]) -> torch.Tensor:
        """A cheap reconstruction sample: the latent noised halfway, then a short DDIM denoise with P̃.

        latents: (1, C, h, w). Returns (1, 3, H, W) in [-1, 1].
        """
        total_steps = math.ceil(RECONSTRUCTION_STEPS / RECONSTRUCTION_STRENGTH)
        sampler = DDIMSampler(DDIMSchedule.from_scheduler(self.model.scheduler, total_steps))
        first = total_steps - RECONSTRUCTION_STEPS
        generator = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        alpha = sampler.alpha(first)
        z = math.sqrt(alpha) * latents.float() + math.sqrt(1 - alpha) * noise.float()  # q(z_t | z_0)
        cond: Conditioning = self.model.encode_prompt([prompt])
        training_controllers = self.attention.controllers
        self.attention.controllers = [SpatialControl(columns, renormalize=self.renormalize)]
        try:
            with self.routed():
                for i in range(first, total_steps):
                    t, alpha = sampler.schedule.timesteps[i].to(z.device), sampler.alpha(i)
                    eps = self.model.to_epsilon(self.model.predict(z, t, cond), z, alpha)
                    z = sampler.step(z, sampler.predict_x0(z, eps, i), eps, i)
        finally:
            self.attention.controllers = training_controllers
        return self.model.decode_latents(z.to(self.model.vae.dtype)).float()

    @torch.no_grad()
    def _log_images(self, batch: dict[str, Any]) -> None:
        """Input, reconstruction sample, M_obj and the placeholder / object-word attention maps."""
        writer = self.logger.experiment
        step = self.global_step
        maps = self.attention_store.average().float()  # (B, h, w, K) of this step
        for row in range(batch["latents"].shape[0]):
            index = int(batch["pair_index"][row])
            pair = self.trainer.datamodule.prepared[index] if self.trainer.datamodule else None
            name = slug(next(k for k, v in self.token_ids.items() if v == int(batch["token_id"][row])))
            size = tuple(batch["latents"].shape[-2:])
            image_size = (size[0] * self.model.vae_scale_factor, size[1] * self.model.vae_scale_factor)
            if pair is not None:
                writer.add_image(f"input/{name}", image_for_log(pair.pixels[0]), step)
            columns = []
            if self.spatial_control:
                columns = [ColumnMask(0, int(batch["placeholder_position"][row]), batch["mask"][row])]
            sample = self.reconstruct(batch["latents"][row : row + 1], batch["prompt"][row], columns)
            writer.add_image(f"reconstruction/{name}", image_for_log(sample[0]), step)
            writer.add_image(f"mask/{name}", resize_mask(batch["mask"][row], image_size)[None], step)
            placeholder_map = maps[row, :, :, int(batch["placeholder_position"][row])]
            object_weights = batch["object_tokens"][row].to(maps)
            object_map = (maps[row] * object_weights).sum(-1) / object_weights.sum().clamp_min(1)
            for tag, attention in (("placeholder", placeholder_map), ("object", object_map)):
                attention = attention / attention.max().clamp_min(torch.finfo(attention.dtype).tiny)
                writer.add_image(f"attention_{tag}/{name}", resize_mask(attention, image_size)[None], step)


def image_for_log(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [-1, 1] → [0, 1] float32 on the CPU (TensorBoard images)."""
    return to_unit(image).cpu().clamp(0, 1)
