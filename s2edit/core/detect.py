"""Which model family `model=` names, told from files alone (no torch, diffusers or transformers import), so
the scripts can choose and refuse a method in one line before anything heavy loads.

A preset's family is in its `preset.json`; a folder's (or a cached hub id's) in `model_index.json`'s
pipeline class. :mod:`s2edit.core.loading` keeps the family classes; a test holds the two tables here
(names, labels) equal to theirs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent / "presets"  # package data: one folder per random preset
PRESET_FILE = "preset.json"
MODEL_INDEX = "model_index.json"
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
FLOW_FAMILIES = ("flux", "sd3")  # rectified-flow transformers: they edit with method=flowedit only
FLOW_METHOD = "flowedit"
LABELS = {"flux": "FLUX.1", "sd3": "Stable Diffusion 3", "sdxl": "SDXL", "sd2": "Stable Diffusion",
          "sd1": "Stable Diffusion"}
# model_index.json pipeline class prefix → family, most specific first (SD 1.x / 2.x need their configs)
PIPELINES = (("StableDiffusion3", "sd3"), ("Flux", "flux"), ("StableDiffusionXL", "sdxl"))


def looks_like_path(model: str) -> bool:
    """A hub id is `name` or `owner/name`; anything that exists, or starts like a path, is a folder."""
    return Path(model).expanduser().exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1


def preset_family(name: str) -> str | None:
    """The family of preset `name` (following its `base`), None when it is no preset."""
    file = PRESET_DIR / name / PRESET_FILE
    if not file.is_file():
        return None
    info = json.loads(file.read_text())
    return info.get("family") or (preset_family(info["base"]) if info.get("base") else None)


def pipeline_class(model: str) -> str:
    """`model_index.json`'s `_class_name` of a folder or a cached hub id ("" when unknown)."""
    try:
        if looks_like_path(model):
            index = json.loads((Path(model).expanduser() / MODEL_INDEX).read_text())
        elif HUB_ID.fullmatch(model):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, MODEL_INDEX)
            if not isinstance(cached, str):
                return ""
            index = json.loads(Path(cached).read_text())
        else:
            return ""
    except (OSError, ValueError):
        return ""
    name = index.get("_class_name", "") if isinstance(index, dict) else ""
    return name if isinstance(name, str) else ""


def family_name(model: str) -> str | None:
    """The family `model=` names when the files tell it without loading (a preset, or a pipeline class of
    a family that has one), else None (SD 1.x / 2.x are told from their component configs while loading)."""
    preset = preset_family(model)
    if preset is not None:
        return preset
    pipeline = pipeline_class(model)
    return next((family for prefix, family in PIPELINES if pipeline.startswith(prefix)), None)


def method_refusal(method: str, family: str, model: str) -> str | None:
    """Why `method` cannot edit `model` of `family` (one line), or None when it can: flowedit runs on the
    flow families only, every other method on the UNet families only."""
    flow = family in FLOW_FAMILIES
    if (method == FLOW_METHOD) == flow:
        return None
    hint = ("flow models edit with method=flowedit" if flow
            else "method=flowedit runs on flow models (SD3, FLUX); use p2p or virtual")
    return f"method={method} does not run on model '{model}' ({LABELS.get(family, family)}): {hint}"


def flow_refusal(family: str, model: str, what: str) -> str | None:
    """Why `what` (fine-tuning, a LoRA) cannot use a flow model (one line), or None for a UNet family."""
    if family not in FLOW_FAMILIES:
        return None
    return (f"model '{model}' is {LABELS[family]}, a flow-matching model: {what} needs a UNet family "
            f"(SD 1.x / 2.x, SDXL); flow models edit with method=flowedit")


def offload_refusal(model: str, family: str | None, device: str | None = None) -> str | None:
    """Why `offload=true` cannot run `model` of `family` on `device` (one line), or None: it is model CPU
    offload of the flow families' large components, onto an accelerator (the library API takes any
    device: `device=None` skips that check)."""
    if family is not None and family not in FLOW_FAMILIES:
        return (f"offload=true is for the flow families (SD3, FLUX), not model '{model}' "
                f"({LABELS.get(family, family)})")
    if device is not None and (device == "cpu" or device.startswith("cpu:")):
        return ("offload=true moves each component to an accelerator when it runs: it needs a GPU, not "
                "device=cpu")
    return None
