"""Prompt-to-Prompt: token alignment, schedules, the controller on synthetic maps, LocalBlend, tiny UNet."""

from __future__ import annotations

import pytest
import torch

from editkit.errors import InputError
from s2edit.core.attention import AttentionCall, AttentionStore, ControllerChain
from s2edit.core.family import ModelFamily
from s2edit.core.loading import load_model
from s2edit.core.settings import P2PSettings
from s2edit.core.tokenizer import clip_tokenizer, word_token_indices
from s2edit.editing.alignment import (
    NEW_TOKEN,
    global_alignment,
    prompt_word_ids,
    refine_mapping,
    replace_mapping,
)
from s2edit.editing.methods.p2p import LocalBlend, PromptToPrompt, cross_replace_schedule, injection_steps
from s2edit.editing.plan import EditPlan, plan_edit
from s2edit.editing.request import EditRequest

BOS, EOS = 100, 200  # hand-made ids: start / end tokens


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def p2p_plan(tokenizer, source: str, targets: list[str], steps: int, **settings) -> EditPlan:
    """The plan of a Prompt-to-Prompt edit with these P2P settings (its tables are the method's)."""
    request = EditRequest(method="p2p", steps=steps, p2p=P2PSettings(**settings))
    return plan_edit(tokenizer, [], source, targets, request)


# ------------------------------------------------------------------------------------ token alignment


def test_alignment_of_identical_sequences_is_the_identity() -> None:
    ids = [BOS, 1, 2, 3, 1, 4, EOS]
    assert global_alignment(ids, ids) == list(range(len(ids)))


def test_alignment_marks_an_inserted_word_new_and_shifts_the_rest() -> None:
    source = [BOS, 1, 2, 3, 1, 4, EOS]  # "a photo of a cat"
    target = [BOS, 1, 2, 3, 1, 9, 4, EOS]  # "a photo of a fluffy cat"
    assert global_alignment(source, target) == [0, 1, 2, 3, 4, NEW_TOKEN, 5, 6]
    assert global_alignment(target, source) == [0, 1, 2, 3, 4, 6, 7]  # a deleted word is skipped


def test_alignment_of_a_substituted_word_and_a_two_token_insert() -> None:
    source = [BOS, 1, 2, 3, 1, 4, EOS]
    substituted = [BOS, 1, 2, 3, 1, 5, EOS]  # gap 0 < mismatch −1: the new word is "new", not mapped
    assert global_alignment(source, substituted) == [0, 1, 2, 3, 4, NEW_TOKEN, 6]
    inserted = [BOS, 7, 8, 1, 2, 3, 1, 4, EOS]
    assert global_alignment(source, inserted) == [0, NEW_TOKEN, NEW_TOKEN, 1, 2, 3, 4, 5, 6]


def test_refine_mapping_maps_target_padding_p_to_source_position_p() -> None:
    # P2P get_mapper: mapper[len(target):] = arange: target padding position p takes source position p
    # "a cat" → "a fluffy cat"
    index, alphas = refine_mapping([BOS, 1, 4, EOS], [BOS, 1, 9, 4, EOS], context=8)
    assert index.tolist() == [0, 1, NEW_TOKEN, 2, 3, 5, 6, 7]
    assert alphas.tolist() == [1, 1, 0, 1, 1, 1, 1, 1]
    index, _ = refine_mapping([BOS, 1, 9, 4, EOS], [BOS, 1, 4, EOS], context=8)  # a deletion
    assert index.tolist() == [0, 1, 3, 4, 4, 5, 6, 7]


def test_a_repeated_token_pairs_with_its_first_candidate() -> None:
    # "the the the cat" → "the cat": ties are broken left, up, diagonal in every cell (seq_aligner), so the
    # traceback climbs past the later "the"s and pairs the target's "the" with the first one (worked by
    # hand in the traceback: (4,2) and (3,2) take "up", (2,2) the diagonal)
    the, cat = 7, 8
    assert global_alignment([BOS, the, the, the, cat, EOS], [BOS, the, cat, EOS]) == [0, 1, 4, 5]
    index, alphas = refine_mapping([BOS, the, the, the, cat, EOS], [BOS, the, cat, EOS], context=8)
    assert index.tolist() == [0, 1, 4, 5, 4, 5, 6, 7] and alphas.tolist() == [1] * 8


