"""S2Edit: identity fine-tuning and structure-preserving editing of diffusion models (S2Edit + SPL).

The stages are subpackages, each importing only the ones below it: `core` (model families, attention,
diffusion, the loop), `training` (identity fine-tuning, the export), `editing` (inversions, the editing
methods, the Editor), `evaluation` (datasets, metrics, the runner) and `app` (the Gradio UI). Built on
`spl` (model-free SPL math) and `editkit` (errors, configs, files, images). The public API is importable
from here; the heavy modules (diffusers, lightning) load on first use, so `import s2edit` stays cheap:

    from s2edit import Editor, EditRequest
    editor = Editor.from_export("outputs/astronaut/export")                 # load once …
    result = editor.run(image, "a photo of a [I] woman", ["a photo of a [I] woman with bangs"],
                        EditRequest(method="p2p", inversion="direct"))      # … edit many times
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Editor": "s2edit.editing.editor",
    "EditResult": "s2edit.editing.result",
    "EditRequest": "s2edit.editing.request",
    "InversionRequest": "s2edit.editing.request",
    "Placeholder": "s2edit.editing.plan",
    "EditPlan": "s2edit.editing.plan",
    "plan_edit": "s2edit.editing.plan",
    "edit_method": "s2edit.editing.methods",
    "NullTextSettings": "s2edit.core.settings",
    "P2PSettings": "s2edit.core.settings",
    "SPLSettings": "s2edit.core.settings",
    "MaskSettings": "s2edit.core.settings",
    "VirtualSettings": "s2edit.core.settings",
    "StepState": "s2edit.core.engine",
    "StepHook": "s2edit.core.engine",
    "ModelFamily": "s2edit.core.family",
    "Conditioning": "s2edit.core.family",
    "GuidedDenoiser": "s2edit.core.denoiser",
    "load_model": "s2edit.core.loading",
    "ddim_scheduler": "s2edit.core.loading",
    "clip_tokenizer": "s2edit.core.tokenizer",
    "token_ids": "s2edit.core.tokenizer",
    "word_token_indices": "s2edit.core.tokenizer",
    "eos_index": "s2edit.core.tokenizer",
    "S2EditModule": "s2edit.training.module",
    "S2EditDataModule": "s2edit.training.data",
    "load_export": "s2edit.training.export",
    "TrainConfig": "s2edit.training.config",
    "InferConfig": "s2edit.editing.config",
    "EvaluateConfig": "s2edit.evaluation.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 's2edit' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
