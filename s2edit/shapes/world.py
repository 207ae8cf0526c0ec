"""The shapes world: a procedural, seeded scene generator with ground truth (issue 20).

A scene is one object (a colour × a shape) on a plain background, drawn anti-aliased into a small RGB
image with its ground-truth mask and caption, e.g. "a red circle on a white background". Three
colour-shape pairs never appear in training scenes (:data:`HELD_OUT_PAIRS`); the benchmark set is made of
them, so an edit "red circle → red square" is scored against a render of the same scene with the new shape
(:func:`edited`).

Geometry: `centre` is (x, y) in pixels with y pointing down, `radius` the shape's circumradius in pixels.
Shapes are upright (no rotation), so a caption says everything a scene shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from editkit.errors import InputError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
    "black": (0, 0, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "square"), ("blue", "star"), ("yellow", "triangle")}
)
IMAGE_SIZE = 64
SUPERSAMPLE = 4  # sub-samples per pixel side for anti-aliasing
RADIUS_RANGE = (0.16, 0.28)  # object circumradius as a fraction of the image side
MARGIN = 1.0  # pixels kept free between the object's circumcircle and the image border
SQUARE_HALF_SIDE = 0.8  # of the radius: a square of this half side has a visible area near the circle's
STAR_INNER_RADIUS = 0.45  # of the outer radius
STAR_POINTS = 5


@dataclass(frozen=True)
class SceneSpec:
    """What a scene shows: enough to render it exactly."""

    colour: str
    shape: str
    background: str
    centre: tuple[float, float]  # (x, y) in pixels, y down
    radius: float  # circumradius in pixels
    size: int = IMAGE_SIZE

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)


@dataclass(frozen=True)
class Scene:
    """A rendered scene: the image, its ground truth and its caption."""

    spec: SceneSpec
    image: np.ndarray  # (H, W, 3) uint8
    coverage: np.ndarray  # (H, W) float32 in [0, 1]: the object's share of each pixel
    mask: np.ndarray  # (H, W) bool: pixels at least half covered by the object

    @property
    def colour(self) -> str:
        return self.spec.colour

    @property
    def shape(self) -> str:
        return self.spec.shape

    @property
    def background(self) -> str:
        return self.spec.background

    @property
    def centre(self) -> tuple[float, float]:
        return self.spec.centre

    @property
    def radius(self) -> float:
        return self.spec.radius

    @property
    def caption(self) -> str:
        return self.spec.caption


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def unit_polygon(shape: str) -> np.ndarray | None:
    """Vertices (n, 2) of `shape` centred at 0 with circumradius 1 (x right, y down); None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = SQUARE_HALF_SIDE
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if shape == "triangle":  # upright equilateral: apex up
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "star":  # alternating outer and inner vertices, first point up
        k = np.arange(2 * STAR_POINTS)
        angles = -math.pi / 2 + k * math.pi / STAR_POINTS
        radii = np.where(k % 2 == 0, 1.0, STAR_INNER_RADIUS)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    raise InputError(f"shape '{shape}' is not one of {', '.join(SHAPES)}")


def unit_extent(shape: str) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of `shape` at centre 0, circumradius 1."""
    vertices = unit_polygon(shape)
    if vertices is None:
        return (-1.0, -1.0, 1.0, 1.0)
    (left, top), (right, bottom) = vertices.min(axis=0), vertices.max(axis=0)
    return (float(left), float(top), float(right), float(bottom))


def _inside_polygon(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule: whether each point (x, y) lies inside the closed polygon `vertices` (n, 2)."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_cross)
    return inside


def shape_coverage(shape: str, centre: tuple[float, float], radius: float, size: int,
                   supersample: int = SUPERSAMPLE) -> np.ndarray:
    """(size, size) float32: the fraction of each pixel's `supersample²` sub-samples inside the shape."""
    offsets = (np.arange(size * supersample) + 0.5) / supersample  # sub-sample centres in pixels
    x = (offsets[None, :] - centre[0]) / radius
    y = (offsets[:, None] - centre[1]) / radius
    x, y = np.broadcast_arrays(x, y)
    vertices = unit_polygon(shape)
    inside = x**2 + y**2 <= 1.0 if vertices is None else _inside_polygon(x, y, vertices)
    blocks = inside.reshape(size, supersample, size, supersample)
    return blocks.mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def render(spec: SceneSpec, supersample: int = SUPERSAMPLE) -> Scene:
    """Draw `spec`: the object's colour blended over the background by its pixel coverage."""
    check_spec(spec)
    coverage = shape_coverage(spec.shape, spec.centre, spec.radius, spec.size, supersample)
    colour = np.array(COLOURS[spec.colour], dtype=np.float64)
    background = np.array(BACKGROUNDS[spec.background], dtype=np.float64)
    alpha = coverage[..., None].astype(np.float64)
    image = np.rint(alpha * colour + (1 - alpha) * background).astype(np.uint8)
    return Scene(spec=spec, image=image, coverage=coverage, mask=coverage >= 0.5)


