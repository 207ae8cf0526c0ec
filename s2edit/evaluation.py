"""Evaluation at scale (GitHub issue #14): edit every item of a dataset, score it, write it, summarise.

    module = EvaluationModule(config)                      # the system: an Editor (+ per-item fine-tuning)
    data = EvaluationDataModule(items, out / ITEMS_DIR)     # items not done yet, shared out over processes
    trainer = L.Trainer(..., inference_mode=False, use_distributed_sampler=False, callbacks=[ItemWriter(…)])
    trainer.predict(module, datamodule=data, return_predictions=False)
    write_report(items, out, …)                            # metrics.csv, summary.md/json, plots/

One item = one source image with its target prompt(s). Each finished item lives in
`<out>/items/<id>/`: `source.png`, `reconstruction.png`, `edit_<k>.png`, `masks/*.png`, `metrics.json`, and
the completion marker `DONE`, written LAST; every file goes through :func:`editkit.files.atomic_path`.
An item folder without `DONE` (a killed run's item in flight) is discarded and redone, so a rerun into the
same `out` resumes and loses at most the items that were in flight.

Multi-process (`devices=N strategy=ddp`, also over nodes): Lightning's DistributedSampler pads the
dataset by repeating items; instead, every process takes `pending[rank::world_size]` of the pending items
(:func:`shard`), so no item is edited twice and none is skipped. Results do not depend on the number of
processes: each item's seed is a stable hash of the item id and the base seed (:func:`item_seed`), and
items are edited one at a time.

Metrics per edit (SPEC §8, :class:`s2edit.metrics.MetricSuite`): against the preprocessed source image,
on the whole image and on the unedited region when the dataset gives an edit mask (PIE-Bench: the mask is
resized, nearest, to the working size with the same crop as the image); weight-backed metrics without
local weights are reported as skipped, never as numbers.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import hashlib
import json
import logging
import math
import re
import shutil
import statistics
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch.utils.data import DataLoader

from editkit.errors import InputError
from editkit.files import atomic_path, slug
from editkit.images import save_image, save_mask
from s2edit.config import TrainConfig
from s2edit.datasets import EditItem
from s2edit.evaluation_config import EvaluateConfig
from s2edit.plan import Placeholder, plan_edit
from s2edit.settings import MaskSettings, NullTextSettings, P2PSettings, SPLSettings, VirtualSettings

ITEMS_DIR = "items"
DONE = "DONE"  # completion marker of an item, written last
ITEM_REPORT = "metrics.json"
ITEM_ERROR = "error.txt"
METRICS_CSV = "metrics.csv"
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
PLOTS_DIR = "plots"
BY_EDIT_TYPE_PLOT = "metrics_by_edit_type.png"
COMPARE_MD, COMPARE_CSV, COMPARE_PLOT = "compare.md", "compare.csv", "compare.png"
SKIPPED = "skipped"

# PIE-Bench's editing_type_id (cure-lab/PnPInversion README)
EDIT_TYPES = {
    0: "random", 1: "change object", 2: "add object", 3: "delete object", 4: "change content",
    5: "change pose", 6: "change color", 7: "change material", 8: "change background", 9: "change style",
}

# metric key → (label, higher is better); the order of metrics.csv's columns and the summary's rows
METRICS: dict[str, tuple[str, bool]] = {
    "psnr": ("PSNR (dB)", True),
    "ssim": ("SSIM", True),
    "mse": ("MSE", False),
    "psnr_unedited": ("PSNR unedited (dB)", True),
    "ssim_unedited": ("SSIM unedited", True),
    "mse_unedited": ("MSE unedited", False),
    "mask_leak": ("mask leak", False),
    "structure_distance_spl": ("SPL structure distance", False),
    "lpips": ("LPIPS", False),
    "lpips_unedited": ("LPIPS unedited", False),
    "structure_distance": ("DINO structure distance", False),
    "clip_score": ("CLIP score", True),
    "clip_score_edit_region": ("CLIP score edit region", True),
    "clip_score_source": ("CLIP score source", True),
    "reconstruction_psnr": ("reconstruction PSNR (dB)", True),
    "spl_loss_before": ("SPL loss before post-processing", False),
    "spl_loss_after": ("SPL loss after post-processing", False),
}
ROW_INFO = ("id", "target_index", "edit_type", "edit_type_name", "method", "seed", "source_prompt",
            "target_prompt", "item_seconds")
# the metrics a person looks at first: (preferred, fallback when the preferred one has no numbers)
PLOT_METRICS = (("psnr_unedited", "psnr"), ("ssim_unedited", "ssim"), ("lpips_unedited", "lpips"),
                ("structure_distance", "structure_distance_spl"), ("clip_score", "clip_score_edit_region"))

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_SEED_BITS = 62  # item seeds stay far inside torch's and the engine's range (< 2**63)


# ------------------------------------------------------------------------------------------ items


def item_seed(item_id: str, seed: int) -> int:
    """The seed of one item: a stable hash of (base seed, item id), the same in every process and run."""
    digest = hashlib.sha256(f"{seed}\0{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _SEED_BITS)


def item_folder(item_id: str) -> str:
    """The folder name of an item: the id itself when it is a safe file name, else a slug + a short hash
    (ids with '/', spaces or unicode cannot collide after slugging)."""
    if _SAFE_ID.fullmatch(item_id) and item_id not in (DONE, ITEM_REPORT):
        return item_id
    return f"{slug(item_id)[:80]}-{hashlib.sha256(item_id.encode()).hexdigest()[:10]}"


def is_done(folder: Path) -> bool:
    return (folder / DONE).is_file()


def shard(items: Sequence[EditItem], rank: int, world_size: int) -> list[EditItem]:
    """This process's share of the items: every `world_size`-th from `rank` on. No padding, no repeats:
    the shares of all ranks partition the items."""
    return list(items[rank::world_size])


def check_item_folders(items: Sequence[EditItem]) -> None:
    seen: dict[str, str] = {}
    for item in items:
        name = item_folder(item.id).lower()  # case-insensitive file systems
        if name in seen:
            raise InputError(f"items '{seen[name]}' and '{item.id}' would share the folder '{name}': "
                             f"make the ids differ by more than case")
        seen[name] = item.id


def object_word(item: EditItem, configured: str | None) -> str:
    """The word [I] is learned for (per-item fine-tuning): `tune.object`, else the item's blend source
    word, else its one bracketed single-word source phrase."""
    if configured:
        return configured
    if item.blend_words is not None:
        return item.blend_words[0]
    if len(item.source_words) == 1 and len(item.source_words[0].split()) == 1:
        return item.source_words[0]
    raise InputError(f"item '{item.id}': no object word for fine-tuning: give the item blend_words, bracket "
                     f"one word of its source prompt, or set tune.object=")


def with_placeholder(prompt: str, word: str, placeholder: str) -> str | None:
    """`prompt` with `placeholder` before the first whole-word `word` ("a photo of a [I] cat"); None when
    the word is not in it."""
    match = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, flags=re.IGNORECASE)
    if match is None:
        return None
    return f"{prompt[: match.start()]}{placeholder} {prompt[match.start():]}"


def tuned_prompts(item: EditItem, placeholder: str, word: str) -> tuple[str, list[str]]:
    """(P̃, targets) of a fine-tuned item: [I] before the object word in the source, and in each target
    before the object word, else before the blend target word (the object's replacement), else none."""
    source = with_placeholder(item.source_prompt, word, placeholder)
    if source is None:
        raise InputError(f"item '{item.id}': object word '{word}' is not in its source prompt "
                         f"'{item.source_prompt}'")
    replacement = item.blend_words[1] if item.blend_words is not None else None
    targets = []
    for target in item.targets:
        edited = with_placeholder(target, word, placeholder)
        if edited is None and replacement is not None:
            edited = with_placeholder(target, replacement, placeholder)
        targets.append(edited or target)
    return source, targets


def item_settings(item: EditItem, method: str, p2p: P2PSettings, virtual: VirtualSettings,
                  item_blend: bool) -> tuple[P2PSettings, VirtualSettings]:
    """The method settings of one item: the run's, with the item's blend words when `item_blend`."""
    if not item_blend or item.blend_words is None:
        return p2p, virtual
    source_word, target_word = item.blend_words
    if method == "p2p":
        return dataclasses.replace(p2p, blend_words=[source_word, target_word]), virtual
    return p2p, dataclasses.replace(virtual, blend_target=[target_word])


def check_items(
    items: Sequence[EditItem], *, method: str, steps: int, p2p: P2PSettings, virtual: VirtualSettings,
    spl: SPLSettings, masks: MaskSettings, item_blend: bool, placeholder: str | None,
    object_override: str | None,
) -> None:
    """Plan every item with the offline CLIP tokenizer before any model loads: a prompt that is too long,
    a word missing from a prompt, a setting that does not fit an item fails now, naming the item.
    `placeholder` is given when each item is fine-tuned (its prompts then hold it)."""
    from s2edit.pairs import TrainingPair, check_pair
    from s2edit.tokenizer import clip_tokenizer

    base = clip_tokenizer()
    for item in items:
        source, targets = item.source_prompt, list(item.targets)
        tokenizer, placeholders = base, []
        try:
            if placeholder is not None:
                word = object_word(item, object_override)
                source, targets = tuned_prompts(item, placeholder, word)
                tokenizer = clip_tokenizer()  # check_pair adds the placeholder to a fresh copy
                check_pair(tokenizer, TrainingPair(str(item.image_path), source, placeholder, word))
                placeholders = [Placeholder(placeholder, None, source)]
            item_p2p, item_virtual = item_settings(item, method, p2p, virtual, item_blend)
            plan_edit(tokenizer, placeholders, source, targets, method=method, steps=steps, p2p=item_p2p,
                      virtual=item_virtual, spl=spl, masks=masks)
        except InputError as err:
            message = str(err)
            raise InputError(message if message.startswith("item '") else f"item '{item.id}': {message}") \
                from None


def mask_to_working_size(mask: torch.Tensor, image_size: tuple[int, int],
                         size: tuple[int, int]) -> torch.Tensor:
    """An edit mask (any size; True = edit region) → (H, W) float {0, 1} aligned with the working image:
    first to the image's own size, then the cover-resize and centre crop of `editkit.images.fit_image`,
    all nearest-neighbour (PIE-Bench masks are binary)."""
    mask = mask.float()[None, None]
    if tuple(mask.shape[-2:]) != tuple(image_size):
        mask = F.interpolate(mask, size=image_size, mode="nearest")
    (height, width), (image_height, image_width) = size, image_size
    scale = max(width / image_width, height / image_height)
    cover = (max(height, math.ceil(image_height * scale)), max(width, math.ceil(image_width * scale)))
    mask = F.interpolate(mask, size=cover, mode="nearest")[0, 0]
    top, left = (cover[0] - height) // 2, (cover[1] - width) // 2
    return mask[top: top + height, left: left + width].contiguous()


# ------------------------------------------------------------------------------------------ data


def _single(batch: list[EditItem]) -> EditItem:
    return batch[0]


class EvaluationDataModule(L.LightningDataModule):
    """The items not done yet in `items_dir`, each process taking its own share (:func:`shard`).

    `setup` runs in every process between Lightning's pre- and post-setup barriers, so all processes see
    the same finished items before any of them writes.
    """

    def __init__(self, items: Sequence[EditItem], items_dir: str | Path) -> None:
        super().__init__()
        self.allow_zero_length_dataloader_with_multiple_devices = True  # fewer pending items than processes
        self.items = list(items)
        self.items_dir = Path(items_dir)
        self.pending: list[EditItem] = []
        self.share: list[EditItem] = []

    def setup(self, stage: str | None = None) -> None:
        self.pending = [item for item in self.items if not is_done(self.items_dir / item_folder(item.id))]
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.share = shard(self.pending, rank, world_size)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.share, batch_size=1, shuffle=False, num_workers=0, collate_fn=_single)

    def transfer_batch_to_device(self, batch: EditItem, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # an EditItem (paths, prompts, a CPU mask): the editor moves what it needs


# ------------------------------------------------------------------------------------------ the system


@dataclass
class ItemOutput:
    """What `predict_step` hands to the writer: the edit (CPU tensors), its metrics, or the error."""

    item: EditItem
    seed: int
    report: dict[str, Any] = field(default_factory=dict)  # metrics.json, without "files"
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # file name → (1, 3, H, W)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # name → (H, W) in [0, 1]
    attention: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # row → word → (h, w)
    error: str | None = None


class EvaluationModule(L.LightningModule):
    """The evaluation system around an :class:`~s2edit.editing.Editor`: edit one item per predict step
    (optionally after fine-tuning [I] on its image), then score every edit.

    The model lives in the Editor, built on this process's device in `setup` (predict wraps nothing in
    DDP, so there is nothing to synchronise); with `finetune`, a fresh S2EditModule is built for every
    item instead, so no weights carry over from one item to the next.
    """

    def __init__(self, config: EvaluateConfig) -> None:
        super().__init__()

        self.save_hyperparameters({"config": dataclasses.asdict(config)})
        self.model_name = config.model
        self.precision_name = config.precision
        self.resolution = config.resolution
        self.base_seed = config.seed
        self.method = config.resolved_method()
        self.steps, self.guidance, self.inversion = config.steps, config.guidance, config.inversion
        self.spatial_control = config.spatial_control
        self.item_blend = config.item_blend
        self.cache_dir = config.cache_dir
        self.save_attention = config.save_attention
        self.continue_on_error = config.continue_on_error
        self.nti: NullTextSettings = config.nti
        self.p2p: P2PSettings = config.p2p
        self.virtual: VirtualSettings = config.virtual
        self.spl: SPLSettings = config.spl
        self.masks: MaskSettings = config.mask
        self.metric_weights = dataclasses.asdict(config.metrics)
        self.finetune = config.finetune
        tune = config.tune
        self.placeholder, self.object_word = tune.placeholder, tune.object
        # train.py's schema for one item; image, prompt, object and seed are filled in per item
        self.tune_template = TrainConfig(
            model=config.model, placeholder=tune.placeholder, resolution=config.resolution,
            max_steps=tune.steps, image_log_every=0, checkpoint_every=0, finetune=tune.finetune,
            semantic=tune.semantic, spatial=tune.spatial,
        )
        self.editor: Any = None
        self.suite: Any = None

    # ------------------------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str) -> None:
        from s2edit.editing import Editor
        from s2edit.metrics import MetricSuite

        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        # per-edit metrics here; FID is a set metric, computed over the written images by the report
        self.suite = MetricSuite(**{**self.metric_weights, "fid": None}, device=device)
        if not self.finetune:
            self.editor = Editor.from_model(
                self.model_name, device=str(device), precision=self.precision_name, seed=self.base_seed,
                cache_dir=self.cache_dir, progress=False, resolution=self.resolution,
            )

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
        p2p, virtual = item_settings(item, self.method, self.p2p, self.virtual, self.item_blend)

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

            # 2. Edit
            image = editor.load_image(item.image_path, self.resolution)
            if self.method == "p2p":
                start = time.perf_counter()
                inversion = editor.invert(image, source, method=self.inversion, steps=self.steps,
                                          guidance=self.guidance, nti=self.nti,
                                          spatial_control=self.spatial_control)
                timings["inversion"] = time.perf_counter() - start
                result = editor.edit(inversion, targets, p2p=p2p, spl=self.spl, masks=self.masks,
                                     spatial_control=self.spatial_control)
            else:
                result = editor.edit_virtual(image, source, targets, virtual=virtual, spl=self.spl,
                                             masks=self.masks, seed=seed,
                                             spatial_control=self.spatial_control)
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
        masks = {f"object_{slug(p.text)}": p.mask for p in editor.placeholders if p.mask is not None}
        masks = {name: F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0]
                 for name, m in {**masks, **result.masks}.items()}
        if edit_mask is not None:
            masks["edit_region"] = edit_mask
        images = {"source.png": result.source, "reconstruction.png": result.reconstruction}
        images.update({f"edit_{k}.png": result.images[k: k + 1] for k in range(len(item.targets))})
        attention = {}
        if self.save_attention:
            for row, maps in enumerate(result.attention_maps):
                attention["source" if row == 0 else f"target_{row - 1}"] = maps
        report = {
            "id": item.id,
            "image": str(item.image_path),
            "edit_type": item.edit_type,
            "edit_type_name": EDIT_TYPES.get(item.edit_type) if item.edit_type is not None else None,
            "instruction": item.instruction,
            "source_prompt": item.source_prompt,
            "edited_source_prompt": source,
            "method": self.method,
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
        return ItemOutput(item, seed, report, images, masks, attention)

    def tuned_editor(self, item: EditItem, seed: int) -> tuple[Any, str, list[str], dict[str, Any]]:
        """S2Edit fine-tuning of [I] on this item's image (a fresh copy of the base model, train.py's
        module and data), then an Editor on the tuned weights. Returns (editor, P̃, targets, report)."""
        from s2edit.data import S2EditDataModule
        from s2edit.editing import Editor, resolve_dtype
        from s2edit.module import S2EditModule
        from s2edit.pairs import TrainingPair

        word = object_word(item, self.object_word)
        source, targets = tuned_prompts(item, self.placeholder, word)
        config = dataclasses.replace(self.tune_template, image=str(item.image_path), prompt=source,
                                     object=word, seed=seed)
        pair = TrainingPair(str(item.image_path), source, self.placeholder, word)
        module = S2EditModule(config)  # loads the base weights again: nothing carries over between items
        data = S2EditDataModule([pair], module.sd, module.token_ids, config.max_steps, module.resolution,
                                config.spatial.mask_timesteps, config.spatial.mask_threshold, seed)
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        fit(module, data, config, device)
        module.to(device).eval()
        prepared = data.prepared[0]
        editor = Editor(
            module.sd.to(dtype=resolve_dtype(self.precision_name, device)),
            [Placeholder(self.placeholder, prepared.mask, source, str(item.image_path))],
            weights=f"finetuned:{item.id}:{seed}", cache_dir=None,
            renormalize=config.spatial.renormalize, progress=False, resolution=module.resolution,
        )
        report = {"steps": config.max_steps, "object": word, "prompt": source,
                  "method": config.finetune.method, "final": module.final_terms}
        return editor, source, targets, report


class _FinalTerms(L.Callback):
    """Keeps the loss terms of the last fine-tuning step (on the module, for the item's report)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        terms = trainer.callback_metrics
        pl_module.final_terms = {k.removeprefix("train/"): float(v) for k, v in terms.items()}


def fit(module: L.LightningModule, data: L.LightningDataModule, config: Any, device: torch.device) -> None:
    """train.py's fine-tuning (same module, data, precision and clipping) on this process's device, as a
    single-device Trainer inside the evaluation's predict step: no logger, checkpoints or progress bar."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    on_gpu = device.type == "cuda"
    # train.py's precision=auto: bf16 mixed precision on a GPU that has it, else fp32 (trainable weights fp32)
    precision = "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"
    if config.precision != "auto":
        precision = config.precision
    with quiet_lightning():  # "GPU available: …" once per item would drown the progress bar
        trainer = L.Trainer(
            accelerator="gpu" if on_gpu else "cpu", strategy=SingleDeviceStrategy(device=device),
            precision=precision, max_steps=config.max_steps, max_epochs=-1,
            gradient_clip_val=config.finetune.grad_clip or None, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=[_FinalTerms()],
        )
        module.final_terms = {}
        trainer.fit(module, datamodule=data)


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


def _write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str, allow_nan=True) + "\n")


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
    size = tuple(output.images["source.png"].shape[-2:])
    for row, maps in output.attention.items():
        for word, attention in maps.items():
            upsampled = F.interpolate(attention[None, None].float(), size=size, mode="bilinear")[0, 0]
            path = f"attention/{row}/{slug(word)}.png"
            save_mask(upsampled, folder / path)  # each word's map is already divided by its maximum
            files.append(path)
    _write_json(folder / ITEM_REPORT, {**output.report, "files": files})
    with atomic_path(folder / DONE) as tmp:  # last: the item counts as done only now
        tmp.write_text(json.dumps({"id": output.item.id, "finished_at": time.time()}) + "\n")


