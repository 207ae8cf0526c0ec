"""`python -m s2edit.shapes train`: train the shapes model in three resumable stages, export it, check it.

Stages (each a Lightning fit with its own `<out>/checkpoints/<stage>/last.ckpt` and TensorBoard logs under
`<out>/logs/<stage>`): `vae` (encoder + decoder), `decoder` (decoder refit on the frozen encoder's latent
means) and `unet` (UNet + text encoder on the latents). A stage whose checkpoint has reached its step
count is not run again, so re-running the same command continues where the last run stopped. At the end:
`<out>/model/` (:func:`s2edit.shapes.model.export_shapes_model`, plus TRAINING.md) and `<out>/quality.json`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers import DDIMScheduler
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from editkit.config import parse_config, to_yaml
from editkit.errors import InputError
from editkit.files import atomic_path, write_json
from s2edit.core.tokenizer import clip_tokenizer
from s2edit.core.trainer import LAST_CHECKPOINT, interruptible, make_trainer
from s2edit.shapes.config import ShapesTrainConfig
from s2edit.shapes.data import caption_tables, images_to_model, pooled_coverage, render_tensors
from s2edit.shapes.model import (
    export_shapes_model,
    scheduler_config,
    text_encoder_config,
    unet_config,
    vae_config,
)
from s2edit.shapes.quality import quality_report
from s2edit.shapes.system import DiffusionSystem, VAESystem
from s2edit.shapes.world import IMAGE_SIZE, training_specs

DEFAULTS = Path(__file__).resolve().parents[2] / "configs" / "shapes.yaml"
DESCRIPTION = "Train the shapes-world model (VAE, then UNet + text encoder), export it and check its quality."
STAGE_SEEDS = {"vae": 1, "decoder": 2, "unet": 3}
LATENT_BATCH = 256


def parse(argv: list[str]) -> ShapesTrainConfig:
    defaults = DEFAULTS if DEFAULTS.is_file() else None
    config = parse_config(ShapesTrainConfig, argv, defaults, prog="python -m s2edit.shapes train",
                          description=DESCRIPTION)
    check(config)
    return config


def check(config: ShapesTrainConfig) -> None:
    """Refuse settings that would fail deep inside a model constructor."""
    for name, channels, groups in (("vae", config.vae.block_out_channels, config.vae.norm_num_groups),
                                   ("unet", config.unet.block_out_channels, config.unet.norm_num_groups)):
        if any(c % groups for c in channels):
            raise InputError(f"{name}.norm_num_groups={groups} must divide every {name}.block_out_channels "
                             f"entry {channels}")
    if len(config.vae.block_out_channels) < 2 or len(config.unet.block_out_channels) < 3:
        raise InputError("vae.block_out_channels needs >= 2 levels and unet.block_out_channels >= 3 "
                         "(cross-attention at the two finest levels)")
    if config.text.hidden_size % config.text.heads:
        raise InputError(f"text.heads={config.text.heads} must divide "
                         f"text.hidden_size={config.text.hidden_size}")


# --------------------------------------------------------------------------------------------- stages


class ProgressLines(L.Callback):
    """One plain line every `every` steps (step, metrics, s/step, time left): readable in a log file,
    where the progress bar only draws at the end."""

    def __init__(self, stage: str, every: int) -> None:
        self.stage, self.every = stage, every
        self.start: tuple[float, int] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.start is None or (step % self.every and step != trainer.max_steps):
            return
        rate = (time.monotonic() - self.start[0]) / max(1, step - self.start[1])
        metrics = " ".join(f"{k.split('/')[-1]}={float(v):.4g}" for k, v in trainer.callback_metrics.items())
        print(f"[{self.stage}] step {step}/{trainer.max_steps} {metrics} {rate:.2f} s/step, "
              f"{rate * (trainer.max_steps - step) / 60:.1f} min left", flush=True)


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """A stage's Lightning checkpoint (tensors and plain values only: `weights_only`), None when there is
    none; an unreadable file is one line, as train.py's resume check says it."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # any unreadable or foreign file: one line, not a traceback
        raise InputError(f"checkpoint '{path}' cannot be resumed: {str(err).splitlines()[0]}; delete it to "
                         "train the stage again") from None


