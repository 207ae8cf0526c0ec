"""Training-free virtual inversion (InfEdit / DDCM, SPEC §9) on the tiny models: the DDCM step in closed
form, reconstruction without inversion, mutual self-attention, SPL in the loop, seeds, LCM and DDIM
schedules, spatial control of an S2Edit export, LocalBlend, refusals."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from diffusers import LCMScheduler

from conftest import record, tolerance
from editkit.errors import InputError
from s2edit.core.attention import AttentionCall, AttentionProcessor, AttentionStore, ControllerChain
from s2edit.core.diffusion import DDIMSchedule, VirtualSampler
from s2edit.core.loading import load_model
from s2edit.core.settings import MaskSettings, SPLSettings, VirtualSettings
from s2edit.editing.editor import Editor
from s2edit.editing.methods.virtual import VirtualAttentionControl, VirtualLocalBlend

IMAGE = "examples/chelsea.png"
SOURCE, TARGET = "a photo of a cat", "a photo of a tiger"
RESOLUTION = 128
NO_SPL = SPLSettings(structure=False, postprocess=False)


# `editor` (the tiny model, UNet output damped: well-conditioned DDIM trajectories) and `image`
# (chelsea.png at 128²) are conftest.py's.


# ----------------------------------------------------------------------------------------- the DDCM step


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddcm_step_equals_a_hand_computed_step_in_float64(eta: float) -> None:
    alphas = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    schedule = DDIMSchedule(torch.tensor([800, 500, 100]), alphas, alphas, "epsilon")
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64)
    latents = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)  # [S, T, M]
    noise = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    sampler = VirtualSampler(schedule, z0, torch.Generator().manual_seed(7), eta=eta)
    i, a, a_next = 1, 0.5, 0.9
    x0 = sampler.predict_x0(latents, noise, i)
    stepped = sampler.step(latents, x0, noise, i)

    xi = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(7)).double()  # the same draw
    for row in range(3):
        difference = (latents[row] - latents[0]) - math.sqrt(1 - a) * (noise[row] - noise[0])
        expected_x0 = z0[0] + difference / math.sqrt(a)
        torch.testing.assert_close(x0[row], expected_x0, rtol=0, atol=1e-12)
        variance = eta * (1 - a_next)
        source_eps = (latents[0] - math.sqrt(a) * z0[0]) / math.sqrt(1 - a)
        direction = math.sqrt(1 - a_next - variance) * ((noise[row] - noise[0]) + source_eps)
        expected = math.sqrt(a_next) * expected_x0 + direction + math.sqrt(variance) * xi[0]
        torch.testing.assert_close(stepped[row], expected, rtol=0, atol=1e-6)  # ξ is drawn in float32
    torch.testing.assert_close(x0[0], z0[0], rtol=0, atol=0)  # x̂0^S = z0 exactly
    # the last step re-noises to its own ᾱ (t′ = t), and a one-step schedule returns x̂0 itself
    assert sampler.alpha_next(2) == 0.9
    one = VirtualSampler(DDIMSchedule(torch.tensor([500]), alphas[:1], alphas[:1], "epsilon"), z0,
                         torch.Generator().manual_seed(0))
    assert torch.equal(one.step(latents, x0, noise, 0), x0)


# ----------------------------------------------------------------------------------------- the editor


def test_identical_prompts_reconstruct_z0_at_every_step_without_inverting(editor, image) -> None:
    """Target = source at the same guidance: T's branch computes what S's does, so its x̂0 is z0 at every
    step — the virtual inversion reconstructs the image without inverting it. (At the default target
    guidance 2 ≠ 1 the branches differ by their guidance alone.) T and S are two rows of one batched
    UNet call, which may run through different kernel blocks: they agree to float32 rounding, not bit
    for bit."""
    x0s: list[torch.Tensor] = []
    same = VirtualSettings(target_guidance=1.0)
    result = editor.edit_virtual(
        image, SOURCE, [SOURCE], virtual=same, spl=NO_SPL, callback=record("x0", x0s)
    )
    z0 = editor.encode(image.to(editor.model.device))[0]
    assert len(x0s) == 15 and result.method == "virtual" and result.inversion is None
    close = tolerance(torch.float32, scale=float(z0.abs().max()))
    for step, x0 in enumerate(x0s):
        torch.testing.assert_close(x0[1], x0[0], **close, msg=f"step {step}")  # T branch = S branch = z0
        torch.testing.assert_close(x0[0], z0, rtol=0, atol=1e-5)  # the input's latent (up to re-encoding)
    torch.testing.assert_close(result.latents[1], result.latents[0], **close)  # the edit IS the input's
    default = editor.edit_virtual(image, SOURCE, [SOURCE], spl=NO_SPL)
    assert (default.latents[1] - default.latents[0]).abs().max() > 1e-3  # guidance 2 vs 1


def test_the_source_branch_is_z0_renoised_with_the_seeded_noise(editor, image) -> None:
    seen: list[torch.Tensor] = []
    editor.edit_virtual(image, SOURCE, [TARGET], spl=NO_SPL, seed=5, callback=record("latents", seen))
    z0 = editor.encode(image.to(editor.model.device))
    schedule = DDIMSchedule.from_scheduler(editor.model.scheduler, 15)
    generator = torch.Generator().manual_seed(5)
    torch.randn(z0.shape, generator=generator)  # the initial ξ shared by the branches
    for i, latents in enumerate(seen):
        alpha_next = float(schedule.alphas[min(i + 1, 14)])
        xi = torch.randn(z0.shape, generator=generator)
        expected = math.sqrt(alpha_next) * z0 + math.sqrt(1 - alpha_next) * xi
        torch.testing.assert_close(latents[0:1], expected, rtol=0, atol=1e-5)


def test_mutual_self_attention_on_one_layer_against_a_direct_computation(editor) -> None:
    unet = editor.model.unet
    attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    heads, channels = attn.heads, attn.to_q.in_features
    hidden = torch.randn(6, 16, channels, generator=torch.Generator().manual_seed(0))  # 2 halves × [S, T, M]
    index, alphas = torch.arange(77)[None], torch.ones(1, 77)

    def expected_rows(query_row: int, key_row: int, value_row: int) -> torch.Tensor:
        def split(x: torch.Tensor) -> torch.Tensor:  # (N, C) → (heads, N, d)
            return x.view(x.shape[0], heads, -1).transpose(0, 1)
        q, k = split(attn.to_q(hidden[query_row])), split(attn.to_k(hidden[key_row]))
        v = split(attn.to_v(hidden[value_row]))
        out = torch.softmax(q @ k.transpose(1, 2) * attn.scale, dim=-1) @ v  # (heads, N, d)
        return attn.to_out[0](out.transpose(0, 1).reshape(hidden.shape[1], -1))

    for step, rows in ((13, {2: (1, 0, 0), 5: (4, 3, 3)}), (0, {1: (0, 0, 1), 2: (0, 0, 0), 4: (3, 3, 4)})):
        control = VirtualAttentionControl(15, index, alphas, cross_replace=0.8, self_replace=0.8)
        chain = ControllerChain([AttentionStore(levels=(4,)), control])
        chain.step, chain.latent_size = step, (16, 16)  # 16 queries: level 4 of a 16×16 latent
        processor = AttentionProcessor(chain, "down_blocks.1.attn1")
        with torch.no_grad():
            out = processor(attn, hidden)
            for row, (q_row, k_row, v_row) in rows.items():
                # late (s ≥ 0.8): M = softmax(Q_T K_Sᵀ)·V_S; early: T = softmax(Q_S K_Sᵀ)·V_T, M = S
                torch.testing.assert_close(out[row], expected_rows(q_row, k_row, v_row), atol=1e-5, rtol=1e-5)
        assert not control.reads_probs(AttentionCall("x", False, heads, (4, 4), 4))  # fused self-attention


def test_in_loop_spl_lowers_the_loss_at_the_late_steps_only(editor, image) -> None:
    result = editor.edit_virtual(image, SOURCE, [TARGET], spl=SPLSettings(iterations=10))
    records = result.metrics["spl_in_loop"]
    assert [r["step"] for r in records] == [12, 13, 14]  # i/N >= 0.8 of 15 steps, and no other step
    assert all(r["after"]["spl"][0] < r["before"]["spl"][0] for r in records)
    target = result.metrics["targets"][0]
    assert target["spl_loss_after"] < target["spl_loss_before"]


def test_the_same_seed_gives_the_same_edit_and_another_seed_another(editor, image) -> None:
    first = editor.edit_virtual(image, SOURCE, [TARGET], spl=NO_SPL, seed=1)
    again = editor.edit_virtual(image, SOURCE, [TARGET], spl=NO_SPL, seed=1)
    other = editor.edit_virtual(image, SOURCE, [TARGET], spl=NO_SPL, seed=2)
    assert torch.equal(first.images, again.images) and torch.equal(first.latents, again.latents)
    assert (first.latents[1] - other.latents[1]).abs().max() > 1e-3


def test_several_targets_in_one_batch(editor, image) -> None:
    result = editor.edit_virtual(image, SOURCE, [TARGET, "a photo of a dog"], spl=SPLSettings(iterations=2))
    assert result.images.shape == (2, 3, RESOLUTION, RESOLUTION) and len(result.attention_maps) == 3
    assert (result.latents[1] - result.latents[2]).abs().max() > 1e-3


@pytest.mark.parametrize("model", ["tiny", "tiny-lcm"])
def test_lcm_and_ddim_schedules_both_run(model: str, image) -> None:
    editor = Editor(load_model(model, seed=0), weights=model, progress=False)
    timesteps: list[int] = []
    editor.edit_virtual(image, SOURCE, [TARGET], virtual=VirtualSettings(steps=4), spl=NO_SPL,
                        callback=lambda state: timesteps.append(int(state.timestep)))
    if model == "tiny-lcm":  # LCM timesteps read from diffusers (they depend on its version)
        scheduler = LCMScheduler.from_config(editor.model.scheduler_config)
        scheduler.set_timesteps(4, original_inference_steps=50)
        assert timesteps == scheduler.timesteps.tolist()
    else:
        assert timesteps == [751, 501, 251, 1]  # SD1's DDIM chain with steps_offset 1


def test_masks_and_maps_of_a_virtual_edit(editor, image) -> None:
    masks = MaskSettings(source_words=["cat"], target_words=["tiger"], source_threshold=0.9,
                         target_threshold=0.9)
    spl = SPLSettings(iterations=3, structure_area="masked")
    result = editor.edit_virtual(image, SOURCE, [TARGET], spl=spl, masks=masks)
    assert set(result.masks) == {"source", "target_0", "mask_0"}
    expected = torch.maximum(result.masks["source"], result.masks["target_0"])
    torch.testing.assert_close(result.masks["mask_0"], expected)
    assert set(result.attention_maps[0]) == {"a", "photo", "of", "cat"}
    assert "tiger" in result.attention_maps[1]


# ----------------------------------------------------------------------------------------- S2Edit exports


# `compositional_editor` (an export with [I] and [A]) is conftest.py's.


def test_an_export_edited_virtually_keeps_the_spatial_control_of_its_placeholder(
    compositional_editor,
) -> None:
    editor = compositional_editor
    image = editor.load_image(IMAGE)
    source, target = "a photo of a [I] cat", "a photo of a [I] cat with [A] stripes"
    controlled = editor.edit_virtual(image, source, [target], spl=NO_SPL)
    free = editor.edit_virtual(image, source, [target], spl=NO_SPL, spatial_control=False)
    assert (controlled.latents[1] - free.latents[1]).abs().max() > 1e-4
    placeholders = list(editor.placeholders)
    placeholders[1] = replace(placeholders[1], mask=torch.ones(RESOLUTION, RESOLUTION))  # [A]: not applied
    other = Editor(editor.model, placeholders, weights=editor.weights, progress=False)
    assert torch.equal(other.edit_virtual(image, source, [target], spl=NO_SPL).latents, controlled.latents)
    with pytest.raises(InputError, match=r"does not contain the placeholder \[I\]"):
        editor.edit_virtual(image, source, ["a photo of a cat"], spl=NO_SPL)


# ----------------------------------------------------------------------------------------- LocalBlend


def test_virtual_local_blend_masks_on_synthetic_maps() -> None:
    K = 6
    target_alphas = torch.zeros(1, K)
    target_alphas[0, 2] = 1  # a target word at token 2
    source_alphas = torch.zeros(K)
    source_alphas[4] = 1  # a source-only word at token 4
    blend = VirtualLocalBlend(5, target_alphas, source_alphas, torch.zeros(1, K), level=4, thresh_e=0.6,
                              thresh_m=0.6)
    maps = torch.zeros(3, 2, 2, K)  # rows [S, T, M], a 2×2 grid
    maps[1, 0, 0, 2] = 1.0  # the target word: top-left
    maps[0, 1, 1, 4] = 1.0  # the source word: bottom-right
    store = AttentionStore(levels=(4,))
    store.add(4, maps)  # steps 0 and 1, the same maps
    store.add(4, maps)
    latents = torch.arange(3.0)[:, None, None, None].expand(3, 1, 4, 4).clone()  # S = 0, T = 1, M = 2
    out = blend(latents, store, step=1, alpha=0.5)
    expected = torch.full((4, 4), 2.0)  # outside the target word's region T follows M
    expected[:2, :2] = 1.0  # inside it T keeps its own latent
    expected[2:, 2:] = 0.0  # the source word's region comes from S
    assert torch.equal(out[1, 0], expected)
    assert torch.equal(out[0], latents[0]) and torch.equal(out[2], latents[2])
    assert torch.equal(blend(latents, store, step=0, alpha=0.5), latents)  # never at step 0


# ----------------------------------------------------------------------------------------- refusals


def test_every_refusal_of_the_p2p_path_holds_for_the_virtual_path(editor, image) -> None:
    cases = [
        (dict(targets=[TARGET], masks=MaskSettings(source_words=["dog"])), r"mask\.source_words word 'dog'"),
        (dict(targets=[TARGET], masks=MaskSettings(target_words=["cat"])), r"mask\.target_words word 'cat'"),
        (dict(targets=[TARGET + " and a dog" * 30]), "tokens long"),
        (dict(targets=[TARGET], spl=SPLSettings(structure_area="masked")), "needs mask words"),
        (dict(targets=[TARGET], virtual=VirtualSettings(blend_target=["cat"])),
         r"virtual\.blend_target word 'cat'"),
        (dict(targets=TARGET), "must be a list"),
        (dict(targets=[123]), "must be a non-empty string"),
        (dict(targets=[TARGET], seed=-1), "seed=-1"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(InputError, match=fragment):
            editor.edit_virtual(image, SOURCE, **kwargs)
    with pytest.raises(InputError, match=r"dtype torch\.uint8"):
        editor.edit_virtual(((image + 1) * 127.5).to(torch.uint8), SOURCE, [TARGET])
    with pytest.raises(InputError, match="NaN"):
        editor.edit_virtual(torch.full_like(image, float("nan")), SOURCE, [TARGET])
    with pytest.raises(InputError, match=r"VirtualSettings\.target_guidance=nan"):
        VirtualSettings(target_guidance=float("nan"))
