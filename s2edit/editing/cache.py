"""The inversion cache (SPEC §3): an inversion is saved beside the checkpoint and reused while every input
is the same.

An entry is `inversion-<key digest>.safetensors` (the tensors) plus `.json` (the key and the numbers),
written atomically, tensors first: the JSON marks the entry complete. The key holds everything the
inversion depends on: image and prompt hashes, the inversion request, the model family, the weights'
fingerprint, the dtype, the spatial control and the scheduler's chain. A corrupt entry (unreadable, wrong
shapes or dtypes, NaN) is recomputed and replaced with one warning; temporary files of killed writers are
removed by the next load.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from editkit.files import atomic_path, remove_temporaries
from s2edit.core.attention import ColumnMask, SpatialControl
from s2edit.core.family import Conditioning, ModelFamily
from s2edit.editing.inversion import Inversion, invert
from s2edit.editing.request import InversionRequest

CACHE_FORMAT = "s2edit-inversion"
CACHE_VERSION = 3  # 3: the unconditional input as a conditioning (context, pooled), the family in the key
GUIDED_METHODS = ("null_text", "direct")  # methods whose result depends on the guidance scale w
STALE_TEMP_SECONDS = 60  # a cache temp file this old belongs to no running save, whoever wrote it
CACHE_KEY_CHARS = 20  # hex characters of the key's sha256 used in cache file names
SCHEDULER_KEYS = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type",
                  "set_alpha_to_one", "steps_offset", "timestep_spacing")

PlaceholderMask = tuple[int, torch.Tensor]  # (token position in the prompt, (H, W) mask in [0, 1])


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and values (on CPU)."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)}|{data.dtype}|".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """A cheap fingerprint of model weights: per tensor, its name, shape, dtype, sum and sum of squares.

    One float64 reduction per tensor (no hashing of gigabytes); any fine-tuning changes it. Use the
    export manifest's fingerprint instead when there is one.
    """
    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            stats = torch.stack([tensor.double().sum(), tensor.double().square().sum()]).tolist()
            digest.update(
                f"{index}.{name}|{tuple(tensor.shape)}|{tensor.dtype}|{stats[0]!r}|{stats[1]!r};".encode()
            )
    return digest.hexdigest()


def inversion_key(
    image: torch.Tensor,
    prompt: str,
    request: InversionRequest,
    model: ModelFamily,
    weights: str,
    placeholder_masks: Sequence[PlaceholderMask] = (),
    renormalize: bool = False,
) -> dict[str, Any]:
    """Everything the inversion depends on, as a JSON-able dict (hashes for tensors and weights)."""
    scheduler_config = dict(model.scheduler.config)
    key: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "image_sha256": tensor_sha256(image.float()),
        "image_size": list(image.shape[-2:]),
        "prompt": prompt,
        "method": request.method,
        "steps": request.steps,
        "guidance": float(request.guidance) if request.method in GUIDED_METHODS else None,
        "family": model.name,
        "weights": weights,
        "dtype": str(model.dtype).removeprefix("torch."),
        "spatial_control": [[token, tensor_sha256(mask.float())] for token, mask in placeholder_masks],
        "renormalize": renormalize if placeholder_masks else None,
        "scheduler": {k: scheduler_config.get(k) for k in SCHEDULER_KEYS},
    }
    if request.method == "null_text":
        key["nti"] = asdict(request.nti)
    return key


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_paths(cache_dir: str | Path, key: dict[str, Any]) -> tuple[Path, Path]:
    """(tensors .safetensors, keys .json) of the cache entry for `key`."""
    stem = Path(cache_dir) / f"inversion-{key_digest(key)[:CACHE_KEY_CHARS]}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_inversion(inversion: Inversion, cache_dir: str | Path, key: dict[str, Any]) -> Path:
    """Write the cache entry atomically: tensors first, then the JSON (which marks the entry complete)."""
    tensors_path, json_path = cache_paths(cache_dir, key)
    tensors = {
        "image": inversion.image,
        "z0": inversion.z0,
        "latents": inversion.latents,
        "null_context": inversion.nulls.context,
    }
    if inversion.nulls.pooled is not None:
        tensors["null_pooled"] = inversion.nulls.pooled
    if inversion.offsets is not None:
        tensors["offsets"] = inversion.offsets
    with atomic_path(tensors_path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    record = {
        "key": key,
        "digest": key_digest(key),
        "method": inversion.method,
        "prompt": inversion.prompt,
        "null_prompt": inversion.null_prompt,
        "steps": inversion.steps,
        "guidance": inversion.guidance,
        "losses": inversion.losses,
        "inner_steps": inversion.inner_steps,
        "seconds": inversion.seconds,
        "tensors": tensors_path.name,
    }
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return json_path


def _invalid_entry(inversion: Inversion, key: dict[str, Any]) -> str | None:
    """Why a loaded cache entry cannot be trusted (None: it is valid): shapes, dtypes, finite values."""
    n, (height, width) = inversion.steps, key["image_size"]
    image, z0, latents, nulls = inversion.image, inversion.z0, inversion.latents, inversion.nulls
    expected_nulls = n if inversion.method == "null_text" else 1
    offsets = inversion.offsets
    pooled = nulls.pooled
    checks = [
        (image.shape == (1, 3, height, width), f"image of shape {tuple(image.shape)}"),
        (z0.dim() == 4 and z0.shape[0] == 1, f"z0 of shape {tuple(z0.shape)}"),
        (latents.shape == (n + 1, *z0.shape[1:]), f"latents of shape {tuple(latents.shape)}"),
        (nulls.context.dim() == 3 and len(nulls) == expected_nulls,
         f"null context of {tuple(nulls.context.shape)}"),
        (pooled is None or (pooled.dim() == 2 and len(pooled) == expected_nulls),
         f"null pooled embedding of {None if pooled is None else tuple(pooled.shape)}"),
        (inversion.method == key["method"] and inversion.steps == key["steps"], "settings not as keyed"),
        ((offsets is not None) == (inversion.method == "direct"), "offsets missing or unexpected"),
        (offsets is None or offsets.shape == (n, *z0.shape[1:]), "offsets of the wrong shape"),
    ]
    for ok, problem in checks:
        if not ok:
            return problem
    tensors = {"image": image, "z0": z0, "latents": latents, "null context": nulls.context,
               "null pooled embedding": pooled, "offsets": offsets}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.dtype != torch.float32:
            return f"{name} of dtype {tensor.dtype}"
        if not bool(torch.isfinite(tensor).all()):
            return f"non-finite values in the {name}"
    return None


def load_inversion(cache_dir: str | Path, key: dict[str, Any]) -> Inversion | None:
    """The cached inversion for exactly `key`, or None (missing or stale entry).

    Raises ValueError naming the problem for an entry that exists but is corrupt (unreadable files,
    wrong shapes or dtypes, NaN or infinite values), so the caller can replace it.
    """
    tensors_path, json_path = cache_paths(cache_dir, key)
    if not (json_path.is_file() and tensors_path.is_file()):
        return None
    try:
        record = json.loads(json_path.read_text())
        if record.get("key") != json.loads(json.dumps(key)):  # digest collision or stale format
            return None
        tensors = load_file(str(tensors_path))
        inversion = Inversion(
            method=record["method"],
            prompt=record["prompt"],
            image=tensors["image"],
            z0=tensors["z0"],
            latents=tensors["latents"],
            nulls=Conditioning(tensors["null_context"], tensors.get("null_pooled")),
            null_prompt=record["null_prompt"],
            steps=int(record["steps"]),
            guidance=float(record["guidance"]),
            offsets=tensors.get("offsets"),
            losses=[float(x) for x in record["losses"]],
            inner_steps=[int(x) for x in record["inner_steps"]],
            seconds=float(record["seconds"]),
            key=record["digest"],
            cached=True,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as error:
        reason = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(f"unreadable ({type(error).__name__}: {reason})") from None
    problem = _invalid_entry(inversion, key)
    if problem is not None:
        raise ValueError(problem)
    return inversion


def remove_stale_temporaries(cache_dir: str | Path, older_than_s: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete the cache's temporary files that killed writers left: those whose writing process is gone,
    and any older than `older_than_s` (a save holds its temporary file for milliseconds). A cache folder
    may be shared by concurrent runs, so a live writer's file is never touched."""
    return remove_temporaries(cache_dir, dead_writers_only=True, older_than_s=older_than_s)


