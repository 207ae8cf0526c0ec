"""Image input/output: every odd format becomes correct 8-bit RGB at a valid working size."""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.errors import InputError
from editkit.images import (
    load_image,
    load_mask,
    pil_to_tensor,
    read_image,
    save_image,
    save_mask,
    working_size,
)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] → (H, W, 3) uint8."""
    return ((image[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def _gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def test_rgb_png_loads_exactly_at_native_size(tmp_path: Path) -> None:
    rgb = _gradient(128, 192)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png", resolution=None)
    assert image.shape == (1, 3, 128, 192) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    np.testing.assert_array_equal(_to_uint8(image), rgb)


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere
    rgba[:, :32, 3] = 0  # left half fully transparent → white
    rgba[:, 32:48, 3] = 255  # opaque → red kept
    rgba[:, 48:, 3] = 128  # half transparent → halfway to white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = _to_uint8(load_image(tmp_path / "a.png", resolution=None))
    assert (out[:, :32] == 255).all()
    assert (out[:, 32:48] == [200, 0, 0]).all()
    np.testing.assert_allclose(out[:, 48:, 1], 255 * (1 - 128 / 255), atol=1.5)


def test_la_palette_and_grayscale(tmp_path: Path) -> None:
    gray = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    out = _to_uint8(load_image(tmp_path / "l.png", resolution=None))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)

    la = np.stack([gray, np.full_like(gray, 255)], -1)
    la[:10, :, 1] = 0
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = _to_uint8(load_image(tmp_path / "la.png", resolution=None))
    assert (out[:10] == 255).all()
    np.testing.assert_array_equal(out[10:, :, 0], gray[10:])

    rgb = _gradient(64, 64)
    palette = Image.fromarray(rgb).quantize(colors=16)
    palette.save(tmp_path / "p.png")
    out = _to_uint8(load_image(tmp_path / "p.png", resolution=None))
    np.testing.assert_array_equal(out, np.asarray(palette.convert("RGB")))


def test_palette_transparency_becomes_white(tmp_path: Path) -> None:
    image = Image.new("P", (64, 64), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.paste(0, (0, 0, 64, 16))
    image.save(tmp_path / "p.png", transparency=0)
    out = _to_uint8(load_image(tmp_path / "p.png", resolution=None))
    assert (out[:16] == 255).all()
    assert (out[16:] == [10, 20, 30]).all()


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 128 * 64).reshape(64, 128).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    out = _to_uint8(load_image(tmp_path / "g16.png", resolution=None))[..., 0].astype(float)
    expected = ramp / 65535 * 255
    assert np.abs(out - expected).max() <= 1.0  # neither black (÷65535 missing) nor clipped at 255
    assert out.max() == 255 and out.min() == 0 and np.median(out) > 100


def _write_png16(path: Path, rgb16: np.ndarray) -> None:
    """Minimal 48-bit RGB PNG encoder (PIL cannot write 16-bit colour PNGs)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb16.shape
    rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16-bit depth, colour type 2 (RGB)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def test_16bit_rgb_png(tmp_path: Path) -> None:
    rgb16 = _gradient(64, 128).astype(np.uint16) * 257  # full 16-bit range
    _write_png16(tmp_path / "rgb16.png", rgb16)
    out = _to_uint8(load_image(tmp_path / "rgb16.png", resolution=None)).astype(int)
    assert np.abs(out - _gradient(64, 128).astype(int)).max() <= 1


def test_exif_orientation_is_honoured(tmp_path: Path) -> None:
    rgb = np.zeros((64, 128, 3), np.uint8)  # landscape, left half red
    rgb[:, :64, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(rgb).save(tmp_path / "o.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "o.jpg", resolution=None)
    assert image.shape == (1, 3, 128, 64)  # displayed as portrait
    out = _to_uint8(image)
    assert out[:48, :, 0].mean() > 200 and out[80:, :, 0].mean() < 50  # red now on top


def test_webp_and_jpeg(tmp_path: Path) -> None:
    rgb = _gradient(128, 128)
    for name in ("a.webp", "a.jpg"):
        Image.fromarray(rgb).save(tmp_path / name, quality=100)
        out = _to_uint8(load_image(tmp_path / name, resolution=None)).astype(int)
        assert np.abs(out - rgb).mean() < 4


@pytest.mark.parametrize(
    ("w", "h"), [(600, 400), (451, 300), (300, 1000), (512, 512), (4000, 3000), (100, 90)]
)
def test_working_size_keeps_aspect_and_area(w: int, h: int) -> None:
    W, H = working_size(w, h, 512)
    assert W % 64 == 0 and H % 64 == 0
    assert abs(math.log((W * H) / 512**2)) < 0.3  # area close to resolution² (up or down)
    assert abs(math.log((W / H) / (w / h))) < 0.2  # aspect ratio kept within one 64-px step


def test_large_non_square_image_is_downscaled_with_aspect(tmp_path: Path) -> None:
    Image.fromarray(_gradient(1200, 1800)).save(tmp_path / "big.png")
    image = load_image(tmp_path / "big.png", resolution=256)
    _, _, H, W = image.shape
    assert (W, H) == working_size(1800, 1200, 256)
    assert H < 1200 and W > H


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("hello, not an image"), "not a readable image"),
        (lambda p: p.write_bytes(b""), "not a readable image"),
        (lambda p: Image.fromarray(_gradient(40, 200)).save(p, format="PNG"), "at least 64 px"),
    ],
)
def test_bad_inputs_are_refused_with_path(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(InputError, match=message) as err:
        load_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_png_is_refused(tmp_path: Path) -> None:
    Image.fromarray(_gradient(256, 256)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.png"):
        read_image(tmp_path / "cut.png")


def test_save_image_is_atomic_and_round_trips(tmp_path: Path) -> None:
    rgb = _gradient(64, 128)
    image = pil_to_tensor(Image.fromarray(rgb))
    out = save_image(image, tmp_path / "sub" / "o.png")
    np.testing.assert_array_equal(np.asarray(Image.open(out)), rgb)
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.png"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not a private temp file
    with pytest.raises(InputError, match="no image extension"):
        save_image(image, tmp_path / "o.unknown")
    assert not list(tmp_path.glob("*.unknown*"))


def test_masks_round_trip_alpha_and_refuse_empty(tmp_path: Path) -> None:
    mask = torch.zeros(64, 96)
    mask[16:48, 32:64] = 1
    save_mask(mask, tmp_path / "m.png")
    torch.testing.assert_close(load_mask(tmp_path / "m.png", (64, 96)), mask)
    assert load_mask(tmp_path / "m.png", (32, 48)).shape == (32, 48)

    rgba = np.zeros((64, 96, 4), np.uint8)
    rgba[16:48, 32:64, 3] = 255  # selection given by alpha, colour irrelevant
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    torch.testing.assert_close(load_mask(tmp_path / "alpha.png", (64, 96)), mask)

    save_mask(torch.zeros(64, 64), tmp_path / "empty.png")
    with pytest.raises(InputError, match="empty"):
        load_mask(tmp_path / "empty.png", (64, 64))
