"""Image input and output for the whole project, in one place.

Every image a user hands in goes through :func:`load_image`: any PIL-readable still format, EXIF
orientation honoured, alpha composited on white, palette / grayscale / 16-bit converted to 8-bit RGB,
resized (aspect ratio kept, centre-cropped by at most one `multiple`) so both sides are multiples of
`multiple` and the area is close to ``resolution**2``. Every image the project writes goes through
:func:`editkit.files.atomic_path`, so an interrupted run never leaves a half-written file under the
final name.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from editkit.errors import InputError
from editkit.files import atomic_path, resolved

MIN_SIDE = 64  # smaller images carry too little for an 8× VAE and 16×16 attention maps

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must be refused, not padded with grey


def _open(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.exists():
        if path.is_symlink():  # a dangling link, or a loop
            resolved(path, "image")
            target = os.readlink(path)
            raise InputError(f"image '{path}' is a symbolic link to '{target}', which does not exist")
        raise InputError(f"image '{path}' does not exist")
    if path.is_dir():
        raise InputError(f"image '{path}' is a directory, not an image file")
    try:
        image = Image.open(path)
        image.load()  # decode now: truncated or corrupt data fails here, not later
    except Image.DecompressionBombError as err:
        raise InputError(f"image '{path}' is too large to load safely ({err})") from None
    except UnidentifiedImageError:
        raise InputError(f"'{path}' is not a readable image (unknown or corrupt format)") from None
    except OSError as err:
        raise InputError(f"image '{path}' could not be decoded: {err}") from None
    return image


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB. 16-bit and 32-bit data are scaled by their bit depth, never clipped."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        data = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            peak = 1.0 if data.max(initial=0.0) <= 1.0 else 255.0
        elif image.mode.startswith("I;16") or data.max(initial=0) > 255:
            peak = 65535.0  # 16-bit samples (PNG 16-bit gray arrives as I or I;16)
        else:
            peak = 255.0
        data = np.clip(np.round(data / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(data, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def read_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB at its own size (no resizing); refuse bad or tiny files."""
    image = _to_rgb8(_open(path))
    if min(image.size) < MIN_SIDE:
        raise InputError(
            f"image '{path}' is {image.width}x{image.height}; both sides must be at least {MIN_SIDE} px"
        )
    return image


def working_size(width: int, height: int, resolution: int | None, multiple: int = 64) -> tuple[int, int]:
    """(W, H): multiples of `multiple`, aspect ratio of (width, height), area ≈ resolution² (or as is)."""
    scale = 1.0 if resolution is None else resolution / math.sqrt(width * height)
    w = max(multiple, round(width * scale / multiple) * multiple)
    h = max(multiple, round(height * scale / multiple) * multiple)
    return w, h


