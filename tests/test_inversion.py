"""Inversion (SPEC §3): DDIM math in closed form, Null-text vs plain DDIM reconstruction, the cache."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from editkit.errors import InputError
from editkit.images import load_image
from s2edit.inversion import (
    DDIMSchedule,
    NullTextSettings,
    cache_paths,
    ddim_step,
    inversion_key,
    invert,
    load_or_invert,
    predicted_x0,
    reconstruct,
    to_epsilon,
)
from s2edit.models import StableDiffusion, load_stable_diffusion

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "examples" / "chelsea.png"
PROMPT = "a photo of a cat"
RESOLUTION = 128
STEPS = 10
GUIDANCE = 7.5
# The random tiny text encoder puts "" and the prompt O(1) apart per dimension and ∅ moves ε̂ weakly,
# so Adam at the paper's 1e-2 barely moves it in 10 steps; the algorithm is the same at a larger lr.
TINY_NTI_LR = 0.1


def load_bench():
    """benchmarks/edit_bench.py as a module (it holds the straightforward NTI reference)."""
    spec = importlib.util.spec_from_file_location("edit_bench", ROOT / "benchmarks" / "edit_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sd(tame_tiny_model) -> StableDiffusion:
    """The tiny model, UNet output damped (conftest.py: well-conditioned DDIM trajectories)."""
    return tame_tiny_model()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return load_image(IMAGE, RESOLUTION)


@pytest.fixture(scope="module")
def inversions(sd, image) -> dict:
    """One inversion per method (shared: the NTI run is the slow part of this file)."""
    nti = NullTextSettings(inner_steps=10, lr=TINY_NTI_LR)
    return {
        method: invert(sd, image, PROMPT, method, STEPS, GUIDANCE, nti, progress=False)
        for method in ("ddim", "negative_prompt", "null_text")
    }


# ----------------------------------------------------------------------------------------- DDIM math


def test_ddim_step_closed_forms() -> None:
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 1, 4, 8, 8, generator=generator, dtype=torch.float64)
    alpha, alpha_prev = 0.3, 0.8
    z = alpha**0.5 * x0 + (1 - alpha) ** 0.5 * noise
    assert torch.allclose(predicted_x0(z, noise, alpha), x0)  # the exact noise gives back x0
    z_prev = ddim_step(z, noise, alpha, alpha_prev)
    assert torch.allclose(z_prev, alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * noise)
    assert torch.allclose(ddim_step(z_prev, noise, alpha_prev, alpha), z)  # inversion undoes the step
    velocity = alpha**0.5 * noise - (1 - alpha) ** 0.5 * x0
    assert torch.allclose(to_epsilon(velocity, z, alpha, "v_prediction"), noise)
    assert torch.allclose(to_epsilon(x0, z, alpha, "sample"), noise)


def test_schedule_matches_the_scheduler(sd) -> None:
    schedule = DDIMSchedule.from_scheduler(sd.scheduler, 50)
    cumprod = sd.scheduler.alphas_cumprod.double()
    assert schedule.timesteps.tolist() == list(range(981, 0, -20))  # SD1 steps_offset 1
    assert torch.equal(schedule.alphas, cumprod[schedule.timesteps])
    assert torch.equal(schedule.alphas_prev[:-1], schedule.alphas[1:])
    assert schedule.alphas_prev[-1] == cumprod[0]  # set_alpha_to_one=False: final ᾱ = ᾱ_0


# ----------------------------------------------------------------------------------------- inversion


def latent_error(sd, inversion) -> float:
    return float((reconstruct(sd, inversion) - inversion.z0.to(sd.device)).pow(2).mean())


def test_null_text_reconstructs_far_better_than_ddim_at_guidance_7_5(sd, inversions) -> None:
    ddim, null_text = latent_error(sd, inversions["ddim"]), latent_error(sd, inversions["null_text"])
    assert null_text < 0.2 * ddim, (null_text, ddim)
    # ∅_i is the evaluated embedding, so the last reported loss IS the reconstruction error of z0
    assert null_text == pytest.approx(inversions["null_text"].losses[-1], rel=1e-3)


def test_inversion_shapes_and_unconditional_embeddings(sd, inversions) -> None:
    null_text, negative, ddim = inversions["null_text"], inversions["negative_prompt"], inversions["ddim"]
    latent = (1, sd.latent_channels, RESOLUTION // sd.vae_scale_factor, RESOLUTION // sd.vae_scale_factor)
    assert null_text.latents.shape == (STEPS + 1, *latent[1:]) and null_text.z_T.shape == latent
    assert torch.equal(null_text.latents[:1], null_text.z0)
    assert null_text.null_embeddings.shape[0] == STEPS and null_text.null_prompt is None
    assert len(null_text.losses) == len(null_text.inner_steps) == STEPS
    assert all(0 <= k <= 10 for k in null_text.inner_steps)
    with torch.no_grad():
        assert torch.equal(negative.null_embedding(7), sd.encode_prompt([PROMPT]))  # NPI: ∅ := P̃
        assert torch.equal(ddim.null_embedding(0), sd.encode_prompt([""]))
    # all three share the same DDIM inversion trajectory (guidance 1, conditional only)
    assert torch.allclose(null_text.latents, ddim.latents) and torch.allclose(negative.latents, ddim.latents)


def test_early_stop_keeps_the_initial_embedding(sd, image) -> None:
    nti = NullTextSettings(inner_steps=5, early_stop=1e3)
    inversion = invert(sd, image, PROMPT, "null_text", 3, GUIDANCE, nti, progress=False)
    assert inversion.inner_steps == [0, 0, 0]  # the first evaluation already meets the threshold
    with torch.no_grad():
        empty = sd.encode_prompt([""])
    assert all(torch.equal(inversion.null_embedding(i), empty) for i in range(3))


def test_fast_null_text_equals_the_straightforward_reference(sd, image) -> None:
    bench = load_bench()
    steps, nti = 4, NullTextSettings(inner_steps=3, lr=TINY_NTI_LR)
    fast = invert(sd, image, PROMPT, "null_text", steps, GUIDANCE, nti, progress=False)
    reference = bench.reference_null_text(sd, image, PROMPT, steps, GUIDANCE, nti)
    # equal up to float32 rounding (Adam divides by √v: where a gradient is ~0 rounding shows most)
    difference = (fast.null_embeddings - reference.null_embeddings).abs()
    assert float(difference.mean()) < 1e-5 and float(difference.max()) < 1e-3, difference.max()
    assert fast.inner_steps == reference.inner_steps
    assert fast.losses == pytest.approx(reference.losses, rel=1e-3)


def test_negative_inner_steps_are_refused() -> None:
    with pytest.raises(InputError, match="nti inner_steps=-1 must be >= 0"):
        NullTextSettings(inner_steps=-1)


def test_float16_is_refused(image) -> None:
    sd = load_stable_diffusion("tiny", dtype=torch.float16)
    with pytest.raises(ValueError, match="float16"):
        invert(sd, image, PROMPT, "null_text", 2, GUIDANCE, NullTextSettings(inner_steps=1), progress=False)


def test_bfloat16_weights_keep_the_inversion_math_in_float32(sd, image, tame_tiny_model) -> None:
    """SPEC §3: bf16 weights, fp32 inversion math. Null-text still does its job at bf16's ~3 digits."""
    bf16 = tame_tiny_model().to(dtype=torch.bfloat16)
    steps, nti = 4, NullTextSettings(inner_steps=3, lr=TINY_NTI_LR)
    errors = {}
    for model in (sd, bf16):
        for method in ("ddim", "null_text"):
            inversion = invert(model, image, PROMPT, method, steps, GUIDANCE, nti, progress=False)
            assert inversion.latents.dtype == inversion.null_embeddings.dtype == torch.float32
            errors[model.dtype, method] = latent_error(model, inversion)
    assert errors[torch.bfloat16, "null_text"] < 0.3 * errors[torch.bfloat16, "ddim"], errors
    assert errors[torch.bfloat16, "null_text"] == pytest.approx(errors[torch.float32, "null_text"], rel=0.2)


