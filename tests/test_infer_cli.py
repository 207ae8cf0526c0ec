"""`python infer.py` end to end on the tiny model: every output file, the inversion cache, and one-line
refusals (exit code 2, no traceback, nothing written) for every input a user can get wrong.

Runs go in-process through `run_main` (the same path as `__main__`); a few refusals also run as real
subprocesses, each paying the interpreter's torch/diffusers imports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, run_cli
from s2edit.core.loading import load_model
from s2edit.editing import run as infer

IMAGE = ROOT / "examples" / "chelsea.png"
FAST = ["resolution=128", "steps=4", "nti.inner_steps=2", "spl.iterations=3"]  # p2p
VIRTUAL_FAST = ["resolution=128", "virtual.steps=2", "spl.iterations=3"]
BASE = ["model=tiny", f"image={IMAGE}", "source=a photo of a cat"]
TRAINING_FREE = [*BASE, "method=p2p"]
LONG = " ".join(["very"] * 80)


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """infer.py in-process: (exit code, stderr)."""
    return run_cli(infer.main, argv, capsys)


def assert_refused(code: int, stderr: str, fragment: str, out: Path) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], stderr
    assert "Traceback" not in stderr
    assert not out.exists()  # nothing half-written


@pytest.fixture(scope="module")
def export(make_export) -> Path:
    """An export folder as train.py writes it (tiny model, tokens [I] and [A]; no training needed)."""
    mask = torch.zeros(128, 128)
    mask[24:104, 16:112] = 1.0
    tokens = [("[I]", "a photo of a [I] cat", "cat"), ("[A]", "a photo of a cat with [A] stripes", "stripes")]
    return make_export(load_model("tiny", seed=0), tokens, [mask, mask])


def copy_export(export: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(export, tmp_path / "export", ignore=shutil.ignore_patterns("cache")))


# ----------------------------------------------------------------------------------------- runs


def test_training_free_run_writes_every_output_and_caches_the_inversion(tmp_path, capsys) -> None:
    out = tmp_path / "edit"
    argv = [
        *TRAINING_FREE,
        "target=a photo of a tiger",
        "target=a photo of a lion",
        f"out={out}",
        *FAST,
        "spl.structure_area=masked",
        "mask.source_words=[cat]",
        "mask.target_words=[photo]",
        "p2p.blend_words=[cat, tiger, lion]",
    ]
    code, stderr = run(argv, capsys)
    assert code == 0, stderr
    expected = {
        "source.png",
        "reconstruction.png",
        "edit_0.png",
        "edit_1.png",
        "report.json",
        "masks/source.png",
        "masks/target_0.png",
        "masks/target_1.png",
        "masks/mask_0.png",
        "masks/mask_1.png",
    }
    expected |= {f"attention/source/{w}.png" for w in ("a", "photo", "of", "cat")}
    expected |= {f"attention/target_{k}/{w}.png" for k, w in ((0, "tiger"), (1, "lion"))}
    written = {
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and "cache" not in p.parts
    }
    assert expected <= written, expected - written
    assert not [p for p in out.rglob("*.tmp")]  # atomic writes leave no temporaries
    for name in ("source.png", "edit_0.png", "reconstruction.png"):
        assert Image.open(out / name).size == (128, 128)

    report = json.loads((out / "report.json").read_text())
    assert (
        report["seed"] == 0
        and report["settings"]["steps"] == 4
        and report["targets"][1] == "a photo of a lion"
    )
    assert report["inversion"]["method"] == "null_text" and report["inversion"]["cached"] is False
    assert set(report["timings"]) >= {"load", "inversion", "edit", "write", "total"}
    assert set(report["timings"]["edit"]) >= {"denoise", "spl_in_loop", "decode", "postprocess"}
    metrics = report["metrics"]
    assert isinstance(metrics["reconstruction_psnr"], float)
    assert [t["file"] for t in metrics["targets"]] == ["edit_0.png", "edit_1.png"]
    assert all(t["spl_loss_after"] < t["spl_loss_before"] for t in metrics["targets"])
    assert len(list((out / "cache").glob("inversion-*.safetensors"))) == 1

    # the same image and prompt again: the inversion comes from the cache
    code, stderr = run([*TRAINING_FREE, "target=a photo of a dog", f"out={out}", *FAST], capsys)
    assert code == 0 and "cache hit" in stderr, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["inversion"]["cached"] is True
    # what the first run wrote and this one did not is gone: out/ holds one run, not a mix
    assert not (out / "edit_1.png").exists() and not (out / "masks").exists()
    assert not (out / "attention" / "target_1").exists()
    assert (out / "attention" / "target_0" / "dog.png").is_file()
    stale = {"edit_1.png", "masks/mask_0.png", "attention/target_0/tiger.png"}
    assert stale <= set(report["removed_stale_outputs"])
    # another image invalidates it
    other = tmp_path / "other.png"
    Image.open(IMAGE).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    code, stderr = run(
        [*TRAINING_FREE, f"image={other}", "target=a photo of a dog", f"out={out}", *FAST], capsys
    )
    assert code == 0 and "computed" in stderr, stderr
    assert json.loads((out / "report.json").read_text())["inversion"]["cached"] is False
    assert len(list((out / "cache").glob("inversion-*.safetensors"))) == 2


def test_checkpoint_run_defaults_to_its_image_and_prompt_and_caches_beside_it(
    export, tmp_path, capsys
) -> None:
    ckpt = copy_export(export, tmp_path)
    out = tmp_path / "edit"
    argv = [f"ckpt={ckpt}", "target=a photo of a [I] cat with [A] stripes", f"out={out}", *FAST]
    code, stderr = run(argv, capsys)
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["source"] == "a photo of a [I] cat" and report["image"]["path"] == str(IMAGE)
    assert report["model"]["placeholders"] == ["[I]", "[A]"]
    assert report["inversion"]["cache_dir"] == str(ckpt / "cache")
    assert (out / "masks" / "object_I.png").is_file() and (out / "attention" / "target_0" / "A.png").is_file()
    assert len(list((ckpt / "cache").glob("inversion-*.json"))) == 1
    code, stderr = run([*argv[:1], "target=a photo of a [I] cat in the snow", f"out={out}", *FAST], capsys)
    assert code == 0 and "cache hit" in stderr, stderr


def test_virtual_method_writes_edit_masks_maps_and_report(tmp_path, capsys) -> None:
    """A training-free edit by virtual inversion (SPEC §9), no inversion, seconds."""
    out = tmp_path / "edit"
    argv = [
        "model=tiny", f"image={IMAGE}", "source=a photo of a cat", "target=a photo of a tiger",
        "method=virtual", f"out={out}", "resolution=128", "spl.iterations=5", "spl.structure_area=masked",
        "mask.source_words=[cat]", "mask.source_threshold=0.9",
    ]
    code, stderr = run(argv, capsys)
    assert code == 0, stderr
    assert "inversion (" not in stderr  # nothing is inverted
    for name in ("edit_0.png", "source.png", "reconstruction.png", "masks/source.png", "masks/mask_0.png",
                 "attention/source/cat.png", "attention/target_0/tiger.png", "report.json"):
        assert (out / name).is_file(), name
    assert not (out / "cache").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "virtual" and report["inversion"] is None
    assert report["edit_settings"]["virtual"]["steps"] == 15
    assert [r["step"] for r in report["metrics"]["spl_in_loop"]] == [12, 13, 14]
    assert report["timings"]["inversion"] == 0.0 and report["timings"]["edit"]["preview"] > 0
    # method=auto: training-free edits default to the virtual method
    code, stderr = run([*argv[:4], f"out={tmp_path / 'auto'}", "resolution=128", "spl.iterations=2"], capsys)
    assert code == 0 and json.loads((tmp_path / "auto" / "report.json").read_text())["method"] == "virtual"


def test_bfloat16_run(tmp_path, capsys) -> None:
    out = tmp_path / "edit"
    fast = ["resolution=128", "steps=3", "nti.inner_steps=1", "spl.iterations=3", "spl.opt_schedule=0.6"]
    argv = [*TRAINING_FREE, "target=a photo of a tiger", "precision=bf16", f"out={out}", *fast]
    code, stderr = run(argv, capsys)
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["dtype"] == "bfloat16" and report["inversion"]["updates"] >= 1
    target = report["metrics"]["targets"][0]
    assert [r["step"] for r in report["metrics"]["spl_in_loop"]] == [2]  # i/T >= 0.6 of 3 steps
    assert target["spl_loss_after"] < target["spl_loss_before"]
    assert Image.open(out / "edit_0.png").size == (128, 128)


# ----------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["target=a photo of a dog", "mask.source_words=[dog]"], "mask.source_words word 'dog'"),
        (["target=a photo of a dog", "mask.target_words=[cat]"], "mask.target_words word 'cat'"),
        (["target=a photo of a dog", "p2p.blend_words=[tiger]"], "blend word 'tiger'"),
        (["target=a photo of a fluffy dog", "p2p.mode=replace"], "use mode=refine"),
        ([f"target=a photo of a {LONG} dog"], "more than the 77"),
        (["target=a photo of a dog", "spl.structure_area=masked"], "needs mask words"),
        (["target=a photo of a dog", "method=virtual", "virtual.blend_target=[cat]"],
         "virtual.blend_target word 'cat'"),
        (["target=a photo of a dog", "method=virtual", "spl.color=true", "spl.color_area=masked"],
         "needs mask words"),
        (["target=a photo of a dog", "method=virtual", "inversion=direct"],
         "inversion='direct' is a setting of method=p2p, which this edit does not use (method=virtual)"),
        (["target=a photo of a dog", "method=p2p", "virtual.steps=3"],
         "virtual.steps=3 is a setting of method=virtual"),
        ([], "no target prompt"),
        (["target=a photo of a dog", "image=nowhere.png"], "does not exist"),
    ],
)
def test_refused_edit_inputs(args, fragment, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    method = [] if any(a.startswith("method=") for a in args) else ["method=p2p"]
    fast = VIRTUAL_FAST if "method=virtual" in args else ["resolution=128", "spl.iterations=3"]
    assert_refused(*run([*BASE, *method, *args, f"out={out}", *fast], capsys), fragment, out)


def test_a_p2p_setting_alone_picks_p2p_and_a_virtual_one_virtual(export, tmp_path, capsys) -> None:
    """method=auto settles by what the user asked for: `inversion=null_text` without a checkpoint edits
    with null-text inversion + P2P (not the training-free default), and `virtual.steps` with a checkpoint
    edits virtually (not the checkpoint's default)."""
    out = tmp_path / "nti"
    argv = [*BASE, "target=a photo of a dog", "inversion=null_text", f"out={out}", *FAST]
    code, stderr = run(argv, capsys)
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "p2p" and report["inversion"]["method"] == "null_text"
    assert report["settings"]["method"] == "auto"
    out = tmp_path / "virtual"
    argv = [f"ckpt={copy_export(export, tmp_path)}", "target=a photo of a [I] cat in the snow", f"out={out}",
            *VIRTUAL_FAST]
    code, stderr = run(argv, capsys)
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "virtual" and report["inversion"] is None


def corrupt_weights(ckpt: Path) -> None:
    (ckpt / "unet.safetensors").write_bytes(b"\0" * 64)


def wrong_base(ckpt: Path) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["base_probe"]["unet.conv_in.weight"] = [
        v + 1.0 for v in manifest["base_probe"]["unet.conv_in.weight"]
    ]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def no_tokens(ckpt: Path) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["tokens"] = []
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def pickled_weights(ckpt: Path) -> None:
    (ckpt / "unet.safetensors").rename(ckpt / "unet.bin")


CHECKPOINT_REFUSALS = {
    "missing": (lambda ckpt: shutil.rmtree(ckpt), [], "does not exist"),
    "corrupt": (corrupt_weights, [], "does not match its sha256"),
    "wrong_base": (wrong_base, [], "differs from the one the export was trained on"),
    "no_token": (no_tokens, [], "has no learned token"),
    "pickle_weights": (pickled_weights, [], "pickle files are never loaded"),
    "no_placeholder": (
        lambda ckpt: None,
        ["target=a photo of a cat with a hat"],
        "does not contain the placeholder [I]",
    ),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_REFUSALS))
