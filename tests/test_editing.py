"""The editing pipeline (SPEC §4–§6) on the tiny model: P2P invariants, spatial control, SPL, masks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from editkit.errors import InputError
from editkit.images import load_image
from s2edit.editing import Editor, Placeholder, prompt_words
from s2edit.inversion import NullTextSettings, reconstruct
from s2edit.tokenizer import add_placeholder_token

IMAGE = "examples/chelsea.png"
SOURCE = "a photo of a cat"
RESOLUTION = 128
STEPS = 10
NO_SPL = {"structure": False, "postprocess": False}


@pytest.fixture(scope="module")
def editor(tame_tiny_model) -> Editor:
    """The tiny model, UNet output damped (conftest.py: well-conditioned DDIM trajectories)."""
    return Editor(tame_tiny_model(), weights="tiny-damped", progress=False)


@pytest.fixture(scope="module")
def image(editor) -> torch.Tensor:
    return editor.load_image(IMAGE, RESOLUTION)


@pytest.fixture(scope="module")
def inversion(editor, image):
    nti = NullTextSettings(inner_steps=2, lr=0.1)
    return editor.invert(image, SOURCE, method="null_text", steps=STEPS, nti=nti)


@pytest.fixture(scope="module")
def reconstruction(editor, inversion) -> torch.Tensor:
    return reconstruct(editor.sd, inversion).cpu()


# ----------------------------------------------------------------------------------------- P2P invariants


def test_target_equal_to_source_reproduces_the_reconstruction(editor, inversion, reconstruction) -> None:
    result = editor.edit(inversion, [SOURCE], **NO_SPL)
    assert torch.allclose(result.latents[0:1], reconstruction, atol=1e-4)
    assert torch.allclose(result.latents[1], result.latents[0], atol=1e-5)
    assert torch.allclose(result.images[0], result.reconstruction[0], atol=1e-4)
    assert result.metrics["reconstruction_psnr"] > 0 and result.metrics["spl_in_loop"] == []


def test_a_word_swap_leaves_the_source_branch_unchanged(editor, inversion, reconstruction) -> None:
    swap = editor.edit(
        inversion, ["a photo of a dog"], mode="replace", cross_replace=1.0, self_replace=1.0, **NO_SPL
    )
    assert torch.allclose(swap.latents[0:1], reconstruction, atol=1e-4)  # only targets are edited
    free = editor.edit(inversion, ["a photo of a dog"], cross_replace=0.0, self_replace=0.0, **NO_SPL)
    assert torch.allclose(free.latents[0:1], reconstruction, atol=1e-4)
    # the injection is really installed: with it the target differs from the uncontrolled target
    assert (swap.latents[1] - free.latents[1]).abs().max() > 1e-3
    assert (free.latents[1] - free.latents[0]).abs().max() > 1e-3  # and the prompt changes the image


def test_local_blend_with_an_empty_mask_keeps_the_source(editor, inversion) -> None:
    # threshold 1: no normalised map value exceeds it, the blend mask is empty, every target := source
    result = editor.edit(
        inversion, ["a photo of a dog"], blend_words=["cat", "dog"], blend_threshold=1.0, **NO_SPL
    )
    assert torch.equal(result.latents[1], result.latents[0])


def test_several_targets_on_a_non_square_image(editor) -> None:
    wide = load_image(IMAGE, RESOLUTION)[..., :128, :]  # 128 x 128 → crop below keeps 64-multiples
    wide = torch.cat([wide, wide.flip(-1)], dim=-1)[..., :, :192]  # (1, 3, 128, 192)
    inversion = editor.invert(wide, SOURCE, method="negative_prompt", steps=4)
    targets = ["a photo of a dog", "a photo of a fluffy cat"]
    result = editor.edit(
        inversion, targets, iterations=2, opt_schedule=0.5, mask_words_source=["cat"], area="masked"
    )
    assert result.images.shape == (2, 3, 128, 192) and result.reconstruction.shape == (1, 3, 128, 192)
    assert set(result.masks) == {"source", "mask_0", "mask_1"}
    assert all(m.shape == (128, 192) for m in result.masks.values())
    assert [list(maps) for maps in result.attention_maps] == [prompt_words(p) for p in [SOURCE, *targets]]
    level4 = (128 // 8 // 4, 192 // 8 // 4)  # "16×16" layers of a 16×24 latent
    assert all(m.shape == level4 and m.max() == 1.0 for maps in result.attention_maps for m in maps.values())


# ----------------------------------------------------------------------------------------- SPL


def test_spl_in_the_loop_and_post_processing_lower_the_spl_loss(editor, inversion) -> None:
    result = editor.edit(inversion, ["a photo of a dog"], iterations=20, opt_schedule=0.7, color=True)
    steps = [record["step"] for record in result.metrics["spl_in_loop"]]
    assert steps == [7, 8, 9]  # i/T >= 0.7
    for record in result.metrics["spl_in_loop"]:
        assert record["after"]["spl"][0] < record["before"]["spl"][0]
        assert record["after"]["cpl"][0] < record["before"]["cpl"][0]
    target = result.metrics["targets"][0]
    assert target["spl_loss_after"] < target["spl_loss_before"]
    assert not torch.equal(result.images, result.raw_images)


def test_spl_switched_off_changes_nothing(editor, inversion) -> None:
    off = editor.edit(inversion, ["a photo of a dog"], structure=False, color=False)
    plain = editor.edit(inversion, ["a photo of a dog"], **NO_SPL)
    assert torch.equal(off.images, off.raw_images) and torch.equal(off.latents, plain.latents)


def test_masked_area_masks_follow_spec_6(editor, inversion) -> None:
    # the random model's attention is nearly uniform: a high threshold keeps only the peaks
    words = {
        "mask_words_source": ["cat"],
        "mask_words_target": ["dog"],
        "area": "masked",
        "iterations": 2,
        "mask_threshold": 0.98,
    }
    result = editor.edit(inversion, ["a photo of a dog"], **words)
    source, target, final = result.masks["source"], result.masks["target_0"], result.masks["mask_0"]
    assert source.shape == target.shape == (RESOLUTION, RESOLUTION)
    assert 0 < float(source.mean()) < 1 and 0 < float(target.mean()) < 1  # soft, guided-filtered masks
    assert 0 <= float(final.min()) and float(final.max()) <= 1
    assert torch.equal(final, torch.maximum(source, target))
    inverted = editor.edit(inversion, ["a photo of a dog"], mask_invert=True, **words)
    assert torch.allclose(inverted.masks["mask_0"], 1 - final, atol=1e-6)


# ----------------------------------------------------------------------------------------- placeholders


@pytest.fixture(scope="module")
def identity_editor(tame_tiny_model) -> Editor:
    sd = tame_tiny_model()
    add_placeholder_token(sd.tokenizer, sd.text_encoder, "[I]", "cat")
    mask = torch.zeros(RESOLUTION, RESOLUTION)
    mask[32:96, 32:96] = 1.0
    return Editor(sd, [Placeholder("[I]", mask, "a photo of a [I] cat")], weights="tiny-[I]", progress=False)


def test_spatial_control_of_the_placeholder_is_active(identity_editor, image) -> None:
    prompt = "a photo of a [I] cat"
    inversion = identity_editor.invert(image, prompt, method="negative_prompt", steps=4)
    controlled = identity_editor.edit(inversion, ["a photo of a [I] cat with a hat"], **NO_SPL)
    free = identity_editor.edit(
        inversion, ["a photo of a [I] cat with a hat"], spatial_control=False, **NO_SPL
    )
    assert (controlled.latents - free.latents).abs().max() > 1e-4
    # the inversion ran with the same control: the source branch still retraces it
    assert torch.allclose(
        controlled.latents[0:1],
        reconstruct(identity_editor.sd, inversion, identity_editor.placeholder_masks(prompt)).cpu(),
        atol=1e-4,
    )


def test_refusals_name_the_bad_value(identity_editor, editor) -> None:
    source = "a photo of a [I] cat"
    with pytest.raises(InputError, match=r"does not contain the placeholder \[I\]"):
        identity_editor.check_inputs(source, ["a photo of a dog"])
    with pytest.raises(InputError, match="mask_words_source word 'dog'"):
        editor.check_inputs(SOURCE, ["a photo of a dog"], mask_words_source=["dog"])
    with pytest.raises(InputError, match="mask_words_target word 'cat'"):
        editor.check_inputs(SOURCE, ["a photo of a dog"], mask_words_target=["cat"])
    with pytest.raises(InputError, match="blend word 'tiger'"):
        editor.check_inputs(SOURCE, ["a photo of a dog"], blend_words=["tiger"])
    with pytest.raises(InputError, match="use mode=refine"):
        editor.check_inputs(SOURCE, ["a photo of a fluffy dog"], mode="replace")
    with pytest.raises(InputError, match="tokens long"):
        editor.check_inputs(SOURCE, ["a photo of a cat" + " and a dog" * 30])
    with pytest.raises(InputError, match="area=masked needs mask words"):
        editor.check_inputs(SOURCE, ["a photo of a dog"], area="masked")
    with pytest.raises(InputError, match="opt_schedule"):
        editor.check_inputs(SOURCE, ["a photo of a dog"], opt_schedule=1.5)


# ----------------------------------------------------------------------------------------- compositional


@pytest.fixture(scope="module")
def compositional_editor(make_export, tame_tiny_model) -> Editor:
    """An export with [I] (this image's subject) and [A] (an attribute, its mask drawn on another image)."""
    identity, attribute = torch.zeros(2, RESOLUTION, RESOLUTION)
    identity[32:96, 32:96] = 1.0
    attribute[:, :40] = 1.0
    tokens = [("[I]", "a photo of a [I] cat", "cat"), ("[A]", "a photo of a dog with [A] stripes", "stripes")]
    ckpt = make_export(tame_tiny_model(), tokens, [identity, attribute], resolution=RESOLUTION)
    return Editor.from_export(ckpt, device="cpu", progress=False)


def test_editor_resolution_follows_the_export_else_the_native_size(compositional_editor, editor) -> None:
    assert compositional_editor.resolution == RESOLUTION and editor.resolution == 256  # tiny: 32 × 8
    assert compositional_editor.load_image(IMAGE).shape == load_image(IMAGE, RESOLUTION).shape
    assert editor.load_image(IMAGE).shape == load_image(IMAGE, 256).shape != load_image(IMAGE, 128).shape


def test_compositional_edit_controls_only_the_source_placeholder(compositional_editor) -> None:
    editor = compositional_editor
    assert [p.text for p in editor.placeholders] == ["[I]", "[A]"]
    image = editor.load_image(IMAGE)
    source, target = "a photo of a [I] cat", "a photo of a [I] cat with [A] stripes"
    inversion = editor.invert(image, source, method="negative_prompt", steps=4)
    result = editor.edit(inversion, [target], **NO_SPL)
    assert (result.latents[1] - result.latents[0]).abs().max() > 1e-3
    assert set(result.attention_maps[1]) >= {"[I]", "[A]", "stripes"}

    def variant(index: int, mask: torch.Tensor) -> Editor:
        placeholders = list(editor.placeholders)
        placeholders[index] = replace(placeholders[index], mask=mask)
        return Editor(editor.sd, placeholders, weights=editor.weights, progress=False)

    # [A]'s mask belongs to its reference image: whatever it is, this edit does not use it ...
    other_attribute = variant(1, torch.ones(RESOLUTION, RESOLUTION)).edit(inversion, [target], **NO_SPL)
    assert torch.equal(other_attribute.latents, result.latents)
    # ... while [I]'s mask controls the target row (the source row keeps the inversion's control)
    other_identity = variant(0, torch.ones(RESOLUTION, RESOLUTION)).edit(inversion, [target], **NO_SPL)
    assert (other_identity.latents[1] - result.latents[1]).abs().max() > 1e-4

    # [A] is the export's embedding: initialised from "stripes", "[A] stripes" reads as "stripes stripes"
    words = editor.edit(inversion, ["a photo of a [I] cat with stripes stripes"], **NO_SPL)
    assert torch.allclose(words.latents, result.latents, atol=1e-5)


def test_compositional_targets_need_the_source_placeholder_only(compositional_editor) -> None:
    source = "a photo of a [I] cat"
    compositional_editor.check_inputs(source, ["a photo of a [I] cat with [A] stripes", "a [I] cat in snow"])
    with pytest.raises(InputError, match=r"does not contain the placeholder \[I\]"):
        compositional_editor.check_inputs(source, ["a photo of a cat with [A] stripes"])
