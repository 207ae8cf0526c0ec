"""Typed configuration of `train.py` (SPEC §2, §7 defaults): one schema, parsed from `key=value` overrides
and an optional `config=file.yaml` (:func:`editkit.config.parse_config`).

`configs/train.yaml` lists every key with these defaults (a test keeps them equal): copy it to start an
experiment file. Only the script and the LightningModule's `__init__` read these objects; library
functions take typed, defaulted arguments.
"""

# ruff: noqa: RUF009  (`setting` returns dataclasses.field(...))

from __future__ import annotations

from dataclasses import dataclass, field

from editkit.config import setting as _opt
from s2edit.core.settings import DEFAULT_MODEL, LORA_HELP, MAX_RESOLUTION, MODEL_HELP


@dataclass
class FinetuneConfig:
    method: str = _opt("auto", "full: the whole UNet (+ text encoder: SD 1.x/2.x), lora: peft LoRA "
                               "adapters; auto: the family's default (full for SD 1.x/2.x as the paper, "
                               "lora for SDXL)",
                       choices=("auto", "full", "lora"))
    lr: float = _opt(2e-6, "AdamW learning rate for full fine-tuning (S2Edit §4.1)", gt=0)
    lora_lr: float = _opt(1e-4, "AdamW learning rate in LoRA mode", gt=0)
    lora_rank: int = _opt(16, "LoRA rank (UNet attention projections and text encoder)", ge=1, le=4096)
    weight_decay: float = _opt(1e-2, "AdamW weight decay", ge=0)
    grad_clip: float = _opt(1.0, "gradient norm clipping (0 = off)", ge=0)
    gradient_checkpointing: bool = _opt(False, "trade compute for memory in UNet and text encoder")


@dataclass
class SemanticConfig:
    weight: float = _opt(0.1, "λ_sem: weight of the semantic (orthogonality) loss, Eq. 2", ge=0)
    embedding: str = _opt(
        "hidden", "e_[I]: last hidden state at [I] (hidden) or its embedding row (token)",
        choices=("hidden", "token"),
    )


@dataclass
class SpatialConfig:
    control: bool = _opt(True, "multiply the placeholder's cross-attention by the object mask (Eq. 3)")
    renormalize: bool = _opt(False, "renormalise attention rows after masking the placeholder column")
    loss_weight: float = _opt(0.01, "λ_attn: weight of the masked-attention loss (0 = off)", ge=0)
    mask_timesteps: list[int] = _opt([200, 400, 600], "timesteps at which the object mask is read", ge=0)
    mask_threshold: float = _opt(0.3, "threshold on the max-normalised object-word attention map", ge=0, le=1)


@dataclass
class TrainConfig:
    model: str = _opt(DEFAULT_MODEL, MODEL_HELP)
    lora: str | None = _opt(None, LORA_HELP)
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
                                  "null: the model's native size (SD v1: 512, tiny: 256)",
                                  ge=64, le=MAX_RESOLUTION)
    out: str = _opt("outputs/train", "output folder: logs, checkpoints and export/")
    max_steps: int = _opt(200, "optimisation steps (S2Edit §4.1)", ge=1, le=10**7)
    seed: int = _opt(0, "random seed", ge=0, le=2**32 - 1)
    resume: bool = _opt(False, "continue from <out>/checkpoints/last.ckpt")
    precision: str = _opt("auto", "Lightning precision: auto (bf16-mixed on GPU, 32 on CPU), 32, bf16-mixed",
                          choices=("auto", "32", "bf16-mixed"))
    accelerator: str = _opt("auto", "Lightning accelerator: auto, cpu, gpu (= cuda)",
                            choices=("auto", "cpu", "gpu", "cuda"))
    image_log_every: int = _opt(
        50, "log input, reconstruction, masks and attention maps every N steps (0: never)", ge=0
    )
    checkpoint_every: int = _opt(100, "also save <out>/checkpoints/last.ckpt every N steps (0: at end/error)",
                                 ge=0)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    spatial: SpatialConfig = field(default_factory=SpatialConfig)
