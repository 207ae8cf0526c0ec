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
from s2edit.core.denoiser import GuidedDenoiser
from s2edit.core.diffusion import DDIMSchedule, ddim_step, predicted_x0, to_epsilon
from s2edit.core.family import ModelFamily
from s2edit.core.loading import load_model
from s2edit.core.settings import NullTextSettings
from s2edit.editing.cache import cache_paths, inversion_key, load_or_invert
from s2edit.editing.inversion import invert, reconstruct
from s2edit.editing.request import InversionRequest

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
def sd(tame_tiny_model) -> ModelFamily:
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
        method: invert(sd, image, PROMPT, InversionRequest(method, STEPS, GUIDANCE, nti), progress=False)
        for method in ("ddim", "negative_prompt", "null_text", "direct")
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


def test_direct_inversion_reconstructs_to_float_precision(sd, inversions) -> None:
    """Direct Inversion (SPEC §3): the offsets put the source branch back on z*_t after every step, so the
    reconstruction at w = 7.5 is exact up to float error — far below DDIM and null-text."""
    errors = {method: latent_error(sd, inversions[method]) for method in ("ddim", "null_text", "direct")}
    assert errors["direct"] < 1e-8, errors  # an RMS of 1e-4 on latents of unit scale: float32 rounding
    assert errors["direct"] < 1e-6 * errors["null_text"] < 1e-6 * errors["ddim"], errors
    direct = inversions["direct"]
    assert direct.offsets.shape == (STEPS, *direct.z0.shape[1:]) and direct.null_prompt == ""
    assert direct.offsets.abs().max() > 1e-3  # guidance 7.5 really leaves the trajectory without them
    with torch.no_grad():
        assert torch.equal(direct.null(3).context, sd.encode_prompt([""]).context)


def test_direct_offsets_by_hand_on_the_first_step(sd, inversions) -> None:
    """offset_0 = z*_{N−1} − DDIM_step(CFG(ε_∅, ε_c, w), t_0, z*_N), computed without the library loop."""
    direct = inversions["direct"]
    schedule = DDIMSchedule.from_scheduler(sd.scheduler, STEPS)
    with torch.no_grad():
        embeds = torch.cat([sd.encode_prompt([""]).context, sd.encode_prompt([PROMPT]).context])
        z = direct.latents[-1:].to(sd.device)
        eps = sd.unet(z.expand(2, -1, -1, -1), schedule.timesteps[0], encoder_hidden_states=embeds).sample
        guided = eps[:1] + GUIDANCE * (eps[1:] - eps[:1])
        alpha, alpha_prev = float(schedule.alphas[0]), float(schedule.alphas_prev[0])
        x0 = (z - (1 - alpha) ** 0.5 * guided) / alpha**0.5
        expected = direct.latents[-2] - (alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * guided)[0]
    torch.testing.assert_close(direct.offsets[0], expected, atol=1e-5, rtol=1e-5)