# ------------------------------------------------------------------------------------------ report


def _number(value: Any) -> float | None:
    """A metric value as a float (NaN included), or None for a skipped / missing one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and not value.startswith(SKIPPED):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def collect_items(items: Sequence[EditItem], items_dir: Path) -> tuple[list[dict], list[str], dict[str, str]]:
    """(reports of the finished items in dataset order, ids not finished, id → error of failed ones)."""
    reports, missing, failed = [], [], {}
    for item in items:
        folder = items_dir / item_folder(item.id)
        if is_done(folder):
            reports.append(json.loads((folder / ITEM_REPORT).read_text()))
        else:
            missing.append(item.id)
            if (folder / ITEM_ERROR).is_file():
                failed[item.id] = (folder / ITEM_ERROR).read_text().strip()
    return reports, missing, failed


def metric_rows(reports: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per (item, target): identification, then every metric (a float, NaN, or 'skipped')."""
    rows = []
    for report in reports:
        for target in report["targets"]:
            row: dict[str, Any] = {
                "id": report["id"], "target_index": target["index"], "edit_type": report["edit_type"],
                "edit_type_name": report["edit_type_name"], "method": report["method"],
                "seed": report["seed"],
                "source_prompt": report["source_prompt"], "target_prompt": target["prompt"],
                "item_seconds": report["timings"]["total"],
            }
            for key in METRICS:
                value = target["metrics"].get(key)
                row[key] = SKIPPED if isinstance(value, str) else (math.nan if value is None else value)
            rows.append(row)
    return rows


