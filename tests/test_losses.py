"""Fine-tuning loss terms against hand-computed answers; the EOS position with an added token."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from s2edit.core.loading import load_model
from s2edit.core.tokenizer import add_placeholder_token, eos_index
from s2edit.training.losses import (
    diffusion_target,
    gather_positions,
    masked_attention_loss,
    reconstruction_loss,
    semantic_loss,
)


def test_semantic_loss_is_the_absolute_cosine_of_eq1() -> None:
    e_prompt = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]])
    e_token = torch.tensor([[-4.0, -3.0, 0.0], [0.0, 2.0, 0.0]])
    # row 0: cos = (−12 − 12) / (5·5) = −0.96 → 0.96; row 1: orthogonal → 0
    expected = (abs((3 * -4 + 4 * -3) / (5 * 5)) + 0.0) / 2
    assert semantic_loss(e_prompt, e_token).item() == pytest.approx(expected, abs=1e-7)


def test_semantic_loss_gradient_pushes_towards_orthogonality() -> None:
    e_prompt = torch.tensor([[1.0, 0.0]])
    e_token = torch.tensor([[1.0, 1.0]], requires_grad=True)
    semantic_loss(e_prompt, e_token).backward()
    step = e_token.detach() - 0.1 * e_token.grad
    assert semantic_loss(e_prompt, step) < semantic_loss(e_prompt, e_token.detach())


def test_masked_attention_loss_normalises_by_the_max_per_map() -> None:
    attention = torch.tensor([[[0.0, 0.5], [1.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]])  # (2, 2, 2)
    mask = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    normalised = [[[0.0, 0.25], [0.5, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]
    expected = sum(
        (normalised[b][i][j] - mask[i, j].item()) ** 2 for b in range(2) for i in range(2) for j in range(2)
    ) / 8
    assert masked_attention_loss(attention, mask).item() == pytest.approx(expected)
    assert masked_attention_loss(attention, mask.expand(2, 2, 2)).item() == pytest.approx(expected)


def test_masked_attention_loss_of_an_empty_map_is_finite() -> None:
    loss = masked_attention_loss(torch.zeros(1, 4, 4), torch.ones(4, 4))
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(1.0)


def test_reconstruction_loss_is_fp32_mse() -> None:
    a = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    b = torch.randn(2, 4, 8, 8)
    loss = reconstruction_loss(a, b)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(((a.float() - b) ** 2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusion_target_follows_the_scheduler(prediction_type: str) -> None:
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    target = diffusion_target(scheduler, latents, noise, t)
    alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = {
        "epsilon": noise,
        "v_prediction": alpha.sqrt() * noise - (1 - alpha).sqrt() * latents,
        "sample": latents,
    }[prediction_type]
    torch.testing.assert_close(target, expected)


def test_gather_positions_picks_one_vector_per_row() -> None:
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    picked = gather_positions(hidden, torch.tensor([4, 1]))
    torch.testing.assert_close(picked, torch.stack([hidden[0, 4], hidden[1, 1]]))


def test_eos_index_with_an_added_token_is_not_transformers_pooling_position() -> None:
    sd = load_model("tiny")
    token_id = add_placeholder_token(sd.tokenizer, sd.text_encoder, "[I]", "woman")
    ids = sd.tokenize(["a photo of a [I] woman"])  # (1, L)
    eos = int(eos_index(ids, sd.tokenizer.eos_token_id)[0])
    words = sd.tokenizer("a photo of a [I] woman", add_special_tokens=False).input_ids
    assert eos == len(words) + 1  # start token + words
    assert int(ids[0, eos]) == sd.tokenizer.eos_token_id
    assert int(ids[0, :eos].eq(sd.tokenizer.eos_token_id).sum()) == 0
    # SD1 configs say eos_token_id=2, so transformers pools at the largest id: the placeholder
    assert sd.text_encoder.config.eos_token_id != sd.tokenizer.eos_token_id
    assert int(ids[0].argmax()) == int((ids[0] == token_id).nonzero()[0])
    with torch.no_grad():
        output = sd.text_encoder(ids)
    placeholder_state = output.last_hidden_state[0, int(ids[0].argmax())]
    torch.testing.assert_close(output.pooler_output[0], placeholder_state)
    assert not torch.allclose(output.pooler_output[0], output.last_hidden_state[0, eos])
