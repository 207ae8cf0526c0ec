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

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editkit.config import parse_config, run_main
from editkit.errors import InputError
from editkit.files import OutputLock, io_errors, refuse_overwriting_inputs
from s2edit.core.lora import check_lora_file
from s2edit.core.tokenizer import clip_tokenizer
from s2edit.training.config import TrainConfig
from s2edit.training.pairs import TrainingPair, check_pair

if TYPE_CHECKING:
    import torch

    from s2edit.training.data import S2EditDataModule
    from s2edit.training.module import S2EditModule

EXPORT_DIR = "export"  # s2edit.training.export.write_export's folder
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
TENSORBOARD_NAME = "tb"
# keys a resumed run must share with the checkpoint it continues
RESUME_KEYS = ("model", "lora", "image", "prompt", "object", "placeholder", "reference", "reference_prompt",
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
    from s2edit.core.detect import family_name, flow_refusal

    family = family_name(config.model)
    refusal = flow_refusal(family, config.model, "identity fine-tuning") if family is not None else None
    if refusal is not None:  # before minutes of loading
        raise InputError(refusal)
    if config.lora is not None:
        check_lora_file(Path(config.lora).expanduser())
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
              "reference_mask": config.reference_mask, "lora": config.lora}
    refuse_overwriting_inputs("out", out, inputs, files=[out])
    if out.exists() and not out.is_dir():
        raise InputError(f"out='{out}' is a file: pass a folder (it receives export/, checkpoints/ and tb/)")
    # the export is replaced as a whole folder, checkpoints and logs are rewritten
    written = [out / name for name in (EXPORT_DIR, CHECKPOINT_DIR, TENSORBOARD_NAME)]
    refuse_overwriting_inputs("out", out, inputs, folders=written)


def check_resumable(checkpoint: Path, config: TrainConfig) -> None:
    """The checkpoint must come from the same model, inputs and method as this run."""
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


def fit(
    config: TrainConfig,
    pairs: Sequence[TrainingPair],
    *,
    out: str | Path | None = None,
    resumable: bool = True,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    devices: int | list[int] = 1,
    device: torch.device | None = None,
) -> tuple[S2EditModule, S2EditDataModule]:
    """Build the module and its data, and fine-tune (SPEC §2). Returns both (`module.export(out,
    data.prepared)` writes what the editing stage loads).

    With `out`: TensorBoard logs in `<out>/tb` and, when `resumable`, `<out>/checkpoints/last.ckpt`
    (every `checkpoint_every` steps, at the end, on an error or Ctrl-C; `config.resume` continues it);
    without: no logger and no checkpoint (the app and per-item evaluation fine-tune in their own process).
    `device`: one torch device (inside another Trainer's process); else `config.accelerator` on `devices`.
    """
    # Heavy imports here, so that refused inputs fail within a second or two
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from editkit.files import remove_temporaries
    from s2edit.core.runtime import retain_freed_memory
    from s2edit.core.trainer import interruptible, make_trainer
    from s2edit.training.data import S2EditDataModule
    from s2edit.training.module import S2EditModule

    retain_freed_memory()  # CPU runs: no page faults on every step's activations (s2edit/core/runtime.py)
    checkpoints = Path(out) / CHECKPOINT_DIR if out is not None and resumable else None
    if checkpoints is not None:
        remove_temporaries(checkpoints)  # what a killed run left while writing last.ckpt
        if config.resume:
            check_resumable(checkpoints / LAST_CHECKPOINT, config)

    # 1. Model and data (the object mask is read from the pretrained model in datamodule.setup). Only
    #    torch draws random numbers here; its seed takes 64 bits (evaluate.py's item seeds have 62)
    torch.manual_seed(config.seed)
    module = S2EditModule(config)
    data = S2EditDataModule(
        pairs, module.model, module.token_ids, config.max_steps, module.resolution,
        config.spatial.mask_timesteps, config.spatial.mask_threshold, config.seed,
    )

    # 2. Trainer: constant lr, grad clipping, a resumable checkpoint, TensorBoard at <out>/tb
    logger = False
    if out is not None:
        logger = TensorBoardLogger(save_dir=out, name=TENSORBOARD_NAME, version="", default_hp_metric=False)
    trainer = make_trainer(
        accelerator=config.accelerator, devices=devices, device=device, precision=config.precision,
        max_steps=config.max_steps, grad_clip=config.finetune.grad_clip, logger=logger, callbacks=callbacks,
        progress=progress, summary=out is not None, root=out, checkpoints=checkpoints,
        checkpoint_every=config.checkpoint_every,
    )

    # 3. Fine-tune (Ctrl-C: last.ckpt is written, then Lightning exits; we turn that into an interrupt)
    def say_how_to_resume() -> None:
        print(f"training interrupted at step {trainer.global_step}; resume with resume=true "
              f"(checkpoint: {checkpoints / LAST_CHECKPOINT if checkpoints else 'none'})", file=sys.stderr)

    with interruptible(trainer, say_how_to_resume):
        trainer.fit(module, datamodule=data, weights_only=True,
                    ckpt_path=checkpoints / LAST_CHECKPOINT if checkpoints and config.resume else None)
    return module, data


def main(argv: list[str]) -> Path:
    config = parse_config(TrainConfig, argv, prog="train.py", description=__doc__.splitlines()[0])
    pairs = check_inputs(config)
    # One run per out folder; a full disk or a read-only folder is one line naming the file
    with OutputLock(config.out, " ".join(["train.py", *argv])), io_errors(config.out):
        from s2edit.training.export import recover_export

        recover_export(Path(config.out) / EXPORT_DIR)  # what a killed run left: a half-done export swap
        module, data = fit(config, pairs, out=config.out)
        export = module.export(config.out, data.prepared)
    print(f"export written to {export}")
    return export


def cli() -> None:
    """The `train.py` / `s2edit-train` / `python -m s2edit.train` command."""
    run_main(main)