def test_refine_mapping_on_real_prompts(tokenizer) -> None:
    p2p = p2p_plan(tokenizer, "a photo of a cat", ["a photo of a fluffy cat"], 4).tables
    fluffy = word_token_indices(tokenizer, "a photo of a fluffy cat", "fluffy")
    cat_source = word_token_indices(tokenizer, "a photo of a cat", "cat")
    cat_target = word_token_indices(tokenizer, "a photo of a fluffy cat", "cat")
    assert p2p.alphas[0, fluffy].tolist() == [0.0] * len(fluffy)
    assert p2p.index[0, cat_target].tolist() == cat_source
    assert p2p.alphas.shape == (1, tokenizer.model_max_length)


def test_replace_mapper_swaps_words_one_to_one_and_spreads_uneven_words() -> None:
    # words: "a" [1], "cat" [4] → "a" [1], "hippo" [5, 6, 7]; P2P get_replacement_mapper_ by hand:
    # i=0,1: (0,0), (1,1); "cat" at i=2: (2, 2:5) = 1/3; no replaced word left: (j, j) for j = 5…9
    mapper = replace_mapping([[1], [4]], [[1], [5, 6, 7]], context=10)
    expected = torch.zeros(10, 10)
    expected[0, 0] = expected[1, 1] = 1
    expected[2, 2:5] = 1 / 3
    for j in range(5, 10):
        expected[j, j] = 1
    torch.testing.assert_close(mapper, expected)

    same_length = replace_mapping([[1], [4], [8, 9]], [[1], [5], [8, 9]], context=8)
    torch.testing.assert_close(same_length, torch.eye(8))  # a one-token swap keeps positions

    # "a cat sat" → "a kitty-cat sat" with the replaced word first: tokens after it stay shifted while
    # replaced words remain, then map position to position
    shorter = replace_mapping([[1], [5, 6], [3]], [[1], [4], [3]], context=8)
    expected = torch.zeros(8, 8)
    expected[0, 0] = expected[1, 1] = 1
    expected[2, 2] = expected[3, 2] = 1  # both source tokens feed the one target token
    for j in range(3, 7):  # i = 4 ↔ j = 3, but after the last replaced word target j takes source j,
        expected[j, j] = 1  # until i runs out of the context: target position 7 receives no map
    torch.testing.assert_close(shorter, expected)


def test_replace_mode_on_real_prompts_and_word_count_check(tokenizer) -> None:
    words = prompt_word_ids(tokenizer, "a photo of a cat, sleeping")
    assert len(words) == 6 and len(words[4]) == 2  # "cat," is one word of two tokens
    p2p = p2p_plan(tokenizer, "a photo of a cat", ["a photo of a dog"], 4, mode="replace").tables
    context = tokenizer.model_max_length
    assert p2p.mapper.shape == (1, context, context)
    torch.testing.assert_close(p2p.mapper[0], torch.eye(context))  # one-token swap: same positions
    with pytest.raises(InputError, match="mode=refine"):
        p2p_plan(tokenizer, "a photo of a cat", ["a photo of a big dog"], 4, mode="replace")


# ------------------------------------------------------------------------------- schedules and inputs