def test_refused_checkpoints(case, export, tmp_path, capsys) -> None:
    ckpt = copy_export(export, tmp_path)
    damage, args, fragment = CHECKPOINT_REFUSALS[case]
    damage(ckpt)
    out = tmp_path / "out"
    argv = [f"ckpt={ckpt}", "target=a photo of a [I] cat with a hat", *args, f"out={out}", *FAST]
    assert_refused(*run(argv, capsys), fragment, out)


def test_refused_pickle_file_and_overwriting_the_input(tmp_path, capsys) -> None:
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickle)
    out = tmp_path / "out"
    code, stderr = run([f"ckpt={pickle}", "target=a photo of a [I] cat", f"out={out}", *FAST], capsys)
    assert_refused(code, stderr, "is a pickle file", out)
    out.mkdir()
    source = out / "source.png"
    shutil.copy(IMAGE, source)
    code, stderr = run(
        ["model=tiny", f"image={source}", "source=a photo of a cat", "target=a dog", f"out={out}"], capsys
    )
    assert code == 2 and "would overwrite the input image" in stderr, stderr
    assert sorted(p.name for p in out.iterdir()) == ["source.png"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            [*TRAINING_FREE, "target=a photo of a dog", "p2p.mode=replace", "target=a photo of a big dog"],
            "use mode=refine",
        ),
        (["ckpt={ckpt}", "target=a photo of a cat"], "does not contain the placeholder [I]"),
    ],
)
def test_refusals_as_real_subprocesses(args, fragment, export, tmp_path) -> None:
    out = tmp_path / "out"
    argv = [a.format(ckpt=export) for a in args] + [f"out={out}", *FAST]
    result = subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert_refused(result.returncode, result.stderr, fragment, out)


def test_stale_outputs_are_removed_but_never_the_input_or_foreign_files(tmp_path) -> None:
    out = tmp_path / "out"
    for name in ("edit_0.png", "edit_1.png", "edit_2.png", "masks/a.png", "notes.txt", "mine.png"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"x")
    previous = {"edit_0.png", "edit_1.png", "edit_2.png", "masks/a.png", "notes.txt", "../outside.png"}
    (tmp_path / "outside.png").write_bytes(b"x")
    removed = infer.remove_stale(out, previous, {"edit_0.png"}, keep=out / "edit_1.png")
    assert removed == ["edit_2.png", "masks/a.png"]
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert left == ["edit_0.png", "edit_1.png", "mine.png", "notes.txt"]  # masks/ emptied and removed
    assert (tmp_path / "outside.png").is_file()
