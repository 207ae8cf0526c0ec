"""Loading a model family from what `model=` names (SPEC §2–§3, §10).

:func:`load_model` accepts a hub id, a local diffusers folder, or a random preset (`tiny`, `tiny-lcm`,
`tiny-v`, `tiny-xl`, `tiny-xl-lcm`, `tiny-sd3`, `tiny-flux`, `sd-v1-random`, `sdxl-random`: the folders of
`s2edit/core/presets/`, shipped as package data). The family is detected from the folder
(`model_index.json`'s pipeline class and the component configs), with no flag; a preset names its own. A
model that cannot be found fails fast with one line saying what to pass. `lora=` fuses a LoRA file into
the UNet (:mod:`s2edit.core.lora`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from huggingface_hub import constants as hub_constants
from transformers import CLIPTextConfig, CLIPTokenizer

from editkit.errors import InputError
from s2edit.core.detect import (
    HUB_ID,
    MODEL_INDEX,
    PRESET_DIR,
    PRESET_FILE,
    family_name,
    looks_like_path,
    offload_refusal,
)
from s2edit.core.family import ModelFamily
from s2edit.core.flow_family import FlowFamily, refuse_flow_family
from s2edit.core.flux import Flux
from s2edit.core.lora import check_lora_file, fuse_unet_lora
from s2edit.core.settings import DEFAULT_MODEL
from s2edit.core.stable_diffusion import StableDiffusion, StableDiffusion2
from s2edit.core.stable_diffusion_3 import StableDiffusion3
from s2edit.core.stable_diffusion_xl import StableDiffusionXL
from s2edit.core.tokenizer import clip_tokenizer, t5_tokenizer

# The model families, in detection order: the first whose `matches` accepts a folder loads it (a family
# that needs more than SD's components is listed before SD, which takes any UNet + CLIP folder).
FAMILIES: dict[str, type[ModelFamily]] = {
    "flux": Flux, "sd3": StableDiffusion3, "sdxl": StableDiffusionXL, "sd2": StableDiffusion2,
    "sd1": StableDiffusion,
}

PRESET_PARTS = ("unet", "transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3")
HUB_PROBE_TIMEOUT_S = 3.0  # a reachable hub answers a TCP connect well within this
LOAD_HINT = ("pass a local diffusers folder (model=/path/to/stable-diffusion-v1-4) or a random preset "
             "(model=tiny)")


class _EmptyFloat32ListFilter(logging.Filter):
    """diffusers warns on every `.to(dtype)` that "modules ... should be kept in float32: []" even when
    the list is empty; that line is noise (on a CLI whose refusals are one line, in every bf16 run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


_DIFFUSERS_MODELING_LOGGER = logging.getLogger("diffusers.models.modeling_utils")
if not any(isinstance(f, _EmptyFloat32ListFilter) for f in _DIFFUSERS_MODELING_LOGGER.filters):
    _DIFFUSERS_MODELING_LOGGER.addFilter(_EmptyFloat32ListFilter())

# What a diffusers folder must hold: per component, alternatives of files (any one will do). Every family
# has these; a family with more text encoders also needs text_encoder_<k> / tokenizer_<k> like them.
TEXT_ENCODER_FILES = (("config.json",), ("model.safetensors", "pytorch_model.bin",
                                         "model.safetensors.index.json", "pytorch_model.bin.index.json"))
TOKENIZER_FILES = (("tokenizer.json", "vocab.json"),)
REQUIRED_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "unet": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                                "diffusion_pytorch_model.safetensors.index.json",
                                "diffusion_pytorch_model.bin.index.json")),
    "vae": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                               "diffusion_pytorch_model.safetensors.index.json")),
    "text_encoder": TEXT_ENCODER_FILES,
    "tokenizer": TOKENIZER_FILES,
    "scheduler": (("scheduler_config.json",),),
}


