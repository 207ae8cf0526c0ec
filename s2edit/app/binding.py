"""The web app's controls bound to the typed settings, and the form → `infer.py` configuration.

Each control is bound to a field of the engine's typed settings (:mod:`s2edit.core.settings`,
:class:`s2edit.editing.config.InferConfig`): its default, choices and help come from the field, and its
range is the SPL app's, checked at start to lie inside the field's. :func:`infer_config` turns the Edit
tab's values into the `infer.py` configuration of the edit, and :func:`cli_arguments` into the `infer.py`
command that reproduces it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from editkit.config import check_fields, check_value
from editkit.errors import InputError
from s2edit.core.settings import FlowEditSettings, MaskSettings, P2PSettings, SPLSettings, VirtualSettings
from s2edit.editing.config import InferConfig


def field_of(schema: type, name: str) -> dataclasses.Field:
    for field in dataclasses.fields(schema):
        if field.name == name:
            return field
    raise KeyError(f"{schema.__name__} has no field '{name}'")


def field_default(schema: type, name: str) -> Any:
    field = field_of(schema, name)
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def checked_field(schema: type, name: str, values: Sequence[Any]) -> dataclasses.Field:
    """The field, after checking that every value the control can give is valid for it."""
    field = field_of(schema, name)
    for value in values:
        check_value(f"{schema.__name__}.{name}", value, field.metadata)  # a UI range wider than the field's
    return field


def bound_slider(
    schema: type, name: str, label: str, minimum: float, maximum: float, step: float, **kwargs: Any
) -> gr.Slider:
    """A slider for `schema.name` over the SPL app's range (which must lie inside the field's)."""
    field = checked_field(schema, name, (minimum, maximum))
    value = kwargs.pop("value", field_default(schema, name))  # a default of its own (a family's)
    return gr.Slider(minimum, maximum, value=value, step=step, label=label,
                     info=kwargs.pop("info", field.metadata["help"]), **kwargs)


def bound_number(schema: type, name: str, label: str, minimum: int, maximum: int, **kwargs: Any) -> gr.Number:
    field = checked_field(schema, name, (minimum, maximum))
    value = kwargs.pop("value", field_default(schema, name))
    return gr.Number(value, label=label, minimum=minimum, maximum=maximum, precision=0,
                     info=kwargs.pop("info", field.metadata["help"]), **kwargs)


def bound_checkbox(schema: type, name: str, label: str, **kwargs: Any) -> gr.Checkbox:
    return gr.Checkbox(field_default(schema, name), label=label, **kwargs)


def bound_dropdown(schema: type, name: str, label: str, labels: dict[str, str], **kwargs: Any) -> gr.Dropdown:
    """A dropdown over the field's choices (`labels` names them for people)."""
    field = field_of(schema, name)
    choices = [(labels.get(c, str(c)), c) for c in field.metadata["choices"]]
    return gr.Dropdown(choices, value=field_default(schema, name), label=label,
                       info=kwargs.pop("info", field.metadata["help"]), **kwargs)


# ----------------------------------------------------------------------------------------- the form


@dataclass
class EditForm:
    """The Edit tab's controls: the edit event's keyword inputs, and the HTTP API's parameter names."""

    image: str | None
    source: str
    target: str
    method: str  # "virtual", "flowedit" (flow models) or an inversion of the p2p method (INVERSIONS)
    attention_schedule: float  # virtual: cross and self replace (the SPL app ties them); p2p: cross
    opt_schedule: float
    spl: bool
    spl_area: str
    cpl: bool
    cpl_area: str
    source_mask_words: str
    source_threshold: float
    source_invert: bool
    target_mask_words: str
    target_threshold: float
    target_invert: bool
    random_seed: bool
    seed: float
    steps: float
    structure_weight: float
    color_weight: float
    iterations: float
    postprocess: bool
    flow_n_max: float  # FlowEdit (flow models): n_max, n_avg, w_src, w_tar; T is `steps`
    flow_n_avg: float
    flow_source_guidance: float
    flow_target_guidance: float
    source_guidance: float
    target_guidance: float
    guidance: float
    p2p_mode: str
    self_attention_schedule: float
    reweight: str
    blend_source: str
    blend_target: str

    @property
    def inversion_based(self) -> bool:
        return self.method not in ("virtual", "flowedit")

    @property
    def flow(self) -> bool:
        return self.method == "flowedit"


def words(text: str | None) -> list[str]:
    """'cat, dog' or 'cat dog' → ['cat', 'dog'] (prompt words; a word is never split by the engine)."""
    return [w for w in re.split(r"[,\s]+", text or "") if w]


