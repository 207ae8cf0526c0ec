"""Typed configuration of `infer.py` (SPEC §3–§9 defaults): the edit request, plus what one run edits
and where it writes.

`configs/infer.yaml` lists every key with these defaults (a test keeps them equal): copy it to start an
experiment file. Only the script reads these objects.
"""

# ruff: noqa: RUF009  (`setting` returns dataclasses.field(...))

from __future__ import annotations

from dataclasses import dataclass

from editkit.config import setting
from s2edit.core.settings import DEFAULT_MODEL, LORA_HELP, MAX_RESOLUTION, MODEL_HELP
from s2edit.editing.request import EditRequest


@dataclass(frozen=True)
class InferConfig(EditRequest):
    ckpt: str | None = setting(None, "export folder written by train.py (omit for training-free editing)")
    model: str = setting(DEFAULT_MODEL, f"base model without ckpt: {MODEL_HELP}")
    lora: str | None = setting(None, f"{LORA_HELP}; with ckpt: where the export's base LoRA lies now")
    image: str | None = setting(None, "image to edit (default: the checkpoint's training image)")
    source: str | None = setting(None, "source prompt (default: the checkpoint's prompt)")
    target: list[str] = setting([], "target prompt(s); repeat target=… for several edits in one batch",
                                text=True)
    out: str = setting("outputs/edit", "output folder")
    resolution: int | None = setting(
        None,
        "working size (area ≈ resolution², sides multiples of 64); null: the checkpoint's training "
        "resolution, else the model's native size (SD v1: 512, tiny: 256)",
        ge=64, le=MAX_RESOLUTION,
    )
    seed: int = setting(0, "random seed: the noise of the virtual method (random presets keep seed-0 "
                           "weights)", ge=0, le=2**32 - 1)
    precision: str = setting("auto", "model dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16",
                             choices=("auto", "fp32", "bf16"))
    device: str = setting("auto", "torch device: auto, cpu, cuda, cuda:1, …")
    offload: bool = setting(False, "flow models (SD3, FLUX): model CPU offload, each component moved to the "
                                   "GPU only while it runs (diffusers' enable_model_cpu_offload)")

    @property
    def default_method(self) -> str:
        """What `method=auto` means when no method's settings are given: p2p with an S2Edit checkpoint
        (the paper's editor), flowedit on a flow model (SD3, FLUX), else virtual inversion (training-free,
        SPEC §9)."""
        if self.ckpt is not None:
            return "p2p"
        from s2edit.core.detect import FLOW_FAMILIES, family_name

        return "flowedit" if family_name(self.model) in FLOW_FAMILIES else "virtual"