def test_inversion_shapes_and_unconditional_embeddings(sd, inversions) -> None:
    null_text, negative, ddim = inversions["null_text"], inversions["negative_prompt"], inversions["ddim"]
    latent = (1, sd.latent_channels, RESOLUTION // sd.vae_scale_factor, RESOLUTION // sd.vae_scale_factor)
    assert null_text.latents.shape == (STEPS + 1, *latent[1:]) and null_text.z_T.shape == latent
    assert torch.equal(null_text.latents[:1], null_text.z0)
    assert len(null_text.nulls) == STEPS and null_text.null_prompt is None
    assert len(null_text.losses) == len(null_text.inner_steps) == STEPS
    assert all(0 <= k <= 10 for k in null_text.inner_steps)
    with torch.no_grad():
        assert torch.equal(negative.null(7).context, sd.encode_prompt([PROMPT]).context)  # NPI: ∅ := P̃
        assert torch.equal(ddim.null(0).context, sd.encode_prompt([""]).context)
    # all three share the same DDIM inversion trajectory (guidance 1, conditional only)
    assert torch.allclose(null_text.latents, ddim.latents) and torch.allclose(negative.latents, ddim.latents)


def test_early_stop_keeps_one_update_when_the_first_loss_is_under_the_threshold(sd, image) -> None:
    # SPEC §3 / the reference: compute the loss, take the Adam step, THEN stop if that loss was small
    nti = NullTextSettings(inner_steps=5, lr=TINY_NTI_LR, early_stop=1e3)
    inversion = invert(sd, image, PROMPT, InversionRequest("null_text", 3, GUIDANCE, nti), progress=False)
    assert inversion.inner_steps == [1, 1, 1]
    with torch.no_grad():
        empty = sd.encode_prompt([""]).context
    assert not torch.equal(inversion.null(0).context, empty)  # ∅_0 is the embedding after that update
    # one Adam step from "" with lr 0.1 moves every coordinate by at most ~lr (Adam's first step is ±lr)
    assert float((inversion.null(0).context - empty).abs().max()) <= TINY_NTI_LR * (1 + 1e-3)
    nti = NullTextSettings(inner_steps=0)
    none = invert(sd, image, PROMPT, InversionRequest("null_text", 3, GUIDANCE, nti), progress=False)
    assert none.inner_steps == [0, 0, 0] and torch.equal(none.null(2).context, empty)


def test_fast_null_text_equals_the_straightforward_reference(sd, image) -> None:
    bench = load_bench()
    steps, nti = 4, NullTextSettings(inner_steps=3, lr=TINY_NTI_LR)
    fast = invert(sd, image, PROMPT, InversionRequest("null_text", steps, GUIDANCE, nti), progress=False)
    reference = bench.reference_null_text(sd, image, PROMPT, steps, GUIDANCE, nti)
    # equal up to float32 rounding (Adam divides by √v: where a gradient is ~0 rounding shows most)
    difference = (fast.nulls.context - reference.nulls.context).abs()
    assert float(difference.mean()) < 1e-5 and float(difference.max()) < 1e-3, difference.max()
    assert fast.inner_steps == reference.inner_steps
    assert fast.losses == pytest.approx(reference.losses, rel=1e-3)


def test_negative_inner_steps_are_refused() -> None:
    with pytest.raises(InputError, match=r"NullTextSettings.inner_steps=-1 must be >= 0"):
        NullTextSettings(inner_steps=-1)


def test_float16_is_refused(image) -> None:
    sd = load_model("tiny", dtype=torch.float16)
    request = InversionRequest("null_text", 2, GUIDANCE, NullTextSettings(inner_steps=1))
    with pytest.raises(ValueError, match="float16"):
        invert(sd, image, PROMPT, request, progress=False)


def test_bfloat16_weights_keep_the_inversion_math_in_float32(sd, image, tame_tiny_model) -> None:
    """SPEC §3: bf16 weights, fp32 inversion math. Null-text still does its job at bf16's ~3 digits."""
    bf16 = tame_tiny_model().to(dtype=torch.bfloat16)
    steps, nti = 4, NullTextSettings(inner_steps=3, lr=TINY_NTI_LR)
    errors = {}
    for model in (sd, bf16):
        for method in ("ddim", "null_text"):
            request = InversionRequest(method, steps, GUIDANCE, nti)
            inversion = invert(model, image, PROMPT, request, progress=False)
            assert inversion.latents.dtype == inversion.nulls.context.dtype == torch.float32
            errors[model.dtype, method] = latent_error(model, inversion)
    assert errors[torch.bfloat16, "null_text"] < 0.3 * errors[torch.bfloat16, "ddim"], errors
    assert errors[torch.bfloat16, "null_text"] == pytest.approx(errors[torch.float32, "null_text"], rel=0.2)


# ----------------------------------------------------------------------------------------- cache


def test_cache_hit_miss_and_invalidation(sd, image, tmp_path) -> None:
    nti = NullTextSettings(inner_steps=2)

    def run(img=image, prompt=PROMPT, steps=3, guidance=GUIDANCE, weights="w1"):
        request = InversionRequest("null_text", steps, guidance, nti)
        return load_or_invert(sd, img, prompt, request, cache_dir=tmp_path, weights=weights, progress=False)

    first = run()
    assert not first.cached and len(list(tmp_path.glob("inversion-*.safetensors"))) == 1
    second = run()
    assert second.cached and second.key == first.key
    assert torch.equal(second.nulls.context, first.nulls.context) and torch.equal(second.z_T, first.z_T)
    assert second.losses == first.losses and second.method == "null_text"

    changed = image.clone()
    changed[..., :8, :8] = -1.0
    assert not run(img=changed).cached  # any change of image, prompt, steps, w or weights misses
    assert not run(prompt="a photo of a dog").cached
    assert not run(steps=2).cached
    assert not run(guidance=3.5).cached
    assert not run(weights="w2").cached
    assert run(img=changed).cached  # … and is cached in its own entry

    key = inversion_key(image, PROMPT, InversionRequest("null_text", 3, GUIDANCE, nti), sd, "w1")
    assert key["family"] == "sd1" and key["dtype"] == "float32"
    tensors, record = cache_paths(tmp_path, key)
    assert json.loads(record.read_text())["key"]["prompt"] == PROMPT
    tensors.write_bytes(b"not safetensors")  # a corrupt entry is recomputed, never trusted
    with pytest.warns(UserWarning, match="is corrupt .*recomputing and replacing it"):
        again = run()
    assert not again.cached and torch.allclose(again.nulls.context, first.nulls.context)
    assert run().cached  # … and replaced by a valid entry


def test_a_cache_entry_with_nan_or_wrong_shapes_is_recomputed_with_one_warning(sd, image, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    def run():
        request = InversionRequest("direct", 3, GUIDANCE)
        return load_or_invert(sd, image, PROMPT, request, cache_dir=tmp_path, weights="w", progress=False)

    first = run()
    assert not first.cached and run().cached  # Direct Inversion is cached like null-text, offsets included
    assert torch.equal(run().offsets, first.offsets)
    tensors = next(tmp_path.glob("inversion-*.safetensors"))
    for name, corrupt in (
        ("offsets", lambda t: torch.full_like(t, float("nan"))),
        ("latents", lambda t: t[:-1].contiguous()),
        ("null_context", lambda t: t.double()),
    ):
        stored = load_file(str(tensors))
        stored[name] = corrupt(stored[name])
        save_file(stored, str(tensors))
        with pytest.warns(UserWarning) as caught:
            again = run()
        assert len(caught) == 1 and "is corrupt" in str(caught[0].message), name
        assert not again.cached and torch.equal(again.offsets, first.offsets)
        assert bool(torch.isfinite(load_file(str(tensors))["offsets"]).all())  # the entry was replaced


def test_temp_files_of_a_killed_save_are_removed_by_the_next_run(sd, image, tmp_path) -> None:
    """A killed writer's temp file goes at the next load however young it is (its pid is gone); a live
    writer's stays (the cache may be shared); a nameless (older format) one goes once it is a minute old."""
    import os
    import subprocess
    import time as time_module

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    killed = tmp_path / f".inversion-0123456789abcdef0123.safetensors.{dead}-ab12cd34.tmp"
    live = tmp_path / f".inversion-0123456789abcdef0123.json.{os.getpid()}-0011aabb.tmp"
    stale = tmp_path / ".inversion-0123456789abcdef0123.safetensors.ab12cd34ef56.tmp"
    for path in (killed, live, stale):
        path.write_bytes(b"half a file")
    old = time_module.time() - 3600
    os.utime(stale, (old, old))
    request = InversionRequest("ddim", 2, GUIDANCE)
    load_or_invert(sd, image, PROMPT, request, cache_dir=tmp_path, weights="w", progress=False)
    assert not killed.exists() and not stale.exists() and live.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p != live]  # its own temps went


def test_direct_offsets_batched_over_steps_equal_one_step_at_a_time(sd, inversions) -> None:
    """The steps of Direct Inversion's offset pass start from the stored trajectory, so they can share a
    UNet call; batching them changes nothing but float rounding."""
    from s2edit.editing.inversion import direct_offsets

    direct = inversions["direct"]
    schedule = DDIMSchedule.from_scheduler(sd.scheduler, STEPS)
    with torch.no_grad():
        null, cond = sd.encode_prompt([""]), sd.encode_prompt([PROMPT])
    args = (GuidedDenoiser(sd), direct.latents, cond, null, schedule, GUIDANCE)
    one = direct_offsets(*args, progress=False, batch_steps=1)
    four = direct_offsets(*args, progress=False, batch_steps=4)
    torch.testing.assert_close(four, one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(direct.offsets, one, atol=1e-5, rtol=1e-5)
