"""One place that builds every Lightning Trainer of the project, with its precision rule, its resumable
checkpoint, the warnings it silences, and Ctrl-C turned back into an interrupt.

    trainer = make_trainer(max_steps=200, grad_clip=1.0, logger=..., checkpoints=out / "checkpoints")
    with interruptible(trainer, lambda: print("resume with resume=true")):
        trainer.fit(module, datamodule=data)

Fine-tuning (`train.py`, the app's Identity tab, per-item fine-tuning in `evaluate.py`) and the evaluation
runner's predict loop all go through :func:`make_trainer`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from editkit.files import atomic_path

LAST_CHECKPOINT = "last"  # <checkpoints>/last.ckpt: what resume=true continues

# Lightning's notes that say nothing here: the data are cached tensors or item paths (no workers, nothing
# to resume in the loader), the frozen VAE is in eval mode on purpose, a predict-only process may get no
# item, lightning's pytree use under torch 2.14, and the checkpoint folder of a resumed run is not empty.
QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*module\\(s\\) in eval mode.*",
    ".*dataloader is not resumable.*",
    ".*Total length of `DataLoader` across ranks is zero.*",
    ".*LeafSpec.*is deprecated.*",
    ".*Checkpoint directory .* exists and is not empty.*",
)


def lightning_precision(precision: str, on_gpu: bool) -> str:
    """`auto`: bf16 mixed precision on a GPU that has it, else full fp32 (SPEC: trainable weights fp32)."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file beside the final one and renamed into place
    (:func:`editkit.files.atomic_path`): a crash or a full disk mid-write keeps the previous checkpoint,
    and the error names the checkpoint, not the temporary file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint keeping one resumable file, `last.ckpt`: every `every` steps (0: never
    in between), at the end of training, and when training stops on an error or Ctrl-C once there is
    something to resume (Lightning's OnExceptionCheckpoint would do that too, but its presence makes
    every later `fit` resume from the newest checkpoint: a run must resume only when asked).

    The save on an error is best effort: when the disk is full it fails too, and the error to report is
    the first one.
    """

    def __init__(self, dirpath: str | Path, every: int = 0) -> None:
        super().__init__(dirpath=dirpath, filename=LAST_CHECKPOINT, save_top_k=0, save_last=True,
                         enable_version_counter=False, every_n_train_steps=every or None)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if trainer.lightning_module is None or not trainer.optimizers:
            return
        with contextlib.suppress(OSError):
            trainer.save_checkpoint(Path(self.dirpath) / f"{LAST_CHECKPOINT}{self.FILE_EXTENSION}")


def make_trainer(
    *,
    accelerator: str = "auto",
    devices: int | list[int] = 1,
    device: torch.device | None = None,
    strategy: str = "auto",
    num_nodes: int = 1,
    precision: str = "auto",
    max_steps: int = -1,
    grad_clip: float = 0.0,
    logger: Any = False,
    callbacks: Sequence[L.Callback] = (),
    progress: bool = True,
    summary: bool = False,
    root: str | Path | None = None,
    checkpoints: str | Path | None = None,
    checkpoint_every: int = 0,
    predicting: bool = False,
) -> L.Trainer:
    """A Trainer for fine-tuning (`max_steps` steps as one long epoch, constant lr, `grad_clip` on the
    gradient norm) or for a predict loop (`predicting=True`).

    `device`: one torch device to run on (a single-device strategy; for work inside another Trainer's
    process); else `accelerator` / `devices` / `strategy` / `num_nodes` as Lightning reads them.
    `precision`: Lightning's, or `auto` (:func:`lightning_precision`); a predict loop runs the model's own
    dtypes (32-true). `checkpoints`: a folder for `last.ckpt`, written every `checkpoint_every` steps (0:
    only at the end), at the end and when training stops on an error or Ctrl-C, each atomically.
    `summary` prints Lightning's table of the module's parameters.
    """
    from lightning.pytorch.strategies import SingleDeviceStrategy

    if device is not None:
        on_gpu = device.type == "cuda"
        accelerator, strategy = ("gpu" if on_gpu else "cpu"), SingleDeviceStrategy(device=device)
    else:
        on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    extra: list[L.Callback] = []
    plugins: list[Any] = []
    if checkpoints is not None:
        extra, plugins = [LastCheckpoint(checkpoints, checkpoint_every)], [AtomicCheckpointIO()]
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", pattern)
    with quiet_lightning():  # "GPU available: …" on every Trainer would drown the progress bars
        return L.Trainer(
            accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=num_nodes,
            precision="32-true" if predicting else lightning_precision(precision, on_gpu),
            max_steps=max_steps, max_epochs=-1, gradient_clip_val=grad_clip or None,
            logger=logger, callbacks=[*extra, *callbacks], plugins=plugins or None,
            enable_checkpointing=checkpoints is not None, enable_progress_bar=progress,
            enable_model_summary=summary, log_every_n_steps=1, num_sanity_val_steps=0, default_root_dir=root,
            inference_mode=not predicting,  # NTI, SPL refinement and per-item fine-tuning need gradients
            use_distributed_sampler=not predicting,  # the runner shares items out itself, without padding
        )


@contextlib.contextmanager
def interruptible(trainer: L.Trainer, on_interrupt: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Lightning answers Ctrl-C by saving (callbacks' `on_exception`) and exiting; turn that exit back
    into a KeyboardInterrupt (the scripts' exit code 130) after `on_interrupt()` has said what to do."""
    try:
        yield
    except SystemExit:
        if not trainer.interrupted:
            raise
        on_interrupt()
        raise KeyboardInterrupt from None


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's start-up info lines (GPU/TPU availability) off: the progress bar says what matters."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