def load_or_invert(
    model: ModelFamily,
    image: torch.Tensor,
    prompt: str,
    request: InversionRequest,
    *,
    cache_dir: str | Path | None,
    weights: str,
    placeholder_masks: Sequence[PlaceholderMask] = (),
    renormalize: bool = False,
    progress: bool = True,
) -> Inversion:
    """:func:`~s2edit.editing.inversion.invert`, reusing `cache_dir`'s entry when every input is the same
    (`Inversion.cached`).

    `weights` fingerprints the model weights (export manifest, or :func:`weights_fingerprint`).
    `placeholder_masks` are (token position in `prompt`, mask) pairs of spatial control.
    `cache_dir=None` disables the cache. A corrupt entry is recomputed and replaced, with one warning.
    """
    key = inversion_key(image, prompt, request, model, weights, placeholder_masks, renormalize)
    if cache_dir is not None and Path(cache_dir).is_dir():
        remove_stale_temporaries(cache_dir)
        try:
            cached = load_inversion(cache_dir, key)
        except ValueError as problem:
            warnings.warn(
                f"inversion cache entry {cache_paths(cache_dir, key)[0].name} is corrupt ({problem}): "
                "recomputing and replacing it",
                stacklevel=2,
            )
            cached = None
        if cached is not None:
            return cached
    columns = [ColumnMask(None, token, mask) for token, mask in placeholder_masks]  # every conditional row
    control = SpatialControl(columns, renormalize)
    inversion = invert(model, image, prompt, request, control, progress)
    inversion.key = key_digest(key)
    if cache_dir is not None:
        try:
            save_inversion(inversion, cache_dir, key)
        except OSError as err:  # a read-only checkpoint folder must not cost the user the inversion
            warnings.warn(f"could not cache the inversion in '{cache_dir}': {err}", stacklevel=2)
    return inversion
