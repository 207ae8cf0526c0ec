"""The wheel runs: built from the checkout, installed into a fresh venv, and used from a folder outside the
checkout (so nothing can come from the checkout's files): a tiny fine-tune and an edit of the export,
`python -m spl`, the web app's start-up, and a one-item evaluation.

The fresh venv borrows the test environment's dependencies (a `.pth` line naming its site-packages,
without running that folder's own `.pth` files, so the checkout's editable install stays out) and gets the
wheel itself with `pip install --no-deps`: everything s2edit is, the wheel holds.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import socket
import subprocess
import sys
import time
import urllib.request
import venv
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
TIMEOUT_S = 600


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = TIMEOUT_S) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path]:
    """(the fresh venv's python, its environment, a work folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update({"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"})

    # 1. Build the wheel from a copy of the tracked files (no build folders in the checkout)
    source = tmp / "source"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
         str(source)], cwd=tmp, env=env)
    wheel = next(dist.glob("s2edit-*.whl"))

    # 2. A fresh venv that sees this environment's dependencies, and the wheel in it
    target = tmp / "venv"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "borrowed-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        cwd=tmp, env=env)
    work = tmp / "work"
    work.mkdir()
    shutil.copy(ROOT / "examples" / "chelsea.png", work / "cat.png")
    shutil.rmtree(source)
    return python, env, work


def test_the_wheel_is_what_runs_and_ships_the_presets(installed) -> None:
    python, env, work = installed
    code = ("import s2edit, s2edit.core.loading as loading; print('where=' + s2edit.__file__); "
            "print('presets=' + str(loading.preset_names())); "
            "w = loading.load_model('shapes').unet.conv_out.weight; "
            "print('weights=' + str(float(w.double().abs().sum())))")
    lines = run([str(python), "-c", code], work, env).splitlines()  # other output (warnings) may come between
    where, presets, weights = (next(line.split("=", 1)[1] for line in lines if line.startswith(f"{key}="))
                               for key in ("where", "presets", "weights"))
    assert Path(where).is_relative_to(python.parent.parent) and not Path(where).is_relative_to(ROOT)
    presets_dir = ROOT / "s2edit" / "core" / "presets"
    shipped = sorted(folder.name for folder in presets_dir.iterdir() if folder.is_dir())
    assert presets == str(shipped) and "tiny-xl" in shipped  # every preset folder is package data
    # the trained shapes model's weights ship too: the wheel's model=shapes is the checkout's
    from s2edit.core.loading import load_model

    assert float(weights) == float(load_model("shapes").unet.conv_out.weight.double().abs().sum())


def test_fine_tune_and_edit_from_the_wheel(installed) -> None:
    python, env, work = installed
    bin_ = python.parent
    run([str(bin_ / "s2edit-train"), "model=tiny", "image=cat.png", "prompt=a photo of a [I] cat",
         "object=cat", "resolution=64", "max_steps=2", "image_log_every=0", "out=run"], work, env)
    assert (work / "run" / "export" / "manifest.json").is_file()
    run([str(python), "-m", "s2edit.infer", "ckpt=run/export", "target=a photo of a [I] cat in the snow",
         "inversion=direct", "steps=3", "spl.iterations=2", "out=edit"], work, env)
    report = json.loads((work / "edit" / "report.json").read_text())
    assert report["method"] == "p2p" and report["inversion"]["method"] == "direct"
    assert (work / "edit" / "edit_0.png").is_file() and (work / "edit" / "masks" / "object_I.png").is_file()


def test_python_m_spl_from_the_wheel(installed) -> None:
    python, env, work = installed
    run([str(python), "-m", "spl", "source=cat.png", "edited=cat.png", "out=restored.png", "resolution=64",
         "iterations=2"], work, env)
    assert (work / "restored.png").is_file()


def test_one_item_evaluation_from_the_wheel(installed) -> None:
    python, env, work = installed
    record = {"id": "cat-tiger", "image": "cat.png", "source": "a photo of a cat",
              "target": "a photo of a tiger"}
    (work / "data.jsonl").write_text(json.dumps(record) + "\n")
    run([str(python.parent / "s2edit-evaluate"), "data=data.jsonl", "model=tiny", "resolution=64",
         "virtual.steps=2", "spl.iterations=2", "progress=false", "out=eval"], work, env)
    summary = json.loads((work / "eval" / "summary.json").read_text())
    assert summary["done"] == 1 and (work / "eval" / "items" / "cat-tiger" / "DONE").is_file()
    listing = run([str(python.parent / "s2edit-metrics"), "list", "--cache", "weights"], work, env)
    assert f"weights cache: {work / 'weights'}" in listing and "fid: not installed" in listing


def test_the_app_starts_from_the_wheel(installed) -> None:
    python, env, work = installed
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = subprocess.Popen([str(python), "-m", "s2edit.app", "--model", "tiny", "--port", str(port),
                            "--workdir", "app"], cwd=work, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.monotonic() + TIMEOUT_S, ""
        while time.monotonic() < deadline and app.poll() is None and not page:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    page = response.read().decode(errors="replace")
            except OSError:
                time.sleep(1)
        assert "S2Edit + SPL" in page, app.stdout.read() if app.poll() is not None else "no page"
    finally:
        app.kill()
        app.wait()
