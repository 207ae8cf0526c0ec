"""The package: every public name resolves, `import s2edit` / `import spl` stay cheap, and the stages
import only downwards (STYLE: lower floors never import higher ones; no package imports a script)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

import s2edit
from conftest import ROOT

# floors, lowest first: a module may import its own floor and the ones below it
FLOORS = ["editkit", "spl", "s2edit.core", "s2edit.training", "s2edit.editing", "s2edit.evaluation",
          "s2edit.app"]
ENTRY_MODULES = {"s2edit.train", "s2edit.infer", "s2edit.evaluate", "s2edit"}  # above every stage
SCRIPTS = {"train", "infer", "evaluate", "app"}


def floor(module: str) -> int:
    matches = [k for k, name in enumerate(FLOORS) if module == name or module.startswith(f"{name}.")]
    return max(matches) if matches else len(FLOORS)


def imports(path) -> set[str]:
    """Every module a file imports (also inside functions: a lazy import is still an arrow)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_every_public_name_resolves() -> None:
    for name in s2edit.__all__:
        assert getattr(s2edit, name).__name__ == name


def test_importing_the_packages_loads_no_model_library() -> None:
    heavy = "{'diffusers', 'lightning'}"
    code = f"import sys, s2edit, spl, s2edit.training.pairs; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("package", ["editkit", "spl", "s2edit"])
def test_the_stages_import_only_downwards_and_never_a_script(package: str) -> None:
    violations = []
    for path in sorted((ROOT / package).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if module in ENTRY_MODULES or module.endswith("__main__"):
            continue
        for imported in imports(path):
            top = imported.split(".")[0]
            if top in SCRIPTS or (top in ("s2edit", "spl", "editkit") and floor(imported) > floor(module)):
                violations.append(f"{module} imports {imported}")
    assert violations == []


def test_the_scripts_are_thin_entry_points() -> None:
    """train.py, infer.py, evaluate.py, app.py and their `python -m s2edit.<stage>` twins only call the
    stage's command."""
    entries = {"train.py": "training", "infer.py": "editing", "evaluate.py": "evaluation", "app.py": "app",
               "s2edit/train.py": "training", "s2edit/infer.py": "editing",
               "s2edit/evaluate.py": "evaluation", "s2edit/app/__main__.py": "app"}
    for path, stage in entries.items():
        lines = (ROOT / path).read_text().splitlines()
        assert len(lines) < 80 and f"from s2edit.{stage}.run import cli" in lines, path