def encoder_folders(family: type[ModelFamily]) -> list[tuple[str, str]]:
    """(text encoder folder, tokenizer folder) of each text encoder of a family, in order."""
    return [("text_encoder", "tokenizer") if k == 0 else (f"text_encoder_{k + 1}", f"tokenizer_{k + 1}")
            for k in range(len(family.text_encoder_classes))]


def ddim_scheduler(config_or_scheduler: Any, **overrides: Any) -> DDIMScheduler:
    """The DDIM scheduler of SPEC §3, from a model's scheduler (or its config): the model's betas,
    prediction type and `steps_offset`, with `clip_sample=False` and `set_alpha_to_one=False` (and a
    family's `overrides`, e.g. SDXL's leading spacing, SPEC §10).

    Timesteps: SPEC §3 writes 980…0 (steps_offset 0). SD1 configs carry `steps_offset: 1`, and the NTI
    reference ran its DDIMScheduler through `StableDiffusionPipeline`, which forces `steps_offset=1`, so it
    denoised at 981, 961, …, 1. We keep the model's value (SD1: 981…1 for 50 steps) to match it.
    """
    config = getattr(config_or_scheduler, "config", config_or_scheduler)
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a scheduler or its config, got {type(config_or_scheduler).__name__}")
    return DDIMScheduler.from_config(dict(config), clip_sample=False, set_alpha_to_one=False, **overrides)


# ----------------------------------------------------------------------------------------- presets


def preset_names() -> list[str]:
    """The random presets that ship with the package (folders of `presets/`)."""
    return sorted(p.parent.name for p in PRESET_DIR.glob(f"*/{PRESET_FILE}"))


