"""The shapes model: its three networks built from diffusers-style configs, its frozen token table, and
the export folder that holds it (configs + ONE fp16 safetensors file + shapes.json).

The text encoder's 49 408-row token table is random and frozen: it is regenerated from a seed
(:func:`token_table`) instead of being shipped, so the weights file holds every other parameter.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from editkit.errors import InputError
from editkit.files import atomic_path, write_json
from s2edit.core.loading import PRESET_DIR, token_table, token_table_name

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "shapes.json"
CONFIG_FILES = {"unet": "unet.json", "vae": "vae.json", "text_encoder": "text_encoder.json"}
SCHEDULER_FILE = "scheduler.json"
FORMAT = "s2edit-shapes/1"


# ------------------------------------------------------------------------------------------ configs


def vae_config(block_out_channels: list[int], norm_num_groups: int, latent_channels: int = 4,
               sample_size: int = 64, scaling_factor: float = 1.0) -> dict[str, Any]:
    """AutoencoderKL with one DownEncoderBlock2D per entry of `block_out_channels`: f = 2^(n−1)."""
    levels = len(block_out_channels)
    return {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": list(block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "in_channels": 3, "out_channels": 3, "latent_channels": latent_channels, "layers_per_block": 1,
        "norm_num_groups": norm_num_groups, "sample_size": sample_size, "scaling_factor": scaling_factor,
    }


def unet_config(block_out_channels: list[int], norm_num_groups: int, cross_attention_dim: int,
                heads: int, layers_per_block: int, sample_size: int,
                latent_channels: int = 4) -> dict[str, Any]:
    """UNet2DConditionModel laid out like SD v1, one level shorter: cross-attention in every down/up block
    but the lowest, and in the mid block (16², 8² and the 4² mid for a 16² latent and three levels)."""
    levels = len(block_out_channels)
    return {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": heads,
        "block_out_channels": list(block_out_channels), "center_input_sample": False,
        "cross_attention_dim": cross_attention_dim,
        "down_block_types": ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1),
        "mid_block_type": "UNetMidBlock2DCrossAttn", "downsample_padding": 1, "flip_sin_to_cos": True,
        "freq_shift": 0, "in_channels": latent_channels, "out_channels": latent_channels,
        "layers_per_block": layers_per_block, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
        "norm_num_groups": norm_num_groups, "sample_size": sample_size,
    }


def text_encoder_config(hidden_size: int, layers: int, heads: int, vocab_size: int = 49408,
                        max_positions: int = 77) -> dict[str, Any]:
    """A small CLIPTextModel with SD v1's conventions (the `tiny` preset's ids: bos 0, eos 2, pad 1)."""
    return {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": hidden_size, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 4 * hidden_size, "layer_norm_eps": 1e-5,
        "max_position_embeddings": max_positions, "model_type": "clip_text_model",
        "num_attention_heads": heads, "num_hidden_layers": layers, "pad_token_id": 1,
        "projection_dim": hidden_size, "vocab_size": vocab_size,
    }


def scheduler_config() -> dict[str, Any]:
    """SD v1's noise schedule (scaled-linear betas 0.00085 → 0.012, 1000 steps, ε), as the `tiny` preset."""
    text = (resources.files("s2edit.core") / "presets" / "tiny" / SCHEDULER_FILE).read_text()
    return json.loads(text)


# ------------------------------------------------------------------------------------------ builders


def _public(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_vae(config: dict[str, Any]) -> AutoencoderKL:
    return AutoencoderKL(**_public(config))


def build_unet(config: dict[str, Any]) -> UNet2DConditionModel:
    return UNet2DConditionModel(**_public(config))


def build_text_encoder(config: dict[str, Any], token_seed: int) -> CLIPTextModel:
    """A CLIPTextModel whose token table is :func:`token_table` (frozen); other weights initialised."""
    clip_config = CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"})
    model = CLIPTextModel(clip_config)
    table = model.get_input_embeddings().weight
    with torch.no_grad():
        table.copy_(token_table(token_seed, clip_config.vocab_size, clip_config.hidden_size,
                                clip_config.initializer_range))
    table.requires_grad_(False)
    return model


def text_encoder_json(model: CLIPTextModel) -> dict[str, Any]:
    keys = text_encoder_config(1, 1, 1).keys()
    values = model.config.to_dict()
    return {key: values[key] for key in keys if key in values} | {"architectures": ["CLIPTextModel"]}


def diffusers_json(model: AutoencoderKL | UNet2DConditionModel) -> dict[str, Any]:
    return {"_class_name": type(model).__name__, **_public(dict(model.config))}


# ------------------------------------------------------------------------------------------ export


def shipped_state(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                  dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Every weight under its component prefix, in `dtype`, without the regenerated token table."""
    state = {}
    table = f"text_encoder.{token_table_name(text_encoder)}"
    for prefix, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        for name, tensor in module.state_dict().items():
            key = f"{prefix}.{name}"
            if key != table:
                state[key] = tensor.detach().to("cpu", dtype).contiguous()
    return state


def export_shapes_model(folder: str | Path, unet: UNet2DConditionModel, vae: AutoencoderKL,
                        text_encoder: CLIPTextModel, token_seed: int,
                        extra: dict[str, Any] | None = None) -> Path:
    """Write the model folder: unet/vae/text_encoder/scheduler JSON configs, `model.safetensors` (fp16)
    and `shapes.json` (format, token-table seed and std, plus `extra`). Each file is written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CONFIG_FILES["unet"], diffusers_json(unet))
    write_json(folder / CONFIG_FILES["vae"], diffusers_json(vae))
    write_json(folder / CONFIG_FILES["text_encoder"], text_encoder_json(text_encoder))
    write_json(folder / SCHEDULER_FILE, scheduler_config())
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(shipped_state(unet, vae, text_encoder), str(tmp), metadata={"format": FORMAT})
    manifest = {"format": FORMAT, "token_table": {"seed": token_seed,
                                                  "std": text_encoder.config.initializer_range,
                                                  "generator": "torch.Generator(cpu).manual_seed; randn*std"}}
    write_json(folder / MANIFEST_FILE, manifest | (extra or {}))
    return folder


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"shapes model file '{path}' is missing: export the model again")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"shapes model file '{path}' is not valid JSON ({err.msg}): export it again"
                         ) from None