def cover_crop(size: tuple[int, int], target: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """How an image of `size` (W, H) is fitted to `target` (W, H): the (W, H) it is resized to, covering
    the target with its aspect ratio kept, and the (left, top) corner of the centred crop."""
    (width, height), (w, h) = size, target
    scale = max(w / width, h / height)
    cover = (max(w, math.ceil(width * scale)), max(h, math.ceil(height * scale)))
    return cover, ((cover[0] - w) // 2, (cover[1] - h) // 2)


def fit_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to cover `size` (W, H) keeping the aspect ratio, then centre-crop the small excess."""
    cover, (left, top) = cover_crop(image.size, size)
    image = image.resize(cover, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image.crop((left, top, left + size[0], top + size[1]))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image → (1, 3, H, W) float32 in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
    return array.permute(2, 0, 1).unsqueeze(0).float().div(127.5).sub(1.0)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) in [-1, 1] → 8-bit RGB PIL image."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {image.shape[0]}")
        image = image[0]
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), mode="RGB")


def load_image(path: str | Path, resolution: int | None = 512, multiple: int = 64) -> torch.Tensor:
    """Load any supported image as (1, 3, H, W) float32 in [-1, 1] at the working size.

    `resolution=None` keeps the image's own scale, only rounding both sides to `multiple`.
    """
    image = read_image(path)
    return pil_to_tensor(fit_image(image, working_size(*image.size, resolution, multiple)))


def to_unit(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] → [0, 1] in float32 (float64 stays float64), same device."""
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"expected an RGB image (3, H, W) or batch (B, 3, H, W), got {tuple(image.shape)}")
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    return (image.detach().to(dtype) + 1.0) / 2.0


def unit_psnr(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image of a (B, C, H, W) batch in [0, 1] against `reference` (peak 1):
    −10·log10(MSE), inf for identical images. Returns (B,)."""
    if image.shape != reference.shape:
        raise ValueError(f"image {tuple(image.shape)} and reference {tuple(reference.shape)} differ in shape")
    mse = (image - reference).square().flatten(1).mean(dim=1)
    return -10.0 * torch.log10(mse)  # log10(0) = −inf: identical images give inf


def psnr(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image of a (B, 3, H, W) batch in [-1, 1] against `reference`, on [0, 1]: (B,)."""
    return unit_psnr(to_unit(image), to_unit(reference))


def check_image_tensor(image: object, multiple: int) -> torch.Tensor:
    """An image tensor from a Python caller: (1, 3, H, W) floating point in [-1, 1], finite, sides
    multiples of `multiple`; refused in one line naming what is wrong."""
    if not isinstance(image, torch.Tensor):
        raise InputError(f"image must be a path or a (1, 3, H, W) tensor, got {type(image).__name__}")
    shape = tuple(image.shape)
    if image.dim() != 4 or shape[:2] != (1, 3) or any(side % multiple for side in shape[-2:]):
        raise InputError(
            f"image tensor of shape {shape} must be (1, 3, H, W) with H, W multiples of {multiple}"
        )
    if not image.is_floating_point():
        raise InputError(f"image tensor of dtype {image.dtype} must be floating point in [-1, 1] "
                         "(convert uint8 with x / 127.5 − 1)")
    if not bool(torch.isfinite(image).all()):
        raise InputError("image tensor contains NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < -1.001 or high > 1.001:
        raise InputError(f"image tensor values lie in [{low:.3g}, {high:.3g}], not in [-1, 1] "
                         "(a [0, 255] image must be scaled: x / 127.5 − 1)")
    image = image.detach().float()  # the caller's layout is kept: conv kernels round by memory layout
    return image.clamp(-1, 1) if low < -1 or high > 1 else image


def resize_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of (B, C, H, W) to `size` = (H, W)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)


def _save_pil(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"output '{path}' has no image extension (use .png, .jpg or .webp)")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)
    return path


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Write (1, 3, H, W) / (3, H, W) in [-1, 1] atomically; the format follows the extension."""
    return _save_pil(tensor_to_pil(image), path)


def save_mask(mask: torch.Tensor, path: str | Path) -> Path:
    """Write a (H, W) (or (1, 1, H, W)) mask in [0, 1] atomically as an 8-bit grayscale image."""
    mask = mask.detach().float().cpu().reshape(mask.shape[-2:]).clamp(0, 1)
    return _save_pil(Image.fromarray((mask * 255).round().to(torch.uint8).numpy(), mode="L"), path)


def load_mask(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """Read a mask image as (H, W) float32 in [0, 1], resized to `size` = (H, W).

    Any mode is accepted; colour masks use their luminance, and masks with transparency their alpha.
    """
    image = _open(path)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        gray = ImageOps.exif_transpose(image).convert("RGBA").getchannel("A")
    else:
        gray = _to_rgb8(image).convert("L")
    mask = torch.from_numpy(np.asarray(gray, dtype=np.uint8).copy()).float().div(255.0)
    mask = resize_to(mask[None, None], size)[0, 0].clamp(0, 1)
    if mask.max() <= 0:
        raise InputError(f"mask '{path}' is empty (all black): nothing would be selected")
    return mask
