"""What one inversion and one edit are asked to do: a typed, range-checked request per stage.

- :class:`InversionRequest`: how to invert a source image (SPEC §3).
- :class:`EditRequest`: the editing method and every setting of the edit. `infer.py`'s configuration and
  `evaluate.py`'s extend it (their keys are its keys), and the web app builds one, so the three front
  ends share one definition, one set of defaults and one set of refusals.

:func:`choose_method` settles `method=auto` and refuses settings the chosen method would ignore: each
method owns some keys (p2p: `inversion`, `steps`, `guidance`, `nti.*`, `p2p.*`; virtual: `virtual.*`;
flowedit: `flowedit.*`);
`spl.*`, `mask.*` and `spatial_control` are shared. With `method=auto`, an explicitly given setting of one
method picks that method (`inversion=direct` alone asks for inversion + Prompt-to-Prompt); without any, the
caller's default applies. A given setting of another method than the chosen one is refused in one line
that names the method using it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from editkit.config import flat_values, setting
from editkit.errors import InputError
from s2edit.core.settings import (
    Checked,
    FlowEditSettings,
    MaskSettings,
    NullTextSettings,
    P2PSettings,
    SPLSettings,
    VirtualSettings,
)
from s2edit.editing.methods import METHODS, edit_method

INVERSIONS = ("null_text", "direct", "negative_prompt", "ddim")
AUTO = "auto"


@dataclass(frozen=True)
class InversionRequest(Checked):
    """How to invert a source image (SPEC §3): the method, the DDIM steps, the editing guidance the
    inversion must retrace (null-text and Direct Inversion depend on it) and null-text's settings."""

    method: str = setting("null_text", "inversion: null_text (Null-text Inversion), direct (Direct "
                                       "Inversion), negative_prompt, ddim", choices=INVERSIONS)
    steps: int = setting(50, "DDIM steps", ge=1, le=1000)
    guidance: float = setting(7.5, "classifier-free guidance of the edit", gt=0, le=100)
    nti: NullTextSettings = field(default_factory=NullTextSettings)


@dataclass(frozen=True)
class EditRequest(Checked):
    """The editing method and its settings (see the module docstring)."""

    method: str = setting(
        AUTO, "editing method: p2p (inversion + Prompt-to-Prompt), virtual (training-free virtual inversion, "
              "SPEC §9), flowedit (flow models: SD3, FLUX; SPEC §11), auto (the method whose settings are "
              "given; else flowedit on a flow model, virtual, or p2p with an S2Edit checkpoint / "
              "finetune=true)", choices=(AUTO, *METHODS))
    steps: int = setting(50, "DDIM steps of the inversion and the p2p edit (virtual: virtual.steps)",
                         ge=1, le=1000)
    guidance: float = setting(7.5, "classifier-free guidance of the p2p edit (3.5–5.5 balances fidelity and "
                                   "editability; virtual: virtual.*_guidance)", gt=0, le=100)
    inversion: str = setting("null_text", "inversion of the p2p method", choices=INVERSIONS)
    spatial_control: bool = setting(True, "mask the placeholder's cross-attention by the object mask")
    nti: NullTextSettings = field(default_factory=NullTextSettings)
    p2p: P2PSettings = field(default_factory=P2PSettings)
    virtual: VirtualSettings = field(default_factory=VirtualSettings)
    flowedit: FlowEditSettings = field(default_factory=FlowEditSettings)
    spl: SPLSettings = field(default_factory=SPLSettings)
    mask: MaskSettings = field(default_factory=MaskSettings)

    def inversion_request(self) -> InversionRequest:
        """The inversion this request's p2p edit starts from."""
        return InversionRequest(method=self.inversion, steps=self.steps, guidance=self.guidance, nti=self.nti)

    @classmethod
    def of(cls, config: EditRequest) -> EditRequest:
        """The request part of a configuration that extends it (InferConfig, EvaluateConfig)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def changed_keys(request: EditRequest) -> set[str]:
    """The keys whose values differ from the defaults (what a caller without a command line "gave")."""
    defaults = flat_values(EditRequest())
    return {key for key, value in flat_values(EditRequest.of(request)).items() if value != defaults[key]}


def _owner(key: str) -> str | None:
    for name in METHODS:
        if any(key == own or key.startswith(f"{own}.") for own in edit_method(name).owns):
            return name
    return None


def choose_method(request: EditRequest, given: Iterable[str] | None = None, default: str = "virtual") -> str:
    """The method of `request` (see the module docstring). `given`: the keys set explicitly (a command
    line's); None: those that differ from the defaults. `default`: what `auto` means without any method's
    settings given. Raises InputError naming a setting that the chosen method ignores."""
    keys = changed_keys(request) if given is None else set(given)
    values = flat_values(EditRequest.of(request))
    owned: dict[str, list[str]] = {}
    for key in sorted(keys):
        owner = _owner(key)
        if owner is not None:
            owned.setdefault(owner, []).append(key)
    method = request.method
    if method == AUTO:
        if len(owned) > 1:
            named = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in owned.items())
            raise InputError(f"settings of several methods are given ({named}): choose one with "
                             f"method={' or method='.join(owned)}")
        method = next(iter(owned), default)
    for owner, owner_keys in owned.items():
        if owner != method:
            key = owner_keys[0]
            raise InputError(f"{key}={values[key]!r} is a setting of method={owner}, which this edit does "
                             f"not use (method={method}): drop it, or pass method={owner}")
    return method
