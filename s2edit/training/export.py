"""The fine-tuned model as the editing stage reads it: `<out>/export/` (SPEC §1–2).

Layout (every weight file is safetensors; nothing is ever unpickled):

    manifest.json               format, version, base model, method, tokens, resolved config, file hashes
    unet.safetensors            full: complete state dict of the fine-tuned UNet
    text_encoder.safetensors    full: complete state dict of the fine-tuned text encoder (new rows included;
                                one file per text encoder of the family: text_encoder_2.safetensors, …)
    unet_lora.safetensors       lora: the LoRA adapter weights of the UNet
    text_encoder_lora.safetensors  lora: those of the text encoder(s)
    embeddings.safetensors      both: the learned embedding row of each placeholder, keyed by placeholder
                                (rows of a family's further text encoders: "<encoder>:<placeholder>")
    mask_<n>_<slug>.png         the object mask of each token, at the working image size
    tokenizer/                  the tokenizer with the added tokens (for other tools; the loader re-adds)

The folder is written to `<out>/.export.tmp-<pid>-XXXX` and renamed into place (an existing export is
first moved to `<out>/.export.old-<pid>-XXXX`), so a crash never leaves a half-written export. A run
killed between those two renames leaves both folders complete: the next read of `<out>/export` puts
the new one in place (:func:`recover_export`), and the next run that writes `<out>` also removes the
temporary folders of dead runs. :func:`read_manifest` checks every manifest field's type and range and
that every mask decodes; :func:`load_export` also checks the weights; every problem is a one-line
InputError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from editkit.config import check_fields
from editkit.errors import InputError
from editkit.files import PICKLE_SUFFIXES, file_sha256, pid_alive, resolved, slug
from editkit.images import load_mask, save_mask
from s2edit.core.family import ModelFamily
from s2edit.core.loading import load_model
from s2edit.core.settings import MAX_RESOLUTION

EXPORT_FORMAT = "s2edit-export"
EXPORT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.safetensors"
METHODS = ("full", "lora")
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections (SPEC §2)
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_MARKER = "lora_"
PROBE_VALUES = 16  # first values of a few base tensors, to detect a different base model
PROBE_RTOL, PROBE_ATOL = 1e-2, 1e-3  # loose enough for a base loaded in bf16 / fp16
EXPORT_DIR = "export"
TMP_PREFIX = ".export.tmp-"  # + "<pid>-<random>": the export being written
OLD_PREFIX = ".export.old-"  # + "<pid>-<random>": the export being replaced, during the swap


@dataclass
class ExportToken:
    """One learned token and the pair it was learned from."""

    placeholder: str
    token_id: int = field(metadata={"ge": 0})
    prompt: str  # P̃
    source_prompt: str  # P
    object: str
    image: str  # path as given to train.py
    image_sha256: str
    mask: str  # file name of the object mask inside the export folder


@dataclass
class ExportManifest:
    base_model: str
    method: str = field(metadata={"choices": METHODS})
    resolution: int = field(metadata={"ge": 64, "le": MAX_RESOLUTION})
    tokens: list[ExportToken]
    config: dict[str, Any]
    lora_rank: int | None = field(default=None, metadata={"ge": 1})
    base_probe: dict[str, list[float]] = field(default_factory=dict)
    base_lora: str | None = None  # the LoRA file fused into the base model's UNet before fine-tuning
    base_lora_sha256: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # weight file → sha256
    weights_sha256: str = ""  # one fingerprint over every weight file (the inversion cache keys on it)
    format: str = EXPORT_FORMAT
    version: int = EXPORT_VERSION

    def token(self, placeholder: str) -> ExportToken:
        for token in self.tokens:
            if token.placeholder == placeholder:
                return token
        known = [t.placeholder for t in self.tokens]
        raise InputError(f"the export has no token '{placeholder}' (it has {known})")


# ----------------------------------------------------------------------------------------- shared helpers


def weight_files(method: str, model: ModelFamily) -> dict[str, str]:
    """Component name → its weight file in an export of `method` (full: state dicts; lora: adapters)."""
    suffix = ".safetensors" if method == "full" else "_lora.safetensors"
    return {name: f"{name}{suffix}" for name in model.trainable_components()}


def add_lora_adapters(model: ModelFamily, rank: int) -> None:
    """peft LoRA (alpha = rank) on the UNet attention projections and every text encoder's attention."""
    for name, module in model.trainable_components().items():
        targets = UNET_LORA_TARGETS if name == "unet" else TEXT_LORA_TARGETS
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
        inject_adapter_in_model(config, module)


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if LORA_MARKER in name}


def embedding_key(encoder: int, placeholder: str, model: ModelFamily) -> str:
    """Key of a placeholder's row of text encoder `encoder` in embeddings.safetensors."""
    return placeholder if encoder == 0 else f"{model.text_encoder_names()[encoder]}:{placeholder}"


