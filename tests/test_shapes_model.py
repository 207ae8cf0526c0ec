"""The shipped shapes model (`model=shapes`, issue 20): a real, trained model whose attention means
something, so edits are scored against the world's ground truth. Fast and deterministic: a few 64²
scenes of training pairs, fixed geometry, on the CPU."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s2edit.core.loading import PRESET_DIR, load_model, token_table
from s2edit.core.settings import MaskSettings, P2PSettings, SPLSettings
from s2edit.editing.editor import Editor
from s2edit.editing.request import InversionRequest
from s2edit.shapes.data import images_to_model, model_to_images
from s2edit.shapes.scorers import dominant_colour, iou, psnr_outside, segment_object
from s2edit.shapes.world import SceneSpec, render

PRESET = PRESET_DIR / "shapes"
NO_SPL = SPLSettings(structure=False, color=False)
# training pairs on every background, the object off-centre (the maps must find it, not the middle)
SCENES = [
    SceneSpec("red", "circle", "white", (24.0, 38.0), 14.0),
    SceneSpec("green", "square", "grey", (40.0, 26.0), 15.0),
    SceneSpec("purple", "triangle", "black", (36.0, 36.0), 16.0),
]
COLOUR_SWAPS = {"red": "blue", "green": "yellow", "purple": "red"}


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (1, 3, H, W) in [-1, 1]."""
    return images_to_model(torch.from_numpy(image)[None])


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] → (H, W, 3) uint8."""
    return model_to_images(image[None])[0].numpy()


@pytest.fixture(scope="module")
def editor() -> Editor:
    return Editor.from_model("shapes", device="cpu", progress=False)


@pytest.fixture(scope="module")
def inversions(editor: Editor) -> dict[SceneSpec, object]:
    """Direct inversion of each scene under its caption (50 steps, as every P2P edit here)."""
    return {spec: editor.invert(to_tensor(render(spec).image), spec.caption, InversionRequest("direct", 50))
            for spec in SCENES}


def colour_swap(spec: SceneSpec) -> str:
    return spec.caption.replace(f"a {spec.colour} ", f"a {COLOUR_SWAPS[spec.colour]} ", 1)


def test_the_preset_is_the_shipped_trained_model() -> None:
    """model=shapes: SD1 layout at 64² (f=4 VAE, masks from the 16² layers), the token table regenerated
    from its seed (not shipped), fp16 weights small enough for package data, and how they were trained."""
    info = json.loads((PRESET / "preset.json").read_text())
    model = load_model("shapes")
    geometry = (model.name, model.native_resolution, model.vae_scale_factor, model.mask_level)
    assert geometry == ("sd1", 64, 4, 1)
    table = model.text_encoder.get_input_embeddings().weight
    expected = token_table(info["token_table"]["seed"], 49408, table.shape[1], info["token_table"]["std"])
    assert torch.equal(table, expected)
    from safetensors import safe_open

    with safe_open(str(PRESET / info["weights"]), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float16}  # noqa: SIM118
    assert (PRESET / info["weights"]).stat().st_size < 8 * 2**20
    notes = (PRESET / "TRAINING.md").read_text()
    assert "python -m s2edit.shapes train" in notes and "seed" in notes and "cores" in notes


def test_the_colour_words_map_lands_on_the_object(editor: Editor) -> None:
    """Each scene's colour word attends to the object: most of its 16² map lies inside the object's
    ground-truth coverage, and its peak is on the object."""
    for spec in SCENES:
        scene = render(spec)
        result = editor.edit_virtual(to_tensor(scene.image), spec.caption, [spec.caption], spl=NO_SPL)
        word_map = result.attention_maps[0][spec.colour]  # (16, 16), max-normalised
        coverage = F.adaptive_avg_pool2d(torch.from_numpy(scene.coverage)[None, None], word_map.shape)[0, 0]
        inside = float((word_map * coverage).sum() / word_map.sum())
        peak = np.unravel_index(int(word_map.argmax()), tuple(word_map.shape))
        assert inside > 0.6 and coverage[peak] > 0.5, (spec.caption, inside, float(coverage[peak]))


def test_a_colour_swap_with_spl_keeps_the_outline_better(editor: Editor, inversions: dict) -> None:
    """Direct + P2P colour swaps: with SPL the edited object keeps the source's outline better (object
    IoU) than without, and the object takes the new colour."""
    overlaps: dict[bool, list[float]] = {False: [], True: []}
    recoloured = 0
    for spec in SCENES:
        source = render(spec)
        for with_spl in (False, True):
            spl = SPLSettings() if with_spl else NO_SPL
            result = editor.edit(inversions[spec], [colour_swap(spec)], spl=spl)
            image = to_uint8(result.images[0])
            found = segment_object(image, spec.background)
            overlaps[with_spl].append(iou(found, source.mask))
            recoloured += with_spl and dominant_colour(image, found) == COLOUR_SWAPS[spec.colour]
    assert statistics.fmean(overlaps[True]) > statistics.fmean(overlaps[False]), overlaps
    assert recoloured >= 2, recoloured


def test_local_blend_keeps_the_background(editor: Editor, inversions: dict) -> None:
    """LocalBlend on the colour words: the pixels outside the object change less than without it (on
    average over the scenes, by more than 1 dB)."""
    gains = []
    for spec in SCENES:
        source = render(spec)
        target = colour_swap(spec)
        plain = editor.edit(inversions[spec], [target], spl=NO_SPL)
        blended = editor.edit(inversions[spec], [target], spl=NO_SPL,
                              p2p=P2PSettings(blend_words=[spec.colour, COLOUR_SWAPS[spec.colour]]))
        outside = [psnr_outside(to_uint8(r.images[0]), source.image, source.mask) for r in (plain, blended)]
        gains.append(outside[1] - outside[0])
    assert sum(g > 0 for g in gains) >= 2 and statistics.fmean(gains) > 1.0, gains


def test_the_preservation_masks_cover_the_object(editor: Editor, inversions: dict) -> None:
    """SPEC §6 masks of the shape word, upsampled by the guided filter: they lie on the object (nearly
    every mask pixel is an object pixel) and cover much of it (IoU with its ground-truth mask). The
    guided filter's radius is sized for 512² images, so at 64² a thin object's edges are partly lost."""
    overlaps = []
    for spec in SCENES:
        source = render(spec)
        masks = MaskSettings(source_words=[spec.shape], target_words=[spec.shape])
        result = editor.edit(inversions[spec], [colour_swap(spec)], masks=masks,
                             spl=SPLSettings(structure_area="masked", iterations=1))
        mask = result.masks["source"].numpy() > 0.5
        on_object = float((mask & source.mask).sum() / max(mask.sum(), 1))
        overlaps.append(iou(mask, source.mask))
        assert on_object > 0.9 and overlaps[-1] > 0.45, (spec.caption, on_object, overlaps[-1])
    assert statistics.fmean(overlaps) > 0.6, overlaps