@pytest.mark.parametrize(
    ("steps", "fraction", "cross", "self_"),
    [  # P2P: cross i < int(f·(T+1)) (alpha table of T+1 rows), self i < int(f·T), Python truncation
        (50, 0.8, 40, 40),
        (10, 0.75, 8, 7),  # int(8.25), int(7.5): floor(f·T) = 7 would drop a cross step
        (4, 0.8, 4, 3),
        (20, 0.5, 10, 10),
        (10, 0.3, 3, 3),
        (7, 0.7, 5, 4),  # 0.7·7 = 4.8999…: 4
        (100, 0.29, 29, 28),  # 0.29·100 = 28.999…96: truncation gives 28, not 29
        (10, 1.0, 11, 10),
        (10, 0.0, 0, 0),
    ],
)
def test_injection_step_counts_follow_the_reference(steps, fraction, cross, self_, tokenizer) -> None:
    schedule = cross_replace_schedule(tokenizer, ["a photo of a dog"], steps, cross_replace=fraction)
    assert schedule.shape == (steps + 1, 1, tokenizer.model_max_length)
    assert int(schedule[:, 0, 0].sum()) == cross and injection_steps(fraction, steps + 1) == cross
    controller = PromptToPrompt(steps, schedule, fraction, index=torch.zeros(1, 77, dtype=torch.long),
                                alphas=torch.ones(1, 77))
    assert controller.self_steps == self_


def test_cross_replace_schedule_with_per_word_fraction(tokenizer) -> None:
    target = "a photo of a dog"
    schedule = cross_replace_schedule(tokenizer, [target], 10, cross_replace=0.8, words={"dog": 0.3})
    dog = word_token_indices(tokenizer, target, "dog")
    others = [k for k in range(tokenizer.model_max_length) if k not in dog]
    assert schedule.shape == (11, 1, tokenizer.model_max_length)
    assert schedule[:, 0, others].amin(dim=1).tolist() == [1] * 8 + [0] * 3  # int(0.8·11) = 8
    assert schedule[:, 0, others].amax(dim=1).tolist() == [1] * 8 + [0] * 3
    assert schedule[:, 0, dog[0]].tolist() == [1] * 3 + [0] * 8  # int(0.3·11) = 3
    with pytest.raises(InputError, match="'tiger'"):
        cross_replace_schedule(tokenizer, [target], 10, words={"tiger": 0.3})


def test_the_plan_refuses_bad_inputs(tokenizer) -> None:
    source, target = "a photo of a cat", "a photo of a dog"
    with pytest.raises(InputError, match="tokens long"):
        p2p_plan(tokenizer, source, [" ".join(["cat"] * 80)], 4)
    with pytest.raises(InputError, match="mode='swap'"):
        p2p_plan(tokenizer, source, [target], 4, mode="swap")
    with pytest.raises(InputError, match="reweight word 'tiger'"):
        p2p_plan(tokenizer, source, [target], 4, reweight={"tiger": 2.0})
    with pytest.raises(InputError, match=r"self_replace=1\.5"):
        p2p_plan(tokenizer, source, [target], 4, self_replace=1.5)
    with pytest.raises(InputError, match="blend word 'tiger' is in neither the source nor a target prompt"):
        p2p_plan(tokenizer, source, [target], 4, blend_words=["tiger"])
    with pytest.raises(InputError, match="must be a list of one or more target prompts"):
        p2p_plan(tokenizer, source, target, 4)


# ------------------------------------------------------------------ the controller on synthetic maps

HEADS, SIZE, K = 2, (4, 4), 6


