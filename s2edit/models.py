"""Loading Stable Diffusion v1.x/2.x and the few model calls every stage shares (SPEC §2–§3).

`load_stable_diffusion(model)` accepts a hub id, a local diffusers folder, `tiny` (a small random model
with SD's architecture, for tests and CPU runs) or `sd-v1-random` (full-size random SD v1). The random
architectures are the JSON configs in `configs/models/`; their tokenizer is the offline CLIP tokenizer.
A model that cannot be found fails fast with one line saying what to pass instead.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from huggingface_hub import constants as hub_constants
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from editkit.errors import InputError
from s2edit.settings import DEFAULT_MODEL
from s2edit.tokenizer import clip_tokenizer, token_ids

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
# random presets: name → folder under configs/models
RANDOM_MODELS = {"tiny": "tiny", "tiny-lcm": "tiny-lcm", "sd-v1-random": "sd-v1"}
BASE_PRESET = "tiny"  # a preset folder without some part (tiny-lcm: all but the scheduler) takes it from here
HUB_PROBE_TIMEOUT_S = 3.0  # a reachable hub answers a TCP connect well within this
LOAD_HINT = "pass a local diffusers folder (model=/path/to/stable-diffusion-v1-4) or model=tiny"


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


@dataclass
class StableDiffusion:
    """The SD components plus the calls that later code shares (prompt, image ↔ latent)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    name: str
    scheduler_config: dict[str, Any] = field(default_factory=dict)  # the model's own (e.g. LCMScheduler)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def native_resolution(self) -> int:
        """The image size the UNet was trained at (diffusers' default height): sample_size × VAE factor."""
        sample_size = self.unet.config.sample_size
        side = sample_size if isinstance(sample_size, int) else max(sample_size)
        return side * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor × the UNet's down-sampling (64 for SD)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> StableDiffusion:
        """Move every model to `device` / cast to `dtype` (in place); returns self."""
        for module in (self.unet, self.vae, self.text_encoder):
            if device is not None:
                module.to(device)
            if dtype is not None and dtype != module.dtype:  # diffusers warns on any `.to(dtype=...)`
                module.to(dtype)
        return self

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        """(B, model_max_length) ids padded with EOS, on the model's device; over-long prompts are refused."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for prompt in prompts:
            token_ids(self.tokenizer, prompt)  # raises InputError instead of truncating
        return self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids.to(self.text_encoder.device)

    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """(B, L, D) text-encoder last hidden state (after the final layer norm), in the encoder's dtype.
        Differentiable: wrap it in `torch.no_grad()` where the text encoder is frozen."""
        return self.text_encoder(self.tokenize(prompts)).last_hidden_state

    def encode_image(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, C, H/f, W/f) latent: posterior MEAN × scaling factor (SPEC §2–§3),
        in the image's dtype; with a (CPU) `generator`, a posterior sample instead (InfEdit's choice)."""
        if image.shape[-1] % self.size_multiple or image.shape[-2] % self.size_multiple:
            size = tuple(image.shape[-2:])
            raise ValueError(f"image size {size} is not a multiple of {self.size_multiple}")
        vae = self.vae
        posterior = vae.encode(image.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latent = posterior.mean
        if generator is not None:
            noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32)
            latent = latent + posterior.std * noise.to(latent)
        latents = (latent - self._shift_factor) * vae.config.scaling_factor
        return latents.to(image.dtype)

    def decode_latents(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """(B, C, h, w) latent → (B, 3, h·f, w·f) image in [-1, 1] (clamped unless `clamp=False`),
        in the latents' dtype."""
        vae = self.vae
        latents_vae = latents.to(device=vae.device, dtype=vae.dtype)
        scaled = latents_vae / vae.config.scaling_factor + self._shift_factor
        image = vae.decode(scaled).sample.to(latents.dtype)
        return image.clamp(-1, 1) if clamp else image

    @property
    def _shift_factor(self) -> float:
        return getattr(self.vae.config, "shift_factor", None) or 0.0  # None / absent for SD1.x and SD2.x


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


def load_stable_diffusion(
    model: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    local_files_only: bool | None = None,
) -> StableDiffusion:
    """Load SD from a hub id, a local diffusers folder, `tiny` or `sd-v1-random` (random, from `seed`).

    `local_files_only=None` means: only the local HF cache when `HF_HUB_OFFLINE` is set, else the cache
    first and then the hub if it answers. All models come back in eval mode on `device` in `dtype`.
    """
    if model in RANDOM_MODELS:
        sd = random_stable_diffusion(model, seed=seed)
    elif _looks_like_path(model):
        folder = Path(model).expanduser()
        check_diffusers_folder(folder)
        sd = _from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    elif HUB_ID.fullmatch(model):
        sd = _from_hub(model, dtype=dtype, local_files_only=local_files_only)
    else:
        presets = ", ".join(RANDOM_MODELS)
        raise InputError(f"model '{model}' is not a hub id (owner/name), a folder, or one of {presets}")
    for module in (sd.unet, sd.vae, sd.text_encoder):
        module.eval()
    return sd.to(device=device, dtype=dtype)


def random_stable_diffusion(name: str = "tiny", seed: int = 0) -> StableDiffusion:
    """A randomly initialised SD with the architecture of `configs/models/<folder>/` (reproducible from
    `seed`; the global RNG is left untouched)."""
    folder = MODEL_CONFIG_DIR / RANDOM_MODELS[name]
    configs = {}
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        file = folder / f"{part}.json"
        file = file if file.is_file() else MODEL_CONFIG_DIR / BASE_PRESET / f"{part}.json"
        configs[part] = json.loads(file.read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    return StableDiffusion(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                           scheduler=ddim_scheduler(configs["scheduler"]), name=name,
                           scheduler_config=configs["scheduler"])


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


def _from_hub(model_id: str, dtype: torch.dtype, local_files_only: bool | None) -> StableDiffusion:
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


def _from_pretrained(source: str, dtype: torch.dtype, local_files_only: bool) -> StableDiffusion:
    """The five components from a hub id or a diffusers folder (safetensors preferred when present)."""
    common: dict[str, Any] = {"subfolder": "", "local_files_only": local_files_only}
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(source, torch_dtype=dtype, **common),
        "vae": lambda: AutoencoderKL.from_pretrained(source, torch_dtype=dtype, **common),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(source, dtype=dtype, **common),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(source, **common),
        "scheduler_config": lambda: dict(DDIMScheduler.load_config(source, **common)),
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
    # A tokenizer saved without tokenizer_config.json has no max length (REFERENCES: known traps).
    max_positions = parts["text_encoder"].config.max_position_embeddings
    parts["tokenizer"].model_max_length = min(parts["tokenizer"].model_max_length, max_positions)
    return StableDiffusion(**parts, scheduler=ddim_scheduler(parts["scheduler_config"]), name=source)
