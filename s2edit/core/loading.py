"""Loading a model family from what `model=` names (SPEC §2–§3, §10).

:func:`load_model` accepts a hub id, a local diffusers folder, or a random preset (`tiny`, `tiny-lcm`,
`tiny-v`, `sd-v1-random`: the folders of `s2edit/core/presets/`, shipped as package data). The family is
detected from the folder (`model_index.json`'s pipeline class and the component configs), with no flag;
a preset names its own. A model that cannot be found fails fast with one line saying what to pass.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from huggingface_hub import constants as hub_constants
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from editkit.errors import InputError
from s2edit.core.family import ModelFamily
from s2edit.core.settings import DEFAULT_MODEL
from s2edit.core.stable_diffusion import StableDiffusion, StableDiffusion2
from s2edit.core.tokenizer import clip_tokenizer

# The model families, in detection order: the first whose `matches` accepts a folder loads it (a family
# that needs more than SD's components is listed before SD, which takes any UNet + CLIP folder).
FAMILIES: dict[str, type[StableDiffusion]] = {"sd1": StableDiffusion, "sd2": StableDiffusion2}

PRESET_DIR = Path(__file__).resolve().parent / "presets"  # package data: one folder per random preset
PRESET_FILE = "preset.json"
PRESET_PARTS = ("unet", "vae", "text_encoder", "scheduler")
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
HUB_PROBE_TIMEOUT_S = 3.0  # a reachable hub answers a TCP connect well within this
LOAD_HINT = "pass a local diffusers folder (model=/path/to/stable-diffusion-v1-4) or model=tiny"
MODEL_INDEX = "model_index.json"


class _EmptyFloat32ListFilter(logging.Filter):
    """diffusers warns on every `.to(dtype)` that "modules ... should be kept in float32: []" even when
    the list is empty; that line is noise (on a CLI whose refusals are one line, in every bf16 run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


_DIFFUSERS_MODELING_LOGGER = logging.getLogger("diffusers.models.modeling_utils")
if not any(isinstance(f, _EmptyFloat32ListFilter) for f in _DIFFUSERS_MODELING_LOGGER.filters):
    _DIFFUSERS_MODELING_LOGGER.addFilter(_EmptyFloat32ListFilter())

# What a diffusers Stable Diffusion folder must hold: per component, alternatives of files (any one will do).
REQUIRED_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "unet": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                                "diffusion_pytorch_model.safetensors.index.json",
                                "diffusion_pytorch_model.bin.index.json")),
    "vae": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                               "diffusion_pytorch_model.safetensors.index.json")),
    "text_encoder": (("config.json",), ("model.safetensors", "pytorch_model.bin",
                                        "model.safetensors.index.json", "pytorch_model.bin.index.json")),
    "tokenizer": (("tokenizer.json", "vocab.json"),),
    "scheduler": (("scheduler_config.json",),),
}


def ddim_scheduler(config_or_scheduler: Any) -> DDIMScheduler:
    """The DDIM scheduler of SPEC §3, from a model's scheduler (or its config): the model's betas,
    prediction type and `steps_offset`, with `clip_sample=False` and `set_alpha_to_one=False`.

    Timesteps: SPEC §3 writes 980…0 (steps_offset 0). SD1 configs carry `steps_offset: 1`, and the NTI
    reference ran its DDIMScheduler through `StableDiffusionPipeline`, which forces `steps_offset=1`, so it
    denoised at 981, 961, …, 1. We keep the model's value (SD1: 981…1 for 50 steps) to match it.
    """
    config = getattr(config_or_scheduler, "config", config_or_scheduler)
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a scheduler or its config, got {type(config_or_scheduler).__name__}")
    return DDIMScheduler.from_config(dict(config), clip_sample=False, set_alpha_to_one=False)


# ----------------------------------------------------------------------------------------- presets


def preset_names() -> list[str]:
    """The random presets that ship with the package (folders of `presets/`)."""
    return sorted(p.parent.name for p in PRESET_DIR.glob(f"*/{PRESET_FILE}"))


