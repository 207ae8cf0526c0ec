"""Hostile inputs through every entry point: train.py, infer.py, python -m spl and the
Python API.

Every row of the table is refused with exit code 2 and exactly one stderr line `error: …` naming the bad
value, without a traceback, and leaves every file as it was: each file under the test's folder, the
shared inputs and the checkpoint is hashed before and after (nothing created, changed or lost). Rows run
in-process through `run_main` (the path of `__main__`); a few also run as real subprocesses. File-system
faults use real tiny tmpfs mounts where the tests run as root (full disk, read-only), else chmod or
injected errors. None of the refusals loads a model.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from conftest import ROOT
from editkit.config import format_help, parse_config, run_main
from editkit.errors import InputError
from editkit.files import LOCK_FILE, OutputLock, file_sha256
from s2edit.core.loading import load_model
from s2edit.core.settings import MAX_RESOLUTION, NullTextSettings, P2PSettings, SPLSettings
from s2edit.editing import run as infer
from s2edit.editing.config import InferConfig
from s2edit.editing.request import EditRequest, InversionRequest
from s2edit.training import run as train
from spl import cli_app

SCRIPTS = {"train": train.main, "infer": infer.main, "spl": cli_app.main}
# what every row of a script passes besides its own arguments (placeholders filled per row)
BASE = {
    "train": ["image={photo}", "model=tiny", "resolution=64", "max_steps=1", "out={tmp}/run"],
    "infer": ["model=tiny", "image={photo}", "source=a photo of a cat", "target=a photo of a dog",
              "resolution=64", "steps=2", "out={tmp}/edit"],
    "spl": ["source={photo}", "edited={edited}", "out={tmp}/out.png", "resolution=64", "iterations=1"],
}


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A photo, an edit of it, a mask and a text file posing as an image, in a folder of their own."""
    folder = tmp_path_factory.mktemp("inputs")
    photo = skdata.chelsea()[:128, 100:228]
    Image.fromarray(photo).save(folder / "photo.png")
    Image.fromarray(np.ascontiguousarray(photo[:, ::-1])).save(folder / "edited.png")
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[32:96, 32:96] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    (folder / "junk.png").write_text("not an image")
    return {"dir": folder, "photo": folder / "photo.png", "edited": folder / "edited.png",
            "mask": folder / "mask.png", "junk": folder / "junk.png"}


