"""Attention processors and controllers on the tiny SD-architecture UNet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import MapLog, Recorder
from s2edit.core.attention import (
    AttentionController,
    AttentionProcessor,
    AttentionStore,
    ColumnMask,
    ControllerChain,
    SpatialControl,
    grid_size,
    stored_map_bytes,
    unet_attention_layers,
)
from s2edit.core.family import ModelFamily
from s2edit.core.loading import load_model


@pytest.fixture(scope="module")
def sd() -> ModelFamily:
    return load_model("tiny")


def _inputs(sd: ModelFamily, batch: int = 2, size: tuple[int, int] = (16, 16)):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, sd.unet.config.in_channels, *size, generator=generator)
    prompts = ["a photo of a woman", "a photo of a cat"][:batch]
    return latents, torch.tensor([500] * batch), sd.encode_prompt(prompts).context


def test_grid_size_levels_and_non_square() -> None:
    assert grid_size(64 * 64, (64, 64)) == ((64, 64), 1)
    assert grid_size(16 * 16, (64, 64)) == ((16, 16), 4)
    assert grid_size(4 * 6, (16, 24)) == ((4, 6), 4)
    assert grid_size(12 * 8, (48, 32)) == ((12, 8), 4)
    with pytest.raises(ValueError, match="do not tile"):
        grid_size(7, (16, 16))


@torch.no_grad()
def test_identity_controller_reproduces_default_attention(sd: ModelFamily) -> None:
    latents, t, text = _inputs(sd)
    reference = sd.unet(latents, t, encoder_hidden_states=text).sample
    with sd.attention_control(AttentionController()):
        controlled = sd.unet(latents, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(controlled, reference, atol=1e-5, rtol=1e-5)


def test_processors_are_installed_selectively_and_restored(sd: ModelFamily) -> None:
    original = dict(sd.unet.attn_processors)
    with sd.attention_control(AttentionController(), cross_only=True):
        inside = sd.unet.attn_processors
        for name, processor in inside.items():
            assert isinstance(processor, AttentionProcessor) == name.endswith("attn2.processor")
            if not name.endswith("attn2.processor"):
                assert processor is original[name]
    assert all(sd.unet.attn_processors[n] is p for n, p in original.items())

    with pytest.raises(RuntimeError, match="boom"), sd.attention_control(AttentionController()):
        raise RuntimeError("boom")
    assert all(sd.unet.attn_processors[n] is p for n, p in original.items())
    assert not sd.unet._forward_pre_hooks  # the latent-size hook is removed too


@torch.no_grad()
def test_spatial_control_masks_exactly_one_column(sd: ModelFamily) -> None:
    latents, t, text = _inputs(sd, size=(16, 24))  # non-square latent
    mask = torch.zeros(64, 96)
    mask[8:40, 24:72] = 1.0
    mask[40:, :10] = 0.5
    token = 5
    before, after = Recorder(), Recorder()
    chain = ControllerChain([before, SpatialControl([ColumnMask(row=1, token=token, mask=mask)]), after])
    with sd.attention_control(chain, cross_only=True):
        sd.unet(latents, t, encoder_hidden_states=text)

    assert len(after.seen) == sum(n.endswith("attn2.processor") for n in sd.unet.attn_processors)
    levels = set()
    for name, (probs, call) in after.seen.items():
        original = before.seen[name][0].view(2, call.heads, *probs.shape[1:])
        edited = probs.view(2, call.heads, *probs.shape[1:])
        resized = F.interpolate(mask[None, None], size=call.size, mode="nearest").flatten()
        levels.add(call.level)
        assert torch.equal(edited[1, :, :, token], original[1, :, :, token] * resized)  # A*[I] = A[I] ⊙ M
        others = [k for k in range(probs.shape[-1]) if k != token]
        assert torch.equal(edited[1, :, :, others], original[1, :, :, others])  # other columns untouched
        assert torch.equal(edited[0], original[0])  # other rows untouched
    assert levels == {1, 2, 4, 8}  # SD architecture: cross-attention at latent/1, /2, /4 and the mid block


@torch.no_grad()
def test_spatial_control_changes_the_output_and_can_renormalise(sd: ModelFamily) -> None:
    latents, t, text = _inputs(sd)
    reference = sd.unet(latents, t, encoder_hidden_states=text).sample
    mask = torch.zeros(16, 16)
    control = SpatialControl([ColumnMask(row=0, token=1, mask=mask)], renormalize=True)
    after = Recorder()
    with sd.attention_control(ControllerChain([control, after]), cross_only=True):
        edited = sd.unet(latents, t, encoder_hidden_states=text).sample
    assert not torch.allclose(edited[0], reference[0], atol=1e-4)  # the processor really acts
    torch.testing.assert_close(edited[1], reference[1], atol=1e-5, rtol=1e-5)
    for probs, _ in after.seen.values():
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


@torch.no_grad()
def test_attention_store_averages_levels_rows_and_steps_in_constant_memory(sd: ModelFamily) -> None:
    latents, t, text = _inputs(sd)
    batch = torch.cat([latents, latents])
    store, log = AttentionStore(levels=(4,)), MapLog(level=4)
    chain = ControllerChain([store, log])
    chain.conditional_rows = slice(2, 4)  # CFG layout: [uncond, uncond, cond, cond]
    sizes = []
    with sd.attention_control(chain, cross_only=True):
        for step in range(3):
            chain.step = step
            sd.unet(batch, torch.cat([t, t]), encoder_hidden_states=torch.cat([text, text]))
            sizes.append(store.stored_bytes())
    layers = sd.attention_layers()
    level4 = {name for name, layer in layers.items() if layer.is_cross and layer.level == 4}
    assert len(level4) >= 2 and {name for _, name, _ in log.calls} == level4  # down and up layers
    assert store.counts == {4: 3 * len(level4)}
    maps = store.average(level=4)
    assert maps.shape == (2, 4, 4, text.shape[1])  # conditional rows only, 16/4 = 4
    torch.testing.assert_close(maps, log.mean(), atol=1e-6, rtol=1e-5)  # the brute-force mean of every map
    assert torch.equal(store.average(), maps)  # the default level is the store's (the model's mask level)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, 4))  # head/layer means keep rows stochastic
    # one running sum per level: the same memory after every step, exactly what stored_map_bytes says
    expected = stored_map_bytes(layers, (16, 16), (4,), rows=2, tokens=text.shape[1])
    assert sizes == [expected] * 3
    with pytest.raises(ValueError, match="level 2"):
        store.average(level=2)
    store.reset()
    assert store.sums == {} and store.counts == {} and store.step == 0


@torch.no_grad()
def test_a_layer_recomputed_within_a_step_counts_once(sd: ModelFamily) -> None:
    """Gradient checkpointing re-runs the forward in backward: the store must not count it twice."""
    latents, t, text = _inputs(sd)
    once, twice = AttentionStore(levels=(4,)), AttentionStore(levels=(4,))
    with sd.attention_control(once, cross_only=True):
        sd.unet(latents, t, encoder_hidden_states=text)
    with sd.attention_control(twice, cross_only=True):
        sd.unet(latents, t, encoder_hidden_states=text)
        sd.unet(latents, t, encoder_hidden_states=text)  # same step
    assert twice.counts == once.counts and torch.equal(twice.average(), once.average())


def test_store_keeps_the_graph_for_training_losses(sd: ModelFamily) -> None:
    latents, t, text = _inputs(sd)
    store = AttentionStore(levels=(4,), detach=False)
    with sd.attention_control(store, cross_only=True):
        sd.unet(latents, t, encoder_hidden_states=text)
    store.average(level=4)[..., 5].sum().backward()
    grads = [p.grad for n, p in sd.unet.named_parameters() if "attn2.to_q" in n and "up_blocks.1" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    sd.unet.zero_grad(set_to_none=True)


def test_chain_shares_step_and_rows() -> None:
    a, b = AttentionController(), AttentionStore(levels=(4,))
    chain = ControllerChain([a, b])
    chain.step = 7
    chain.conditional_rows = slice(1, 2)
    assert a.step == b.step == 7 and b.rows(2) == range(1, 2)


def test_the_family_names_every_layer_and_its_level(sd: ModelFamily) -> None:
    layers = sd.attention_layers()
    assert layers == unet_attention_layers(sd.unet) and set(layers) == set(sd.unet.attn_processors)
    cross = {name for name, layer in layers.items() if layer.is_cross}
    assert cross == {name for name in layers if name.endswith("attn2.processor")}
    assert layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"].level == 1
    assert layers["mid_block.attentions.0.transformer_blocks.0.attn1.processor"].level == 8
    assert layers["up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"].level == 4
    assert sd.mask_level == 4 and sd.self_replace_level == 2  # image/32 of a ×8 VAE; ≤ (latent/2)²


@torch.no_grad()
def test_spatial_control_addresses_conditional_rows_and_unconditional_columns(sd: ModelFamily) -> None:
    """Under a CFG batch [uncond × 2, cond × 2], column row 1 is batch row 3; unconditional columns act on
    rows 0 and 1; a column for every conditional row (row None) on rows 2 and 3."""
    latents, t, text = _inputs(sd)
    batch, times, context = torch.cat([latents, latents]), torch.cat([t, t]), torch.cat([text, text])
    mask = torch.zeros(16, 16)
    cases = {  # controller → the batch rows whose column 4 is zeroed
        "row 1": (SpatialControl([ColumnMask(1, 4, mask)]), {3}),
        "every conditional row": (SpatialControl([ColumnMask(None, 4, mask)]), {2, 3}),
        "unconditional": (SpatialControl(unconditional=[(4, mask)]), {0, 1}),
    }
    for name, (control, zeroed) in cases.items():
        after = Recorder()
        chain = ControllerChain([control, after])
        chain.conditional_rows = slice(2, 4)
        with sd.attention_control(chain, cross_only=True):
            sd.unet(batch, times, encoder_hidden_states=context)
        for probs, call in after.seen.values():
            column = probs.view(4, call.heads, *probs.shape[1:])[..., 4]  # (rows, heads, Q)
            assert {row for row in range(4) if not bool(column[row].any())} == zeroed, name
