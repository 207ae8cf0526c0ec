"""The items of an evaluation: their folders, seeds and shares, per-item prompts and settings, the check
of every item before any model loads, and the Lightning data module that serves the pending ones.

One item = one source image with its target prompt(s). Each finished item lives in `<out>/items/<id>/`
(:func:`item_folder`), with the completion marker `DONE` written last (:func:`is_done`). Multi-process
(`devices=N strategy=ddp`, also over nodes): Lightning's DistributedSampler pads the dataset by repeating
items; instead, every process takes `pending[rank::world_size]` of the pending items (:func:`shard`), so
no item is edited twice and none is skipped. Results do not depend on the number of processes: each
item's seed is a stable hash of the item id and the base seed (:func:`item_seed`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from editkit.errors import InputError
from editkit.files import slug
from editkit.images import cover_crop
from s2edit.editing.methods import edit_method
from s2edit.editing.request import EditRequest
from s2edit.evaluation.datasets import EditItem

ITEMS_DIR = "items"
DONE = "DONE"  # completion marker of an item, written last
ITEM_REPORT = "metrics.json"
ITEM_ERROR = "error.txt"

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_SEED_BITS = 62  # item seeds stay far inside torch's and the engine's range (< 2**63)


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


def item_request(item: EditItem, request: EditRequest, method: str, item_blend: bool) -> EditRequest:
    """The edit request of one item: the run's, with LocalBlend on the item's blend words when
    `item_blend` (as the method blends: :meth:`~s2edit.editing.methods.base.EditMethod.with_blend_words`)."""
    if not item_blend or item.blend_words is None:
        return request
    return edit_method(method).with_blend_words(request, *item.blend_words)


def check_items(
    items: Sequence[EditItem], request: EditRequest, *, method: str, item_blend: bool,
    placeholder: str | None, object_override: str | None,
) -> None:
    """Plan every item with the offline CLIP tokenizer before any model loads: a prompt that is too long,
    a word missing from a prompt, a setting that does not fit an item fails now, naming the item.
    `placeholder` is given when each item is fine-tuned (its prompts then hold it)."""
    from s2edit.core.tokenizer import clip_tokenizer
    from s2edit.editing.plan import Placeholder, plan_edit
    from s2edit.training.pairs import TrainingPair, check_pair

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
            plan_edit(tokenizer, placeholders, source, targets,
                      item_request(item, request, method, item_blend), method=method)
        except InputError as err:
            message = str(err)
            raise InputError(message if message.startswith("item '") else f"item '{item.id}': {message}") \
                from None


def mask_to_working_size(mask: torch.Tensor, image_size: tuple[int, int],
                         size: tuple[int, int]) -> torch.Tensor:
    """An edit mask (any size; True = edit region) → (H, W) float {0, 1} aligned with the working image:
    first to the image's own size (H, W), then the cover-resize and centre crop of
    `editkit.images.fit_image`, all nearest-neighbour (PIE-Bench masks are binary)."""
    mask = mask.float()[None, None]
    if tuple(mask.shape[-2:]) != tuple(image_size):
        mask = F.interpolate(mask, size=image_size, mode="nearest")
    (height, width), (image_height, image_width) = size, image_size
    (cover_width, cover_height), (left, top) = cover_crop((image_width, image_height), (width, height))
    mask = F.interpolate(mask, size=(cover_height, cover_width), mode="nearest")[0, 0]
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
