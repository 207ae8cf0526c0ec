"""Typed configuration schemas of `train.py` and `infer.py` (SPEC §7 defaults).

`configs/train.yaml` and `configs/infer.yaml` carry the same defaults as these dataclasses (a test keeps
them equal); the scripts merge YAML and `key=value` overrides into them with :func:`editkit.config.parse_config`.
Only the scripts and the LightningModule's `__init__` read these objects; library functions take typed,
defaulted arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


def _opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    meta: dict[str, Any] = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------- fine-tuning


@dataclass
class FinetuneConfig:
    method: str = _opt("full", "train the whole UNet + text encoder, or peft LoRA adapters", ("full", "lora"))
    lr: float = _opt(2e-6, "AdamW learning rate for full fine-tuning (S2Edit §4.1)")
    lora_lr: float = _opt(1e-4, "AdamW learning rate in LoRA mode")
    lora_rank: int = _opt(16, "LoRA rank (UNet attention projections and text encoder)")
    weight_decay: float = _opt(1e-2, "AdamW weight decay")
    grad_clip: float = _opt(1.0, "gradient norm clipping (0 = off)")
    gradient_checkpointing: bool = _opt(False, "trade compute for memory in UNet and text encoder")


@dataclass
class SemanticConfig:
    weight: float = _opt(0.1, "λ_sem: weight of the semantic (orthogonality) loss, Eq. 2")
    embedding: str = _opt(
        "hidden", "e_[I]: last hidden state at [I] (hidden) or its embedding row (token)", ("hidden", "token")
    )


@dataclass
class SpatialConfig:
    control: bool = _opt(True, "multiply the placeholder's cross-attention by the object mask (Eq. 3)")
    renormalize: bool = _opt(False, "renormalise attention rows after masking the placeholder column")
    loss_weight: float = _opt(0.01, "λ_attn: weight of the masked-attention loss (0 = off)")
    mask_timesteps: list[int] = _opt([200, 400, 600], "timesteps at which the object mask is read")
    mask_threshold: float = _opt(0.3, "threshold on the max-normalised object-word attention map")


@dataclass
class TrainConfig:
    model: str = _opt(DEFAULT_MODEL, "hub id, local diffusers folder, 'tiny' or 'sd-v1-random'")
    image: str = _opt("examples/astronaut.png", "the ONE image whose subject becomes the placeholder token")
    prompt: str = _opt("a photo of a [I] woman", "enhanced prompt P~, containing the placeholder")
    object: str = _opt("woman", "word of the prompt naming the subject; its attention gives the object mask")
    placeholder: str = _opt("[I]", "identity token string added to the tokenizer")
    init_word: str | None = _opt(None, "word whose embedding initialises the token (default: object word)")
    mask: str | None = _opt(None, "object mask image instead of the attention-derived one")
    reference: str | None = _opt(None, "compositional edit: reference image carrying the attribute")
    reference_prompt: str | None = _opt(None, "prompt of the reference, containing reference_placeholder")
    reference_object: str | None = _opt(None, "word of reference_prompt naming the attribute's region")
    reference_placeholder: str = _opt("[A]", "attribute token string for the reference")
    reference_mask: str | None = _opt(None, "attribute mask image instead of the attention-derived one")
    resolution: int | None = _opt(None, "working size (area ≈ resolution², sides multiples of 64); "
                                  "null: the model's native size (SD v1: 512, tiny: 256)")
    out: str = _opt("outputs/train", "output folder: logs, checkpoints and export/")
    max_steps: int = _opt(200, "optimisation steps (S2Edit §4.1)")
    seed: int = _opt(0, "random seed")
    resume: bool = _opt(False, "continue from <out>/checkpoints/last.ckpt")
    precision: str = _opt("auto", "Lightning precision: auto (bf16-mixed on GPU, 32 on CPU), 32, bf16-mixed")
    accelerator: str = _opt("auto", "Lightning accelerator: auto, cpu, gpu")
    image_log_every: int = _opt(50, "log input, reconstruction, masks and attention maps every N steps")
    checkpoint_every: int = _opt(100, "also save <out>/checkpoints/last.ckpt every N steps (0: at end/error)")
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    spatial: SpatialConfig = field(default_factory=SpatialConfig)


# ----------------------------------------------------------------------------------------- editing


@dataclass
class NullTextConfig:
    inner_steps: int = _opt(10, "Adam steps per timestep for the null embedding")
    lr: float = _opt(1e-2, "initial learning rate, decayed as lr·(1 − i/100)")
    early_stop: float = _opt(1e-5, "inner loop stops when loss < early_stop + i·early_stop_growth")
    early_stop_growth: float = _opt(2e-5, "growth of the early-stop threshold per timestep")


@dataclass
class SPLConfig:
    structure: bool = _opt(True, "optimise the Structure Preservation Loss")
    color: bool = _opt(False, "optimise the Color Preservation Loss")
    structure_weight: float = _opt(1e4, "λ_s")
    color_weight: float = _opt(1e3, "λ_c (100–10000)")
    iterations: int = _opt(100, "SGD iterations per refinement")
    lr: float = _opt(1.0, "SGD learning rate")
    momentum: float = _opt(0.9, "SGD momentum")
    opt_schedule: float = _opt(0.8, "refine the predicted x0 at steps i/T >= this (1 = never in the loop)")
    postprocess: bool = _opt(True, "refine the final decoded image against the input")
    radius: int = _opt(5, "local window radius (11×11)")
    eps: float = _opt(1e-4, "regulariser ε of the local linear model")
    area: str = _opt("whole", "where the losses apply", ("whole", "masked"))
    mask_words_source: list[str] = _opt([], "source-prompt words whose attention defines the mask")
    mask_words_target: list[str] = _opt([], "target-prompt words whose attention defines the mask")
    mask_threshold: float = _opt(0.5, "binarisation threshold of the attention mask")
    mask_invert: bool = _opt(False, "apply the losses outside the mask instead")
    mask_radius: int = _opt(1, "guided-filter radius at the first ×2 stage (+1 per stage)")
    mask_eps: float = _opt(1e-2, "guided-filter ε for mask upsampling")


@dataclass
class InferConfig:
    ckpt: str | None = _opt(None, "export folder written by train.py (omit for training-free editing)")
    model: str = _opt(DEFAULT_MODEL, "base model without ckpt: hub id, folder, 'tiny', 'sd-v1-random'")
    image: str | None = _opt(None, "image to edit (default: the checkpoint's training image)")
    source: str | None = _opt(None, "source prompt (default: the checkpoint's prompt)")
    target: list[str] = _opt([], "target prompt(s); repeat target=… for several edits in one batch")
    out: str = _opt("outputs/edit", "output folder")
    resolution: int | None = _opt(
        None,
        "working size (area ≈ resolution², sides multiples of 64); null: the checkpoint's training "
        "resolution, else the model's native size (SD v1: 512, tiny: 256)",
    )
    seed: int = _opt(0, "random seed")
    steps: int = _opt(50, "DDIM steps")
    guidance: float = _opt(7.5, "classifier-free guidance scale (3.5–5.5 balances fidelity and editability)")
    inversion: str = _opt("null_text", "inversion method", ("null_text", "negative_prompt", "ddim"))
    mode: str = _opt("refine", "Prompt-to-Prompt word mapping", ("refine", "replace"))
    cross_replace: float = _opt(0.8, "fraction of steps with cross-attention injection")
    cross_replace_words: dict[str, float] = _opt({}, "per-word cross-attention schedules, e.g. {bangs: 0.4}")
    self_replace: float = _opt(0.5, "fraction of steps with self-attention injection")
    reweight: dict[str, float] = _opt({}, "scale words' cross-attention, e.g. {smiling: 2.0}")
    blend_words: list[str] = _opt([], "LocalBlend words (source and target); empty = off")
    blend_threshold: float = _opt(0.3, "LocalBlend mask threshold")
    blend_start: float = _opt(0.2, "LocalBlend starts at this fraction of the steps")
    spatial_control: bool = _opt(True, "mask the placeholder's cross-attention by the object mask")
    precision: str = _opt("auto", "model dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16")
    device: str = _opt("auto", "torch device: auto, cpu, cuda, cuda:1, …")
    nti: NullTextConfig = field(default_factory=NullTextConfig)
    spl: SPLConfig = field(default_factory=SPLConfig)
