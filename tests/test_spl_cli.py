"""`python -m spl` end to end, in a subprocess with the project's Python (SPEC §5 post-processing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from skimage import data

from editkit.images import load_image, resize_to
from spl.losses import structure_preservation_loss

ROOT = Path(__file__).resolve().parents[1]


def start_spl(*args: str) -> subprocess.Popen:
    # One thread: on a shared 2-core machine OpenMP barriers stall whenever another process holds a core.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "spl", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_spl(*args: str) -> subprocess.CompletedProcess:
    return finish(start_spl(*args))


def loaded_pair(images: dict[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Source at the tool's working size (resolution=192) and the edit resized to it, as the tool does."""
    source = load_image(images["source"], resolution=192)
    edited = resize_to(load_image(images["edited"], resolution=None, multiple=1), tuple(source.shape[-2:]))
    return source, edited


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real photo, an edit of it (blur + bluish cast, saved smaller and as JPEG), a half mask, junk."""
    folder = tmp_path_factory.mktemp("spl_cli")
    photo = Image.fromarray(data.chelsea())                             # 451×300
    photo.save(folder / "source.png")
    edit = np.asarray(photo.filter(ImageFilter.GaussianBlur(3)), dtype=np.float64)
    edit[..., 2] = edit[..., 2] * 0.6 + 60
    Image.fromarray(edit.clip(0, 255).astype(np.uint8)).resize((300, 200)).save(folder / "edited.jpg")
    mask = np.zeros((300, 451), dtype=np.uint8)
    mask[:, :225] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    (folder / "notes.png").write_text("this is not an image")
    return {"dir": folder, "source": folder / "source.png", "edited": folder / "edited.jpg",
            "mask": folder / "mask.png", "junk": folder / "notes.png"}


def test_cli_refines_a_real_pair(images: dict[str, Path]) -> None:
    out = images["dir"] / "refined.png"
    result = run_spl(f"source={images['source']}", f"edited={images['edited']}", f"out={out}",
                     "resolution=192", "iterations=40")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("report:") == 1

    source, edited = loaded_pair(images)
    refined = load_image(out, resolution=None, multiple=1)
    assert refined.shape == source.shape
    assert (refined - edited).abs().mean() > 0.01                      # it did something
    before, after = structure_preservation_loss(source, edited), structure_preservation_loss(source, refined)
    assert after < 0.5 * before
    # the report's numbers are the library's SPL before and after (after: before 8-bit rounding)
    reported = result.stdout.split("spl ")[1].split(" |")[0].split(" -> ")
    assert float(reported[0]) == pytest.approx(before.item(), rel=1e-3)
    assert float(reported[1]) == pytest.approx(after.item(), rel=0.1)
    # colours of the edit stay (CPL off by default): the blue channel keeps its cast
    assert (refined[:, 2] - edited[:, 2]).mean().abs() < 0.5 * (source[:, 2] - edited[:, 2]).mean().abs()


def test_cli_mask_and_color(images: dict[str, Path]) -> None:
    """Outside the mask nothing moves (up to 8-bit rounding); inside, structure and colour come back."""
    out = images["dir"] / "masked.png"
    result = run_spl(f"source={images['source']}", f"edited={images['edited']}", f"out={out}",
                     f"mask={images['mask']}", "color=true", "resolution=192", "iterations=40")
    assert result.returncode == 0, result.stderr
    assert "cpl " in result.stdout
    source, edited = loaded_pair(images)
    refined = load_image(out, resolution=None, multiple=1)
    width = source.shape[-1]
    outside = (..., slice(None), slice(width // 2 + 4, None))         # mask is black right of the middle
    inside = (..., slice(None), slice(None, width // 2 - 4))
    assert (refined[outside] - edited[outside]).abs().max() <= 1.01 / 127.5
    error_before = (edited[inside] - source[inside]).abs().mean()
    assert (refined[inside] - source[inside]).abs().mean() < 0.8 * error_before


REFUSALS = {
    "missing_file": "does not exist",
    "not_an_image": "not a readable image",
    "missing_key": "missing required key 'edited'",
    "unknown_key": "unknown config key 'iteration'",
}


@pytest.fixture(scope="module")
def refusals(images: dict[str, Path]) -> dict[str, tuple[subprocess.CompletedProcess, Path, set[Path]]]:
    """Run the four refused command lines at once (each start pays for importing torch)."""
    folder = images["dir"]
    before = set(folder.iterdir())
    args = {
        "missing_file": [f"source={images['source']}", f"edited={folder / 'absent.png'}"],
        "not_an_image": [f"source={images['source']}", f"edited={images['junk']}"],
        "missing_key": [f"source={images['source']}"],
        "unknown_key": [f"source={images['source']}", f"edited={images['edited']}", "iteration=3"],
    }
    outs = {case: folder / f"refused_{case}.png" for case in args}
    started = {case: start_spl(*a, f"out={outs[case]}") for case, a in args.items()}
    return {case: (finish(process), outs[case], before) for case, process in started.items()}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_cli_refuses_bad_input(images: dict[str, Path], refusals: dict, case: str) -> None:
    result, out, before = refusals[case]
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and REFUSALS[case] in lines[0], result.stderr
    assert not out.exists()
    leftovers = {p for p in images["dir"].iterdir() if p.name.startswith((".refused", "refused"))}
    assert not leftovers and before <= set(images["dir"].iterdir())     # no partial or temporary file
