"""The editing pipeline (SPEC §4–§6) on the tiny model: P2P invariants, spatial control, SPL, masks,
Direct Inversion in the edit, step hooks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from editkit.errors import InputError
from editkit.images import load_image
from s2edit.core.attention import ColumnMask, SpatialControl
from s2edit.core.engine import StepState
from s2edit.core.settings import MaskSettings, NullTextSettings, P2PSettings, SPLSettings
from s2edit.editing.editor import Editor
from s2edit.editing.inversion import Inversion, reconstruct
from s2edit.editing.maps import map_words
from s2edit.editing.plan import Placeholder
from s2edit.editing.request import EditRequest, InversionRequest

IMAGE = "examples/chelsea.png"
SOURCE = "a photo of a cat"
RESOLUTION = 128
STEPS = 10
NO_SPL = SPLSettings(structure=False, postprocess=False)


# `editor` (the tiny model, UNet output damped: well-conditioned DDIM trajectories) and `image`
# (chelsea.png at 128²) are conftest.py's.


@pytest.fixture(scope="module")
def inversion(editor, image):
    nti = NullTextSettings(inner_steps=2, lr=0.1)
    return editor.invert(image, SOURCE, InversionRequest("null_text", STEPS, nti=nti))


@pytest.fixture(scope="module")
def direct(editor, image):
    return editor.invert(image, SOURCE, InversionRequest("direct", STEPS))


@pytest.fixture(scope="module")
def reconstruction(editor, inversion) -> torch.Tensor:
    return reconstruct(editor.model, inversion).cpu()


def inversion_control(editor: Editor, inversion: Inversion) -> SpatialControl:
    """The spatial control an inversion ran with, as the edit's source branch applies it (its prompt's
    placeholders on the conditional row; on the unconditional row too when ∅ is the prompt)."""
    masks = editor.placeholder_masks(inversion.prompt)
    return SpatialControl([ColumnMask(None, token, mask) for token, mask in masks],
                          unconditional=masks if inversion.null_is_prompt else ())


# ----------------------------------------------------------------------------------------- P2P invariants


def test_target_equal_to_source_reproduces_the_reconstruction(editor, inversion, reconstruction) -> None:
    result = editor.edit(inversion, [SOURCE], spl=NO_SPL)
    assert torch.allclose(result.latents[0:1], reconstruction, atol=1e-4)
    assert torch.allclose(result.latents[1], result.latents[0], atol=1e-5)
    assert torch.allclose(result.images[0], result.reconstruction[0], atol=1e-4)
    assert result.metrics["reconstruction_psnr"] > 0 and result.metrics["spl_in_loop"] == []
    assert result.method == "p2p" and result.inversion["method"] == "null_text"


def test_a_word_swap_leaves_the_source_branch_unchanged(editor, inversion, reconstruction) -> None:
    swap = editor.edit(
        inversion, ["a photo of a dog"], p2p=P2PSettings(mode="replace", cross_replace=1.0, self_replace=1.0),
        spl=NO_SPL,
    )
    assert torch.allclose(swap.latents[0:1], reconstruction, atol=1e-4)  # only targets are edited
    free = editor.edit(inversion, ["a photo of a dog"], p2p=P2PSettings(cross_replace=0.0, self_replace=0.0),
                       spl=NO_SPL)
    assert torch.allclose(free.latents[0:1], reconstruction, atol=1e-4)
    # the injection is really installed: with it the target differs from the uncontrolled target
    assert (swap.latents[1] - free.latents[1]).abs().max() > 1e-3
    assert (free.latents[1] - free.latents[0]).abs().max() > 1e-3  # and the prompt changes the image


def test_local_blend_with_an_empty_mask_keeps_the_source(editor, inversion) -> None:
    # threshold 1: no normalised map value exceeds it, the blend mask is empty, every target := source
    # (z_s + 0·(z_t − z_s) is z_s exactly: bit-equality is the arithmetic's, not two kernels')
    result = editor.edit(
        inversion, ["a photo of a dog"], p2p=P2PSettings(blend_words=["cat", "dog"], blend_threshold=1.0),
        spl=NO_SPL,
    )
    assert torch.equal(result.latents[1], result.latents[0])


def test_the_store_sees_the_maps_before_the_injection(editor, inversion) -> None:
    """SPEC §4: saved maps (and LocalBlend, masks) are what each layer computed BEFORE the P2P edit. With
    cross-attention injected at every step, the target's injected maps of "a photo of a" ARE the source's;
    the maps the target computed itself differ once its latent has moved away from the source's."""
    result = editor.edit(inversion, ["a photo of a dog"], p2p=P2PSettings(cross_replace=1.0), spl=NO_SPL)
    source, target = result.attention_maps
    assert (target["photo"] - source["photo"]).abs().max() > 1e-4
    assert set(target) == {"a", "photo", "of", "dog"}


