"""The evaluation system: edit every pending item (optionally after fine-tuning [I] on it), score it,
write it (SPEC §8).

    module = EvaluationModule(config, method)              # the system: an Editor (+ per-item fine-tuning)
    data = EvaluationDataModule(items, out / ITEMS_DIR)     # items not done yet, shared out over processes
    trainer = make_trainer(predicting=True, callbacks=[ItemWriter(out / ITEMS_DIR)], …)
    trainer.predict(module, datamodule=data, return_predictions=False)

Each finished item is written as soon as its predict step returns (:class:`ItemWriter`): `source.png`,
`reconstruction.png`, `edit_<k>.png`, `masks/*.png`, `metrics.json`, then the completion marker `DONE`,
every file through :func:`editkit.files.atomic_path`. An item folder without `DONE` (a killed run's item in
flight) is discarded and redone, so a rerun into the same `out` resumes and loses at most the items that
were in flight.

Metrics per edit (:class:`s2edit.evaluation.metrics.MetricSuite`): against the preprocessed source image,
on the whole image and on the unedited region when the dataset gives an edit mask (PIE-Bench: the mask is
resized, nearest, to the working size with the same crop as the image); weight-backed metrics without
local weights are reported as skipped, never as numbers.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from editkit.files import atomic_path, slug, write_json
from editkit.images import save_image, save_mask
from s2edit.editing.plan import Placeholder
from s2edit.editing.request import EditRequest
from s2edit.evaluation.config import EvaluateConfig
from s2edit.evaluation.datasets import EDIT_TYPES, EditItem
from s2edit.evaluation.items import (
    DONE,
    ITEM_ERROR,
    ITEM_REPORT,
    item_folder,
    item_request,
    item_seed,
    mask_to_working_size,
    object_word,
    tuned_prompts,
)
from s2edit.training.config import TrainConfig


@dataclass
class ItemOutput:
    """What `predict_step` hands to the writer: the edit (CPU tensors), its metrics, or the error."""

    item: EditItem
    seed: int
    report: dict[str, Any] = field(default_factory=dict)  # metrics.json, without "files"
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # file name → (1, 3, H, W)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # name → (H, W) in [0, 1]
    attention: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # row → word → (H, W)
    error: str | None = None


class EvaluationModule(L.LightningModule):
    """The evaluation system around an :class:`~s2edit.editing.editor.Editor`: edit one item per predict
    step (optionally after fine-tuning [I] on its image), then score every edit.

    The model lives in the Editor, built on this process's device in `setup` (predict wraps nothing in
    DDP, so there is nothing to synchronise); with `finetune`, a fresh S2EditModule is built for every
    item instead, so no weights carry over from one item to the next. `method` is the editing method the
    run settled on (:func:`s2edit.editing.request.choose_method`).
    """

    def __init__(self, config: EvaluateConfig, method: str) -> None:
        super().__init__()
        self.save_hyperparameters({"config": dataclasses.asdict(config), "method": method})
        self.request = EditRequest.of(config)
        self.method = method
        self.model_name = config.model
        self.lora = config.lora
        self.precision_name = config.precision
        self.offload = config.offload
        self.resolution = config.resolution
        self.base_seed = config.seed
        self.item_blend = config.item_blend
        self.cache_dir = config.cache_dir
        self.save_attention = config.save_attention
        self.continue_on_error = config.continue_on_error
        self.metric_weights = dataclasses.asdict(config.metrics)
        self.finetune = config.finetune
        tune = config.tune
        self.placeholder, self.object_word = tune.placeholder, tune.object
        # train.py's schema for one item; image, prompt, object and seed are filled in per item
        self.tune_template = TrainConfig(
            model=config.model, lora=config.lora, placeholder=tune.placeholder, resolution=config.resolution,
            max_steps=tune.steps, image_log_every=0, checkpoint_every=0, finetune=tune.finetune,
            semantic=tune.semantic, spatial=tune.spatial,
        )
        self.editor: Any = None
        self.suite: Any = None

    # ------------------------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str) -> None:
        from s2edit.editing.editor import Editor
        from s2edit.evaluation.metrics import MetricSuite

        # per-edit metrics here; FID is a set metric, computed over the written images by the report
        self.suite = MetricSuite(**self.metric_weights, device=self.root_device,
                                 include=("lpips", "dists", "clip", "dino"))
        if not self.finetune:
            self.editor = Editor.from_model(
                self.model_name, device=str(self.root_device), precision=self.precision_name,
                seed=self.base_seed, cache_dir=self.cache_dir, progress=False, resolution=self.resolution,
                lora=self.lora, offload=self.offload,
            )

    @property
    def root_device(self) -> torch.device:
        return self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")

    def predict_step(self, item: EditItem, batch_idx: int) -> ItemOutput:
        seed = item_seed(item.id, self.base_seed)
        try:
            return self.evaluate_item(item, seed)
        except Exception as err:  # any failure of one item, when asked to go on
            if not self.continue_on_error:
                raise
            return ItemOutput(item, seed, error=f"{type(err).__name__}: {err}")
        finally:
            if self.finetune:  # the item's model copy sits in reference cycles (its Trainer): free it now
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------ one item

    def evaluate_item(self, item: EditItem, seed: int) -> ItemOutput:
        """Fine-tune (optionally), edit and score one item."""
        started = time.time()
        timings: dict[str, float] = {}
        torch.manual_seed(seed)  # fine-tuning's noise; the virtual edit seeds its own generator
        request = item_request(item, self.request, self.method, self.item_blend)

        # 1. The editor: the shared one, or one fine-tuned on this item's image
        tuning = None
        source, targets = item.source_prompt, list(item.targets)
        with torch.enable_grad():  # predict runs under no_grad; fine-tuning, NTI and SPL need gradients
            if self.finetune:
                start = time.perf_counter()
                editor, source, targets, tuning = self.tuned_editor(item, seed)
                timings["finetune"] = time.perf_counter() - start
            else:
                editor = self.editor

            # 2. Edit (p2p: the inversion first)
            image = editor.load_image(item.image_path, self.resolution)
            result = editor.run(image, source, targets, request, method=self.method, seed=seed)
        if result.inversion is not None:
            timings["inversion"] = result.inversion_seconds
        timings["edit"] = result.timings["total"]

        # 3. Metrics of every target against the preprocessed source (SPEC §8)
        start = time.perf_counter()
        size = tuple(result.source.shape[-2:])
        edit_mask = None
        if item.mask is not None:
            with Image.open(item.image_path) as opened:
                image_size = (opened.height, opened.width)
            edit_mask = mask_to_working_size(item.mask, image_size, size)
        target_reports = []
        for k, target in enumerate(item.targets):
            values = self.suite.per_item(result.source, result.images[k: k + 1], target, edit_mask,
                                         source_prompt=item.source_prompt)
            engine = result.metrics["targets"][k]
            values["reconstruction_psnr"] = result.metrics["reconstruction_psnr"]
            values["spl_loss_before"] = engine["spl_loss_before"]
            values["spl_loss_after"] = engine["spl_loss_after"]
            target_reports.append({"index": k, "prompt": target, "edited_prompt": targets[k],
                                   "file": f"edit_{k}.png", "metrics": values})
        timings["metrics"] = time.perf_counter() - start
        timings["total"] = time.time() - started

        # 4. What the writer saves
        masks = result.output_masks()
        if edit_mask is not None:
            masks["edit_region"] = edit_mask
        images = {"source.png": result.source, "reconstruction.png": result.reconstruction}
        images.update({f"edit_{k}.png": result.images[k: k + 1] for k in range(len(item.targets))})
        report = {
            "id": item.id,
            "image": str(item.image_path),
            "edit_type": item.edit_type,
            "edit_type_name": EDIT_TYPES.get(item.edit_type) if item.edit_type is not None else None,
            "instruction": item.instruction,
            "source_prompt": item.source_prompt,
            "edited_source_prompt": source,
            "method": self.method,
            "family": editor.model.name,
            "edit_settings": result.settings,
            "seed": seed,
            "working_size": [int(size[1]), int(size[0])],
            "edit_mask": edit_mask is not None,
            "targets": target_reports,
            "inversion": result.inversion,
            "finetune": tuning,
            "skipped_metrics": {k: v for k, v in self.suite.skipped().items() if k != "fid"},
            "timings": timings,
            "started_at": started,
            "finished_at": time.time(),
            "rank": self.global_rank,
        }
        attention = result.attention_images() if self.save_attention else {}
        return ItemOutput(item, seed, report, images, masks, attention)

    def tuned_editor(self, item: EditItem, seed: int) -> tuple[Any, str, list[str], dict[str, Any]]:
        """S2Edit fine-tuning of [I] on this item's image (a fresh copy of the base model, train.py's
        module, data and trainer), then an Editor on the tuned weights. Returns (editor, P̃, targets,
        report)."""
        from s2edit.core.runtime import resolve_dtype
        from s2edit.editing.editor import Editor
        from s2edit.training.pairs import TrainingPair
        from s2edit.training.run import fit

        word = object_word(item, self.object_word)
        source, targets = tuned_prompts(item, self.placeholder, word)
        config = dataclasses.replace(self.tune_template, image=str(item.image_path), prompt=source,
                                     object=word, seed=seed)
        final = FinalTerms()
        module, data = fit(config, [TrainingPair(str(item.image_path), source, self.placeholder, word)],
                           callbacks=[final], progress=False, device=self.root_device)
        module.to(self.root_device).eval()
        editor = Editor(
            module.model.to(dtype=resolve_dtype(self.precision_name, self.root_device)),
            [Placeholder(self.placeholder, data.prepared[0].mask, source, str(item.image_path))],
            weights=f"finetuned:{item.id}:{seed}", cache_dir=None,
            renormalize=config.spatial.renormalize, progress=False, resolution=module.resolution,
        )
        report = {"steps": config.max_steps, "object": word, "prompt": source,
                  "method": module.method, "final": final.terms}
        return editor, source, targets, report


class FinalTerms(L.Callback):
    """Keeps the loss terms of the last fine-tuning step (for the item's report)."""

    def __init__(self) -> None:
        self.terms: dict[str, float] = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self.terms = {k.removeprefix("train/"): float(v) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------ writing


class ItemWriter(BasePredictionWriter):
    """Writes each item as soon as its predict step returns (:func:`write_item`), in every process."""

    def __init__(self, items_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.items_dir = Path(items_dir)

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: ItemOutput,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        write_item(self.items_dir / item_folder(prediction.item.id), prediction)


def write_item(folder: Path, output: ItemOutput) -> None:
    """Every file of one item, each atomically: images, masks, attention maps, metrics.json, then DONE.

    Whatever an interrupted attempt left in the folder is removed first, so a finished folder never mixes
    two attempts. A failed item gets only `error.txt` (no DONE: the next run retries it)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if output.error is not None:
        with atomic_path(folder / ITEM_ERROR) as tmp:
            tmp.write_text(output.error + "\n")
        return
    files = []
    for name, image in output.images.items():
        save_image(image, folder / name)
        files.append(name)
    for name, mask in output.masks.items():
        save_mask(mask, folder / "masks" / f"{name}.png")
        files.append(f"masks/{name}.png")
    for row, maps in output.attention.items():
        for word, attention in maps.items():
            path = f"attention/{row}/{slug(word)}.png"
            save_mask(attention, folder / path)  # each word's map is already divided by its maximum
            files.append(path)
    write_json(folder / ITEM_REPORT, {**output.report, "files": files})
    with atomic_path(folder / DONE) as tmp:  # last: the item counts as done only now
        tmp.write_text(json.dumps({"id": output.item.id, "finished_at": time.time()}) + "\n")
