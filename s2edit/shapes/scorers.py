"""Scorers of shapes-world images against ground truth: colour, segmentation, shape, IoU, PSNR.

All functions are pure and work on numpy arrays: images (H, W, 3) uint8, masks (H, W) bool.
"""

from __future__ import annotations

import math

import numpy as np

from editkit.errors import InputError
from s2edit.shapes.world import BACKGROUNDS, COLOURS, SHAPES, shape_coverage, unit_extent

SEGMENT_THRESHOLD = 60.0  # RGB distance from the background beyond which a pixel is object (0–441)


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[-1] != 3:
        raise InputError(f"image of shape {tuple(image.shape)} must be (H, W, 3)")


def _nearest(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """Index into `palette` of the nearest colour (RGB distance) of each pixel (..., 3)."""
    colours = np.array(list(palette.values()), dtype=np.float64)  # (P, 3)
    distances = np.linalg.norm(pixels[..., None, :].astype(np.float64) - colours, axis=-1)  # (..., P)
    return distances.argmin(axis=-1)


def dominant_colour(image: np.ndarray, mask: np.ndarray) -> str | None:
    """The palette colour most pixels inside `mask` are nearest to; None for an empty mask."""
    _check_image(image)
    pixels = image[mask]
    if len(pixels) == 0:
        return None
    votes = np.bincount(_nearest(pixels, COLOURS), minlength=len(COLOURS))
    return list(COLOURS)[int(votes.argmax())]


def background_colour(image: np.ndarray) -> str:
    """The background whose colour is nearest to the median of the image's border pixels."""
    _check_image(image)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return list(BACKGROUNDS)[int(_nearest(np.median(border, axis=0), BACKGROUNDS))]


def segment_object(image: np.ndarray, background: str, threshold: float = SEGMENT_THRESHOLD) -> np.ndarray:
    """(H, W) bool: the object's pixels in an image of the named background.

    The object's typical distance from the background colour is the 90th percentile of the distances
    above `threshold` (RGB distance); pixels at least half that far are object, so that an anti-aliased
    edge pixel counts when the object covers at least half of it, like the ground truth.
    """
    _check_image(image)
    if background not in BACKGROUNDS:
        raise InputError(f"background '{background}' is not one of {', '.join(BACKGROUNDS)}")
    reference = np.array(BACKGROUNDS[background], dtype=np.float64)
    distance = np.linalg.norm(image.astype(np.float64) - reference, axis=-1)
    candidates = distance > threshold
    if not candidates.any():
        return candidates
    half = 0.5 * np.percentile(distance[candidates], 90) - 1.0  # 1: uint8 rounding of a half-covered pixel
    return distance >= max(half, 0.5 * threshold)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∧ b| / |a ∨ b| of two boolean masks; 1.0 when both are empty."""
    if a.shape != b.shape:
        raise InputError(f"masks of shapes {a.shape} and {b.shape} must match")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def fit_template(mask: np.ndarray, shape: str) -> np.ndarray:
    """The mask of `shape` placed so that its bounding box matches `mask`'s (centre and radius from the
    box: radius = mean of width / unit width and height / unit height)."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1.0, cols.min(), cols.max() + 1.0
    u_left, u_top, u_right, u_bottom = unit_extent(shape)
    radius = 0.5 * ((right - left) / (u_right - u_left) + (bottom - top) / (u_bottom - u_top))
    centre = (left - u_left * radius, top - u_top * radius)
    return shape_coverage(shape, centre, radius, mask.shape[0]) >= 0.5


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """IoU of `mask` with each shape's template fitted to its bounding box (all 0 for an empty mask)."""
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        raise InputError(f"mask of shape {mask.shape} must be square (H, H)")
    if not mask.any():
        return dict.fromkeys(SHAPES, 0.0)
    return {shape: iou(mask, fit_template(mask, shape)) for shape in SHAPES}


def classify_shape(mask: np.ndarray) -> str | None:
    """The shape whose fitted template overlaps `mask` best; None for an empty mask."""
    scores = shape_scores(mask)
    best = max(scores, key=scores.get)
    return best if scores[best] > 0 else None


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over the pixels `where` (all by default); inf when they are equal
    there, nan when `where` selects nothing."""
    if a.shape != b.shape:
        raise InputError(f"images of shapes {a.shape} and {b.shape} must match")
    diff = a.astype(np.float64) - b.astype(np.float64)
    if where is not None:
        diff = diff[where]
    if diff.size == 0:
        return math.nan
    mse = float(np.mean(diff**2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def psnr_outside(a: np.ndarray, b: np.ndarray, mask: np.ndarray, peak: float = 255.0) -> float:
    """PSNR over the pixels outside `mask` (H, W): what an edit of the object must leave unchanged."""
    return psnr(a, b, ~mask, peak)