def test_several_targets_on_a_non_square_image(editor) -> None:
    wide = load_image(IMAGE, RESOLUTION)[..., :128, :]  # 128 x 128 → crop below keeps 64-multiples
    wide = torch.cat([wide, wide.flip(-1)], dim=-1)[..., :, :192]  # (1, 3, 128, 192)
    inversion = editor.invert(wide, SOURCE, InversionRequest("negative_prompt", 4))
    targets = ["a photo of a dog", "a photo of a fluffy cat"]
    result = editor.edit(
        inversion, targets, spl=SPLSettings(iterations=2, opt_schedule=0.5, structure_area="masked"),
        masks=MaskSettings(source_words=["cat"]),
    )
    assert result.images.shape == (2, 3, 128, 192) and result.reconstruction.shape == (1, 3, 128, 192)
    assert set(result.masks) == {"source", "mask_0", "mask_1"}
    assert all(m.shape == (128, 192) for m in result.masks.values())
    assert [list(maps) for maps in result.attention_maps] == [map_words(p) for p in [SOURCE, *targets]]
    level4 = (128 // 8 // 4, 192 // 8 // 4)  # "16×16" layers of a 16×24 latent
    assert all(m.shape == level4 and m.max() == 1.0 for maps in result.attention_maps for m in maps.values())


# ----------------------------------------------------------------------------------------- SPL


def test_spl_in_the_loop_and_post_processing_lower_the_spl_loss(editor, inversion) -> None:
    spl = SPLSettings(iterations=20, opt_schedule=0.7, color=True)
    result = editor.edit(inversion, ["a photo of a dog"], spl=spl)
    steps = [record["step"] for record in result.metrics["spl_in_loop"]]
    assert steps == [7, 8, 9]  # i/T >= 0.7
    for record in result.metrics["spl_in_loop"]:
        assert record["after"]["spl"][0] < record["before"]["spl"][0]
        assert record["after"]["cpl"][0] < record["before"]["cpl"][0]
    target = result.metrics["targets"][0]
    assert target["spl_loss_after"] < target["spl_loss_before"]
    assert not torch.equal(result.images, result.raw_images)


def test_spl_switched_off_changes_nothing(editor, inversion) -> None:
    off = editor.edit(inversion, ["a photo of a dog"], spl=SPLSettings(structure=False, color=False))
    plain = editor.edit(inversion, ["a photo of a dog"], spl=NO_SPL)
    assert torch.equal(off.images, off.raw_images) and torch.equal(off.latents, plain.latents)


# ----------------------------------------------------------------------------------------- masks (SPEC §6)

# the random model's attention is nearly uniform: a high threshold keeps only the peaks
WORDS = {"source_words": ["cat"], "target_words": ["dog"], "source_threshold": 0.98, "target_threshold": 0.98}


def test_masked_area_masks_follow_spec_6(editor, inversion) -> None:
    spl = SPLSettings(iterations=2, structure_area="masked")
    result = editor.edit(inversion, ["a photo of a dog"], spl=spl, masks=MaskSettings(**WORDS))
    source, target, final = result.masks["source"], result.masks["target_0"], result.masks["mask_0"]
    assert source.shape == target.shape == (RESOLUTION, RESOLUTION)
    assert 0 < float(source.mean()) < 1 and 0 < float(target.mean()) < 1  # soft, guided-filtered masks
    assert 0 <= float(final.min()) and float(final.max()) <= 1
    assert torch.equal(final, torch.maximum(source, target))

    # each side is inverted on its own, BEFORE the max (the SPL app), not 1 − max(source, target)
    both = editor.edit(inversion, ["a photo of a dog"], spl=spl,
                       masks=MaskSettings(**WORDS, source_invert=True, target_invert=True))
    torch.testing.assert_close(both.masks["source"], 1 - source)
    torch.testing.assert_close(both.masks["target_0"], 1 - target)
    torch.testing.assert_close(both.masks["mask_0"], torch.maximum(1 - source, 1 - target))
    assert (both.masks["mask_0"] - (1 - final)).abs().max() > 0.1  # the old rule gives another mask
    one = editor.edit(inversion, ["a photo of a dog"], spl=spl,
                      masks=MaskSettings(**WORDS, target_invert=True))
    torch.testing.assert_close(one.masks["mask_0"], torch.maximum(source, 1 - target))


def test_preview_masks_equal_the_masks_of_a_separate_loss_free_run(editor, inversion) -> None:
    """SPEC §6: the masks come from a full loss-free preview edit with the same settings — its maps over
    all steps and its final image — even though in-loop SPL then changes the run's own path."""
    masks = MaskSettings(**WORDS)
    spl = SPLSettings(iterations=30, opt_schedule=0.5, structure_area="masked")
    with_spl = editor.edit(inversion, ["a photo of a dog"], spl=spl, masks=masks)
    assert with_spl.metrics["spl_in_loop"]  # SPL acted in the loop
    loss_free = editor.edit(inversion, ["a photo of a dog"], spl=NO_SPL, masks=masks)
    assert set(with_spl.masks) == set(loss_free.masks) == {"source", "target_0", "mask_0"}
    for name in loss_free.masks:
        torch.testing.assert_close(with_spl.masks[name], loss_free.masks[name], atol=1e-5, rtol=0)
    # the cheaper in-loop approximation (maps until the first SPL step, its x̂0 as guide) is another mask
    in_loop = editor.edit(inversion, ["a photo of a dog"], spl=spl, masks=replace(masks, inputs="in_loop"))
    assert (in_loop.masks["target_0"] - loss_free.masks["target_0"]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------- Direct Inversion


def test_direct_inversion_keeps_the_source_branch_exact_and_leaves_targets_alone(editor, direct) -> None:
    seen: dict[str, list[torch.Tensor]] = {"with": [], "without": []}

    def recorder(name: str):
        def record(state: StepState) -> None:
            seen[name].append(state.latents.clone())
        return record

    result = editor.edit(direct, ["a photo of a dog"], spl=NO_SPL, callback=recorder("with"))
    # the source branch retraces the inversion: z0 to float precision at guidance 7.5
    error = float((result.latents[0] - direct.z0[0]).pow(2).mean())
    assert error < 1e-8, error
    without_offsets = replace(direct, offsets=None)
    editor.edit(without_offsets, ["a photo of a dog"], spl=NO_SPL, callback=recorder("without"))
    first_with, first_without = seen["with"][0], seen["without"][0]
    assert torch.equal(first_with[1], first_without[1])  # step 0: the target row is not offset
    torch.testing.assert_close(first_with[0] - first_without[0], direct.offsets[0], atol=1e-5, rtol=1e-5)


def test_direct_inversion_edits_with_spatial_control_and_spl(identity_editor, image) -> None:
    prompt = "a photo of a [I] cat"
    inversion = identity_editor.invert(image, prompt, InversionRequest("direct", 4))
    spl = SPLSettings(iterations=5, opt_schedule=0.5)
    controlled = identity_editor.edit(inversion, ["a photo of a [I] cat with a hat"], spl=spl)
    free = identity_editor.edit(
        inversion, ["a photo of a [I] cat with a hat"], spl=spl, spatial_control=False
    )
    assert (controlled.latents[1] - free.latents[1]).abs().max() > 1e-4  # [I]'s mask acts on the target
    assert [r["step"] for r in controlled.metrics["spl_in_loop"]] == [2, 3]
    target = controlled.metrics["targets"][0]
    assert target["spl_loss_after"] < target["spl_loss_before"]
    # the source branch runs with the same spatial control as the offsets were computed with: exact
    assert float((controlled.latents[0] - inversion.z0[0]).pow(2).mean()) < 1e-8


def test_a_step_callback_can_replace_the_latents(editor, inversion) -> None:
    steps = []

    def freeze_target(state: StepState):
        steps.append(state.step)
        latents = state.latents.clone()
        latents[1] = latents[0]  # the target follows the source after every step
        return {"latents": latents}

    result = editor.edit(inversion, ["a photo of a dog"], spl=NO_SPL, callback=freeze_target)
    assert steps == list(range(STEPS))
    assert torch.equal(result.latents[1], result.latents[0])  # the callback's assignment, exactly
    with pytest.raises(ValueError, match="may return 'latents' and 'x0'"):
        editor.edit(inversion, ["a photo of a dog"], spl=NO_SPL, callback=lambda state: {"noise": 0})


# ----------------------------------------------------------------------------------------- placeholders


@pytest.fixture(scope="module")
def identity_editor(tame_tiny_model) -> Editor:
    sd = tame_tiny_model()
    sd.add_placeholder("[I]", "cat")
    mask = torch.zeros(RESOLUTION, RESOLUTION)
    mask[32:96, 32:96] = 1.0
    return Editor(sd, [Placeholder("[I]", mask, "a photo of a [I] cat")], weights="tiny-[I]", progress=False)


def test_spatial_control_of_the_placeholder_is_active(identity_editor, image) -> None:
    prompt = "a photo of a [I] cat"
    inversion = identity_editor.invert(image, prompt, InversionRequest("negative_prompt", 4))
    controlled = identity_editor.edit(inversion, ["a photo of a [I] cat with a hat"], spl=NO_SPL)
    free = identity_editor.edit(
        inversion, ["a photo of a [I] cat with a hat"], spatial_control=False, spl=NO_SPL
    )
    assert (controlled.latents - free.latents).abs().max() > 1e-4
    # the inversion ran with the same control: the source branch still retraces it
    assert torch.allclose(
        controlled.latents[0:1],
        reconstruct(identity_editor.model, inversion, inversion_control(identity_editor, inversion)).cpu(),
        atol=1e-4,
    )


def test_refusals_name_the_bad_value(identity_editor, editor) -> None:
    source = "a photo of a [I] cat"
    with pytest.raises(InputError, match=r"does not contain the placeholder \[I\]"):
        identity_editor.plan(source, ["a photo of a dog"])
    with pytest.raises(InputError, match=r"mask\.source_words word 'dog'"):
        editor.plan(SOURCE, ["a photo of a dog"], EditRequest(mask=MaskSettings(source_words=["dog"])))
    with pytest.raises(InputError, match=r"mask\.target_words word 'cat'"):
        editor.plan(SOURCE, ["a photo of a dog"], EditRequest(mask=MaskSettings(target_words=["cat"])))
    with pytest.raises(InputError, match="blend word 'tiger'"):
        editor.plan(SOURCE, ["a photo of a dog"], EditRequest(p2p=P2PSettings(blend_words=["tiger"])))
    with pytest.raises(InputError, match="use mode=refine"):
        editor.plan(SOURCE, ["a photo of a fluffy dog"], EditRequest(p2p=P2PSettings(mode="replace")))
    with pytest.raises(InputError, match="tokens long"):
        editor.plan(SOURCE, ["a photo of a cat" + " and a dog" * 30])
    with pytest.raises(InputError, match="area=masked needs mask words"):
        editor.plan(SOURCE, ["a photo of a dog"], EditRequest(spl=SPLSettings(structure_area="masked")))
    with pytest.raises(InputError, match=r"SPLSettings\.opt_schedule=1\.5 must be >= 0, <= 1"):
        SPLSettings(opt_schedule=1.5)
    with pytest.raises(InputError, match="targets='a photo of a dog' must be a list"):
        editor.plan(SOURCE, "a photo of a dog")


# ----------------------------------------------------------------------------------------- compositional


# `compositional_editor` (an export with [I] and [A]) is conftest.py's.


def test_editor_resolution_follows_the_export_else_the_native_size(compositional_editor, editor) -> None:
    assert compositional_editor.resolution == RESOLUTION and editor.resolution == 256  # tiny: 32 × 8
    assert compositional_editor.load_image(IMAGE).shape == load_image(IMAGE, RESOLUTION).shape
    assert editor.load_image(IMAGE).shape == load_image(IMAGE, 256).shape != load_image(IMAGE, 128).shape


def test_compositional_edit_controls_only_the_source_placeholder(compositional_editor) -> None:
    editor = compositional_editor
    assert [p.text for p in editor.placeholders] == ["[I]", "[A]"]
    image = editor.load_image(IMAGE)
    source, target = "a photo of a [I] cat", "a photo of a [I] cat with [A] stripes"
    inversion = editor.invert(image, source, InversionRequest("negative_prompt", 4))
    result = editor.edit(inversion, [target], spl=NO_SPL)
    assert (result.latents[1] - result.latents[0]).abs().max() > 1e-3
    assert set(result.attention_maps[1]) >= {"[I]", "[A]", "stripes"}

    def variant(index: int, mask: torch.Tensor) -> Editor:
        placeholders = list(editor.placeholders)
        placeholders[index] = replace(placeholders[index], mask=mask)
        return Editor(editor.model, placeholders, weights=editor.weights, progress=False)

    # [A]'s mask belongs to its reference image: whatever it is, this edit does not use it ...
    other_attribute = variant(1, torch.ones(RESOLUTION, RESOLUTION)).edit(inversion, [target], spl=NO_SPL)
    assert torch.equal(other_attribute.latents, result.latents)
    # ... while [I]'s mask controls the target row (the source row keeps the inversion's control)
    other_identity = variant(0, torch.ones(RESOLUTION, RESOLUTION)).edit(inversion, [target], spl=NO_SPL)
    assert (other_identity.latents[1] - result.latents[1]).abs().max() > 1e-4

    # [A] is the export's embedding: initialised from "stripes", "[A] stripes" reads as "stripes stripes"
    words = editor.edit(inversion, ["a photo of a [I] cat with stripes stripes"], spl=NO_SPL)
    assert torch.allclose(words.latents, result.latents, atol=1e-5)


def test_compositional_targets_need_the_source_placeholder_only(compositional_editor) -> None:
    source = "a photo of a [I] cat"
    compositional_editor.plan(source, ["a photo of a [I] cat with [A] stripes", "a [I] cat in snow"])
    with pytest.raises(InputError, match=r"does not contain the placeholder \[I\]"):
        compositional_editor.plan(source, ["a photo of a cat with [A] stripes"])