def checkpoint_step(path: Path) -> int:
    """The global step a Lightning checkpoint was saved at (0 when there is none)."""
    saved = read_checkpoint(path)
    return int(saved["global_step"]) if saved is not None else 0


def _loader(dataset: TensorDataset, batch: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=min(batch, len(dataset)), shuffle=True, drop_last=True,
                      generator=generator)


def run_stage(name: str, module: L.LightningModule, dataset: TensorDataset, steps: int, batch: int,
              config: ShapesTrainConfig) -> dict[str, Any]:
    """Fit `module` for `steps` steps, continuing from the stage's last checkpoint; a finished stage only
    loads its weights. Returns the stage record: steps, seconds (summed over runs), final metrics."""
    out = Path(config.out)
    record_path = out / "stages" / f"{name}.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"seconds": 0.0}
    checkpoint = out / "checkpoints" / name / f"{LAST_CHECKPOINT}.ckpt"
    saved = read_checkpoint(checkpoint)
    done = int(saved["global_step"]) if saved is not None else 0
    if saved is not None and done >= steps:
        module.load_state_dict(saved["state_dict"])
        print(f"stage {name}: finished at step {done}, loaded from {checkpoint}", flush=True)
        return record
    print(f"stage {name}: steps {done} → {steps}" + (" (resumed)" if done else ""), flush=True)
    L.seed_everything(config.seed + STAGE_SEEDS[name] + done, verbose=False)
    logger = TensorBoardLogger(save_dir=str(out), name="logs", version=name, default_hp_metric=False)
    trainer = make_trainer(accelerator=config.accelerator, precision="32", max_steps=steps, grad_clip=1.0,
                           logger=logger, root=out, checkpoints=checkpoint.parent,
                           checkpoint_every=config.checkpoint_every,
                           callbacks=[ProgressLines(name, config.log_every)])
    start = time.monotonic()
    with interruptible(trainer, lambda: print(f"interrupted: run the same command to resume {name}",
                                              file=sys.stderr)):
        trainer.fit(module, train_dataloaders=_loader(dataset, batch, config.seed + STAGE_SEEDS[name] + done),
                    ckpt_path=str(checkpoint) if checkpoint.is_file() else None, weights_only=True)
    seconds = time.monotonic() - start
    record = {"steps": trainer.global_step, "seconds": record["seconds"] + seconds,
              "seconds_per_step_last_run": seconds / max(1, trainer.global_step - done),
              "final": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    write_json(record_path, record)
    return record


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Latent means (N, C, h, w) of uint8 images (N, H, W, 3), unscaled."""
    vae.eval()
    return torch.cat([vae.encode(images_to_model(chunk)).latent_dist.mode()
                      for chunk in images.split(LATENT_BATCH)])


def _vae_config(config: ShapesTrainConfig) -> dict[str, Any]:
    return vae_config(config.vae.block_out_channels, config.vae.norm_num_groups, sample_size=IMAGE_SIZE)


def _decoder_system(config: ShapesTrainConfig, vae: torch.nn.Module) -> VAESystem:
    settings = config.vae
    system = VAESystem(_vae_config(config), settings.lr, settings.warmup, settings.refit_steps,
                       settings.kl_weight, settings.l1_weight, decoder_only=True)
    system.vae.load_state_dict(vae.state_dict())
    return system


# ------------------------------------------------------------------------------------------------ main


def train(config: ShapesTrainConfig, command: str = "") -> dict[str, Any]:
    """Every stage, the export and the quality report; returns the report."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(to_yaml(config))
    torch.manual_seed(config.seed)
    started = time.monotonic()
    # 1. Data: the training scenes, rendered
    data = render_tensors(training_specs(config.scenes, config.seed))
    print(f"rendered {len(data.images)} training scenes", flush=True)
    records: dict[str, Any] = {}
    # 2. VAE: encoder + decoder, then the decoder alone on the frozen latent means
    v = config.vae
    vae_system = VAESystem(_vae_config(config), v.lr, v.warmup, v.steps, v.kl_weight, v.l1_weight)
    images = TensorDataset(data.images)
    records["vae"] = run_stage("vae", vae_system, images, v.steps, v.batch, config)
    vae = vae_system.vae
    if v.refit_steps:
        decoder_system = _decoder_system(config, vae)
        records["decoder"] = run_stage("decoder", decoder_system, images, v.refit_steps, v.batch, config)
        vae = decoder_system.vae
    vae.eval().requires_grad_(False)
    # 3. Latents, scaled to unit variance (SD's scaling_factor, measured on the training scenes)
    latents = encode_latents(vae, data.images)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * vae.config.scaling_factor
    size = latents.shape[-1]
    # 4. UNet + text encoder
    u, t = config.unet, config.text
    tokenizer = clip_tokenizer()
    tables = caption_tables(tokenizer)
    scheduler = DDIMScheduler.from_config(scheduler_config())
    diffusion = DiffusionSystem(
        unet_config(u.block_out_channels, u.norm_num_groups, t.hidden_size, u.heads, u.layers_per_block,
                    size),
        text_encoder_config(t.hidden_size, t.layers, t.heads), t.token_seed,
        scheduler.alphas_cumprod.tolist(), tables.ids.tolist(), tables.empty_ids.tolist(),
        tables.object_tokens.tolist(), tables.background_tokens.tolist(), u.lr, u.warmup, u.steps,
        u.caption_dropout, u.min_snr_gamma, u.attention_weight, u.ema_decay)
    dataset = TensorDataset(latents, data.captions, pooled_coverage(data.coverage, size),
                            pooled_coverage(data.coverage, size // 2))
    records["unet"] = run_stage("unet", diffusion, dataset, u.steps, u.batch, config)
    unet, text_encoder = diffusion.ema_unet.eval(), diffusion.ema_text_encoder.eval()
    # 5. Export, quality, TRAINING.md
    folder = export_shapes_model(out / "model", unet, vae, text_encoder, t.token_seed,
                                 {"trained": {"seed": config.seed, "steps": {k: r.get("steps")
                                                                          for k, r in records.items()}}})
    q = config.quality
    report = quality_report(unet, vae, text_encoder, tokenizer, scheduler.alphas_cumprod, seed=config.seed,
                            ddim_steps=q.ddim_steps, guidance=q.guidance,
                            samples_per_caption=q.samples_per_caption,
                            reconstruction_images=q.reconstruction_images,
                            attention_images=q.attention_images, vae_images=q.vae_images)
    write_json(out / "quality.json", report)
    write_training_notes(folder / "TRAINING.md", config, command, records, report,
                         time.monotonic() - started)
    print(json.dumps(report, indent=1), flush=True)
    return report


def _machine() -> str:
    try:
        uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        uname = platform.platform()
    return f"{uname}; {os.cpu_count()} cores; torch {torch.__version__}"


def write_training_notes(path: Path, config: ShapesTrainConfig, command: str, records: dict[str, Any],
                         report: dict[str, Any], seconds: float) -> None:
    lines = ["# How this shapes model was trained", "",
             f"- command: `{command or 'train(config) from Python'}`",
             f"- seed: {config.seed}; token-table seed: {config.text.token_seed}",
             f"- machine: {_machine()}",
             f"- this invocation: {seconds / 60:.1f} min (stages below sum every run that resumed them)", "",
             "| stage | steps | minutes | s/step | final metrics |", "|---|---|---|---|---|"]
    for name, record in records.items():
        final = ", ".join(f"{k}={v:.4g}" for k, v in sorted(record.get("final", {}).items()))
        lines.append(f"| {name} | {record.get('steps')} | {record.get('seconds', 0) / 60:.1f} | "
                     f"{record.get('seconds_per_step_last_run') or 0:.2f} | {final} |")
    lines += ["", "## Quality (quality.json)", "", "```json", json.dumps(report, indent=1), "```", "",
              "## Configuration", "", "```yaml", to_yaml(config).rstrip(), "```", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


def main(argv: list[str]) -> dict[str, Any]:
    config = parse(argv)
    command = shlex.join(["python", "-m", "s2edit.shapes", "train", *argv])
    return train(config, command)