def write_metrics_csv(rows: Sequence[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=[*ROW_INFO, *METRICS])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in writer.fieldnames})


def read_metrics_csv(path: Path) -> list[dict[str, Any]]:
    """metrics.csv back as rows: metric cells as floats (NaN kept) or 'skipped'."""
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        for key in METRICS:
            cell = row.get(key, "")
            row[key] = SKIPPED if cell == SKIPPED else (_number(cell) if cell != "" else math.nan)
        edit_type = row.get("edit_type", "")
        row["edit_type"] = int(edit_type) if edit_type not in ("", None) else None
    return rows


@dataclass
class Stat:
    """mean ± sample std (n − 1) over the n non-NaN values; `skipped` holds the reason when no value is
    a number because the metric was skipped."""

    mean: float = math.nan
    std: float = math.nan
    n: int = 0
    skipped: bool = False

    def text(self, digits: int = 4) -> str:
        if self.skipped:
            return SKIPPED
        if self.n == 0:
            return "–"
        spread = f" ± {self.std:.{digits}g}" if self.n > 1 else ""
        return f"{self.mean:.{digits}g}{spread}"


def stat(values: Sequence[Any]) -> Stat:
    """Stat of metric values (floats, NaN, 'skipped'): NaN values are excluded from mean, std and n."""
    if values and all(isinstance(v, str) for v in values):
        return Stat(skipped=True)
    numbers = [float(v) for v in values if not isinstance(v, str) and not math.isnan(float(v))]
    if not numbers:
        return Stat()
    std = statistics.stdev(numbers) if len(numbers) > 1 else math.nan
    return Stat(statistics.fmean(numbers), std, len(numbers))


