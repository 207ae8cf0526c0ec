"""The public API: every export resolves, and `import s2edit` / `import spl` stay cheap."""

from __future__ import annotations

import subprocess
import sys

import s2edit


def test_every_public_name_resolves() -> None:
    for name in s2edit.__all__:
        assert getattr(s2edit, name).__name__ == name


def test_importing_the_packages_loads_no_model_library() -> None:
    heavy = "{'diffusers', 'lightning'}"
    code = f"import sys, s2edit, spl, s2edit.pairs; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
