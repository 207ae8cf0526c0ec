"""Edit datasets for evaluation: PIE-Bench's `mapping_file.json`, and a simple JSONL / CSV format.

Every reader returns a list of :class:`EditItem`, in file order. A bad row stops the read with one
:class:`~editkit.errors.InputError` line naming the file, the line (JSONL / CSV) or id (PIE-Bench) and the
field.

**PIE-Bench** (cure-lab/PnPInversion, SPEC §8). Layout::

    <root>/mapping_file.json
    <root>/annotation_images/<image_path>    e.g. 1_change_object_80/1_artificial/1_animal/111000000000.jpg

`mapping_file.json` maps each id to `image_path` (relative to `annotation_images/`), `original_prompt`,
`editing_prompt` (the edited words in ``[ ]``), `editing_instruction`, `editing_type_id` (digits, "0"
random … "9" style), `blended_word` ("src tgt", or "" for none) and `mask`: run-length pairs
``[start, length, …]`` over the row-major flattened 512×512 image, 1 = edit region. Brackets are deleted
from both prompts before use, as the reference scripts do; the bracketed words are kept as `edited_words` /
`source_words`.

**JSONL / CSV.** One item per line (JSONL: a JSON object; CSV: a row under a header line). Columns:

=============  ========  =====================================================================================
column         required  meaning
=============  ========  =====================================================================================
`image`        yes       image file, relative to the dataset file's folder (or absolute)
`source`       yes       source prompt; words in ``[ ]`` are recorded as `source_words`, the brackets removed
`target`       yes       target prompt(s): JSONL a string or a list of strings; CSV prompts separated by ``|``
                         Words in ``[ ]`` are the edited words (`edited_words`, one tuple per target).
`id`           no        unique item id (default: the line number)
`mask`         no        mask image (white = edit region), relative like `image`; resized to the image's size
                         and binarised at 0.5
`blend_words`  no        two words "src tgt" for a local blend (JSONL also a list of two strings)
`edit_type`    no        integer ≥ 0 (PIE-Bench's numbering: 0 random … 9 style)
`instruction`  no        free-text editing instruction
=============  ========  =====================================================================================

Empty CSV cells and JSON nulls mean "not given". Unknown columns are refused (a misspelt `taget` would
otherwise be dropped silently). :func:`read_dataset` picks the reader from the path.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from editkit.errors import InputError
from editkit.images import load_mask

__all__ = [
    "PIE_IMAGES_DIR",
    "PIE_MAPPING_FILE",
    "PIE_MASK_SIZE",
    "EditItem",
    "decode_pie_mask",
    "read_csv",
    "read_dataset",
    "read_jsonl",
    "read_pie_bench",
    "strip_brackets",
]

# PIE-Bench's editing_type_id (cure-lab/PnPInversion README)
EDIT_TYPES = {
    0: "random", 1: "change object", 2: "add object", 3: "delete object", 4: "change content",
    5: "change pose", 6: "change color", 7: "change material", 8: "change background", 9: "change style",
}
PIE_MAPPING_FILE = "mapping_file.json"
PIE_IMAGES_DIR = "annotation_images"
PIE_MASK_SIZE = (512, 512)  # (H, W): PIE-Bench masks are encoded over 512×512 images
MASK_THRESHOLD = 0.5  # mask images are binarised here (PIE-Bench masks are binary)
TARGET_SEPARATOR = "|"  # several targets in one CSV cell
COLUMNS = ("id", "image", "source", "target", "mask", "blend_words", "edit_type", "instruction")
REQUIRED_COLUMNS = ("image", "source", "target")
_BRACKETED = re.compile(r"\[([^\[\]]*)\]")


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields have no boolean equality
class EditItem:
    """One source image with its prompts and optional edit mask."""

    id: str
    image_path: Path
    source_prompt: str  # brackets removed
    targets: tuple[str, ...]  # ≥ 1 target prompts, brackets removed
    mask: Tensor | None = None  # (H, W) bool, True = edit region; PIE-Bench: 512×512 with the border set
    blend_words: tuple[str, str] | None = None  # (source word, target word)
    edited_words: tuple[tuple[str, ...], ...] = ()  # per target: the phrases that were in [ ]
    source_words: tuple[str, ...] = ()  # the phrases in [ ] in the source prompt
    edit_type: int | None = None
    instruction: str | None = None


# --------------------------------------------------------------------------------------------------- helpers


def strip_brackets(prompt: str, strict: bool = True) -> tuple[str, tuple[str, ...]]:
    """Remove ``[`` and ``]`` from `prompt`; return (prompt, the bracketed phrases, whitespace-trimmed).

    "a [rusty] bike" → ("a rusty bike", ("rusty",)). `strict` refuses unbalanced or nested brackets
    (ValueError); PIE-Bench's reader is lenient like the reference scripts (every bracket is deleted).
    """
    phrases = tuple(p.strip() for p in _BRACKETED.findall(prompt))
    outside = _BRACKETED.sub("", prompt)
    if strict and ("[" in outside or "]" in outside):
        raise ValueError(f"unbalanced or nested brackets in {prompt!r}")
    return prompt.replace("[", "").replace("]", ""), phrases


def decode_pie_mask(encoded: Sequence[int], size: tuple[int, int] = PIE_MASK_SIZE) -> Tensor:
    """PIE-Bench's run-length mask → (H, W) bool, True = edit region (PnPInversion `mask_decode`).

    `encoded` = [start, length, …] over the row-major flattened image; runs past the end are clipped, and
    the one-pixel border is set to True like the reference ("to avoid annotation errors in boundary").
    Raises ValueError on an odd count, non-integers, a start outside the image or a negative length.
    """
    height, width = size
    numel = height * width
    if len(encoded) % 2:
        raise ValueError(f"needs [start, length] pairs, got {len(encoded)} values")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in encoded):
        raise ValueError("values must be integers")
    runs = torch.tensor(list(encoded), dtype=torch.int64).view(-1, 2)  # (R, 2)
    starts, lengths = runs[:, 0], runs[:, 1]
    if runs.numel() and (starts.min() < 0 or starts.max() >= numel):
        raise ValueError(f"run start outside the {height}x{width} image")
    if runs.numel() and lengths.min() < 0:
        raise ValueError("negative run length")
    ends = torch.clamp(starts + lengths, max=numel)  # the reference clips runs at the end of the image
    # +1 at each start, −1 at each end; the running sum is > 0 inside a run (overlapping runs add up).
    delta = torch.zeros(numel + 1, dtype=torch.int64)
    delta.index_add_(0, starts, torch.ones_like(starts))
    delta.index_add_(0, ends, -torch.ones_like(ends))
    mask = (delta.cumsum(0)[:numel] > 0).view(height, width)
    mask[0, :] = mask[-1, :] = True
    mask[:, 0] = mask[:, -1] = True
    return mask


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the image header, without decoding the pixels. Raises ValueError when unreadable."""
    if not path.is_file():
        raise ValueError(f"'{path}' does not exist" if not path.exists() else f"'{path}' is not a file")
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"'{path}' is not a readable image ({err})") from None


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _blend_words(value: Any) -> tuple[str, str] | None:
    """ "src tgt" or ["src", "tgt"] → (src, tgt); "" / None → None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        words = value.split()
    elif isinstance(value, list) and all(isinstance(w, str) for w in value):
        words = [w.strip() for w in value]
    else:
        raise ValueError(f"must be two words 'src tgt', got {value!r}")
    if len(words) != 2 or not all(words):
        raise ValueError(f"must be two words 'src tgt', got {value!r}")
    return words[0], words[1]


def _edit_type(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"must be an integer ≥ 0, got {value!r}")


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value.strip()


class _Row:
    """Error context of one row: every problem becomes `InputError('<where>: field '<f>': <why>')`."""

    def __init__(self, where: str) -> None:
        self.where = where

    def error(self, field: str, why: str) -> InputError:
        return InputError(f"{self.where}: field '{field}': {why}")


# ------------------------------------------------------------------------------------------------ PIE-Bench


def read_pie_bench(
    path: str | Path, images_dir: str | Path | None = None, edit_types: Iterable[int] | None = None
) -> list[EditItem]:
    """Read PIE-Bench: `path` is the dataset root or its `mapping_file.json`.

    Images are looked up under `images_dir` (default `<root>/annotation_images`); `edit_types` keeps only
    those `editing_type_id`s. Each item has one target and its decoded (512, 512) bool mask (256 KiB; the
    700 items of PIE-Bench hold about 180 MB of masks).
    """
    path = Path(path).expanduser()
    mapping_file = path / PIE_MAPPING_FILE if path.is_dir() else path
    if not mapping_file.is_file():
        raise InputError(f"PIE-Bench mapping file '{mapping_file}' does not exist")
    images = Path(images_dir).expanduser() if images_dir is not None else mapping_file.parent / PIE_IMAGES_DIR
    try:
        mapping = json.loads(mapping_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"'{mapping_file}' is not a readable JSON file: {err}") from None
    if not isinstance(mapping, dict):
        raise InputError(f"'{mapping_file}' must hold a JSON object {{id: entry}}, "
                         f"got {type(mapping).__name__}")
    keep = None if edit_types is None else set(edit_types)

    items = []
    for key, entry in mapping.items():
        row = _Row(f"{mapping_file}: id {key}")
        if not isinstance(entry, dict):
            raise InputError(f"{row.where}: entry must be a JSON object, got {type(entry).__name__}")
        for field in ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "mask"):
            if field not in entry:
                raise row.error(field, "missing")
        try:
            edit_type = _edit_type(entry["editing_type_id"])
        except ValueError as err:
            raise row.error("editing_type_id", str(err)) from None
        if keep is not None and edit_type not in keep:
            continue
        prompts = {}
        for field in ("original_prompt", "editing_prompt"):
            if not isinstance(entry[field], str):
                raise row.error(field, f"must be a string, got {entry[field]!r}")
            prompts[field] = strip_brackets(entry[field], strict=False)
        try:
            blend = _blend_words(entry.get("blended_word"))
        except ValueError as err:
            raise row.error("blended_word", str(err)) from None
        if not isinstance(entry["mask"], list):
            raise row.error("mask", f"must be a list [start, length, …], got {type(entry['mask']).__name__}")
        try:
            mask = decode_pie_mask(entry["mask"])
        except ValueError as err:
            raise row.error("mask", str(err)) from None
        if not isinstance(entry["image_path"], str) or not entry["image_path"]:
            raise row.error("image_path", f"must be a non-empty string, got {entry['image_path']!r}")
        image_path = images / entry["image_path"]
        try:
            _image_size(image_path)
        except ValueError as err:
            raise row.error("image_path", str(err)) from None
        instruction = entry.get("editing_instruction")
        items.append(
            EditItem(
                id=str(key),
                image_path=image_path,
                source_prompt=prompts["original_prompt"][0],
                targets=(prompts["editing_prompt"][0],),
                mask=mask,
                blend_words=blend,
                edited_words=(prompts["editing_prompt"][1],),
                source_words=prompts["original_prompt"][1],
                edit_type=edit_type,
                instruction=instruction if isinstance(instruction, str) and instruction else None,
            )
        )
    return items


# ------------------------------------------------------------------------------------------------ JSONL / CSV


def _checked(row: _Row, field: str, value: Any) -> str:
    try:
        return _text(value)
    except ValueError as err:
        raise row.error(field, str(err)) from None


def _item_from_record(record: dict[str, Any], row: _Row, base: Path, default_id: str) -> EditItem:
    """Check one JSONL object / CSV row (columns of the module docstring) and build its EditItem."""
    unknown = sorted(set(record) - set(COLUMNS))
    if unknown:
        raise InputError(f"{row.where}: unknown column(s) {', '.join(map(repr, unknown))}; "
                         f"expected {', '.join(COLUMNS)}")
    record = {k: v for k, v in record.items() if v is not None and v != ""}  # empty = not given
    for field in REQUIRED_COLUMNS:
        if field not in record:
            raise row.error(field, "missing")

    image_path = _resolve(base, _checked(row, "image", record["image"]))
    try:
        size = _image_size(image_path)
    except ValueError as err:
        raise row.error("image", str(err)) from None
    try:
        source, source_words = strip_brackets(_text(record["source"]))
    except ValueError as err:
        raise row.error("source", str(err)) from None

    raw_targets = record["target"]
    if isinstance(raw_targets, str):
        raw_targets = raw_targets.split(TARGET_SEPARATOR)
    if not isinstance(raw_targets, list) or not raw_targets:
        raise row.error("target", f"must be a prompt or a non-empty list of prompts, got {raw_targets!r}")
    targets, edited_words = [], []
    for raw in raw_targets:
        try:
            target, words = strip_brackets(_text(raw))
        except ValueError as err:
            raise row.error("target", str(err)) from None
        targets.append(target)
        edited_words.append(words)

    mask = None
    if "mask" in record:
        mask_path = _resolve(base, _checked(row, "mask", record["mask"]))
        try:
            mask = load_mask(mask_path, size) >= MASK_THRESHOLD
        except InputError as err:
            raise row.error("mask", str(err)) from None
    fields: dict[str, Any] = {}
    for field, parse in (("blend_words", _blend_words), ("edit_type", _edit_type)):
        try:
            fields[field] = parse(record.get(field))
        except ValueError as err:
            raise row.error(field, str(err)) from None
    instruction = _checked(row, "instruction", record["instruction"]) if "instruction" in record else None
    item_id = record.get("id", default_id)
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        raise row.error("id", f"must be a string or an integer, got {item_id!r}")
    return EditItem(
        id=str(item_id).strip(),
        image_path=image_path,
        source_prompt=source,
        targets=tuple(targets),
        mask=mask,
        edited_words=tuple(edited_words),
        source_words=source_words,
        instruction=instruction,
        **fields,
    )


def _unique(items: list[EditItem], path: Path) -> list[EditItem]:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise InputError(f"{path}: id '{item.id}' appears more than once; ids must be unique")
        seen.add(item.id)
    return items


def _open_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"dataset file '{path}' does not exist")
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"dataset file '{path}' is not readable UTF-8 text: {err}") from None


def read_jsonl(path: str | Path) -> list[EditItem]:
    """Read the JSONL format (module docstring): one JSON object per non-empty line."""
    path = Path(path).expanduser()
    items = []
    for number, line in enumerate(_open_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        row = _Row(f"{path}:{number}")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{row.where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{row.where}: must be a JSON object, got {type(record).__name__}")
        items.append(_item_from_record(record, row, path.parent, default_id=str(number)))
    return _unique(items, path)


def read_csv(path: str | Path) -> list[EditItem]:
    """Read the CSV format (module docstring): a header line, then one item per row."""
    path = Path(path).expanduser()
    reader = csv.DictReader(_open_text(path).splitlines())
    header = [name.strip() for name in reader.fieldnames or []]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise InputError(f"{path}:1: header lacks column(s) {', '.join(missing)}; got {', '.join(header)}")
    items = []
    for record in reader:
        row = _Row(f"{path}:{reader.line_num}")
        if None in record:  # more cells than header columns
            cells = len(header) + len(record[None])
            raise InputError(f"{row.where}: {cells} cells for {len(header)} columns")
        cleaned = {k.strip(): v.strip() if isinstance(v, str) else v for k, v in record.items()}
        if not any(cleaned.values()):
            continue  # a blank row
        items.append(_item_from_record(cleaned, row, path.parent, default_id=str(reader.line_num)))
    return _unique(items, path)


def read_dataset(path: str | Path, edit_types: Iterable[int] | None = None) -> list[EditItem]:
    """Read any supported dataset: a `.jsonl` / `.csv` file, or PIE-Bench (its root or mapping `.json`).

    `edit_types` keeps only items of those types (items without a type are dropped when it is given).
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".json":
        return read_pie_bench(path, edit_types=edit_types)
    if suffix == ".jsonl":
        items = read_jsonl(path)
    elif suffix == ".csv":
        items = read_csv(path)
    else:
        raise InputError(f"dataset '{path}': unknown format (use .jsonl, .csv, or a PIE-Bench folder / "
                         f"{PIE_MAPPING_FILE})")
    if edit_types is not None:
        keep = set(edit_types)
        items = [item for item in items if item.edit_type in keep]
    return items