def edit_type_label(edit_type: int | None) -> str:
    if edit_type is None:
        return "no type"
    return f"{edit_type} {EDIT_TYPES.get(edit_type, '')}".strip()


def summarize(rows: Sequence[dict]) -> dict[str, dict[str, Stat]]:
    """metric → group ('all', then each edit type label in order) → Stat."""
    groups: dict[str, list[dict]] = {"all": list(rows)}
    for row in sorted(rows, key=lambda r: (r["edit_type"] is None, r["edit_type"] or 0)):
        groups.setdefault(edit_type_label(row["edit_type"]), []).append(row)
    return {key: {name: stat([r[key] for r in members]) for name, members in groups.items()}
            for key in METRICS}


def set_metrics(reports: Sequence[dict], items_dir: Path, items: Sequence[EditItem],
                weights: dict[str, Any]) -> dict[str, float | str]:
    """Metrics over the whole set: FID between the source images and the edits (or its skipped reason)."""
    from editkit.images import load_image
    from s2edit.metrics import MetricSuite

    suite = MetricSuite(fid=weights.get("fid"))
    if "fid" in suite.skipped():
        return {"fid": suite.skipped()["fid"]}
    folders = {item.id: items_dir / item_folder(item.id) for item in items}

    def images(kind: str) -> Iterator[torch.Tensor]:
        for report in reports:
            folder = folders[report["id"]]
            names = ["source.png"] if kind == "real" else [t["file"] for t in report["targets"]]
            for name in names:
                yield load_image(folder / name, resolution=None)

    return {"fid": suite.fid(images("real"), images("fake"))}


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def write_summary(out: Path, rows: Sequence[dict], summary: dict[str, dict[str, Stat]], *,
                  info: dict[str, Any], skipped: dict[str, str], missing: Sequence[str],
                  failed: dict[str, str], set_values: dict[str, float | str]) -> None:
    """summary.md (a person's view) and summary.json (the same numbers for tools)."""
    groups = list(next(iter(summary.values())))
    counts = {name: len({r["id"] for r in rows if name == "all" or edit_type_label(r["edit_type"]) == name})
              for name in groups}
    lines = [
        "# Evaluation summary", "",
        f"- dataset: `{info['data']}` — {info['items']} items; {info['done']} evaluated "
        f"({len(rows)} edits), {len(missing)} not finished" + (f", {len(failed)} failed" if failed else ""),
        f"- method: {info['method']} (model `{info['model']}`, seed {info['seed']}); settings: "
        f"`{info['config']}`",
        f"- item time: {info['item_seconds']:.1f} s in all, {info['seconds_per_item']:.2f} s per item",
        "",
        "Mean ± sample standard deviation over the edits whose value is a number (NaN = undefined for "
        "that edit, e.g. an edit mask covering the whole image, is excluded); `n` = edits counted. "
        "Unedited-region metrics: both images × (1 − edit mask) (PIE-Bench). ↑ higher is better, "
        "↓ lower is better.", "",
        "## Per edit type", "",
    ]
    header = ["metric", *(f"{g} ({counts[g]} item{'s' if counts[g] != 1 else ''})" for g in groups)]
    table = []
    for key, (label, higher) in METRICS.items():
        cells = []
        for group in groups:
            value = summary[key][group]
            cells.append(value.text() if value.skipped or value.n == 0 else f"{value.text()} (n={value.n})")
        table.append([f"{label} {'↑' if higher else '↓'}", *cells])
    lines += [*_md_table(header, table), ""]
    lines += ["## Set metrics", ""]
    lines += _md_table(["metric", "value"], [[name.upper(), str(value) if isinstance(value, str)
                                              else f"{value:.4g}"] for name, value in set_values.items()])
    lines.append("")
    if skipped:
        lines += ["## Skipped metrics", ""]
        lines += [f"- {name}: {reason}" for name, reason in skipped.items()]
        lines.append("")
    if failed:
        lines += ["## Failed items (retried by the next run)", ""]
        lines += [f"- `{item_id}`: {error}" for item_id, error in failed.items()]
        lines.append("")
    if missing and len(missing) != len(failed):
        unfinished = [i for i in missing if i not in failed]
        lines += ["## Not finished (rerun the same command to resume)", "",
                  ", ".join(f"`{i}`" for i in unfinished[:50]) + (" …" if len(unfinished) > 50 else ""), ""]
    with atomic_path(out / SUMMARY_MD) as tmp:
        tmp.write_text("\n".join(lines))
    as_json = {
        **info, "edits": len(rows), "missing": list(missing), "failed": failed, "skipped": skipped,
        "set_metrics": set_values,
        "metrics": {key: {group: dataclasses.asdict(value) for group, value in by_group.items()}
                    for key, by_group in summary.items()},
    }
    _write_json(out / SUMMARY_JSON, as_json)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _shown_metrics(summary: dict[str, dict[str, Stat]], edits: int) -> list[str]:
    """Of each PLOT_METRICS pair: the preferred metric when at least half the edits have it (unedited-region
    metrics need edit masks), else the fallback when it has numbers."""
    shown = []
    for preferred, fallback in PLOT_METRICS:
        if summary[preferred]["all"].n * 2 >= max(edits, 1):
            shown.append(preferred)
        elif summary[fallback]["all"].n > 0:
            shown.append(fallback)
    return shown