def _preset_configs(name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(preset.json, {part: config}) of a preset, parts it lacks taken from its `base` preset."""
    folder = PRESET_DIR / name
    info = json.loads((folder / PRESET_FILE).read_text())
    base = info.get("base")
    configs = _preset_configs(base)[1] if base else {}
    for part in PRESET_PARTS:
        file = folder / f"{part}.json"
        if file.is_file():
            configs[part] = json.loads(file.read_text())
    missing = [part for part in PRESET_PARTS if part not in configs]
    if missing:
        raise ValueError(f"preset '{name}' has no config for {missing}")
    return info, configs


def random_model(name: str = "tiny", seed: int = 0) -> ModelFamily:
    """A randomly initialised model of the preset `name` (reproducible from `seed`; the global RNG is
    left untouched)."""
    info, configs = _preset_configs(name)
    family = FAMILIES[info["family"]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    return family(unet=unet, vae=vae, text_encoders=[text_encoder], tokenizers=[clip_tokenizer()],
                  scheduler=ddim_scheduler(configs["scheduler"]), source=name,
                  scheduler_config=configs["scheduler"])


# ----------------------------------------------------------------------------------------- loading


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    local_files_only: bool | None = None,
) -> ModelFamily:
    """Load a model from a hub id, a local diffusers folder or a random preset (weights from `seed`).

    `local_files_only=None` means: only the local HF cache when `HF_HUB_OFFLINE` is set, else the cache
    first and then the hub if it answers. Every component comes back in eval mode on `device` in `dtype`.
    """
    presets = preset_names()
    if model in presets:
        loaded = random_model(model, seed=seed)
    elif _looks_like_path(model):
        folder = Path(model).expanduser()
        check_diffusers_folder(folder)
        loaded = _from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    elif HUB_ID.fullmatch(model):
        loaded = _from_hub(model, dtype=dtype, local_files_only=local_files_only)
    else:
        raise InputError(f"model '{model}' is not a hub id (owner/name), a folder, or one of "
                         f"{', '.join(presets)}")
    return loaded.eval().to(device=device, dtype=dtype)


def _looks_like_path(model: str) -> bool:
    """A hub id is `name` or `owner/name`; anything that exists, or starts like a path, is a folder."""
    return Path(model).expanduser().exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1


def check_diffusers_folder(folder: Path) -> None:
    """Refuse, in one line naming what is missing, a folder that is not a diffusers SD folder."""
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        raise InputError(f"model folder '{folder}' {problem}; {LOAD_HINT}")
    missing = [
        f"{part}/{' or '.join(names)}"
        for part, alternatives in REQUIRED_FILES.items()
        for names in alternatives
        if not any((folder / part / name).is_file() for name in names)
    ]
    if missing:
        raise InputError(
            f"model folder '{folder}' is not a diffusers Stable Diffusion folder: "
            f"missing {', '.join(missing)}"
        )


def _from_hub(model_id: str, dtype: torch.dtype, local_files_only: bool | None) -> ModelFamily:
    """Cache first (never touches the network); then the hub, unless offline or unreachable — both fail
    fast instead of retrying for half a minute."""
    env_offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    offline = (hub_constants.HF_HUB_OFFLINE or env_offline) if local_files_only is None else local_files_only
    try:
        return _from_pretrained(model_id, dtype=dtype, local_files_only=True)
    except InputError:
        if offline or not _hub_reachable():
            raise InputError(
                f"could not load model '{model_id}': it is not in the local Hugging Face cache and the hub "
                f"is {'disabled (offline mode)' if offline else 'unreachable'}; {LOAD_HINT}"
            ) from None
    return _from_pretrained(model_id, dtype=dtype, local_files_only=False)


def _hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """TCP connect to the hub endpoint within `timeout_s` (DNS included: it runs in a daemon thread).
    Behind a proxy a direct probe says nothing, so we then assume the hub is reachable."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlsplit(hub_constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    reachable = threading.Event()

    def probe() -> None:
        try:
            with socket.create_connection((endpoint.hostname, port), timeout=timeout_s):
                reachable.set()
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return reachable.is_set()


def _pipeline_class(source: str, local_files_only: bool) -> str:
    """The `_class_name` of a model's `model_index.json` ("" when it has none)."""
    try:
        if Path(source).is_dir():
            return json.loads((Path(source) / MODEL_INDEX).read_text()).get("_class_name", "")
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, MODEL_INDEX, local_files_only=local_files_only))
                          .read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):  # no model_index.json (the hub's errors are OSErrors)
        return ""


def _from_pretrained(source: str, dtype: torch.dtype, local_files_only: bool) -> ModelFamily:
    """The components of a hub id or a diffusers folder (safetensors preferred when present), as the
    family the folder holds."""
    common: dict[str, Any] = {"subfolder": "", "local_files_only": local_files_only}
    loaders = {
        "scheduler_config": lambda: dict(DDIMScheduler.load_config(source, **common)),
        "text_encoder_config": lambda: CLIPTextConfig.from_pretrained(source, **common).to_dict(),
        "unet": lambda: UNet2DConditionModel.from_pretrained(source, torch_dtype=dtype, **common),
        "vae": lambda: AutoencoderKL.from_pretrained(source, torch_dtype=dtype, **common),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(source, dtype=dtype, **common),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(source, **common),
    }
    parts: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # diffusers → hub, not ours
        for part, load in loaders.items():
            common["subfolder"] = part.removesuffix("_config")
            try:
                parts[part] = load()
            except (OSError, ValueError) as error:  # missing / unreadable files, bad configs
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise InputError(
                    f"could not load the {common['subfolder']} of model '{source}': {reason}"
                ) from error
            if part == "text_encoder_config":  # the family decides what else to load; SD: the same parts
                family = _detect_family(source, local_files_only, parts)
    # A tokenizer saved without tokenizer_config.json has no max length (REFERENCES: known traps).
    max_positions = parts["text_encoder"].config.max_position_embeddings
    parts["tokenizer"].model_max_length = min(parts["tokenizer"].model_max_length, max_positions)
    return family(unet=parts["unet"], vae=parts["vae"], text_encoders=[parts["text_encoder"]],
                  tokenizers=[parts["tokenizer"]], scheduler=ddim_scheduler(parts["scheduler_config"]),
                  source=source, scheduler_config=parts["scheduler_config"])


def _detect_family(source: str, local_files_only: bool, parts: Mapping[str, Any]) -> type[StableDiffusion]:
    pipeline = _pipeline_class(source, local_files_only)
    configs = {"scheduler": parts["scheduler_config"], "text_encoder": parts["text_encoder_config"]}
    for family in FAMILIES.values():
        if family.matches(pipeline, configs):
            return family
    known = ", ".join(f"{name} ({family.default_model})" for name, family in FAMILIES.items())
    raise InputError(f"model '{source}' is a {pipeline or 'diffusers'} model of no family this tool edits "
                     f"with: {known}")