def base_model_probe(model: ModelFamily) -> dict[str, list[float]]:
    """A few values of base tensors that identify the base model (cheap; robust to half-precision loads)."""
    tensors = {
        "vae.encoder.conv_in.weight": model.vae.encoder.conv_in.weight,
        "unet.conv_in.weight": model.unet.conv_in.weight,
        "text_encoder.token_embedding": model.text_encoder.get_input_embeddings().weight[0],
    }
    return {name: t.detach().flatten()[:PROBE_VALUES].float().cpu().tolist() for name, t in tensors.items()}


def _fingerprint(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def mask_file_name(index: int, placeholder: str) -> str:
    """"mask_0_I.png" for "[I]" (:func:`editkit.files.slug`); the index keeps names unique."""
    return f"mask_{index}_{slug(placeholder)}.png"


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    except SafetensorError as err:  # safetensors reports a full disk as "… (os error 28)": an OSError
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from err


# ----------------------------------------------------------------------------------------- writing


def _apply_umask(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_export(
    out: str | Path,
    model: ModelFamily,
    manifest: ExportManifest,
    masks: Sequence[torch.Tensor],
) -> Path:
    """Write `<out>/export/` atomically and return its path.

    `manifest.tokens[i].mask` is set here; `masks[i]` is token i's (H, W) mask at the working image size.
    `manifest.files` and `manifest.weights_sha256` are filled in from the written files. A file-system
    error (full disk, read-only folder) is an OSError naming `<out>/export`, which is then unchanged.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = out / EXPORT_DIR
    recover_export(final)
    tmp = _temporary_folder(out, TMP_PREFIX)
    try:
        # 1. Weights
        names = weight_files(manifest.method, model)
        for name, module in model.trainable_components().items():
            state = module.state_dict() if manifest.method == "full" else lora_state_dict(module)
            _save_tensors(state, tmp / names[name])
        rows = {
            embedding_key(k, t.placeholder, model): encoder.get_input_embeddings().weight[t.token_id]
            for k, encoder in enumerate(model.text_encoders) for t in manifest.tokens
        }
        _save_tensors(rows, tmp / EMBEDDINGS)

        # 2. Masks, tokenizer(s)
        for index, (token, mask) in enumerate(zip(manifest.tokens, masks, strict=True)):
            token.mask = mask_file_name(index, token.placeholder)
            save_mask(mask, tmp / token.mask)
        for k, tokenizer in enumerate(model.tokenizers):
            tokenizer.save_pretrained(tmp / ("tokenizer" if k == 0 else f"tokenizer_{k + 1}"))

        # 3. Manifest with file hashes (last: a folder with a manifest is complete), then the swap
        manifest.files = {name: file_sha256(tmp / name) for name in [*names.values(), EMBEDDINGS]}
        manifest.weights_sha256 = _fingerprint(manifest.files)
        (tmp / MANIFEST).write_text(json.dumps(dataclasses.asdict(manifest), indent=2) + "\n")
        _apply_umask(tmp)  # temporary files and folders are private (0600 / 0700); the export is not
        _swap_into_place(tmp, final)
    except OSError as err:
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(final)) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _temporary_folder(out: Path, prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=out))


def _swap_into_place(new: Path, final: Path) -> None:
    """Rename the complete folder `new` onto `final`. An existing `final` is moved aside first (a folder
    cannot replace a non-empty one in one rename) and put back if the second rename fails; a kill
    between the two renames is repaired by :func:`recover_export`."""
    if not final.exists():
        os.replace(new, final)
        return
    old = _temporary_folder(final.parent, OLD_PREFIX)
    try:
        os.replace(final, old / final.name)
        try:
            os.replace(new, final)
        except BaseException:
            os.replace(old / final.name, final)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _writer_gone(folder: Path) -> bool:
    """Whether the process that made a temporary folder (`.export.tmp-<pid>-…`) no longer runs here."""
    try:
        pid = int(folder.name.split("-")[1])
    except (IndexError, ValueError):
        return True
    return pid != os.getpid() and not pid_alive(pid)


def recover_export(final: str | Path, clean: bool = True) -> Path | None:
    """Repair what a killed writer of `final` (`<out>/export`) left: if it died between the two renames of
    its swap (`final` missing), rename the new export into place (complete: its manifest is written last),
    else the old one; with `clean`, remove the temporary folders of dead writers (for the run that owns
    `<out>`). Returns the folder that was put in place, if any; never touches a live writer's folders."""
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return None
    restored = None
    if not final.exists():
        for old in sorted(parent.glob(f"{OLD_PREFIX}*"), key=lambda p: p.stat().st_mtime, reverse=True):
            if not _writer_gone(old) or not (old / final.name / MANIFEST).is_file():
                continue
            pid = old.name.split("-")[1]
            complete = [t for t in parent.glob(f"{TMP_PREFIX}{pid}-*") if (t / MANIFEST).is_file()]
            source = complete[0] if complete else old / final.name
            os.rename(source, final)
            restored = source
            which = "new export" if complete else "previous export"
            warnings.warn(f"'{final}' was missing (a run was killed while replacing it): "
                          f"put the {which} back from '{source}'", stacklevel=2)
            break
    if clean:
        for folder in [*parent.glob(f"{TMP_PREFIX}*"), *parent.glob(f"{OLD_PREFIX}*")]:
            if folder.is_dir() and _writer_gone(folder):
                shutil.rmtree(folder, ignore_errors=True)
    return restored


# ----------------------------------------------------------------------------------------- reading


def read_manifest(path: str | Path) -> ExportManifest:
    """Parse and check `<path>/manifest.json`: every field's type and range, and that every token's mask
    is a readable, non-empty image in the folder (InputError for every problem a user can cause)."""
    path = Path(path)
    if not path.exists():
        _restore_or_refuse(path)
    if not path.exists():
        if path.is_symlink():
            resolved(path, "ckpt")  # a loop: one line naming it
        raise InputError(f"checkpoint folder '{path}' does not exist (train.py writes <out>/export)")
    if not path.is_dir():
        raise InputError(f"checkpoint '{path}' is not a folder: pass the export folder written by train.py")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"'{path}' has no {MANIFEST}: it is not an S2Edit export folder")
    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"'{manifest_path}' is not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise InputError(f"'{manifest_path}' is not an {EXPORT_FORMAT} manifest")
    if data.get("version") != EXPORT_VERSION:
        version = data.get("version")
        raise InputError(f"'{manifest_path}' has version {version}; this code reads version {EXPORT_VERSION}")
    try:
        tokens = [ExportToken(**t) for t in data.pop("tokens")]
        manifest = ExportManifest(tokens=tokens, **data)
    except (KeyError, TypeError) as err:
        raise InputError(f"'{manifest_path}' is incomplete or has unknown fields ({err})") from None
    try:
        check_fields(manifest)
        for token in manifest.tokens:
            check_fields(token)
    except InputError as err:
        raise InputError(f"'{manifest_path}' is invalid: {err}; re-export it with train.py") from None
    _check_masks(path, manifest)
    return manifest


def _restore_or_refuse(path: Path) -> None:
    """A missing export whose writer was killed mid-swap: put the complete one back, or say where it is."""
    try:
        recover_export(path, clean=False)
    except OSError as err:
        found = sorted(path.parent.glob(f"{OLD_PREFIX}*/{path.name}")) + sorted(
            t for t in path.parent.glob(f"{TMP_PREFIX}*") if (t / MANIFEST).is_file())
        where = f"'{found[0]}'" if found else "a temporary folder beside it"
        raise InputError(f"checkpoint folder '{path}' is missing (a run was killed while replacing it) and "
                         f"could not be restored ({err.strerror}): move {where} to '{path}'") from None


def _check_masks(path: Path, manifest: ExportManifest) -> None:
    for token in manifest.tokens:
        file = path / token.mask
        if Path(token.mask).name != token.mask:
            raise InputError(f"export '{path}' names the mask '{token.mask}' for {token.placeholder}: a mask "
                             "must be a file name inside the export folder; re-export with train.py")
        if not file.is_file():
            raise InputError(f"export '{path}' is missing the mask file '{token.mask}' ({token.placeholder})")
        try:
            with Image.open(file) as image:
                image.load()
                size = (image.height, image.width)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise InputError(f"mask '{file}' of token {token.placeholder} is not a readable image ({err}): "
                             "re-export with train.py") from None
        load_mask(file, size)  # refuses an empty (all-black) mask


def _check_files(path: Path, manifest: ExportManifest, verify: bool) -> None:
    """Every weight file the manifest lists is there (never a pickle), with its sha256; the embeddings and
    the UNet's file are among them."""
    required = [f"unet{'.safetensors' if manifest.method == 'full' else '_lora.safetensors'}", EMBEDDINGS]
    if not set(required) <= set(manifest.files):
        raise InputError(f"manifest of '{path}' lists weight files {sorted(manifest.files)}, expected "
                         f"{required} among them")
    for name in manifest.files:
        file = path / name
        if Path(name).name != name:
            raise InputError(f"manifest of '{path}' names the weight file '{name}' outside the export folder")
        if not file.is_file():
            pickles = [p.name for p in path.glob(f"{Path(name).stem}.*") if p.suffix in PICKLE_SUFFIXES]
            found = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
            raise InputError(f"export '{path}' is missing {name}{found}")
        if verify and file_sha256(file) != manifest.files[name]:
            raise InputError(f"'{file}' does not match its sha256 in the manifest: corrupt or replaced")
    if _fingerprint(manifest.files) != manifest.weights_sha256:
        raise InputError(f"manifest of '{path}' has an inconsistent weights_sha256: it was edited by hand")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"'{file}' is not a readable safetensors file ({err})") from None


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], file: Path, base: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"'{file}' does not fit the base model '{base}': {detail}") from None