def check_spec(spec: SceneSpec) -> None:
    """Refuse an unknown colour, shape or background, or an object that leaves the image."""
    for kind, value, valid in (("colour", spec.colour, COLOURS), ("shape", spec.shape, SHAPES),
                               ("background", spec.background, BACKGROUNDS)):
        if value not in valid:
            raise InputError(f"{kind} '{value}' is not one of {', '.join(valid)}")
    x, y = spec.centre
    if spec.radius <= 0 or min(x, y) < spec.radius or max(x, y) > spec.size - spec.radius:
        raise InputError(f"object at centre {spec.centre} with radius {spec.radius} leaves the "
                         f"{spec.size}×{spec.size} image: move it inward or shrink it")


def training_pairs() -> list[tuple[str, str]]:
    """Every (colour, shape) pair that training scenes may show: all but the held-out ones."""
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]


def held_out_pairs() -> list[tuple[str, str]]:
    return sorted(HELD_OUT_PAIRS)


def random_geometry(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[tuple[float, float], float]:
    """A centre and radius drawn uniformly: radius in RADIUS_RANGE·size, circumcircle inside the image."""
    radius = float(rng.uniform(*RADIUS_RANGE)) * size
    low, high = radius + MARGIN, size - radius - MARGIN
    return (float(rng.uniform(low, high)), float(rng.uniform(low, high))), radius


def random_specs(count: int, seed: int, pairs: list[tuple[str, str]],
                 size: int = IMAGE_SIZE) -> list[SceneSpec]:
    """`count` scenes: pair and background cycle in a seeded random order (balanced), geometry random."""
    if count < 0:
        raise InputError(f"scene count {count} must be >= 0")
    rng = np.random.default_rng(seed)
    combos = [(c, s, b) for c, s in pairs for b in BACKGROUNDS]
    specs = []
    for start in range(0, count, len(combos)):
        order = rng.permutation(len(combos))[: count - start]
        for index in order:
            colour, shape, background = combos[index]
            centre, radius = random_geometry(rng, size)
            specs.append(SceneSpec(colour, shape, background, centre, radius, size))
    return specs


def training_specs(count: int, seed: int = 0, size: int = IMAGE_SIZE) -> list[SceneSpec]:
    """The training scenes: only the training pairs, every (pair, background) equally often."""
    return random_specs(count, seed, training_pairs(), size)


BENCHMARK_SEED = 20_000  # fixed: the benchmark must not move with the training seed


def benchmark_specs(per_combination: int = 4, size: int = IMAGE_SIZE) -> list[SceneSpec]:
    """The fixed held-out benchmark: `per_combination` scenes of each held-out pair on each background."""
    return random_specs(per_combination * len(HELD_OUT_PAIRS) * len(BACKGROUNDS), BENCHMARK_SEED,
                        held_out_pairs(), size)


def edited(spec: SceneSpec, colour: str | None = None, shape: str | None = None) -> SceneSpec:
    """The ground truth of an edit: the same scene (centre, radius, background) with a new colour/shape."""
    return replace(spec, colour=colour or spec.colour, shape=shape or spec.shape)