def plot_by_edit_type(summary: dict[str, dict[str, Stat]], edits: int, path: Path) -> Path:
    """A bar chart per metric: mean ± std (n on the bar) for all edits and for each edit type; a group
    without values is marked n/a."""
    plt = _pyplot()
    keys = _shown_metrics(summary, edits) or ["psnr"]
    groups = list(summary[keys[0]])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys) + 1, 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for index, group in enumerate(groups):
            s = summary[key][group]
            if s.n == 0:
                ax.text(index, 0, "n/a", ha="center", va="bottom", fontsize=7, color="gray")
                continue
            ax.bar(index, s.mean, yerr=_zero_nan(s.std), color="#444444" if index == 0 else "#4C72B0",
                   capsize=3)
            ax.text(index, s.mean / 2, f"n={s.n}", ha="center", va="center", fontsize=6, color="white",
                    rotation=90)
        label, higher = METRICS[key]
        ax.set_title(f"{label} {'↑' if higher else '↓'}", fontsize=9)
        ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("Metrics per edit type (mean ± std; dark: all edits)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def write_report(items: Sequence[EditItem], out: Path, *, info: dict[str, Any],
                 weights: dict[str, Any]) -> dict[str, Any]:
    """metrics.csv, summary.md / summary.json and plots/ of a run, from the item folders on disk (so a
    resumed run reports the items of earlier runs too). Returns summary.json's content."""
    items_dir = out / ITEMS_DIR
    reports, missing, failed = collect_items(items, items_dir)
    rows = metric_rows(reports)
    write_metrics_csv(rows, out / METRICS_CSV)
    skipped: dict[str, str] = {}
    for report in reports:
        skipped.update(report.get("skipped_metrics", {}))
    item_seconds = sum(r["timings"]["total"] for r in reports)
    info = {**info, "items": len(items), "done": len(reports), "item_seconds": item_seconds,
            "seconds_per_item": item_seconds / max(len(reports), 1)}
    summary = summarize(rows)
    set_values = set_metrics(reports, items_dir, items, weights) if reports else {"fid": "no items"}
    skipped.update({k: v for k, v in set_values.items() if isinstance(v, str) and v.startswith(SKIPPED)})
    write_summary(out, rows, summary, info=info, skipped=skipped, missing=missing, failed=failed,
                  set_values=set_values)
    if rows:
        plot_by_edit_type(summary, len(rows), out / PLOTS_DIR / BY_EDIT_TYPE_PLOT)
    return json.loads((out / SUMMARY_JSON).read_text())