def base_lora_file(path: Path, manifest: ExportManifest, override: str | None) -> Path | None:
    """The LoRA file to fuse into the base, checked against the manifest's sha256."""
    if manifest.base_lora is None:
        if override is not None:
            raise InputError(f"export '{path}' was trained without a base LoRA: drop lora={override}")
        return None
    lora = Path(override or manifest.base_lora).expanduser()
    if not lora.is_file():
        raise InputError(f"export '{path}' was trained on base model + LoRA '{manifest.base_lora}', which is "
                         "not there: pass lora=<where the file is now>")
    if file_sha256(lora) != manifest.base_lora_sha256:
        raise InputError(f"lora file '{lora}' is not the LoRA the export '{path}' was trained with "
                         "(sha256 differs)")
    return lora


def _check_probe(model: ModelFamily, manifest: ExportManifest, base: str) -> None:
    probe = base_model_probe(model)
    for name, values in manifest.base_probe.items():
        have = torch.tensor(probe.get(name, []))
        want = torch.tensor(values)
        if have.shape != want.shape or not torch.allclose(have, want, rtol=PROBE_RTOL, atol=PROBE_ATOL):
            raise InputError(
                f"base model '{base}' differs from the one the export was trained on "
                f"('{manifest.base_model}', {name} mismatch): pass the matching base_model"
            )