def _probs(rows: int, keys: int = K, seed: int = 0) -> torch.Tensor:
    """Random attention probabilities (rows·heads, Q, keys), batch-major like diffusers."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows * HEADS, SIZE[0] * SIZE[1], keys, generator=generator)
    return scores.softmax(dim=-1)


def _call(is_cross: bool, level: int = 4) -> AttentionCall:
    return AttentionCall("layer", is_cross, HEADS, SIZE, level)


def _refine_controller(num_steps: int = 4, cross: float = 1.0, self_replace: float = 0.5, reweight=None):
    # source [BOS, 1, 4, EOS, pad, pad] → target [BOS, 1, 9, 4, EOS, pad]: token 2 is new
    index, alphas = refine_mapping([BOS, 1, 4, EOS], [BOS, 1, 9, 4, EOS], context=K)
    schedule = torch.zeros(num_steps + 1, 1, K)
    schedule[: int(cross * num_steps)] = 1.0
    controller = PromptToPrompt(
        num_steps, schedule, self_replace, index=index[None], alphas=alphas[None], reweight=reweight
    )
    controller.conditional_rows = slice(2, 4)  # CFG batch: [uncond source, uncond target, source, target]
    return controller, index


def test_cross_injection_copies_mapped_source_columns_exactly() -> None:
    controller, index = _refine_controller(cross=1.0)
    probs = _probs(4)
    edited = controller(probs, _call(is_cross=True)).view(4, HEADS, -1, K)
    original = probs.view(4, HEADS, -1, K)
    mapped = [t for t in range(K) if index[t] != NEW_TOKEN]
    assert torch.equal(edited[3][..., mapped], original[2][..., index[mapped]])  # target ← source
    assert torch.equal(edited[3][..., 2], original[3][..., 2])  # the new token keeps its own map
    assert torch.equal(edited[:3], original[:3])  # source and unconditional rows untouched


def test_after_the_cross_schedule_the_target_is_untouched() -> None:
    controller, _ = _refine_controller(num_steps=4, cross=0.5)
    probs = _probs(4)
    controller.step = 1
    assert not torch.equal(controller(probs, _call(True)), probs)
    for step in (2, 3):
        controller.step = step
        assert torch.equal(controller(probs, _call(True)), probs)
    controller.step = 4
    with pytest.raises(ValueError, match="outside the 4 denoising steps"):
        controller(probs, _call(True))


def test_replace_mapper_injection_follows_the_mapper() -> None:
    mapper = replace_mapping([[1], [4]], [[1], [5, 6]], context=K)  # "cat" → a 2-token word
    schedule = torch.ones(3, 1, K)
    controller = PromptToPrompt(2, schedule, 0.0, mapper=mapper[None])
    probs = _probs(2)
    edited = controller(probs, _call(True)).view(2, HEADS, -1, K)
    source = probs.view(2, HEADS, -1, K)[0]
    torch.testing.assert_close(edited[1], source @ mapper)
    torch.testing.assert_close(edited[1][..., 2], source[..., 2] / 2)  # spread evenly over 2 tokens
    torch.testing.assert_close(edited[1][..., 3], source[..., 2] / 2)
    torch.testing.assert_close(edited[1][..., 4:], source[..., 4:])  # then position p ← position p


def test_self_attention_injected_only_at_coarse_levels_and_early_steps() -> None:
    controller, _ = _refine_controller(num_steps=4, self_replace=0.5)
    queries = SIZE[0] * SIZE[1]
    probs = _probs(4, keys=queries)
    original = probs.view(4, HEADS, queries, queries)
    for step in range(4):
        controller.step = step
        fine = controller(probs, _call(is_cross=False, level=1))
        assert torch.equal(fine, probs)  # full-resolution layers: never
        coarse = controller(probs, _call(is_cross=False, level=2)).view(4, HEADS, queries, queries)
        assert torch.equal(coarse[:3], original[:3])  # source and unconditional rows untouched
        assert torch.equal(coarse[3], original[2] if step < 2 else original[3])


def test_reweight_scales_the_injected_maps_and_is_off_after_the_injection() -> None:
    factors = torch.ones(1, K)
    factors[0, 3] = 2.5  # target token 3 ("cat", source position 2)
    factors[0, 2] = 0.5  # target token 2 is new: its own map, reweighted (P2P: refine, then equalizer)
    controller, _ = _refine_controller(num_steps=4, cross=0.5, reweight=factors)
    probs = _probs(4)
    original = probs.view(4, HEADS, -1, K)
    controller.step = 1  # inside the injection window (steps 0, 1)
    edited = controller(probs, _call(True)).view(4, HEADS, -1, K)
    torch.testing.assert_close(edited[3][..., 3], original[2][..., 2] * 2.5)
    torch.testing.assert_close(edited[3][..., 2], original[3][..., 2] * 0.5)
    torch.testing.assert_close(edited[3][..., 0], original[2][..., 0])
    assert torch.equal(edited[:3], original[:3])
    for step in (2, 3):  # after the injection: the target attends freely, no reweighting (SPEC §4)
        controller.step = step
        assert torch.equal(controller(probs, _call(True)), probs)


def test_the_reweight_table_marks_the_word_tokens(tokenizer) -> None:
    target = "a photo of a hippopotamus"
    p2p = p2p_plan(tokenizer, "a photo of a cat", [target], 4, reweight={"hippopotamus": 0.5}).tables
    word = word_token_indices(tokenizer, target, "hippopotamus")
    assert len(word) > 1 and p2p.reweight[0, word].tolist() == [0.5] * len(word)
    assert int((p2p.reweight != 1).sum()) == len(word)


# -------------------------------------------------------------------------------------- LocalBlend


def _store_with(maps: torch.Tensor, step: int) -> AttentionStore:
    store = AttentionStore(levels=(4,))
    store.step = step
    store.add(4, maps)  # a down and an up layer with the same maps
    store.add(4, maps)
    return store


def test_local_blend_keeps_the_target_only_where_the_words_attend() -> None:
    word_alphas = torch.zeros(2, K)
    word_alphas[0, 4] = 1.0  # source word token
    word_alphas[1, 2] = 1.0  # target word token
    blend = LocalBlend(word_alphas, num_steps=10, level=4, threshold=0.3, start=0.2)
    maps = torch.zeros(2, 4, 4, K)
    maps[1, 0:2, 0:2, 2] = 1.0  # target word: top-left 2×2 cells
    maps[1, :, :, 2] += 0.1  # weak everywhere: below the threshold after /max
    maps[0, 3, 3, 4] = 0.5  # source word: bottom-right cell
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    out = blend(latents, _store_with(maps, step=2), step=2)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[0:6, 0:6] = True  # 3×3 max-pool grows 2×2 cells to 3×3, nearest ×2 to the 8×8 latent
    expected[4:8, 4:8] = True  # union with the source word's region
    assert torch.equal(out[0], latents[0])  # the source latent is never changed
    torch.testing.assert_close(out[1][:, expected], latents[1][:, expected])  # z_s + 1·(z_t − z_s)
    assert torch.equal(out[1][:, ~expected], latents[0][:, ~expected])

    early = blend(latents, _store_with(maps, step=1), step=1)  # before start·T = 2
    assert torch.equal(early, latents)


def test_local_blend_reads_the_maps_summed_over_all_steps_so_far() -> None:
    word_alphas = torch.zeros(2, K)
    word_alphas[0, 4] = 1.0  # source word: never attended in these maps
    word_alphas[1, 2] = 1.0  # target word
    blend = LocalBlend(word_alphas, num_steps=10, level=4, threshold=0.3, start=0.0)
    first, second = torch.zeros(2, 2, 4, 4, K)
    first[1, 0, 0, 2] = 1.0  # step 0: the target word attends to the top-left cell
    second[1, 3, 3, 2] = 1.0  # step 1: to the bottom-right cell
    store = AttentionStore(levels=(4,))
    store.add(4, first)  # step 0
    store.add(4, second)  # step 1
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = blend(latents, store, step=1)
    # sum of both steps → 3×3 max-pool → nearest ×2: two 4×4 blocks (P2P's mask from the summed store);
    # the current step alone would give the bottom-right block only
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[0:4, 0:4] = expected[4:8, 4:8] = True
    torch.testing.assert_close(out[1][:, expected], latents[1][:, expected])
    assert torch.equal(out[1][:, ~expected], latents[0][:, ~expected])
    at_step_0 = AttentionStore(levels=(4,))  # what the store held after step 0: the top-left block only
    at_step_0.add(4, first)
    assert torch.equal(blend(latents, at_step_0, step=0)[1][:, 4:8, 4:8], latents[0][:, 4:8, 4:8])


def test_local_blend_marks_the_words_of_each_prompt(tokenizer, sd) -> None:
    source, target = "a photo of a cat", "a photo of a hippopotamus"
    plan = p2p_plan(tokenizer, source, [target], 10, blend_words=["cat", "hippopotamus"])
    blend = plan.local_blend(sd)
    alphas = blend.word_alphas
    assert alphas[0].nonzero().flatten().tolist() == word_token_indices(tokenizer, source, "cat")
    assert alphas[1].nonzero().flatten().tolist() == word_token_indices(tokenizer, target, "hippopotamus")
    assert blend.start_step == 2 and blend.level == sd.mask_level


# ------------------------------------------------------------------------------ the tiny SD UNet


@pytest.fixture(scope="module")
def sd() -> ModelFamily:
    return load_model("tiny")


# A randomly initialised UNet attends almost uniformly (its query·key logits are ~0), so its attention
# maps carry little of a prompt change. Scaling the text conditioning sharpens the cross-attention like a
# trained model's, which is the regime P2P is about.
TEXT_SCALE = 20.0
SOURCE, TARGET = "a photo of a cat", "a photo of a dog"


def _edit_inputs(sd: ModelFamily) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, sd.unet.config.in_channels, 16, 16, generator=generator)  # 128² image
    text = sd.encode_prompt([SOURCE, TARGET]).context * TEXT_SCALE
    return latent.repeat(2, 1, 1, 1), torch.tensor([500, 500]), text  # both branches start from z_T


@torch.no_grad()
def test_injection_pulls_the_target_towards_the_source_and_keeps_the_source(sd: ModelFamily) -> None:
    latents, t, text = _edit_inputs(sd)
    plain = sd.unet(latents, t, encoder_hidden_states=text).sample
    alone = sd.unet(latents[:1], t[:1], encoder_hidden_states=text[:1]).sample
    for mode in ("refine", "replace"):
        p2p = p2p_plan(sd.tokenizer, SOURCE, [TARGET], 1, mode=mode, cross_replace=1.0,
                       self_replace=1.0).controller(sd)
        with sd.attention_control(p2p):
            edited = sd.unet(latents, t, encoder_hidden_states=text).sample
        gap_plain = (plain[1] - plain[0]).abs().mean()
        gap_edited = (edited[1] - edited[0]).abs().mean()
        assert gap_edited < 0.3 * gap_plain, mode  # measured: ≈ 0.18 (replace)
        torch.testing.assert_close(edited[0], alone[0], atol=1e-5, rtol=1e-5)  # source branch unchanged
        assert (edited[1] - plain[1]).abs().max() > 100 * 1e-5  # the processors really act


@torch.no_grad()
def test_cfg_rows_untouched_and_local_blend_on_the_stored_maps(sd: ModelFamily) -> None:
    latents, t, text = _edit_inputs(sd)
    null = sd.encode_prompt(["", ""]).context * TEXT_SCALE
    batch, times, context = torch.cat([latents, latents]), torch.cat([t, t]), torch.cat([null, text])
    plain = sd.unet(batch, times, encoder_hidden_states=context).sample
    plan = p2p_plan(sd.tokenizer, SOURCE, [TARGET], 1, cross_replace=1.0, self_replace=1.0,
                    blend_words=["cat", "dog"], blend_start=0.0, blend_threshold=0.8)
    p2p, local_blend = plan.controller(sd), plan.local_blend(sd)
    store = AttentionStore(levels=(local_blend.level,))
    chain = ControllerChain([store, p2p])  # the store sees the maps before the edit (SPEC §4)
    chain.conditional_rows = slice(2, 4)  # [uncond source, uncond target, source, target]
    with sd.attention_control(chain):
        edited = sd.unet(batch, times, encoder_hidden_states=context).sample
    torch.testing.assert_close(edited[:2], plain[:2], atol=1e-5, rtol=1e-5)
    assert (edited[3] - plain[3]).abs().max() > 1e-3

    stepped = latents + torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    blended = local_blend(stepped, store, step=0)
    masks = local_blend.masks(store.average(level=local_blend.level), (16, 16))
    mask = (masks[0] | masks[1])[0]  # (16, 16) target ∪ source words
    assert 0 < int(mask.sum()) < mask.numel()  # a real region (a random model's maps are flat: threshold 0.8)
    assert torch.equal(blended[0], stepped[0])
    torch.testing.assert_close(blended[1][:, mask], stepped[1][:, mask])
    assert torch.equal(blended[1][:, ~mask], stepped[0][:, ~mask])
