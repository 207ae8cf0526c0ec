"""`lora=PATH`: a LoRA file fused into a model's UNet (SPEC §10: LCM-LoRA-SDXL for the virtual editor).

The file is read with safetensors only (a pickle is never loaded), converted by diffusers' own LoRA
loader of the model's family (diffusers, peft and kohya key layouts), attached to the UNet with peft,
checked to have loaded EVERY tensor of the file, then merged into the weights and the adapter removed:
the UNet is a plain UNet again, so attention control, fine-tuning (LoRA on top) and the inversion cache
(its weight fingerprint changes) work as with any other model. Text-encoder weights in the file are
ignored with a warning.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from editkit.errors import InputError
from editkit.files import PICKLE_SUFFIXES, resolved

if TYPE_CHECKING:
    from s2edit.core.family import ModelFamily

ADAPTER = "s2edit_base_lora"
UNET_PREFIX = "unet."
UNET_MODULES = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.",
                "add_embedding.")
TEXT_PREFIXES = ("text_encoder", "lora_te")


def check_lora_file(path: Path) -> None:
    """Refuse, in one line, a LoRA path that is missing, a folder, or not a safetensors file."""
    path = resolved(path, "lora")
    if not path.is_file():
        problem = "is a folder: pass the .safetensors file in it" if path.is_dir() else "does not exist"
        raise InputError(f"lora file '{path}' {problem}")
    if path.suffix in PICKLE_SUFFIXES:
        raise InputError(f"lora file '{path}' is a pickle ({path.suffix}): only .safetensors files are "
                         "loaded")


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"lora file '{path}' is not a readable safetensors file ({err})") from None


def fuse_unet_lora(model: ModelFamily, path: Path, scale: float = 1.0) -> None:
    """Merge the UNet LoRA weights of `path` into `model.unet` (in place; see the module docstring)."""
    from diffusers.loaders import lora_pipeline

    check_lora_file(path)
    state = _read(path)
    text = [k for k in state if k.startswith(TEXT_PREFIXES)]
    state = {k: v for k, v in state.items() if k not in text}
    if any(k.startswith(UNET_MODULES) for k in state):  # a bare peft state dict of the UNet
        state = {(k if k.startswith(UNET_PREFIX) else UNET_PREFIX + k): v for k, v in state.items()}
    if not state:
        raise InputError(f"lora file '{path}' holds no UNet LoRA weights")
    loader = getattr(lora_pipeline, model.lora_loader)
    unet = model.unet
    try:
        with _quiet_diffusers():
            converted, alphas = loader.lora_state_dict(state, unet_config=unet.config)
            tensors = sum(1 for k in converted if k.startswith(UNET_PREFIX) and not k.endswith(".alpha"))
            unet.load_lora_adapter(converted, prefix="unet", network_alphas=alphas, adapter_name=ADAPTER)
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"lora file '{path}' does not fit the UNet of '{model.source}': {detail}") from None
    loaded = sum(1 for name, _ in unet.named_parameters() if f".{ADAPTER}." in name)
    if loaded != tensors or not tensors:
        _remove_adapter(unet)
        raise InputError(f"lora file '{path}' does not fit the UNet of '{model.source}': {loaded} of its "
                         f"{tensors} UNet tensors found a layer")
    unet.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER])
    unet.unload_lora()
    if text:
        warnings.warn(f"lora file '{path}': ignored {len(text)} text-encoder tensors (only the UNet's load)",
                      stacklevel=2)


def _remove_adapter(unet: torch.nn.Module) -> None:
    if ADAPTER in getattr(unet, "peft_config", {}):
        unet.delete_adapters(ADAPTER)


class _quiet_diffusers:
    """diffusers logs a partial load as a warning and goes on; the count check above decides instead."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("diffusers")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)