def load_export(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    base_model: str | None = None,
    verify: bool = True,
    base_lora: str | None = None,
) -> tuple[ModelFamily, ExportManifest]:
    """Load an export folder: the base model, the placeholder tokens (same ids), the fine-tuned weights.

    `base_model` overrides the manifest's base (e.g. a local copy of the hub model); it must be the same
    model. `base_lora` says where the LoRA file fused into the base during training lies now (it must be
    the same file: its sha256 is checked). `verify` checks every weight file's sha256 against the
    manifest. All weights are loaded strictly; only safetensors files are read. Returns the model in eval
    mode without gradients.
    """
    # 1. Manifest and files
    path = Path(path)
    manifest = read_manifest(path)
    _check_files(path, manifest, verify)
    base = base_model or manifest.base_model
    lora = base_lora_file(path, manifest, base_lora)

    # 2. Base model, then the same placeholder ids as in training
    model = load_model(base, lora=lora)
    _check_probe(model, manifest, base)
    names = weight_files(manifest.method, model)
    if set(manifest.files) != {*names.values(), EMBEDDINGS}:
        raise InputError(f"manifest of '{path}' lists weight files {sorted(manifest.files)}, but a "
                         f"{manifest.method} export of '{base}' has {sorted([*names.values(), EMBEDDINGS])}")
    for token in manifest.tokens:
        token_id = model.add_placeholder(token.placeholder, token.object)
        if token_id != token.token_id:
            raise InputError(
                f"token '{token.placeholder}' got id {token_id} on base '{base}', but the export was trained "
                f"with id {token.token_id}: the tokenizer differs"
            )

    # 3. Weights (strict)
    if manifest.method == "lora":
        if manifest.lora_rank is None:
            raise InputError(f"manifest of '{path}' has method lora but no lora_rank")
        add_lora_adapters(model, manifest.lora_rank)
    for name, module in model.trainable_components().items():
        file = path / names[name]
        state = _load_tensors(file)
        if manifest.method == "lora":
            expected = set(lora_state_dict(module))
            if set(state) != expected:
                rank = manifest.lora_rank
                raise InputError(f"'{file}' holds other LoRA weights than rank-{rank} adapters on '{base}'")
            state = {**module.state_dict(), **state}
        _load_strict(module, state, file, base)
    rows = _load_tensors(path / EMBEDDINGS)
    for k, encoder in enumerate(model.text_encoders):
        embeddings = encoder.get_input_embeddings().weight
        with torch.no_grad():
            for token in manifest.tokens:
                row = rows.get(embedding_key(k, token.placeholder, model))
                if row is None or row.shape != embeddings.shape[1:]:
                    raise InputError(f"'{path / EMBEDDINGS}' has no embedding row of size "
                                     f"{embeddings.shape[1]} for '{token.placeholder}'")
                embeddings[token.token_id] = row.to(embeddings.dtype)

    # 4. Device, dtype, inference mode
    for module in model.components().values():
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, manifest