# ----------------------------------------------------------------------------------------- cache


def test_cache_hit_miss_and_invalidation(sd, image, tmp_path) -> None:
    nti = NullTextSettings(inner_steps=2)

    def run(img=image, prompt=PROMPT, steps=3, guidance=GUIDANCE, weights="w1"):
        return load_or_invert(
            sd, img, prompt, tmp_path, weights, "null_text", steps, guidance, nti, progress=False
        )

    first = run()
    assert not first.cached and len(list(tmp_path.glob("inversion-*.safetensors"))) == 1
    second = run()
    assert second.cached and second.key == first.key
    assert torch.equal(second.null_embeddings, first.null_embeddings) and torch.equal(second.z_T, first.z_T)
    assert second.losses == first.losses and second.method == "null_text"

    changed = image.clone()
    changed[..., :8, :8] = -1.0
    assert not run(img=changed).cached  # any change of image, prompt, steps, w or weights misses
    assert not run(prompt="a photo of a dog").cached
    assert not run(steps=2).cached
    assert not run(guidance=3.5).cached
    assert not run(weights="w2").cached
    assert run(img=changed).cached  # … and is cached in its own entry

    key = inversion_key(
        image,
        PROMPT,
        "null_text",
        3,
        GUIDANCE,
        "w1",
        torch.float32,
        nti,
        scheduler_config=dict(sd.scheduler.config),
    )
    tensors, record = cache_paths(tmp_path, key)
    assert json.loads(record.read_text())["key"]["prompt"] == PROMPT
    tensors.write_bytes(b"not safetensors")  # a corrupt entry is recomputed, never trusted
    again = run()
    assert not again.cached and torch.allclose(again.null_embeddings, first.null_embeddings)
    assert run().cached