@pytest.fixture(scope="module")
def ckpt(make_export: Callable[..., Path]) -> Path:
    """An export folder as train.py writes it (tiny model, token [I]; no training)."""
    mask = torch.zeros(128, 128)
    mask[24:104, 16:112] = 1.0
    tokens = [("[I]", "a photo of a [I] cat", "cat")]
    return make_export(load_model("tiny", seed=0), tokens, [mask])


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder on a full file system: a tiny tmpfs, filled up (needs root; else skipped: the injected
    ENOSPC tests below run everywhere)."""
    path = tmp_path_factory.mktemp("disk") / "full"
    if not _mount_tmpfs(path, "size=16k"):
        pytest.skip("mounting a tiny tmpfs needs root")
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def read_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A read-only folder: a read-only tmpfs as root, a chmod 555 folder otherwise."""
    path = tmp_path_factory.mktemp("disk") / "ro"
    if os.geteuid() == 0:
        if not _mount_tmpfs(path, "ro,size=4k"):
            pytest.skip("root ignores chmod, and mounting a read-only tmpfs failed")
        yield path
        subprocess.run(["umount", str(path)], check=True)
    else:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (sha256), folder and symlink under `roots`: equal snapshots = nothing created, changed
    or lost."""
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if path.is_symlink():
                state[str(path)] = f"link to {os.readlink(path)}"
            elif path.is_dir():
                state[str(path)] = "folder"
            else:
                state[str(path)] = file_sha256(path)
    return state


def run_cli(script: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """A script in-process, as its `__main__` runs it: (exit code, stderr)."""
    try:
        run_main(SCRIPTS[script], argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def assert_refused(code: int, stderr: str, fragment: str, after_progress: bool = False) -> None:
    """Exit code 2, no traceback, one line `error: …` containing `fragment` (`after_progress`: the last
    line, after the progress bars of a run that failed while writing)."""
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert "Traceback" not in stderr
    if after_progress:
        assert not any(line.startswith("error: ") for line in lines[:-1]), stderr
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert fragment in lines[0], stderr


# ----------------------------------------------------------------------------------------- row set-ups


def _link(target: str, name: str) -> Callable[[Path, dict[str, Path]], None]:
    def make(tmp: Path, paths: dict[str, Path]) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).symlink_to(paths[target])
    return make


def _loop(name: str) -> Callable[[Path, dict[str, Path]], None]:
    """A symbolic link that points at itself (every lookup of it fails with ELOOP)."""
    def make(tmp: Path, paths: dict[str, Path]) -> None:
        (tmp / name).symlink_to(tmp / name)
    return make


def _hard_link(tmp: Path, paths: dict[str, Path]) -> None:
    shutil.copy(paths["photo"], tmp / "photo.png")
    os.link(tmp / "photo.png", tmp / "same.png")


def _file(name: str) -> Callable[[Path, dict[str, Path]], None]:
    def make(tmp: Path, paths: dict[str, Path]) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(paths["photo"], tmp / name)
    return make


def _export_copy(damage: Callable[[Path], None]) -> Callable[[Path, dict[str, Path]], None]:
    def make(tmp: Path, paths: dict[str, Path]) -> None:
        shutil.copytree(paths["ckpt"], tmp / "ckpt", ignore=shutil.ignore_patterns("cache"))
        damage(tmp / "ckpt")
    return make


def _edit_manifest(token: dict | None = None, **changes: object) -> Callable[[Path], None]:
    """Change top-level fields of the manifest, and fields of its first token."""
    def damage(ckpt: Path) -> None:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest.update(changes)
        manifest["tokens"][0].update(token or {})
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return damage


def _corrupt_mask(ckpt: Path) -> None:
    next(ckpt.glob("mask_*.png")).write_bytes(b"\x89PNG\r\n\x1a\n garbage")


def _truncated_mask(ckpt: Path) -> None:
    mask = next(ckpt.glob("mask_*.png"))
    mask.write_bytes(mask.read_bytes()[:60])  # cut inside the image data


def _black_mask(ckpt: Path) -> None:
    Image.fromarray(np.zeros((128, 128), dtype=np.uint8)).save(next(ckpt.glob("mask_*.png")))


NEEDS_NO_GPU = {"train-accelerator-gpu"}

# (id, script, arguments, fragment of the error line, set-up of the test folder, fixtures needed)
ROWS = [
    # 1. never overwrite an input: same file, through a symlink, a relative path or a hard link
    ("spl-out-is-source", "spl", ["out={photo}"], "would overwrite the input source=", None, ()),
    ("spl-out-is-edited", "spl", ["out={edited}"], "would overwrite the input edited=", None, ()),
    ("spl-out-is-mask", "spl", ["mask={mask}", "out={mask}"], "would overwrite the input mask=", None, ()),
    ("spl-out-symlink-to-source", "spl", ["out={tmp}/link.png"], "out='{tmp}/link.png' would overwrite",
     _link("photo", "link.png"), ()),
    ("spl-out-relative-to-source", "spl", ["out={relative_photo}"], "would overwrite the input source=",
     None, ()),
    ("spl-out-hard-link", "spl", ["source={tmp}/photo.png", "out={tmp}/same.png"],
     "out='{tmp}/same.png' would overwrite the input source=", _hard_link, ()),
    ("train-out-is-image", "train", ["out={photo}"], "out='{photo}' would overwrite the input image=",
     None, ()),
    ("train-out-is-a-file", "train", ["out={edited}"], "out='{edited}' is a file", None, ()),
    ("train-out-symlink-to-image", "train", ["out={tmp}/link.png"], "would overwrite the input image=",
     _link("photo", "link.png"), ()),
    ("train-image-inside-export", "train", ["image={tmp}/run/export/photo.png"],
     "the input image='{tmp}/run/export/photo.png' lies in", _file("run/export/photo.png"), ()),
    ("train-mask-inside-checkpoints", "train", ["mask={tmp}/run/checkpoints/m.png"],
     "the input mask='{tmp}/run/checkpoints/m.png' lies in", _file("run/checkpoints/m.png"), ()),
    ("infer-out-is-image", "infer", ["out={photo}"], "out='{photo}' would overwrite the input image=",
     None, ()),
    ("infer-out-is-a-file", "infer", ["out={edited}"], "out='{edited}' is a file", None, ()),
    ("infer-output-is-image", "infer", ["image={tmp}/edit/edit_0.png"],
     "would overwrite the input image='{tmp}/edit/edit_0.png'", _file("edit/edit_0.png"), ()),
    ("infer-output-symlink-to-image", "infer", [], "would overwrite the input image=",
     _link("photo", "edit/source.png"), ()),
    ("infer-image-in-masks", "infer", ["image={tmp}/edit/masks/m.png"], "lies in '{tmp}/edit/masks'",
     _file("edit/masks/m.png"), ()),
    ("infer-out-in-ckpt", "infer", ["ckpt={ckpt}", "target=a photo of a [I] dog", "out={ckpt}/edits"],
     "lies in the checkpoint folder", None, ()),
    # 2. paths that are symlink loops, or links to nothing
    ("train-image-symlink-loop", "train", ["image={tmp}/loop.png"],
     "image='{tmp}/loop.png' is a symbolic link that loops back on itself", _loop("loop.png"), ()),
    ("train-out-symlink-loop", "train", ["out={tmp}/loop"],
     "out='{tmp}/loop' is a symbolic link that loops back on itself", _loop("loop"), ()),
    ("infer-image-symlink-loop", "infer", ["image={tmp}/loop.png"],
     "image='{tmp}/loop.png' is a symbolic link that loops back on itself", _loop("loop.png"), ()),
    ("infer-ckpt-symlink-loop", "infer", ["ckpt={tmp}/loop", "target=a photo of a [I] dog"],
     "'{tmp}/loop' is a symbolic link that loops back on itself", _loop("loop"), ()),
    ("infer-image-dangling-link", "infer", ["image={tmp}/gone.png"],
     "image '{tmp}/gone.png' is a symbolic link to '{tmp}/nowhere.png', which does not exist",
     lambda tmp, paths: (tmp / "gone.png").symlink_to(tmp / "nowhere.png"), ()),
    ("spl-source-symlink-loop", "spl", ["source={tmp}/loop.png"],
     "source='{tmp}/loop.png' is a symbolic link that loops back on itself", _loop("loop.png"), ()),
    # LoRA files: read before any model loads, never a pickle; an export knows whether it had one
    ("train-lora-missing", "train", ["lora={tmp}/none.safetensors"],
     "lora file '{tmp}/none.safetensors' does not exist", None, ()),
    ("infer-lora-a-pickle", "infer", ["lora={tmp}/lora.bin"],
     "lora file '{tmp}/lora.bin' is a pickle (.bin): only .safetensors files are loaded", _file("lora.bin"),
     ()),
    ("infer-lora-a-folder", "infer", ["lora={tmp}"], "lora file '{tmp}' is a folder", None, ()),
    ("infer-ckpt-given-a-lora", "infer", ["ckpt={ckpt}", "target=a photo of a [I] dog", "lora={photo}"],
     "was trained without a base LoRA: drop lora=", None, ()),
    # the method's settings: a setting of a method the edit does not use
    ("infer-setting-of-another-method", "infer", ["method=virtual"],
     "steps=2 is a setting of method=p2p, which this edit does not use (method=virtual)", None, ()),
    # 3. numbers out of range, refused at parse time
    ("infer-guidance-nan", "infer", ["guidance=nan"], "guidance=nan must be a finite number", None, ()),
    ("infer-guidance-inf", "infer", ["guidance=inf"], "guidance=inf must be a finite number", None, ()),
    ("infer-guidance-zero", "infer", ["guidance=0"], "guidance=0.0 must be > 0", None, ()),
    ("infer-guidance-negative", "infer", ["guidance=-2"], "guidance=-2.0 must be > 0", None, ()),
    ("infer-spl-eps-zero", "infer", ["spl.eps=0"], "spl.eps=0.0 must be > 0", None, ()),
    ("infer-spl-radius-negative", "infer", ["spl.radius=-1"], "spl.radius=-1 must be >= 0", None, ()),
    ("infer-spl-momentum-one", "infer", ["spl.momentum=1"], "spl.momentum=1.0 must be >= 0, < 1", None, ()),
    ("infer-spl-lr-zero", "infer", ["spl.lr=0"], "spl.lr=0.0 must be > 0", None, ()),
    ("infer-seed-negative", "infer", ["seed=-1"], "seed=-1 must be >= 0", None, ()),
    ("infer-resolution-small", "infer", ["resolution=32"], "resolution=32 must be >= 64, <= 2048", None, ()),
    ("infer-resolution-large", "infer", ["resolution=100000"], "resolution=100000 must be >= 64, <= 2048",
     None, ()),
    ("infer-cross-replace", "infer", ["p2p.cross_replace=1.5"], "p2p.cross_replace=1.5 must be >= 0, <= 1",
     None, ()),
    ("infer-self-replace", "infer", ["p2p.self_replace=-0.1"], "p2p.self_replace=-0.1 must be >= 0", None,
     ()),
    ("infer-word-schedule", "infer", ["p2p.cross_replace_words={{cat: 2}}"],
     "p2p.cross_replace_words={{'cat': 2.0}} must be >= 0, <= 1", None, ()),
    ("infer-opt-schedule", "infer", ["spl.opt_schedule=2"], "spl.opt_schedule=2.0 must be >= 0, <= 1", None,
     ()),
    ("infer-virtual-schedule", "infer", ["virtual.self_replace=1.01"], "virtual.self_replace=1.01", None, ()),
    ("infer-mask-threshold", "infer", ["mask.source_threshold=2"], "mask.source_threshold=2.0", None, ()),
    ("infer-steps-zero", "infer", ["steps=0"], "steps=0 must be >= 1", None, ()),
    ("train-finetune-lr-zero", "train", ["finetune.lr=0"], "finetune.lr=0.0 must be > 0", None, ()),
    ("train-finetune-lr-nan", "train", ["finetune.lr=nan"], "finetune.lr=nan must be a finite number",
     None, ()),
    ("train-lora-rank-zero", "train", ["finetune.lora_rank=0"], "finetune.lora_rank=0 must be >= 1", None,
     ()),
    ("train-seed-negative", "train", ["seed=-1"], "seed=-1 must be >= 0", None, ()),
    ("train-resolution-small", "train", ["resolution=63"], "resolution=63 must be >= 64", None, ()),
    ("train-resolution-large", "train", ["resolution=2049"], "resolution=2049 must be >= 64, <= 2048",
     None, ()),
    ("train-mask-threshold-high", "train", ["spatial.mask_threshold=1.5"],
     "spatial.mask_threshold=1.5 must be >= 0, <= 1", None, ()),
    ("train-mask-threshold-low", "train", ["spatial.mask_threshold=-0.1"], "spatial.mask_threshold=-0.1",
     None, ()),
    ("train-max-steps-zero", "train", ["max_steps=0"], "max_steps=0 must be >= 1", None, ()),
    ("train-accelerator-unknown", "train", ["accelerator=tpu"], "accelerator='tpu' must be one of auto, cpu",
     None, ()),
    ("train-precision-unknown", "train", ["precision=fp16"], "precision='fp16' must be one of", None, ()),
    ("train-accelerator-gpu", "train", ["accelerator=gpu"], "accelerator=gpu needs a CUDA GPU, and none is "
     "available: use accelerator=auto or accelerator=cpu", None, ()),
    ("spl-resolution-large", "spl", ["resolution=100000"], "resolution=100000 must be >= 64, <= 2048", None,
     ()),
    ("spl-resolution-small", "spl", ["resolution=32"], "resolution=32 must be >= 64", None, ()),
    ("spl-eps-zero", "spl", ["eps=0"], "eps=0.0 must be > 0", None, ()),
    ("spl-radius-negative", "spl", ["radius=-1"], "radius=-1 must be >= 0", None, ()),
    ("spl-momentum-one", "spl", ["momentum=1"], "momentum=1.0 must be >= 0, < 1", None, ()),
    ("spl-lr-zero", "spl", ["lr=0"], "lr=0.0 must be > 0", None, ()),
    ("spl-lr-nan", "spl", ["lr=nan"], "lr=nan must be a finite number", None, ()),
    ("spl-iterations-negative", "spl", ["iterations=-1"], "iterations=-1 must be >= 0", None, ()),
    ("spl-weight-negative", "spl", ["structure_weight=-1"], "structure_weight=-1.0 must be >= 0", None, ()),
    ("spl-device-unknown", "spl", ["device=tpu"], "device='tpu' must be one of auto, cpu, cuda", None, ()),
    # 4. I/O faults: a missing parent folder, a file in the way, a read-only folder, a full disk
    ("spl-missing-folder", "spl", ["out={tmp}/missing/out.png"],
     "out='{tmp}/missing/out.png': its folder '{tmp}/missing' does not exist", None, ()),
    ("spl-read-only", "spl", ["out={read_only}/out.png"], "its folder '{read_only}' is not writable", None,
     ("read_only",)),
    ("spl-full-disk", "spl", ["out={full_disk}/out.png"],
     "could not write '{full_disk}/out.png': No space left on device", None, ("full_disk",)),
    ("train-out-under-a-file", "train", ["out={edited}/run"], "out='{edited}/run' must be a folder, but",
     None, ()),
    ("train-read-only", "train", ["out={read_only}/run"], "could not write '{read_only}/run", None,
     ("read_only",)),
    ("train-full-disk", "train", ["out={full_disk}/run"],
     "could not write '{full_disk}/run/.output.lock': No space left on device", None, ("full_disk",)),
    ("infer-out-under-a-file", "infer", ["out={edited}/edit"], "out='{edited}/edit' must be a folder, but",
     None, ()),
    ("infer-read-only", "infer", ["out={read_only}/edit"], "could not write '{read_only}/edit", None,
     ("read_only",)),
    ("infer-full-disk", "infer", ["out={full_disk}/edit"],
     "could not write '{full_disk}/edit/.output.lock': No space left on device", None, ("full_disk",)),
    # 5. exports are validated, not trusted
    ("infer-ckpt-corrupt-mask", "infer", ["ckpt={tmp}/ckpt"],
     "mask '{tmp}/ckpt/mask_0_I.png' of token [I] is not a readable image", _export_copy(_corrupt_mask), ()),
    ("infer-ckpt-truncated-mask", "infer", ["ckpt={tmp}/ckpt"],
     "mask '{tmp}/ckpt/mask_0_I.png' of token [I] is not a readable image", _export_copy(_truncated_mask),
     ()),
    ("infer-ckpt-black-mask", "infer", ["ckpt={tmp}/ckpt"],
     "mask '{tmp}/ckpt/mask_0_I.png' is empty", _export_copy(_black_mask), ()),
    ("infer-ckpt-resolution-text", "infer", ["ckpt={tmp}/ckpt"],
     "ExportManifest.resolution='abc' must be int", _export_copy(_edit_manifest(resolution="abc")), ()),
    ("infer-ckpt-resolution-huge", "infer", ["ckpt={tmp}/ckpt"],
     f"ExportManifest.resolution=99999 must be >= 64, <= {MAX_RESOLUTION}",
     _export_copy(_edit_manifest(resolution=99999)), ()),
    ("infer-ckpt-method", "infer", ["ckpt={tmp}/ckpt"],
     "ExportManifest.method='dreambooth' must be one of full, lora",
     _export_copy(_edit_manifest(method="dreambooth")), ()),
    ("infer-ckpt-token-id", "infer", ["ckpt={tmp}/ckpt"],
     "ExportToken.token_id=-3 must be >= 0", _export_copy(_edit_manifest(token={"token_id": -3})), ()),
    ("infer-ckpt-token-prompt", "infer", ["ckpt={tmp}/ckpt"],
     "ExportToken.prompt=42 must be str", _export_copy(_edit_manifest(token={"prompt": 42})), ()),
    ("infer-ckpt-mask-path", "infer", ["ckpt={tmp}/ckpt"],
     "names the mask '../photo.png' for [I]: a mask must be a file name inside the export folder",
     _export_copy(_edit_manifest(token={"mask": "../photo.png"})), ()),
    ("infer-ckpt-files", "infer", ["ckpt={tmp}/ckpt"],
     "ExportManifest.files=['unet.safetensors'] must be mapping",
     _export_copy(_edit_manifest(files=["unet.safetensors"])), ()),
]


@pytest.mark.parametrize(("name", "script", "args", "fragment", "setup", "needs"),
                         [pytest.param(*row, id=row[0]) for row in ROWS])
def test_hostile_cli_input_is_refused_in_one_line_and_touches_nothing(
    name: str, script: str, args: list[str], fragment: str, setup: Callable | None, needs: tuple[str, ...],
    inputs: dict[str, Path], ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    if name in NEEDS_NO_GPU and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    paths = {**inputs, "ckpt": ckpt, "tmp": tmp_path}
    paths.update({fixture: request.getfixturevalue(fixture) for fixture in needs})
    if setup is not None:
        setup(tmp_path, paths)
    values = {key: str(value) for key, value in paths.items()}
    values["relative_photo"] = os.path.relpath(inputs["photo"])
    argv = [arg.format(**values) for arg in [*BASE[script], *args]]
    roots = [tmp_path, inputs["dir"], ckpt, *(paths[fixture] for fixture in needs)]
    before = snapshot(*roots)
    code, stderr = run_cli(script, argv, capsys)
    assert_refused(code, stderr, fragment.format(**values))
    assert snapshot(*roots) == before


def test_every_numeric_setting_of_the_spl_tool_has_a_range() -> None:
    """`python -m spl` declares its ranges like train.py and infer.py (one maximum resolution for all)."""
    assert cli_app.MAX_RESOLUTION == MAX_RESOLUTION
    fields = {f.name: f for f in cli_app.SPLToolConfig.__dataclass_fields__.values()}
    numeric = [name for name, f in fields.items() if f.type in ("float", "int", "int | None")]
    assert set(numeric) == {"resolution", "structure_weight", "color_weight", "iterations", "lr", "momentum",
                            "radius", "eps"}
    assert all({"ge", "gt"} & set(fields[name].metadata) for name in numeric)
    text = format_help(cli_app.SPLToolConfig, cli_app.PROG)
    assert "(int or null, >= 64, <= 2048 = 512)" in text and "(float, >= 0, < 1 = 0.9)" in text


# ----------------------------------------------------------------------------------------- 6. prompts


def test_prompts_beginning_with_a_bracket_are_one_literal_prompt(inputs: dict[str, Path], ckpt: Path,
                                                                 tmp_path: Path) -> None:
    """`target=[I]` and `target=[I] cat smiling` are prompts, not YAML lists; planned without a model."""
    argv = [f"ckpt={ckpt}", "target=[I]", "target=[I] cat smiling", f"out={tmp_path / 'edit'}"]
    cfg = parse_config(InferConfig, argv)
    assert cfg.target == ["[I]", "[I] cat smiling"]
    plan = infer.check_inputs(cfg).plan
    assert plan.targets == ("[I]", "[I] cat smiling") and plan.source == "a photo of a [I] cat"
    free = [f"image={inputs['photo']}", "source=a photo of a cat", "target=[I] cat smiling", "model=tiny"]
    assert infer.check_inputs(parse_config(InferConfig, free)).plan.targets == ("[I] cat smiling",)
    listed = parse_config(InferConfig, [*free[:2], 'target=["a cat", "[I] dog"]'])
    assert listed.target == ["a cat", "[I] dog"]
    assert not (tmp_path / "edit").exists()


# ----------------------------------------------------------------------------------------- 4. locks


HOLD_LOCK = """
import sys, time
from editkit.files import OutputLock
with OutputLock(sys.argv[1], "infer.py (the first run)"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_into_the_same_out_is_refused_and_a_dead_runs_lock_taken_over(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "edit"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                             env=env, cwd=ROOT)
    try:
        assert first.stdout.readline().strip() == "locked"
        before = snapshot(tmp_path, inputs["dir"])
        argv = [arg.format(photo=inputs["photo"], tmp=tmp_path) for arg in BASE["infer"]]
        code, stderr = run_cli("infer", argv, capsys)
        assert_refused(code, stderr, f"out='{out}' is in use by another run (pid {first.pid} on "
                                     f"{socket.gethostname()}, started ")
        assert f"infer.py (the first run); lock file '{out / LOCK_FILE}')" in stderr
        assert snapshot(tmp_path, inputs["dir"]) == before
    finally:
        first.kill()  # SIGKILL: no clean-up, the lock file stays behind naming a dead process
        first.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid
    with pytest.warns(UserWarning, match=rf"no longer running \(pid {first.pid} on ") as caught, \
            OutputLock(out, "infer.py (the next run)"):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert len(caught) == 1
    assert list(out.iterdir()) == []  # released


def test_output_lock_refuses_a_second_holder_and_removes_what_it_made(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    with OutputLock(out, "first"):
        assert out.is_dir()
        busy = r"is in use by another run \(pid \d+ .*: first; lock file"
        with pytest.raises(InputError, match=busy), OutputLock(out, "second"):
            pass  # pragma: no cover
    assert not (tmp_path / "a").exists()  # folders it made, left empty, go again
    (out / "kept.txt").parent.mkdir(parents=True)
    (out / "kept.txt").write_text("x")
    with OutputLock(out, "third"):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]


# ------------------------------------------------------------------------------------- 4. full disk mid-run


def _full_disk_on_save(monkeypatch: pytest.MonkeyPatch, failing_call: int) -> list[str]:
    """Image.save writes part of the file, then fails as a full disk does, at its `failing_call`-th call."""
    real_save, calls = Image.Image.save, []

    def save(self: Image.Image, fp: object, format: str | None = None, **params: object) -> None:
        calls.append(str(fp))
        if len(calls) == failing_call:
            Path(str(fp)).write_bytes(b"\x89PNG\r\n\x1a\n partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(self, fp, format, **params)

    monkeypatch.setattr(Image.Image, "save", save)
    return calls


def test_full_disk_during_infer_leaves_no_partial_file(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "edit"
    out.mkdir()
    (out / "reconstruction.png").write_bytes(b"an earlier run's image")  # kept, not half-overwritten
    (out / ".edit_0.png.0123456789ab.tmp").write_bytes(b"what a killed run left")
    calls = _full_disk_on_save(monkeypatch, failing_call=2)  # source.png, then reconstruction.png
    argv = ["model=tiny", f"image={inputs['photo']}", "source=a photo of a cat", "target=a photo of a dog",
            "method=virtual", "virtual.steps=2", "spl.iterations=1", "resolution=64", f"out={out}"]
    code, stderr = run_cli("infer", argv, capsys)
    assert len(calls) == 2 and calls[1].endswith(".tmp")
    assert_refused(code, stderr, f"could not write '{out / 'reconstruction.png'}': No space left on device",
                   after_progress=True)
    assert (out / "reconstruction.png").read_bytes() == b"an earlier run's image"
    assert sorted(p.name for p in out.iterdir()) == ["reconstruction.png", "source.png"]  # no temp, no lock
    assert Image.open(out / "source.png").size == (64, 64)


def test_full_disk_during_spl_leaves_no_partial_file(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _full_disk_on_save(monkeypatch, failing_call=1)
    out = tmp_path / "out.png"
    argv = [arg.format(photo=inputs["photo"], edited=inputs["edited"], tmp=tmp_path) for arg in BASE["spl"]]
    code, stderr = run_cli("spl", argv, capsys)
    assert_refused(code, stderr, f"could not write '{out}': No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_saving_the_resume_checkpoint_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every Trainer's checkpoints go through one atomic writer: a full disk mid-write keeps the previous
    last.ckpt, names the checkpoint (not the temporary file) and leaves no temporary file."""
    from s2edit.core.trainer import AtomicCheckpointIO

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"the previous checkpoint")

    def full_disk_save(checkpoint: object, path: Path) -> None:
        Path(path).write_bytes(b"half a checkp")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(OSError, match="No space left on device") as caught:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, folder / "last.ckpt")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(folder / "last.ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert (folder / "last.ckpt").read_bytes() == b"the previous checkpoint"


# ----------------------------------------------------------------------------------------- 7. the Python API


@pytest.fixture(scope="module")
def editor(tmp_path_factory: pytest.TempPathFactory) -> object:
    from s2edit.editing.editor import Editor

    cache = tmp_path_factory.mktemp("api_cache")
    return Editor(load_model("tiny", seed=0), cache_dir=cache, progress=False)


def _image() -> torch.Tensor:
    return torch.zeros(1, 3, 64, 64)


API_ROWS = {
    "uint8-image": (lambda ed: ed.invert(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "a cat"),
                    "dtype torch.uint8 must be floating point in [-1, 1]"),
    "0-255-image": (lambda ed: ed.invert(torch.full((1, 3, 64, 64), 200.0), "a cat"),
                    "values lie in [200, 200], not in [-1, 1]"),
    "nan-image": (lambda ed: ed.invert(torch.full((1, 3, 64, 64), math.nan), "a cat"),
                  "image tensor contains NaN"),
    "image-shape": (lambda ed: ed.invert(torch.zeros(3, 64, 64), "a cat"), "shape (3, 64, 64) must be"),
    "guidance-nan": (lambda ed: ed.invert(_image(), "a cat", InversionRequest(guidance=math.nan)),
                     "guidance=nan must be"),
    "guidance-zero": (lambda ed: ed.invert(_image(), "a cat", InversionRequest(guidance=0)),
                      "guidance=0 must be"),
    "spl-lr-nan": (lambda ed: SPLSettings(lr=math.nan), "SPLSettings.lr=nan must be a finite number"),
    "p2p-schedule": (lambda ed: P2PSettings(cross_replace=1.5), "P2PSettings.cross_replace=1.5 must be"),
    "nti-lr-text": (lambda ed: NullTextSettings(lr="0.01"), "NullTextSettings.lr='0.01' must be float"),
    "targets-string": (lambda ed: ed.edit_virtual(_image(), "a cat", "tiger"),
                       "targets='tiger' must be a list"),
    "targets-number": (lambda ed: ed.edit_virtual(_image(), "a cat", [123]), "target prompt 123 must be"),
    "prompt-none": (lambda ed: ed.invert(_image(), None), "prompt=None must be a non-empty string"),
    "steps-text": (lambda ed: ed.invert(_image(), "a cat", InversionRequest(steps="4")),
                   "InversionRequest.steps='4' must be int"),
    "request-type": (lambda ed: ed.invert(_image(), "a cat", {"method": "direct"}),
                     "request={'method': 'direct'} must be an InversionRequest"),
    "method-setting": (lambda ed: ed.run(_image(), "a cat", ["a dog"],
                                         EditRequest(method="virtual", steps=4)),
                       "steps=4 is a setting of method=p2p"),
    "seed-negative": (lambda ed: ed.edit_virtual(_image(), "a cat", ["a dog"], seed=-1), "seed=-1 must be"),
}


@pytest.mark.parametrize("case", list(API_ROWS))
def test_hostile_api_arguments_are_refused_in_one_line(case: str, editor: object) -> None:
    call, fragment = API_ROWS[case]
    before = snapshot(editor.cache_dir)
    with pytest.raises(InputError) as caught:
        call(editor)
    message = str(caught.value)
    assert fragment in message and "\n" not in message
    assert snapshot(editor.cache_dir) == before


# ----------------------------------------------------------------------------------------- real subprocesses


SUBPROCESS_ROWS = {
    "spl-out-symlink-to-source": ("spl", ["out={tmp}/link.png"], "would overwrite the input source="),
    "train-out-is-a-file": ("train", ["out={edited}"], "is a file"),
    "infer-guidance-nan": ("infer", ["guidance=nan"], "guidance=nan must be a finite number"),
}


@pytest.fixture(scope="module")
def subprocess_runs(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The subprocess rows, started at once (each start pays the interpreter's torch imports)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    commands = {"train": [str(ROOT / "train.py")], "infer": [str(ROOT / "infer.py")], "spl": ["-m", "spl"]}
    started = {}
    for name, (script, args, _) in SUBPROCESS_ROWS.items():
        tmp = tmp_path_factory.mktemp(name)
        (tmp / "link.png").symlink_to(inputs["photo"])
        values = {"photo": inputs["photo"], "edited": inputs["edited"], "tmp": tmp}
        argv = [arg.format(**values) for arg in [*BASE[script], *args]]
        before = snapshot(tmp, inputs["dir"])
        process = subprocess.Popen([sys.executable, *commands[script], *argv], cwd=ROOT, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started[name] = (process, tmp, before)
    results = {}
    for name, (process, tmp, before) in started.items():
        _, stderr = process.communicate(timeout=300)
        results[name] = (process.returncode, stderr, snapshot(tmp, inputs["dir"]) == before)
    return results


@pytest.mark.parametrize("name", list(SUBPROCESS_ROWS))
def test_hostile_input_in_a_real_subprocess(name: str, subprocess_runs: dict) -> None:
    code, stderr, untouched = subprocess_runs[name]
    assert_refused(code, stderr, SUBPROCESS_ROWS[name][2])
    assert untouched


# ----------------------------------------------------------------------------------------- run_main


def _raise(error: BaseException) -> Callable[[list[str]], None]:
    def main(argv: list[str]) -> None:
        raise error
    return main


def test_run_main_reports_the_machines_os_errors_in_one_line_and_keeps_bugs_visible(
    capsys: pytest.CaptureFixture[str],
) -> None:
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/edit_0.png")
    with pytest.raises(SystemExit) as exit_:
        run_main(_raise(full), [])
    assert_refused(exit_.value.code, capsys.readouterr().err,
                   "could not access '/data/out/edit_0.png': No space left on device")
    bugs = (OSError(errno.EINVAL, "Invalid argument", "x"), FileNotFoundError(errno.ENOENT, "No such", "y"),
            ValueError("a bug"))
    for bug in bugs:
        with pytest.raises(type(bug)):
            run_main(_raise(bug), [])
