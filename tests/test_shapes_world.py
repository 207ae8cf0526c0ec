"""The shapes world (issue 20): deterministic scenes, held-out pairs, ground truth and scorers."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from editkit.errors import InputError
from s2edit.shapes.scorers import (
    background_colour,
    classify_shape,
    dominant_colour,
    iou,
    psnr,
    psnr_outside,
    segment_object,
)
from s2edit.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    SceneSpec,
    benchmark_specs,
    edited,
    random_specs,
    render,
    training_specs,
)

ALL_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]


def test_same_seed_gives_the_same_bytes_and_another_seed_other_scenes():
    first = [render(spec).image.tobytes() for spec in training_specs(12, seed=3)]
    again = [render(spec).image.tobytes() for spec in training_specs(12, seed=3)]
    other = [render(spec).image.tobytes() for spec in training_specs(12, seed=4)]
    assert first == again
    assert first != other


def test_held_out_pairs_never_appear_in_training_and_make_the_benchmark():
    training = {(s.colour, s.shape) for s in training_specs(2000, seed=0)}
    assert training.isdisjoint(HELD_OUT_PAIRS)
    assert len(training) == len(ALL_PAIRS) - len(HELD_OUT_PAIRS)  # every other pair does appear
    benchmark = benchmark_specs(per_combination=2)
    assert {(s.colour, s.shape) for s in benchmark} == set(HELD_OUT_PAIRS)
    assert len(benchmark) == 2 * len(HELD_OUT_PAIRS) * len(BACKGROUNDS)
    assert benchmark == benchmark_specs(per_combination=2)  # fixed, whatever the training seed


def test_every_pair_and_background_is_balanced_in_training():
    specs = training_specs(51 * 3, seed=1)  # three full cycles of the 17 pairs × 3 backgrounds
    counts = Counter((s.colour, s.shape, s.background) for s in specs)
    assert len(counts) == 51 and set(counts.values()) == {3}


def test_mask_and_pixels_agree_with_the_coverage():
    scene = render(SceneSpec("red", "star", "grey", centre=(30.3, 33.7), radius=14.2))
    colour, background = np.array(COLOURS["red"]), np.array(BACKGROUNDS["grey"])
    full, empty = scene.coverage == 1, scene.coverage == 0
    assert (scene.image[full] == colour).all()
    assert (scene.image[empty] == background).all()
    assert np.array_equal(scene.mask, scene.coverage >= 0.5)
    edge = (scene.coverage > 0) & (scene.coverage < 1)
    assert edge.any()  # anti-aliased
    expected = np.rint(scene.coverage[edge, None] * colour + (1 - scene.coverage[edge, None]) * background)
    assert np.array_equal(scene.image[edge], expected.astype(np.uint8))
    assert scene.caption == "a red star on a grey background"


def test_a_circle_covers_pi_r_squared():
    scene = render(SceneSpec("blue", "circle", "white", centre=(32.0, 32.0), radius=15.0))
    assert scene.coverage.sum() == pytest.approx(math.pi * 15.0**2, rel=2e-3)


def test_an_edit_keeps_the_scene_and_changes_only_the_object():
    spec = training_specs(1, seed=7)[0]
    target = edited(spec, colour="purple", shape="triangle")
    assert (target.centre, target.radius, target.background) == (spec.centre, spec.radius, spec.background)
    before, after = render(spec), render(target)
    outside = ~(before.coverage > 0) & ~(after.coverage > 0)
    assert np.array_equal(before.image[outside], after.image[outside])
    assert psnr_outside(before.image, after.image, ~outside) == math.inf
    assert psnr_outside(before.image, after.image, before.mask | after.mask) < math.inf  # edge pixels


def test_ground_truth_renders_are_scored_right():
    specs = random_specs(240, seed=11, pairs=ALL_PAIRS)  # every shape × colour × background, random sizes
    assert {s.shape for s in specs} == set(SHAPES)
    for spec in specs:
        scene = render(spec)
        assert classify_shape(scene.mask) == spec.shape, spec
        assert dominant_colour(scene.image, scene.mask) == spec.colour, spec
        assert background_colour(scene.image) == spec.background, spec
        assert iou(segment_object(scene.image, spec.background), scene.mask) == 1.0, spec


def test_empty_masks_have_no_colour_or_shape():
    image = render(SceneSpec("red", "circle", "black", (32.0, 32.0), 12.0)).image
    empty = np.zeros((64, 64), dtype=bool)
    assert dominant_colour(image, empty) is None
    assert classify_shape(empty) is None


def test_iou_of_shifted_squares():
    a = np.zeros((20, 20), dtype=bool)
    a[0:10, 0:10] = True
    b = np.roll(a, 5, axis=1)  # overlap 10×5 = 50 of a union 150
    assert iou(a, b) == pytest.approx(50 / 150)
    assert iou(a, a) == 1.0
    assert iou(a, ~a) == 0.0
    assert iou(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_psnr_closed_forms():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = a.copy()
    assert psnr(a, b) == math.inf
    b[0, 0] = 255  # one pixel of 16 wrong by the peak in every channel: MSE = 255²/16
    assert psnr(a, b) == pytest.approx(10 * math.log10(16))
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = True
    assert psnr_outside(a, b, mask) == math.inf
    assert math.isnan(psnr_outside(a, b, np.ones((4, 4), dtype=bool)))


def test_bad_inputs_are_refused_in_one_line():
    with pytest.raises(InputError, match="shape 'hexagon'"):
        render(SceneSpec("red", "hexagon", "white", (32.0, 32.0), 10.0))
    with pytest.raises(InputError, match="leaves the"):
        render(SceneSpec("red", "circle", "white", (5.0, 32.0), 10.0))
    with pytest.raises(InputError, match="background 'pink'"):
        segment_object(np.zeros((8, 8, 3), dtype=np.uint8), "pink")
