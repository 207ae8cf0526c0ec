"""S2Edit identity fine-tuning: learn a placeholder token ([I]) for ONE image (SPEC §2).

    python train.py image=examples/astronaut.png prompt="a photo of a [I] woman" object=woman
    python train.py ... model=tiny max_steps=20 out=outputs/demo      # CPU smoke run
    python train.py ... reference=ref.png reference_prompt="a photo of a woman with [A] makeup" \\
        reference_object=makeup                                       # compositional pair (§3.3)
    python train.py ... resume=true                                   # continue <out>/checkpoints/last.ckpt

Writes `<out>/export/` (what infer.py loads), `<out>/checkpoints/last.ckpt` (for resuming only) and
TensorBoard logs in `<out>/tb/`. `out` is a folder (made if missing) that no input lies in; one run at a
time writes it (`<out>/.output.lock` names the run), and that run first removes what a killed run left
there. `python train.py --help` lists every key.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from editkit.config import parse_config, run_main
from editkit.errors import InputError
from editkit.files import OutputLock, io_errors, refuse_overwriting_inputs
from s2edit.config import CONFIG_DIR, TrainConfig
from s2edit.pairs import TrainingPair, check_pair
from s2edit.tokenizer import clip_tokenizer

EXPORT_DIR = "export"  # s2edit.export.write_export's folder
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
TENSORBOARD_NAME = "tb"
# keys a resumed run must share with the checkpoint it continues
RESUME_KEYS = ("model", "image", "prompt", "object", "placeholder", "reference", "reference_prompt",
               "resolution", "finetune.method", "finetune.lora_rank")


def training_pairs(config: TrainConfig) -> list[TrainingPair]:
    """The source pair, plus the reference pair of a compositional edit."""
    pairs = [TrainingPair(config.image, config.prompt, config.placeholder, config.object, config.mask)]
    if config.reference is not None or config.reference_prompt is not None:
        if config.reference is None or config.reference_prompt is None or config.reference_object is None:
            raise InputError("a compositional edit needs reference=, reference_prompt= and reference_object=")
        if config.reference_placeholder.lower() == config.placeholder.lower():
            raise InputError(f"reference_placeholder must differ from placeholder '{config.placeholder}'")
        pairs.append(TrainingPair(config.reference, config.reference_prompt, config.reference_placeholder,
                                  config.reference_object, config.reference_mask))
    return pairs


def check_inputs(config: TrainConfig) -> list[TrainingPair]:
    """Refuse bad inputs in one line before any model is loaded (STYLE habit 5); the ranges of the
    numbers are checked by `parse_config` from the schema."""
    if config.accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"accelerator={config.accelerator} needs a CUDA GPU, and none is available: "
                             "use accelerator=auto or accelerator=cpu")
    check_output(config)
    pairs = training_pairs(config)
    tokenizer = clip_tokenizer()  # the checks add the placeholders to this fresh copy
    for pair, role in zip(pairs, ("prompt", "reference_prompt")):
        check_pair(tokenizer, pair, role)
    if config.resume:
        checkpoint = Path(config.out) / CHECKPOINT_DIR / LAST_CHECKPOINT
        if not checkpoint.is_file():
            raise InputError(f"resume=true but there is no checkpoint '{checkpoint}': drop resume=true")
    return pairs


def check_output(config: TrainConfig) -> None:
    """`out` is a folder (made if missing) and the run never writes over or replaces an input file."""
    out = Path(config.out)
    inputs = {"image": config.image, "mask": config.mask, "reference": config.reference,
              "reference_mask": config.reference_mask}
    refuse_overwriting_inputs("out", out, inputs, files=[out])
    if out.exists() and not out.is_dir():
        raise InputError(f"out='{out}' is a file: pass a folder (it receives export/, checkpoints/ and tb/)")
    # the export is replaced as a whole folder, checkpoints and logs are rewritten
    written = [out / name for name in (EXPORT_DIR, CHECKPOINT_DIR, TENSORBOARD_NAME)]
    refuse_overwriting_inputs("out", out, inputs, folders=written)


def check_resumable(checkpoint: Path, config: TrainConfig) -> None:
    """The checkpoint must come from the same model, inputs and method as this run."""
    import dataclasses

    import torch

    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]
    except Exception as err:  # any unreadable or foreign file: one line, not a traceback
        raise InputError(f"checkpoint '{checkpoint}' cannot be resumed: {str(err).splitlines()[0]}") from None
    saved, current = saved["config"], dataclasses.asdict(config)
    for key in RESUME_KEYS:
        section, _, leaf = key.rpartition(".")
        old = saved.get(section, {}).get(leaf) if section else saved.get(key)
        new = current[section][leaf] if section else current[key]
        if old != new:
            raise InputError(f"checkpoint '{checkpoint}' was trained with {key}={old!r}, not {new!r}: "
                             f"use the same {key} or a new out=")


def lightning_precision(precision: str, accelerator: str) -> str:
    """`auto`: bf16 mixed precision on a GPU that has it, else full fp32 (SPEC: trainable weights fp32)."""
    if precision != "auto":
        return precision
    import torch

    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def fit(
    config: TrainConfig,
    pairs: list[TrainingPair],
    callbacks: Sequence[Any] = (),
    resumable: bool = True,
    progress_bar: bool = True,
    devices: int | list[int] = 1,
) -> Path:
    """Build the module, data and trainer; fine-tune; export. Returns the export folder.

    `callbacks`: more Lightning callbacks (the web app's progress); `resumable=False` writes no
    `last.ckpt` (an app that fine-tunes in its own process does not resume)."""
    # Heavy imports here, so that refused inputs fail within a second or two
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from s2edit.data import S2EditDataModule
    from s2edit.export import recover_export
    from s2edit.module import ResumeCheckpoint, S2EditModule
    from s2edit.runtime import retain_freed_memory

    retain_freed_memory()  # CPU runs: no page faults on every step's activations (s2edit/runtime.py)

    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the data is cached tensors
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the frozen VAE, on purpose
    warnings.filterwarnings("ignore", ".*dataloader is not resumable.*")  # cached pairs: nothing to resume
    out = Path(config.out)
    recover_export(out / EXPORT_DIR)  # what a killed run left: its temporary folders, a half-done swap
    checkpoint = out / CHECKPOINT_DIR / LAST_CHECKPOINT
    if config.resume:
        check_resumable(checkpoint, config)

    # 1. Model and data (the object mask is read from the pretrained model in datamodule.setup)
    L.seed_everything(config.seed, verbose=False)
    module = S2EditModule(config)
    datamodule = S2EditDataModule(
        pairs, module.sd, module.token_ids, config.max_steps, module.resolution,
        config.spatial.mask_timesteps, config.spatial.mask_threshold, config.seed,
    )

    # 2. Trainer: constant lr, grad clipping, a resumable checkpoint, TensorBoard at <out>/tb
    trainer = L.Trainer(
        accelerator=config.accelerator,
        devices=devices,
        precision=lightning_precision(config.precision, config.accelerator),
        max_steps=config.max_steps,
        max_epochs=-1,
        gradient_clip_val=config.finetune.grad_clip or None,
        logger=TensorBoardLogger(save_dir=out, name=TENSORBOARD_NAME, version="", default_hp_metric=False),
        callbacks=[
            *([ResumeCheckpoint(out / CHECKPOINT_DIR, config.checkpoint_every)] if resumable else []),
            *callbacks,
        ],
        enable_checkpointing=False,  # ResumeCheckpoint writes last.ckpt itself
        enable_progress_bar=progress_bar,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )

    # 3. Fine-tune (Ctrl-C: last.ckpt is written, then Lightning exits; we turn that into an interrupt)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint if config.resume else None,
                    weights_only=True)
    except SystemExit:
        if trainer.interrupted:
            print(f"training interrupted at step {trainer.global_step}; resume with resume=true "
                  f"(checkpoint: {checkpoint})", file=sys.stderr)
            raise KeyboardInterrupt from None
        raise

    # 4. Export what the editing stage loads
    return module.export(out, datamodule.prepared)


def main(argv: list[str]) -> Path:
    config = parse_config(TrainConfig, argv, CONFIG_DIR / "train.yaml", prog="train.py",
                          description=__doc__.splitlines()[0])
    pairs = check_inputs(config)
    # One run per out folder; a full disk or a read-only folder is one line naming the file
    with OutputLock(config.out, " ".join(["train.py", *argv])), io_errors(config.out):
        export = fit(config, pairs)
    print(f"export written to {export}")
    return export


if __name__ == "__main__":
    run_main(main)