def load_shapes_components(folder: str | Path,
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """Rebuild {"unet", "vae", "text_encoder"} of an exported shapes model (eval mode, `dtype`): modules
    from the JSON configs, the token table from its seed, every other weight from `model.safetensors`."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"shapes model folder '{folder}' does not exist")
    manifest = _read_json(folder / MANIFEST_FILE)
    if manifest.get("format") != FORMAT:
        raise InputError(f"'{folder / MANIFEST_FILE}' has format {manifest.get('format')!r}, not {FORMAT!r}")
    modules: dict[str, torch.nn.Module] = {
        "unet": build_unet(_read_json(folder / CONFIG_FILES["unet"])),
        "vae": build_vae(_read_json(folder / CONFIG_FILES["vae"])),
        "text_encoder": build_text_encoder(_read_json(folder / CONFIG_FILES["text_encoder"]),
                                           int(manifest["token_table"]["seed"])),
    }
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise InputError(f"shapes model weights '{weights_path}' are missing: export the model again")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise InputError(f"shapes model weights '{weights_path}' cannot be read ({err}): export again"
                         ) from None
    for prefix, module in modules.items():
        state = {k[len(prefix) + 1:]: v.float() for k, v in weights.items() if k.startswith(prefix + ".")}
        if prefix == "text_encoder":
            state[token_table_name(module)] = module.get_input_embeddings().weight.detach().clone()
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(f"'{weights_path}' does not match the configs of {prefix}: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}: export the model again")
        module.to(dtype).eval().requires_grad_(False)
    return modules


# ------------------------------------------------------------------------------------------ shipping

PRESET = "shapes"  # model=shapes
IMAGE_PER_MASK_SIDE = 4  # masks, LocalBlend and saved maps use the 16² layers of the 16² latent (level 1)
SHIPPED_FILES = (*CONFIG_FILES.values(), SCHEDULER_FILE, WEIGHTS_FILE, MANIFEST_FILE, "TRAINING.md")


def ship_preset(folder: str | Path, preset: str | Path = PRESET_DIR / PRESET) -> Path:
    """Make an exported model folder the `model=shapes` preset: its files, plus `preset.json` naming the
    family (sd1), the weights file, the token table's seed and the level of the mask maps. Written to a
    temporary folder first, then swapped in whole."""
    import shutil

    folder, preset = Path(folder).expanduser(), Path(preset)
    manifest = _read_json(folder / MANIFEST_FILE)
    missing = [name for name in SHIPPED_FILES if not (folder / name).is_file()]
    if missing:
        raise InputError(f"model folder '{folder}' lacks {', '.join(missing)}: train (or export) it again")
    table = manifest["token_table"]
    info = {
        "family": "sd1",
        "about": "the trained shapes-world model (64² scenes of one coloured shape on a plain background; "
                 "f=4 VAE, 2.2 M-parameter UNet, 2-layer CLIP text encoder whose token table is regenerated "
                 "from its seed): TRAINING.md says how it was trained",
        "weights": WEIGHTS_FILE,
        "token_table": {"seed": int(table["seed"]), "std": float(table["std"])},
        "pipeline": {"image_per_mask_side": IMAGE_PER_MASK_SIDE},
    }
    staging = preset.with_name(preset.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in SHIPPED_FILES:
        target = "text_encoder.json" if name == CONFIG_FILES["text_encoder"] else name
        shutil.copyfile(folder / name, staging / target)
    write_json(staging / "preset.json", info)
    old = preset.with_name(preset.name + ".old")
    if preset.exists():
        preset.rename(old)
    staging.rename(preset)
    shutil.rmtree(old, ignore_errors=True)
    return preset
