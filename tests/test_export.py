"""The export folder: written atomically, loaded back exactly (full and LoRA), every bad folder refused."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from skimage import data as skdata

import s2edit.training.export
from conftest import ROOT
from editkit.config import parse_config
from editkit.errors import InputError
from editkit.files import describe_io_error, file_sha256
from editkit.images import load_mask
from s2edit.core.loading import random_model
from s2edit.training.config import TrainConfig
from s2edit.training.export import (
    EMBEDDINGS,
    MANIFEST,
    load_export,
    read_manifest,
    recover_export,
    write_export,
)
from s2edit.training.module import S2EditModule
from s2edit.training.pairs import TrainingPair
from s2edit.training.run import fit

SIZE = 128


def _train_and_export(root: Path, method: str) -> tuple[S2EditModule, Path]:
    image = root / "astronaut.png"
    Image.fromarray(skdata.astronaut()[:SIZE, SIZE : 2 * SIZE]).save(image)
    argv = [f"image={image}", "model=tiny", f"resolution={SIZE}", f"out={root / 'run'}",
            f"finetune.method={method}", "finetune.lr=1e-3", "max_steps=1"]
    config = parse_config(TrainConfig, argv)
    pair = TrainingPair(str(image), config.prompt, config.placeholder, config.object)
    module, datamodule = fit(config, [pair], progress=False)
    return module, module.export(root / "run", datamodule.prepared)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[S2EditModule, Path]:
    return _train_and_export(tmp_path_factory.mktemp("full"), "full")


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> tuple[S2EditModule, Path]:
    return _train_and_export(tmp_path_factory.mktemp("lora"), "lora")


@pytest.fixture()
def copy(full: tuple[S2EditModule, Path], tmp_path: Path) -> Path:
    """A scratch copy of the full export, to damage."""
    return Path(shutil.copytree(full[1], tmp_path / "export"))


def _unet_output(unet: torch.nn.Module, cross_dim: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator)
    context = torch.randn(1, 7, cross_dim, generator=generator)
    with torch.no_grad():
        return unet(z, 500, encoder_hidden_states=context).sample


def test_manifest_follows_the_contract(full: tuple[S2EditModule, Path]) -> None:
    module, export = full
    data = json.loads((export / MANIFEST).read_text())
    assert data["format"] == "s2edit-export" and data["version"] == 1
    assert data["base_model"] == "tiny" and data["method"] == "full" and data["resolution"] == SIZE
    (token,) = data["tokens"]
    assert token["placeholder"] == "[I]" and token["token_id"] == module.token_ids["[I]"]
    assert token["prompt"] == "a photo of a [I] woman" and token["source_prompt"] == "a photo of a woman"
    assert token["object"] == "woman" and len(token["image_sha256"]) == 64
    assert (export / token["mask"]).is_file() and Path(token["mask"]).name == token["mask"]
    assert data["config"]["finetune"]["method"] == "full" and len(data["weights_sha256"]) == 64
    assert {"unet.safetensors", "text_encoder.safetensors", EMBEDDINGS} == set(data["files"])
    assert not list(export.parent.glob(".export.*"))  # no temporary folder left behind


def test_full_export_loads_back_exactly(full: tuple[S2EditModule, Path]) -> None:
    module, export = full
    sd, manifest = load_export(export)
    for trained, loaded in ((module.unet, sd.unet), (module.text_encoder, sd.text_encoder)):
        want, have = trained.state_dict(), loaded.state_dict()
        assert want.keys() == have.keys()
        assert all(torch.equal(want[k], have[k]) for k in want)
    assert sd.tokenizer("[I]", add_special_tokens=False).input_ids == [manifest.tokens[0].token_id]
    assert not any(p.requires_grad for p in sd.unet.parameters())
    mask = load_mask(export / manifest.tokens[0].mask, (SIZE, SIZE))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_lora_export_loads_back_exactly(lora: tuple[S2EditModule, Path]) -> None:
    module, export = lora
    assert {p.name for p in export.glob("*.safetensors")} == {
        "unet_lora.safetensors", "text_encoder_lora.safetensors", EMBEDDINGS}
    sd, manifest = load_export(export)
    assert manifest.method == "lora" and manifest.lora_rank == module.lora_rank
    cross_dim = module.unet.config.cross_attention_dim
    torch.testing.assert_close(_unet_output(sd.unet, cross_dim), _unet_output(module.unet, cross_dim))
    token_id = manifest.tokens[0].token_id
    torch.testing.assert_close(
        sd.text_encoder.get_input_embeddings().weight[token_id],
        module.text_encoder.get_input_embeddings().weight[token_id].detach(),
    )
    ids = sd.tokenize(["a photo of a [I] woman"])  # the family's first tokenizer, padded
    with torch.no_grad():
        torch.testing.assert_close(sd.text_encoder(ids)[0], module.text_encoder(ids)[0])


def test_loading_in_another_dtype(full: tuple[S2EditModule, Path]) -> None:
    sd, _ = load_export(full[1], dtype=torch.bfloat16)
    assert sd.unet.dtype == torch.bfloat16 and sd.text_encoder.dtype == torch.bfloat16


def test_reexport_replaces_the_folder_atomically(full: tuple[S2EditModule, Path], tmp_path: Path) -> None:
    module, export = full
    out = tmp_path / "run"
    shutil.copytree(export, out / "export")
    (out / "export" / "stale.txt").write_text("from an older export")
    with pytest.raises(ValueError):  # no mask for the token: the write fails after the weights
        write_export(out, module.model, read_manifest(export), masks=[])
    assert (out / "export" / "stale.txt").is_file()  # the old export is untouched
    assert not list(out.glob(".export.*"))
    module.export(out, module.trainer.datamodule.prepared)
    assert not (out / "export" / "stale.txt").exists() and (out / "export" / MANIFEST).is_file()
    assert not list(out.glob(".export.*"))


def test_missing_folder_and_manifest_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_export(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"no manifest\.json"):
        load_export(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_export(tmp_path)


def test_missing_weight_file_is_refused(copy: Path) -> None:
    (copy / "text_encoder.safetensors").unlink()
    with pytest.raises(InputError, match=r"missing text_encoder\.safetensors"):
        load_export(copy)


def test_pickle_weights_are_never_loaded(copy: Path) -> None:
    (copy / "unet.safetensors").rename(copy / "unet.bin")
    with pytest.raises(InputError, match=r"found unet\.bin: pickle files are never loaded"):
        load_export(copy)


def test_corrupt_safetensors_is_refused(copy: Path) -> None:
    weights = copy / "unet.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"\xff" * 16  # the JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match its sha256"):
        load_export(copy)
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_export(copy, verify=False)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_export(copy, verify=False)


def test_manifest_mismatches_are_refused(copy: Path) -> None:
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["tokens"][0]["token_id"] += 1
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="trained with id"):
        load_export(copy)
    manifest["tokens"][0]["token_id"] -= 1
    manifest["method"] = "lora"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="lists weight files"):
        load_export(copy)
    manifest["format"] = "something-else"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="not an s2edit-export manifest"):
        read_manifest(copy)


def test_a_different_base_model_is_refused(copy: Path, tmp_path: Path) -> None:
    other = random_model("tiny", seed=1)  # same architecture, other weights
    folder = tmp_path / "other-base"
    other.unet.save_pretrained(folder / "unet")
    other.vae.save_pretrained(folder / "vae")
    other.text_encoder.save_pretrained(folder / "text_encoder")
    other.tokenizer.save_pretrained(folder / "tokenizer")
    other.scheduler.save_config(folder / "scheduler")
    with pytest.raises(InputError, match="differs from the one the export was trained on"):
        load_export(copy, base_model=str(folder))


def test_missing_mask_is_refused(copy: Path) -> None:
    next(copy.glob("mask_*.png")).unlink()
    with pytest.raises(InputError, match="missing the mask file"):
        load_export(copy)


def test_unknown_token_lookup_is_refused(full: tuple[S2EditModule, Path]) -> None:
    manifest = read_manifest(full[1])
    assert manifest.token("[I]").object == "woman"
    with pytest.raises(InputError, match="no token"):
        manifest.token("[Z]")


def test_mask_png_is_the_latent_mask_at_image_size(full: tuple[S2EditModule, Path]) -> None:
    module, export = full
    prepared = module.trainer.datamodule.prepared[0]
    saved = np.asarray(Image.open(export / read_manifest(export).tokens[0].mask)) / 255.0
    expected = prepared.mask.repeat_interleave(8, 0).repeat_interleave(8, 1).numpy()
    assert saved.shape == tuple(prepared.pixels.shape[-2:])
    np.testing.assert_array_equal(saved, expected)


# ----------------------------------------------------------------------------------------- interrupted writes

KILL_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from s2edit.training.export import load_export, write_export

out = Path(sys.argv[1])
sd, manifest = load_export(out / "export")
manifest.config = {"marker": "new"}
masks = [__import__("torch").ones(128, 128)]
real_replace, moved = os.replace, []

def replace(src, dst, **kwargs):
    if moved:  # the old export was moved aside: die before the new one is renamed into place
        os._exit(17)
    if Path(src) == out / "export":
        moved.append(src)
    return real_replace(src, dst, **kwargs)

os.replace = replace
write_export(out, sd, manifest, masks)
"""


