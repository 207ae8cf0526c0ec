"""M_obj: the object word's attention at the model's mask level (4: image/32), binarised; or a user mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from conftest import MapLog
from editkit.errors import InputError
from editkit.images import load_image
from s2edit.core.family import ModelFamily
from s2edit.core.loading import load_model
from s2edit.core.tokenizer import word_token_indices
from s2edit.training.object_mask import load_object_mask, object_attention_map, object_mask, resize_mask

SIZE = 128
PROMPT = "a photo of a woman"


@pytest.fixture(scope="module")
def sd() -> ModelFamily:
    return load_model("tiny")


@pytest.fixture(scope="module")
def latents(sd: ModelFamily, tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    Image.fromarray(skdata.astronaut()[:SIZE, SIZE : 2 * SIZE]).save(path)
    with torch.no_grad():
        return sd.encode_image(load_image(path, resolution=None))


def test_attention_map_is_the_mean_of_the_word_columns_over_layers_and_timesteps(
    sd: ModelFamily, latents: torch.Tensor
) -> None:
    timesteps = (200, 600)
    attention = object_attention_map(sd, latents, PROMPT, "woman", timesteps, seed=3)
    # recompute by hand: same noise, each timestep, every level-4 cross-attention layer
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    log = MapLog(level=sd.mask_level)
    with torch.no_grad(), sd.attention_control(log, cross_only=True):
        embeds = sd.encode_prompt([PROMPT]).context
        for step, t in enumerate(timesteps):
            log.step = step
            noisy = sd.scheduler.add_noise(latents, noise, torch.tensor([t]))
            sd.unet(noisy, t, encoder_hidden_states=embeds)
    layers = {name for _, name, _ in log.calls}
    assert len(log.calls) == len(timesteps) * len(layers) and len(layers) >= 2  # down + up
    position = word_token_indices(sd.tokenizer, PROMPT, "woman")
    by_hand = log.mean()[0, :, :, position].mean(-1)
    torch.testing.assert_close(attention, by_hand / by_hand.max())
    latent_h, latent_w = latents.shape[-2:]
    assert sd.mask_level == 4 and attention.shape == (latent_h // 4, latent_w // 4)
    assert attention.max().item() == pytest.approx(1.0)


def test_object_mask_is_the_thresholded_map_at_the_latent_grid(
    sd: ModelFamily, latents: torch.Tensor
) -> None:
    attention = object_attention_map(sd, latents, PROMPT, "woman")
    threshold = float(attention.median())  # a threshold that splits the map
    mask = object_mask(sd, latents, PROMPT, "woman", threshold=threshold)
    assert mask.shape == latents.shape[-2:]
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    expected = resize_mask((attention > threshold).float(), tuple(latents.shape[-2:]))
    torch.testing.assert_close(mask, expected)
    # nearest resampling back to the attention grid gives the binary map exactly
    torch.testing.assert_close(resize_mask(mask, tuple(attention.shape)), (attention > threshold).float())


def test_object_word_missing_from_the_prompt_is_refused(sd: ModelFamily, latents: torch.Tensor) -> None:
    with pytest.raises(InputError, match="'cat' is not in the prompt"):
        object_mask(sd, latents, PROMPT, "cat")


def test_object_word_of_several_tokens_averages_them(sd: ModelFamily, latents: torch.Tensor) -> None:
    prompt = "a photo of an astronautically dressed woman"
    positions = word_token_indices(sd.tokenizer, prompt, "astronautically")
    assert len(positions) > 1
    attention = object_attention_map(sd, latents, prompt, "astronautically")
    assert torch.isfinite(attention).all() and attention.max().item() == pytest.approx(1.0)


def test_user_mask_is_binarised_at_the_latent_grid(tmp_path: Path) -> None:
    array = np.zeros((128, 128), dtype=np.uint8)
    array[:, 64:] = 255  # right half
    array[:8, :8] = 100  # faint corner: below the 0.5 threshold
    Image.fromarray(array).save(tmp_path / "mask.png")
    mask = load_object_mask(tmp_path / "mask.png", (16, 16))
    expected = torch.zeros(16, 16)
    expected[:, 8:] = 1
    torch.testing.assert_close(mask, expected)


def test_empty_user_mask_is_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(InputError, match="empty"):
        load_object_mask(tmp_path / "black.png", (8, 8))


def test_resize_mask_nearest_upsampling_repeats_cells() -> None:
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    up = resize_mask(mask, (4, 4))
    torch.testing.assert_close(up, mask.repeat_interleave(2, 0).repeat_interleave(2, 1))
