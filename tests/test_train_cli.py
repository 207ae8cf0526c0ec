"""`python train.py` end to end: refused inputs fail in one line before any model work; Ctrl-C leaves a
resumable checkpoint; the resumed run writes the export and TensorBoard scalars and images.

Every refusal runs in-process through `run_main` (the same path as `__main__`: exit code 2, one line on
stderr); a few also run as real subprocesses (each pays the interpreter's torch/transformers imports).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from editkit.config import run_main
from editkit.files import LOCK_FILE
from s2edit.training import run as train
from s2edit.training.export import load_export

ROOT = Path(__file__).resolve().parent.parent
SIZE = 128
START_TIMEOUT_S = 240
LONG = " ".join(["very"] * 80)

# name → (arguments, expected fragment of the one-line error)
REFUSALS: dict[str, tuple[list[str], str]] = {
    "no_placeholder": (["prompt=a photo of a woman"], "does not contain the placeholder '[I]'"),
    "placeholder_with_space": (["placeholder=my token", "prompt=a photo of a my token woman"],
                               "must be one token without spaces"),
    "placeholder_is_a_word": (["placeholder=cat", "prompt=a photo of a cat woman"],
                              "already the vocabulary token"),
    "prompt_too_long": ([f"prompt=a photo of a [I] woman {LONG}"], "more than the 77 the text encoder takes"),
    "object_not_in_prompt": (["object=cat"], "word 'cat' is not in the prompt"),
    "unreadable_image": (["image={tmp}/not_an_image.png"], "is not a readable image"),
    "missing_mask": (["mask={tmp}/nowhere.png"], "does not exist"),
    "resume_without_checkpoint": (["resume=true"], "no checkpoint"),
    "reference_without_object": (["reference={tmp}/astronaut.png", "reference_prompt=a [A] woman"],
                                 "needs reference=, reference_prompt= and reference_object="),
}


def _train(tmp: Path, *args: str) -> subprocess.Popen:
    argv = [f"image={tmp}/astronaut.png", "model=tiny", f"resolution={SIZE}", f"out={tmp}/run", *args]
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=tmp, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    Image.fromarray(skdata.astronaut()[:SIZE, SIZE : 2 * SIZE]).save(tmp / "astronaut.png")
    (tmp / "not_an_image.png").write_text("plain text")
    return tmp


SUBPROCESS_REFUSALS = ("no_placeholder", "prompt_too_long", "unreadable_image")


def _check_refusal(name: str, code: int | str | None, stderr: str, out: Path) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert REFUSALS[name][1] in lines[0]
    assert "Traceback" not in stderr
    assert not out.exists()  # nothing written: no checkpoint, no export, no logs


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused_input_fails_in_one_line_before_training(
    workdir: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a.format(tmp=workdir) for a in REFUSALS[name][0]]
    out = workdir / f"run-{name}"
    argv = [f"image={workdir}/astronaut.png", "model=tiny", f"resolution={SIZE}", f"out={out}", *args]
    with pytest.raises(SystemExit) as exit_info:
        run_main(train.main, argv)
    _check_refusal(name, exit_info.value.code, capsys.readouterr().err, out)


@pytest.mark.parametrize("name", SUBPROCESS_REFUSALS)
def test_refused_input_as_a_subprocess(workdir: Path, name: str) -> None:
    case = workdir / f"sub-{name}"
    case.mkdir()
    for file in ("astronaut.png", "not_an_image.png"):
        (case / file).symlink_to(workdir / file)
    process = _train(case, *(a.format(tmp=case) for a in REFUSALS[name][0]))
    _, stderr = process.communicate(timeout=START_TIMEOUT_S)
    _check_refusal(name, process.returncode, stderr, case / "run")


def test_ctrl_c_leaves_a_resumable_checkpoint_and_the_resumed_run_exports(workdir: Path) -> None:
    tmp = workdir / "interrupted"
    tmp.mkdir()
    (tmp / "astronaut.png").symlink_to(workdir / "astronaut.png")
    process = _train(tmp, "max_steps=100000", "checkpoint_every=1", "image_log_every=0")
    checkpoint = tmp / "run" / "checkpoints" / "last.ckpt"  # appears after the first step
    deadline = time.monotonic() + START_TIMEOUT_S
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=START_TIMEOUT_S)
    assert process.returncode == 130, stderr
    assert "resume with resume=true" in stderr and stderr.strip().splitlines()[-1] == "error: interrupted"
    assert checkpoint.is_file() and not (tmp / "run" / "export").exists()
    assert not (tmp / "run" / LOCK_FILE).exists()  # Ctrl-C releases the lock of out
    interrupted_at = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    assert interrupted_at >= 1
    # what a killed run would have left: the next run that owns out removes it and never reads it
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp / "run" / "checkpoints" / f".last.ckpt.{dead.pid}-0123abcd.tmp").write_bytes(b"half a checkpoint")
    (tmp / "run" / f".export.tmp-{dead.pid}-x1").mkdir()

    resumed = _train(tmp, f"max_steps={interrupted_at + 2}", "resume=true", "image_log_every=1")
    stdout, stderr = resumed.communicate(timeout=START_TIMEOUT_S)
    assert resumed.returncode == 0, stderr
    assert "export written to" in stdout
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == interrupted_at + 2
    assert sorted(p.name for p in (tmp / "run").iterdir()) == ["checkpoints", "export", "tb"]
    assert [p.name for p in (tmp / "run" / "checkpoints").iterdir()] == ["last.ckpt"]
    _, manifest = load_export(tmp / "run" / "export")
    assert manifest.tokens[0].placeholder == "[I]" and manifest.base_model == "tiny"

    events = EventAccumulator(str(tmp / "run" / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for term in ("loss", "recon", "semantic", "attention", "lr"):
        steps = [e.step for e in events.Scalars(f"train/{term}")]
        assert max(steps) >= interrupted_at, term  # the resumed run continued, it did not restart at 0
    for image in ("input/I", "reconstruction/I", "mask/I", "attention_placeholder/I", "attention_object/I"):
        assert image in tags["images"]
        logged = events.Images(image)
        assert len(logged) == 2 and all(e.width == SIZE and e.height == SIZE for e in logged)
    mask = np.asarray(Image.open(tmp / "run" / "export" / manifest.tokens[0].mask))
    assert mask.shape == (SIZE, SIZE)