def _marker(export: Path) -> object:
    return json.loads((export / MANIFEST).read_text())["config"].get("marker")


def _set_marker(export: Path, marker: str) -> None:
    manifest = json.loads((export / MANIFEST).read_text())
    manifest["config"]["marker"] = marker
    (export / MANIFEST).write_text(json.dumps(manifest))


def test_a_kill_between_the_two_renames_leaves_a_complete_loadable_export(
    full: tuple[S2EditModule, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(full[1], out / "export")
    _set_marker(out / "export", "old")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(out)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 17, killed.stderr
    assert not (out / "export").exists()  # the kill landed between the renames
    olds, news = list(out.glob(".export.old-*")), list(out.glob(".export.tmp-*"))
    assert len(olds) == 1 and len(news) == 1 and (news[0] / MANIFEST).is_file()
    shutil.copytree(out, tmp_path / "copy", symlinks=True)

    # the next read puts the new export (complete: its manifest was written last) in place and loads it
    with pytest.warns(UserWarning, match="put the new export back"):
        assert read_manifest(out / "export").config == {"marker": "new"}
    _, manifest = load_export(out / "export")
    assert manifest.config == {"marker": "new"} and not news[0].exists()
    # the next run that writes the folder removes what is left of the dead run
    recover_export(out / "export")
    assert [p.name for p in out.iterdir()] == ["export"]

    # had the new export been incomplete, the old one would have come back
    copy = tmp_path / "copy"
    (copy / news[0].name / MANIFEST).unlink()
    with pytest.warns(UserWarning, match="put the previous export back"):
        _, manifest = load_export(copy / "export")
    assert manifest.config["marker"] == "old"


def test_a_failed_second_rename_puts_the_old_export_back(
    full: tuple[S2EditModule, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, export = full
    out = tmp_path / "run"
    shutil.copytree(export, out / "export")
    before = {p.relative_to(out): file_sha256(p) for p in out.rglob("*") if p.is_file()}
    real_replace = os.replace

    def replace(src: object, dst: object) -> None:
        if Path(str(src)).name.startswith(".export.tmp-"):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError) as caught:
        module.export(out, module.trainer.datamodule.prepared)
    assert caught.value.filename == str(out / "export")
    assert {p.relative_to(out): file_sha256(p) for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in out.iterdir()] == ["export"]


def test_a_full_disk_while_exporting_keeps_the_old_export(
    full: tuple[S2EditModule, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, export = full
    out = tmp_path / "run"
    shutil.copytree(export, out / "export")
    before = {p.relative_to(out): file_sha256(p) for p in out.rglob("*") if p.is_file()}
    real_save = s2edit.training.export.save_file

    def save_file(tensors: dict, path: str) -> None:
        if Path(path).name == "text_encoder.safetensors":  # the second weight file: the disk is full
            Path(path).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, path)

    monkeypatch.setattr(s2edit.training.export, "save_file", save_file)
    with pytest.raises(OSError) as caught:
        module.export(out, module.trainer.datamodule.prepared)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(out / "export")
    message = describe_io_error(caught.value, out)
    assert message == f"could not write '{out / 'export'}': No space left on device"
    assert {p.relative_to(out): file_sha256(p) for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in out.iterdir()] == ["export"]  # no temporary folder left


def test_temporary_folders_of_dead_writers_are_removed_by_the_next_export(
    full: tuple[S2EditModule, Path], tmp_path: Path
) -> None:
    module, export = full
    out = tmp_path / "run"
    shutil.copytree(export, out / "export")
    dead = _dead_pid()
    for name in (f".export.tmp-{dead}-a1", f".export.old-{dead}-b2/export", ".export.tmp-1-c3"):
        (out / name).mkdir(parents=True)
        (out / name / "unet.safetensors").write_bytes(b"half a file")
    module.export(out, module.trainer.datamodule.prepared)
    # pid 1 is alive: its folder may belong to a write in progress and stays
    assert sorted(p.name for p in out.iterdir()) == [".export.tmp-1-c3", "export"]
    load_export(out / "export")


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_corrupt_mask_is_refused_when_the_editor_loads_the_export(copy: Path) -> None:
    from s2edit.editing.editor import Editor

    mask = next(copy.glob("mask_*.png"))
    mask.write_bytes(b"not a png at all")
    with pytest.raises(InputError, match=rf"mask '{mask}' of token \[I\] is not a readable image"):
        Editor.from_export(copy, device="cpu", progress=False)