def word_factors(text: str | None) -> dict[str, float]:
    """'smiling: 2, tiger: 1.5' → {'smiling': 2.0, 'tiger': 1.5}; InputError for anything else."""
    factors: dict[str, float] = {}
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        word, _, value = item.partition(":")
        try:
            factor = float(value)
        except ValueError:
            factor = None
        if not word.strip() or factor is None:
            raise InputError(f"reweight '{item}' must be word: factor pairs, e.g. 'smiling: 2, tiger: 1.5'")
        factors[word.strip()] = factor
    return factors


def infer_config(form: EditForm, *, model: str, ckpt: str | None, out: Path, seed: int,
                 resolution: int | None = None, device: str = "auto", precision: str = "auto",
                 lora: str | None = None, offload: bool = False) -> InferConfig:
    """The `infer.py` configuration of an edit of the form (the web app's edits ARE infer.py's).

    Only the chosen method's settings leave their defaults; mask words count only when a preservation
    area is `masked` (as in the SPL app, whose mask settings are hidden otherwise). Values are checked
    by the settings types: a refused one raises InputError naming its field.
    """
    masked = (form.spl and form.spl_area == "masked") or (form.cpl and form.cpl_area == "masked")
    blend_source, blend_target = words(form.blend_source), words(form.blend_target)
    p2p = P2PSettings(
        mode=form.p2p_mode, cross_replace=float(form.attention_schedule),
        self_replace=float(form.self_attention_schedule), reweight=word_factors(form.reweight),
        blend_words=list(dict.fromkeys(blend_source + blend_target)),
    ) if form.inversion_based else P2PSettings()
    flowedit = FlowEditSettings(
        steps=int(form.steps), n_max=int(form.flow_n_max), n_avg=int(form.flow_n_avg),
        source_guidance=float(form.flow_source_guidance), target_guidance=float(form.flow_target_guidance),
    ) if form.flow else FlowEditSettings()
    virtual = VirtualSettings() if form.inversion_based or form.flow else VirtualSettings(
        steps=int(form.steps), source_guidance=float(form.source_guidance),
        target_guidance=float(form.target_guidance), cross_replace=float(form.attention_schedule),
        self_replace=float(form.attention_schedule), blend_source=blend_source, blend_target=blend_target,
    )
    defaults = InferConfig()
    target = (form.target or "").strip()
    cfg = InferConfig(
        ckpt=ckpt,
        model=model if ckpt is None else defaults.model,  # an export names its own base model (and LoRA)
        lora=lora if ckpt is None else None,
        image=form.image,
        source=(form.source or "").strip() or None,
        target=[target] if target else [],
        out=str(out),
        resolution=None if ckpt is not None else resolution,  # an export edits at its training size
        seed=seed,
        method="p2p" if form.inversion_based else form.method,
        steps=int(form.steps) if form.inversion_based else defaults.steps,
        guidance=float(form.guidance) if form.inversion_based else defaults.guidance,
        inversion=form.method if form.inversion_based else defaults.inversion,
        precision=precision,
        device=device,
        offload=offload,
        p2p=p2p,
        virtual=virtual,
        flowedit=flowedit,
        spl=SPLSettings(
            structure=bool(form.spl), color=bool(form.cpl), structure_weight=float(form.structure_weight),
            color_weight=float(form.color_weight), iterations=int(form.iterations),
            opt_schedule=float(form.opt_schedule), postprocess=bool(form.postprocess),
            structure_area=form.spl_area, color_area=form.cpl_area,
        ),
        mask=MaskSettings(
            source_words=words(form.source_mask_words) if masked else [],
            target_words=words(form.target_mask_words) if masked else [],
            source_threshold=float(form.source_threshold), target_threshold=float(form.target_threshold),
            source_invert=bool(form.source_invert), target_invert=bool(form.target_invert),
        ),
    )
    check_fields(cfg)
    return cfg


def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)  # JSON is YAML: what infer.py's key=[…] / key={…} parse
    return str(value)


def cli_arguments(cfg: InferConfig) -> list[str]:
    """The `infer.py` key=value arguments that give `cfg` (keys left at their defaults omitted)."""
    arguments = []
    hints = typing.get_type_hints(InferConfig)
    for field in dataclasses.fields(InferConfig):
        value, default = getattr(cfg, field.name), getattr(InferConfig(), field.name)
        if dataclasses.is_dataclass(hints[field.name]):
            arguments += [
                f"{field.name}.{sub.name}={_cli_value(getattr(value, sub.name))}"
                for sub in dataclasses.fields(value)
                if getattr(value, sub.name) != getattr(default, sub.name)
            ]
        elif field.metadata.get("text"):  # prompts: one key per prompt, literal text
            arguments += [f"{field.name}={item}" for item in value]
        elif value != default:
            arguments.append(f"{field.name}={_cli_value(value)}")
    return arguments