def _preset_configs(name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(preset.json, {part: config}) of a preset, parts it lacks (and its `pipeline` settings) taken from
    its `base` preset."""
    folder = PRESET_DIR / name
    info = json.loads((folder / PRESET_FILE).read_text())
    base = info.get("base")
    configs: dict[str, dict[str, Any]] = {}
    if base:
        base_info, configs = _preset_configs(base)
        pipeline = {**base_info.get("pipeline", {}), **info.get("pipeline", {})}
        info = {**base_info, **info, "pipeline": pipeline}
    for part in PRESET_PARTS:
        file = folder / f"{part}.json"
        if file.is_file():
            configs[part] = json.loads(file.read_text())
    family = FAMILIES[info["family"]]
    needed = [family.denoiser, "vae", "scheduler", *(folder for folder, _ in encoder_folders(family))]
    missing = [part for part in needed if part not in configs]
    if missing:
        raise ValueError(f"preset '{name}' has no config for {missing}")
    return info, configs


def preset_components(name: str, device: str | torch.device | None = None) -> dict[str, torch.nn.Module]:
    """The randomly initialised components of preset `name` by their diffusers names, in creation order
    (unet, vae, text encoders); on the "meta" device they cost no memory (for parameter counts)."""
    info, configs = _preset_configs(name)
    family = FAMILIES[info["family"]]
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if issubclass(family, FlowFamily):
            import diffusers

            denoiser = getattr(diffusers, family.transformer_class).from_config(configs["transformer"])
        else:
            denoiser = UNet2DConditionModel.from_config(configs["unet"])
        parts: dict[str, torch.nn.Module] = {
            family.denoiser: denoiser,
            "vae": AutoencoderKL.from_config(configs["vae"]),
        }
        for (folder, _), cls_name in zip(encoder_folders(family), family.text_encoder_classes):
            config_class = transformers.T5Config if cls_name.startswith("T5") else CLIPTextConfig
            parts[folder] = getattr(transformers, cls_name)(config_class.from_dict(configs[folder]))
    return parts


def token_table(seed: int, vocab_size: int, hidden_size: int, std: float) -> torch.Tensor:
    """A frozen random token-embedding table (vocab, hidden), N(0, std²) from a CPU generator seeded `seed`:
    the same numbers on every machine, so a trained preset need not ship it (the shapes model's 49 408
    rows are 3× its other weights)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(vocab_size, hidden_size, generator=generator) * std


def token_table_name(text_encoder: torch.nn.Module) -> str:
    """The state-dict key of a text encoder's token table (it differs across transformers versions)."""
    table = text_encoder.get_input_embeddings().weight
    return next(name for name, p in text_encoder.named_parameters() if p is table)


def load_preset_weights(name: str, parts: Mapping[str, torch.nn.Module], info: Mapping[str, Any]) -> None:
    """Load a trained preset's weights (`preset.json` "weights": one safetensors file, keys
    `<component>.<parameter>`) into its freshly built `parts`; a text encoder's token table left out of
    the file is regenerated from "token_table" ({"seed", "std"}, :func:`token_table`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = PRESET_DIR / name / info["weights"]
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise InputError(f"the weights of preset '{name}' ({path}) cannot be read: {error}; reinstall the "
                         "package") from None
    table = info.get("token_table")
    for prefix, module in parts.items():
        state = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
        if table is not None and prefix == "text_encoder":
            config = module.config
            state[token_table_name(module)] = token_table(int(table["seed"]), config.vocab_size,
                                                          config.hidden_size, float(table["std"]))
        dtype = next(module.parameters()).dtype
        try:
            module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
        except RuntimeError as error:
            raise InputError(f"the weights of preset '{name}' do not fit its {prefix} config "
                             f"({str(error).splitlines()[0]})") from None


def random_model(name: str = "tiny", seed: int = 0, device: str | torch.device | None = None) -> ModelFamily:
    """The model of the preset `name`: randomly initialised (reproducible from `seed`; the global RNG is
    left untouched), or a trained preset's shipped weights (`model=shapes`). `device`: initialise there
    (the benchmarks' full-size flow models: 12 B parameters drawn on a GPU in seconds); the weights then
    come from that device's generator, not the CPU's."""
    info, configs = _preset_configs(name)
    family = FAMILIES[info["family"]]
    devices = [torch.device(device)] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        parts = preset_components(name, device)
    if "weights" in info:
        load_preset_weights(name, parts, info)
    encoders = [parts[folder] for folder, _ in encoder_folders(family)]
    if issubclass(family, FlowFamily):
        tokenizers = [clip_tokenizer(pad_token=pad) for pad in family.tokenizer_pads]
        tokenizers += [t5_tokenizer() for cls in family.tokenizer_classes[len(tokenizers):]]
        return family(transformer=parts["transformer"], vae=parts["vae"], text_encoders=encoders,
                      tokenizers=tokenizers, scheduler_config=configs["scheduler"], source=name,
                      pipeline_config=info.get("pipeline", {}))
    return family(unet=parts["unet"], vae=parts["vae"], text_encoders=encoders,
                  tokenizers=[clip_tokenizer(pad_token=pad) for pad in family.tokenizer_pads],
                  scheduler=ddim_scheduler(configs["scheduler"], **family.ddim_overrides), source=name,
                  scheduler_config=configs["scheduler"], pipeline_config=info.get("pipeline", {}))


# ----------------------------------------------------------------------------------------- loading


def family_of(model: str) -> type[ModelFamily] | None:
    """The family class of what `model=` names, told from files without loading weights
    (:func:`s2edit.core.detect.family_name`); None when that does not tell."""
    name = family_name(model)
    return FAMILIES[name] if name is not None else None


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    local_files_only: bool | None = None,
    lora: str | Path | None = None,
    offload: bool = False,
) -> ModelFamily:
    """Load a model from a hub id, a local diffusers folder or a random preset (weights from `seed`).

    `local_files_only=None` means: only the local HF cache when `HF_HUB_OFFLINE` is set, else the cache
    first and then the hub if it answers. `lora`: a LoRA file (diffusers / peft / kohya keys, safetensors)
    fused into the UNet, e.g. LCM-LoRA. Every component comes back in eval mode on `device` in `dtype`;
    with `offload` (flow families) in `dtype` on the CPU, each moving to `device` when it runs
    (:meth:`~s2edit.core.flow_family.FlowFamily.enable_offload`).
    """
    if offload:
        refusal = offload_refusal(model, family_name(model))
        if refusal is not None:  # before minutes of loading
            raise InputError(refusal)
    if lora is not None:
        lora = Path(lora).expanduser()
        check_lora_file(lora)  # before minutes of model loading
        family = family_of(model)
        if family is not None:
            refuse_flow_family(family, "lora=", model)
    presets = preset_names()
    if model in presets:
        loaded = random_model(model, seed=seed)
    elif looks_like_path(model):
        folder = Path(model).expanduser()
        check_diffusers_folder(folder)
        loaded = _from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    elif HUB_ID.fullmatch(model):
        loaded = _from_hub(model, dtype=dtype, local_files_only=local_files_only)
    else:
        raise InputError(f"model '{model}' is not a hub id (owner/name), a folder, or one of "
                         f"{', '.join(presets)}")
    if lora is not None:
        refuse_flow_family(loaded, "lora=")
        fuse_unet_lora(loaded, lora)
    if not offload:
        return loaded.eval().to(device=device, dtype=dtype)
    refusal = offload_refusal(model, loaded.name)
    if refusal is not None or not isinstance(loaded, FlowFamily):
        raise InputError(refusal or f"offload=true: model '{model}' is not a flow model")
    return loaded.eval().to(device="cpu", dtype=dtype).enable_offload(device)


def check_diffusers_folder(folder: Path, family: type[ModelFamily] | None = None) -> None:
    """Refuse, in one line naming what is missing, a folder that is not a diffusers folder of Stable
    Diffusion (any family), or of `family` (its further text encoders and tokenizers too)."""
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        raise InputError(f"model folder '{folder}' {problem}; {LOAD_HINT}")
    required = dict(REQUIRED_FILES)
    flow = family.denoiser != "unet" if family is not None else (
        (folder / "transformer").is_dir() and not (folder / "unet").is_dir())
    if flow:
        required["transformer"] = required.pop("unet")
    for encoder, tokenizer in encoder_folders(family)[1:] if family is not None else []:
        required.update({encoder: TEXT_ENCODER_FILES, tokenizer: TOKENIZER_FILES})
    missing = [
        f"{part}/{' or '.join(names)}"
        for part, alternatives in required.items()
        for names in alternatives
        if not any((folder / part / name).is_file() for name in names)
    ]
    if missing:
        kind = family.label if family is not None else "Stable Diffusion"
        raise InputError(f"model folder '{folder}' is not a diffusers {kind} folder: "
                         f"missing {', '.join(missing)}")


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


def _model_index(source: str, local_files_only: bool) -> dict[str, Any]:
    """A model's `model_index.json` ({} when it has none or it is unreadable)."""
    try:
        if Path(source).is_dir():
            index = json.loads((Path(source) / MODEL_INDEX).read_text())
        else:
            from huggingface_hub import hf_hub_download

            index = json.loads(Path(hf_hub_download(source, MODEL_INDEX, local_files_only=local_files_only))
                               .read_text())
    except (OSError, ValueError, AttributeError):  # no model_index.json (the hub's errors are OSErrors)
        return {}
    return index if isinstance(index, dict) else {}


def _from_pretrained(source: str, dtype: torch.dtype, local_files_only: bool) -> ModelFamily:
    """The components of a hub id or a diffusers folder (safetensors preferred when present), as the
    family the folder holds."""
    common: dict[str, Any] = {"local_files_only": local_files_only}

    def load(part: str, loader: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # diffusers → hub
                return loader(subfolder=part)
        except (OSError, ValueError) as error:  # missing / unreadable files, bad configs
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"could not load the {part} of model '{source}': {reason}") from error

    # 1. Configs: which family is it?
    index = _model_index(source, local_files_only)
    flow = next((family for family in FAMILIES.values() if issubclass(family, FlowFamily)
                 and family.matches(index.get("_class_name", ""), {})), None)
    if flow is not None:
        return _flow_from_pretrained(flow, source, index, dtype, load, common)
    configs = {
        "scheduler": dict(load("scheduler", lambda **kw: DDIMScheduler.load_config(source, **kw, **common))),
        "unet": dict(load("unet", lambda **kw: UNet2DConditionModel.load_config(source, **kw, **common))),
        "text_encoder": load("text_encoder",
                             lambda **kw: CLIPTextConfig.from_pretrained(source, **kw, **common).to_dict()),
    }
    family = _detect_family(source, index.get("_class_name", ""), configs)
    if Path(source).is_dir():
        check_diffusers_folder(Path(source), family)

    # 2. Components
    unet = load("unet", lambda **kw: UNet2DConditionModel.from_pretrained(source, torch_dtype=dtype, **kw,
                                                                          **common))
    vae = load("vae", lambda **kw: AutoencoderKL.from_pretrained(source, torch_dtype=dtype, **kw, **common))
    encoders, tokenizers = [], []
    for (encoder_part, tokenizer_part), cls_name in zip(encoder_folders(family), family.text_encoder_classes):
        encoder_class = getattr(transformers, cls_name)
        encoder = load(encoder_part, functools.partial(encoder_class.from_pretrained, source, dtype=dtype,
                                                       **common))
        tokenizer = load(tokenizer_part, lambda **kw: CLIPTokenizer.from_pretrained(source, **kw, **common))
        # A tokenizer saved without tokenizer_config.json has no max length (REFERENCES: known traps).
        tokenizer.model_max_length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
        encoders.append(encoder)
        tokenizers.append(tokenizer)
    pipeline = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    return family(unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                  scheduler=ddim_scheduler(configs["scheduler"], **family.ddim_overrides), source=source,
                  scheduler_config=configs["scheduler"], pipeline_config=pipeline)


def _flow_from_pretrained(family: type[FlowFamily], source: str, index: Mapping[str, Any], dtype: torch.dtype,
                          load: Any, common: Mapping[str, Any]) -> FlowFamily:
    """A flow family's components (SD3: transformer, VAE, CLIP-L, CLIP-G, T5 and their tokenizers)."""
    import diffusers

    if Path(source).is_dir():
        check_diffusers_folder(Path(source), family)
    scheduler = dict(load("scheduler", lambda **kw: diffusers.FlowMatchEulerDiscreteScheduler.load_config(
        source, **kw, **common)))
    transformer_class = getattr(diffusers, family.transformer_class)
    transformer = load("transformer", lambda **kw: transformer_class.from_pretrained(
        source, torch_dtype=dtype, **kw, **common))
    vae = load("vae", lambda **kw: AutoencoderKL.from_pretrained(source, torch_dtype=dtype, **kw, **common))
    encoders, tokenizers = [], []
    for (encoder_part, tokenizer_part), name in zip(encoder_folders(family), family.text_encoder_classes):
        encoder_class = getattr(transformers, name)
        encoders.append(load(encoder_part, functools.partial(encoder_class.from_pretrained, source,
                                                             dtype=dtype, **common)))
        tokenizers.append(load(tokenizer_part, lambda **kw: transformers.AutoTokenizer.from_pretrained(
            source, **kw, **common)))
    pipeline = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    return family(transformer=transformer, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                  scheduler_config=scheduler, source=source, pipeline_config=pipeline)


def _detect_family(source: str, pipeline: str, configs: Mapping[str, Mapping[str, Any]]) -> type[ModelFamily]:
    for family in FAMILIES.values():
        if family.matches(pipeline, configs):
            return family
    known = ", ".join(f"{name} ({family.default_model})" for name, family in FAMILIES.items())
    raise InputError(f"model '{source}' is a {pipeline or 'diffusers'} model of no family this tool edits "
                     f"with: {known}")
