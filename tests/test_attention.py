"""Attention processors and controllers on the tiny SD-architecture UNet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from s2edit.attention import (
    AttentionCall,
    AttentionController,
    AttentionProcessor,
    AttentionStore,
    ColumnMask,
    ControllerChain,
    SpatialControl,
    controlled_attention,
    cross_attention_layers,
    grid_size,
)
from s2edit.models import StableDiffusion, load_stable_diffusion


@pytest.fixture(scope="module")
def sd() -> StableDiffusion:
    return load_stable_diffusion("tiny")


def _inputs(sd: StableDiffusion, batch: int = 2, size: tuple[int, int] = (16, 16)):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, sd.unet.config.in_channels, *size, generator=generator)
    prompts = ["a photo of a woman", "a photo of a cat"][:batch]
    return latents, torch.tensor([500] * batch), sd.encode_prompt(prompts)


class Recorder(AttentionController):
    """Keeps a copy of the probabilities it sees, per layer."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, tuple[torch.Tensor, AttentionCall]] = {}

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        self.seen[call.name] = (probs.detach().clone(), call)
        return probs


def test_grid_size_levels_and_non_square() -> None:
    assert grid_size(64 * 64, (64, 64)) == ((64, 64), 1)
    assert grid_size(16 * 16, (64, 64)) == ((16, 16), 4)
    assert grid_size(4 * 6, (16, 24)) == ((4, 6), 4)
    assert grid_size(12 * 8, (48, 32)) == ((12, 8), 4)
    with pytest.raises(ValueError, match="do not tile"):
        grid_size(7, (16, 16))


@torch.no_grad()
def test_identity_controller_reproduces_default_attention(sd: StableDiffusion) -> None:
    latents, t, text = _inputs(sd)
    reference = sd.unet(latents, t, encoder_hidden_states=text).sample
    with controlled_attention(sd.unet, AttentionController()):
        controlled = sd.unet(latents, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(controlled, reference, atol=1e-5, rtol=1e-5)


def test_processors_are_installed_selectively_and_restored(sd: StableDiffusion) -> None:
    original = dict(sd.unet.attn_processors)
    with controlled_attention(sd.unet, AttentionController(), layers=cross_attention_layers):
        inside = sd.unet.attn_processors
        for name, processor in inside.items():
            assert isinstance(processor, AttentionProcessor) == name.endswith("attn2.processor")
            if not name.endswith("attn2.processor"):
                assert processor is original[name]
    assert all(sd.unet.attn_processors[n] is p for n, p in original.items())

    with pytest.raises(RuntimeError, match="boom"), controlled_attention(sd.unet, AttentionController()):
        raise RuntimeError("boom")
    assert all(sd.unet.attn_processors[n] is p for n, p in original.items())
    assert not sd.unet._forward_pre_hooks  # the latent-size hook is removed too


@torch.no_grad()
def test_spatial_control_masks_exactly_one_column(sd: StableDiffusion) -> None:
    latents, t, text = _inputs(sd, size=(16, 24))  # non-square latent
    mask = torch.zeros(64, 96)
    mask[8:40, 24:72] = 1.0
    mask[40:, :10] = 0.5
    token = 5
    before, after = Recorder(), Recorder()
    chain = ControllerChain([before, SpatialControl([ColumnMask(row=1, token=token, mask=mask)]), after])
    with controlled_attention(sd.unet, chain, layers=cross_attention_layers):
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
def test_spatial_control_changes_the_output_and_can_renormalise(sd: StableDiffusion) -> None:
    latents, t, text = _inputs(sd)
    reference = sd.unet(latents, t, encoder_hidden_states=text).sample
    mask = torch.zeros(16, 16)
    control = SpatialControl([ColumnMask(row=0, token=1, mask=mask)], renormalize=True)
    after = Recorder()
    with controlled_attention(sd.unet, ControllerChain([control, after]), layers=cross_attention_layers):
        edited = sd.unet(latents, t, encoder_hidden_states=text).sample
    assert not torch.allclose(edited[0], reference[0], atol=1e-4)  # the processor really acts
    torch.testing.assert_close(edited[1], reference[1], atol=1e-5, rtol=1e-5)
    for probs, _ in after.seen.values():
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


@torch.no_grad()
def test_attention_store_levels_rows_and_steps(sd: StableDiffusion) -> None:
    latents, t, text = _inputs(sd)
    batch = torch.cat([latents, latents])
    store = AttentionStore(levels=(4,))
    store.conditional_rows = slice(2, 4)  # CFG layout: [uncond, uncond, cond, cond]
    with controlled_attention(sd.unet, store, layers=cross_attention_layers):
        for step in range(3):
            store.step = step
            sd.unet(batch, torch.cat([t, t]), encoder_hidden_states=torch.cat([text, text]))
    assert sorted(store.maps) == [0, 1, 2]
    level4 = [n for n, lv in store.layer_levels.items() if lv == 4]
    assert level4 and all(n.startswith(("down", "up")) for n in level4)
    maps = store.average(level=4)
    assert maps.shape == (2, 4, 4, text.shape[1])  # conditional rows only, 16/4 = 4
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, 4))  # head/layer means keep rows stochastic
    only_first = store.average(level=4, steps=[0])
    torch.testing.assert_close(only_first, maps, atol=1e-6, rtol=1e-5)  # same inputs every step
    with pytest.raises(ValueError, match="level 2"):
        store.average(level=2)
    store.reset()
    assert store.maps == {} and store.step == 0


def test_store_keeps_the_graph_for_training_losses(sd: StableDiffusion) -> None:
    latents, t, text = _inputs(sd)
    store = AttentionStore(levels=(4,), detach=False)
    with controlled_attention(sd.unet, store, layers=cross_attention_layers):
        sd.unet(latents, t, encoder_hidden_states=text)
    store.average(level=4)[..., 5].sum().backward()
    grads = [p.grad for n, p in sd.unet.named_parameters() if "attn2.to_q" in n and "up_blocks.1" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    sd.unet.zero_grad(set_to_none=True)


def test_chain_shares_step_and_rows() -> None:
    a, b = AttentionController(), AttentionStore()
    chain = ControllerChain([a, b])
    chain.step = 7
    chain.conditional_rows = slice(1, 2)
    assert a.step == b.step == 7 and b.rows(2) == range(1, 2)
