"""S2Edit: identity fine-tuning and Prompt-to-Prompt editing of Stable Diffusion with spatial control.

Built on `spl` (model-free image ops: structure/colour preservation losses, guided filter, image I/O).
The public API is importable from here; the heavy modules (diffusers, lightning) load on first use, so
`import s2edit` stays cheap for scripts that only check their inputs.

    from s2edit import Editor
    editor = Editor.from_export("outputs/astronaut/export")   # load once …
    inversion = editor.invert(image, prompt)                   # … invert (cached) and edit many times
    result = editor.edit(inversion, ["a photo of a [I] woman with bangs"], p2p=P2PSettings(self_replace=0.6))
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Editor": "s2edit.editing",
    "EditResult": "s2edit.editing",
    "Placeholder": "s2edit.plan",
    "EditPlan": "s2edit.plan",
    "plan_edit": "s2edit.plan",
    "NullTextSettings": "s2edit.settings",
    "P2PSettings": "s2edit.settings",
    "SPLSettings": "s2edit.settings",
    "MaskSettings": "s2edit.settings",
    "VirtualSettings": "s2edit.settings",
    "StepState": "s2edit.engine",
    "StepHook": "s2edit.engine",
    "S2EditModule": "s2edit.module",
    "S2EditDataModule": "s2edit.data",
    "load_export": "s2edit.export",
    "StableDiffusion": "s2edit.models",
    "load_stable_diffusion": "s2edit.models",
    "ddim_scheduler": "s2edit.models",
    "clip_tokenizer": "s2edit.tokenizer",
    "add_placeholder_token": "s2edit.tokenizer",
    "token_ids": "s2edit.tokenizer",
    "word_token_indices": "s2edit.tokenizer",
    "eos_index": "s2edit.tokenizer",
    "TrainConfig": "s2edit.config",
    "InferConfig": "s2edit.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 's2edit' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
