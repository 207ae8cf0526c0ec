"""Training the shapes model (issue 20): a tiny run end to end, its export, resuming, and the loss terms."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from s2edit.shapes.losses import min_snr_weights, pixel_region_loss, word_region_loss
from s2edit.shapes.model import load_shapes_components, token_table, token_table_name
from s2edit.shapes.quality import ddim_step, ddim_timesteps
from s2edit.shapes.system import DiffusionSystem, VAESystem, warmup_cosine
from s2edit.shapes.train import checkpoint_step, main

TINY = [
    "scenes=24", "vae.steps=3", "vae.refit_steps=2", "vae.batch=4", "vae.block_out_channels=[8,8,16]",
    "vae.norm_num_groups=4", "unet.block_out_channels=[16,16,16]", "unet.norm_num_groups=8", "unet.heads=2",
    "unet.batch=4", "unet.warmup=1", "text.hidden_size=16", "text.heads=2", "text.token_seed=5",
    "quality.ddim_steps=2", "quality.samples_per_caption=0", "quality.reconstruction_images=2",
    "quality.attention_images=2", "quality.vae_images=4", "checkpoint_every=1",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    main([f"out={out}", "unet.steps=3", *TINY])
    return out


def test_the_run_logs_finite_losses_and_writes_its_report(tiny_run: Path):
    record = json.loads((tiny_run / "stages" / "unet.json").read_text())
    assert record["steps"] == 3
    for name in ("unet/loss", "unet/eps", "unet/words_16", "unet/pixels_8"):
        assert math.isfinite(record["final"][name]), name
    assert 0 <= record["final"]["unet/words_16"] <= 1
    assert list((tiny_run / "logs" / "unet").glob("events.out.tfevents.*"))
    quality = json.loads((tiny_run / "quality.json").read_text())
    assert set(quality) == {"vae", "ddim_reconstruction_psnr", "attention_16"}
    assert 0 <= quality["attention_16"]["colour_iou"] <= 1
    notes = (tiny_run / "model" / "TRAINING.md").read_text()
    assert "python -m s2edit.shapes train" in notes and "cores" in notes


def test_the_export_loads_back_as_the_ema_model(tiny_run: Path):
    system = DiffusionSystem.load_from_checkpoint(tiny_run / "checkpoints" / "unet" / "last.ckpt",
                                                  map_location="cpu")
    loaded = load_shapes_components(tiny_run / "model")
    assert set(loaded) == {"unet", "vae", "text_encoder"}
    table = system.ema_text_encoder.get_input_embeddings().weight
    # the token table is regenerated from its seed, equal to the one trained with, and never shipped
    regenerated = loaded["text_encoder"].get_input_embeddings().weight
    assert torch.equal(regenerated, table)
    assert torch.equal(regenerated, token_table(5, table.shape[0], table.shape[1], 0.02))
    manifest = json.loads((tiny_run / "model" / "shapes.json").read_text())
    assert manifest["token_table"]["seed"] == 5
    with safe_open(str(tiny_run / "model" / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
        assert f"text_encoder.{token_table_name(loaded['text_encoder'])}" not in keys
        assert not any("token_embedding" in key for key in keys)
        assert {weights.get_tensor(k).dtype for k in keys} == {torch.float16}
    # the same computation on fp16-rounded EMA weights is bit-identical; the fp32 EMA model is close
    generator = torch.Generator().manual_seed(0)
    ids = system.caption_ids[:2]
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    with torch.no_grad():
        fp32_text = system.ema_text_encoder(ids).last_hidden_state
        fp32 = system.ema_unet(latents, 500, fp32_text).sample
        text = loaded["text_encoder"](ids).last_hidden_state
        assert torch.equal(text, fp16_rounded(system.ema_text_encoder, skip=table)(ids).last_hidden_state)
        output = loaded["unet"](latents, 500, text).sample
        assert torch.equal(output, fp16_rounded(system.ema_unet)(latents, 500, text).sample)
        torch.testing.assert_close(text, fp32_text, atol=1e-2, rtol=1e-2)  # fp16 weight rounding
        torch.testing.assert_close(output, fp32, atol=1e-2, rtol=1e-2)
        image = torch.rand(1, 3, 64, 64) * 2 - 1
        vae = decoder_from_checkpoint(tiny_run)
        torch.testing.assert_close(loaded["vae"](image).sample, vae(image).sample, atol=2e-2, rtol=2e-2)
    assert loaded["vae"].config.scaling_factor != 1.0  # measured on the training latents


def fp16_rounded(module: torch.nn.Module, skip: torch.Tensor | None = None) -> torch.nn.Module:
    """A copy of `module` whose parameters (but `skip`) went through fp16 and back."""
    copied = copy.deepcopy(module)
    for original, parameter in zip(module.parameters(), copied.parameters()):
        if original is not skip:
            parameter.data = parameter.data.half().float()
    return copied


def decoder_from_checkpoint(out: Path) -> torch.nn.Module:
    system = VAESystem.load_from_checkpoint(out / "checkpoints" / "decoder" / "last.ckpt", map_location="cpu")
    return system.vae.eval()


def test_a_rerun_resumes_from_the_checkpoint_step(tiny_run: Path, capsys: pytest.CaptureFixture):
    vae_checkpoint = tiny_run / "checkpoints" / "vae" / "last.ckpt"
    stamp = vae_checkpoint.stat().st_mtime_ns
    main([f"out={tiny_run}", "unet.steps=5", *TINY])
    printed = capsys.readouterr().out
    assert "stage vae: finished at step 3" in printed
    assert "stage unet: steps 3 → 5 (resumed)" in printed
    assert vae_checkpoint.stat().st_mtime_ns == stamp  # the finished VAE stage did not run again
    assert checkpoint_step(tiny_run / "checkpoints" / "unet" / "last.ckpt") == 5


def test_region_losses_closed_forms():
    rows = torch.ones(1)
    object = torch.zeros(1, 2, 2)
    object[0, 0, 0] = 1.0  # one object cell of four
    object_tokens = torch.tensor([[False, True, False]])
    background_tokens = torch.tensor([[False, False, True]])
    perfect = torch.zeros(1, 2, 2, 3)
    perfect[0, 0, 0, 1] = 1.0  # the object cell attends to the object word
    perfect[0, 0, 1, 2] = perfect[0, 1, 0, 2] = perfect[0, 1, 1, 2] = 1.0  # background cells to theirs
    assert word_region_loss(perfect, object, object_tokens, background_tokens, rows) == 0
    assert pixel_region_loss(perfect, object, object_tokens, background_tokens, rows) == 0
    uniform = torch.full((1, 2, 2, 3), 1 / 3)
    # word mass: object word 1 − 1/4, background word 1 − 3/4; pixels: every cell misses 2/3
    tokens = (object_tokens, background_tokens)
    assert word_region_loss(uniform, object, *tokens, rows).item() == pytest.approx(0.5)
    assert pixel_region_loss(uniform, object, *tokens, rows).item() == pytest.approx(2 / 3)
    assert pixel_region_loss(uniform, object, *tokens, torch.zeros(1)) == 0  # a dropped caption


def test_min_snr_weights_and_schedules():
    alphas = torch.tensor([0.9, 0.5, 0.1])  # SNR 9, 1, 1/9
    weights = min_snr_weights(alphas, torch.tensor([0, 1, 2]), gamma=5.0)
    torch.testing.assert_close(weights, torch.tensor([5 / 9, 1.0, 1.0]))
    assert ddim_timesteps(1000, 4) == [751, 501, 251, 1]
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.1)
    x, eps = torch.randn(2, 4), torch.randn(2, 4)
    there = ddim_step(x, eps, 0.9, 0.2)
    torch.testing.assert_close(ddim_step(there, eps, 0.2, 0.9), x)  # DDIM with fixed ε is invertible