# ------------------------------------------------------------------------------------------ comparing runs


def trade_off_axes(summaries: Sequence[dict[str, dict[str, Stat]]]) -> tuple[str, str, str]:
    """(x metric, y metric, note) of the trade-off plot: LPIPS vs CLIP score when every run has them, else
    the SPL structure distance and/or PSNR, saying which was replaced."""
    def available(key: str) -> bool:
        return all(s[key]["all"].n > 0 for s in summaries)

    x = "lpips" if available("lpips") else "structure_distance_spl"
    y = "clip_score" if available("clip_score") else "psnr"
    replaced = [f"{wanted} → {METRICS[used][0]}" for wanted, used, preferred in
                (("LPIPS", x, "lpips"), ("CLIP score", y, "clip_score")) if used != preferred]
    note = ("" if not replaced else
            f"CLIP/LPIPS not computed in every run (no local weights): plotted {', '.join(replaced)}")
    return x, y, note


def compare_runs(runs: Sequence[str | Path], names: Sequence[str], out: str | Path) -> dict[str, Any]:
    """One table (compare.md, compare.csv) and one trade-off plot (compare.png) of several runs' overall
    means. Returns {"runs": …, "x": …, "y": …, "note": …}."""
    if len(runs) < 1:
        raise InputError("no runs to compare: pass runs=[outputs/eval_a, outputs/eval_b]")
    if names and len(names) != len(runs):
        raise InputError(f"names= has {len(names)} labels for {len(runs)} runs: give one per run")
    labels = list(names) or [Path(r).name or str(r) for r in runs]
    if len(set(labels)) != len(labels):
        raise InputError(f"run labels {labels} are not unique: pass names=[…]")
    all_rows = []
    for run in runs:
        path = Path(run) / METRICS_CSV
        if not path.is_file():
            raise InputError(f"run '{run}' has no {METRICS_CSV}: run evaluate.py data=… out={run} first")
        all_rows.append(read_metrics_csv(path))
    summaries = [summarize(rows) for rows in all_rows]
    out = Path(out)
    x, y, note = trade_off_axes(summaries)

    # 1. The table: one row per run, the overall mean ± std (n) of every metric
    keys = list(METRICS)
    header = ["run", "items", *(f"{METRICS[k][0]} {'↑' if METRICS[k][1] else '↓'}" for k in keys)]
    table = []
    for label, rows, summary in zip(labels, all_rows, summaries):
        cells = [s.text() if s.skipped or s.n == 0 else f"{s.text()} (n={s.n})"
                 for s in (summary[k]["all"] for k in keys)]
        table.append([label, str(len({r["id"] for r in rows})), *cells])
    lines = ["# Comparison", "", f"Runs: {', '.join(f'`{r}`' for r in runs)}. Overall mean ± sample std "
             "over non-NaN values (n = edits counted).", "", *_md_table(header, table), ""]
    lines += [f"Trade-off plot: `{COMPARE_PLOT}`, {METRICS[x][0]} (x) against {METRICS[y][0]} (y)."
              + (f" {note}." if note else ""), ""]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / COMPARE_MD) as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(out / COMPARE_CSV) as tmp, open(tmp, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["run", "metric", "mean", "std", "n", "skipped"])
        for label, summary in zip(labels, summaries):
            for key in keys:
                s = summary[key]["all"]
                writer.writerow([label, key, s.mean, s.std, s.n, s.skipped])

    # 2. The plot: per-edit points (faint) and each run's mean ± std
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for index, (label, rows, summary) in enumerate(zip(labels, all_rows, summaries)):
        color = f"C{index % 10}"
        points = [(r[x], r[y]) for r in rows if _finite(r[x]) and _finite(r[y])]
        if points:
            ax.scatter(*zip(*points), s=10, alpha=0.25, color=color)
        sx, sy = summary[x]["all"], summary[y]["all"]
        if sx.n and sy.n:
            ax.errorbar(sx.mean, sy.mean, xerr=_zero_nan(sx.std), yerr=_zero_nan(sy.std), fmt="o",
                        color=color, capsize=3, label=label)
    ax.set_xlabel(f"{METRICS[x][0]} {'↑' if METRICS[x][1] else '↓'}")
    ax.set_ylabel(f"{METRICS[y][0]} {'↑' if METRICS[y][1] else '↓'}")
    title = "Edit quality trade-off (runs: mean ± std; dots: edits)"
    ax.set_title("\n".join([title, *textwrap.wrap(note, 80)]), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / COMPARE_PLOT) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return {"runs": labels, "x": x, "y": y, "note": note}


def _finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def _zero_nan(value: float) -> float:
    return 0.0 if math.isnan(value) else value


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


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
