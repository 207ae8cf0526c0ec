"""The editing methods, by the name `method=` gives them. A method is one file of this folder (an
:class:`~s2edit.editing.methods.base.EditMethod`) plus one line here; the command line, the web app and
the evaluation runner know them only through this table.

The entries are import paths, so that naming the methods (the config schemas' choices) loads no model code.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from s2edit.editing.methods.base import EditMethod

METHODS: dict[str, str] = {
    "p2p": "s2edit.editing.methods.p2p:PromptToPromptMethod",  # inversion + Prompt-to-Prompt (SPEC §3–§4)
    "virtual": "s2edit.editing.methods.virtual:VirtualMethod",  # InfEdit's virtual inversion (SPEC §9)
    "flowedit": "s2edit.editing.methods.flowedit:FlowEditMethod",  # FlowEdit on flow models (SPEC §11)
}


@functools.cache
def edit_method(name: str) -> EditMethod:
    """The method registered as `name` (one shared instance: methods hold no per-run state)."""
    module, _, cls = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
