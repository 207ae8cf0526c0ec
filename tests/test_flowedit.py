"""FlowEdit's loop and the flow-model sampling pieces (s2edit.core.flow, SPEC §11), driven by closed-form
velocities so that every number can be written down by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from s2edit.core.flow import (
    EDIT,
    SAMPLE,
    SKIP,
    dynamic_shift,
    flow_sigmas,
    flowedit,
    flowedit_phases,
    latent_image_ids,
    pack_latents,
    step_noise,
    unpack_latents,
)

SHAPE = (1, 4, 6, 6)
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
                  "base_shift": 0.5, "max_shift": 1.15}


class LinearVelocity:
    """v(z, σ, prompt c) = a·z + σ·b_c + d_c: one source prompt (c = 0) and targets c = 1 … K. Records the
    σ of every call and whether the source row ran."""

    def __init__(self, targets: list[int], a: float = -0.7) -> None:
        gen = torch.Generator().manual_seed(5)
        self.a = a
        self.b = torch.randn(8, *SHAPE[1:], generator=gen)
        self.d = torch.randn(8, *SHAPE[1:], generator=gen)
        self.targets = targets  # the prompt index of each target row
        self.calls: list[tuple[float, bool]] = []

    def of(self, z: torch.Tensor, sigma: float, prompts: list[int]) -> torch.Tensor:
        return self.a * z + sigma * self.b[prompts] + self.d[prompts]

    def __call__(self, z_src, z_tar, sigma):
        self.calls.append((sigma, z_src is not None))
        v_src = None if z_src is None else self.of(z_src, sigma, [0])
        return v_src, self.of(z_tar, sigma, self.targets)


class NonlinearVelocity(LinearVelocity):
    def of(self, z, sigma, prompts):
        return torch.tanh(super().of(z, sigma, prompts)) + 0.3 * z.square()


def source() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def test_target_equal_to_source_returns_the_source_exactly() -> None:
    """V_Δ = v(z_tar, c_src) − v(z_src, c_src) with z_tar = z_src at the first step, and so on: 0."""
    x = source()
    sigmas = flow_sigmas(SD3_SCHEDULER, 10)
    out = flowedit(NonlinearVelocity(targets=[0]), x, sigmas, 1, n_max=8, n_avg=2, seed=3)
    assert torch.equal(out, x)


def test_one_edit_step_equals_the_float64_closed_form() -> None:
    """One executed step (n_max = 1): z1 = x + (σ_T − σ_{T−1})·(v(z_tar, c_1) − v(z_src, c_0)), with
    z_src = (1 − σ)x + σε, z_tar = z_src (z_edit = x): = x + (0 − σ)·(σ(b_1 − b_0) + d_1 − d_0)."""
    x = source()
    sigmas = flow_sigmas(SD3_SCHEDULER, 6)
    velocity = LinearVelocity(targets=[1, 2])
    out = flowedit(velocity, x, sigmas, 2, n_max=1, seed=11)
    sigma = float(sigmas[5])
    b, d = velocity.b.double(), velocity.d.double()
    for row, c in enumerate((1, 2)):
        expected = x.double()[0] - sigma * (sigma * (b[c] - b[0]) + d[c] - d[0])
        torch.testing.assert_close(out[row].double(), expected, atol=1e-6, rtol=0)
    assert velocity.calls == [(float(sigmas[5]), True)]


def velocity_by_hand(velocity: NonlinearVelocity, z: torch.Tensor, sigma: float, c: int) -> torch.Tensor:
    """NonlinearVelocity in float64."""
    b, d = velocity.b[c].double(), velocity.d[c].double()
    return torch.tanh(velocity.a * z + sigma * b + d) + 0.3 * z.square()


def test_two_steps_and_n_avg_follow_the_recursion_by_hand() -> None:
    """Two edit steps with n_avg = 2 against a float64 re-implementation of SPEC §11's recursion."""
    x = source()
    sigmas = flow_sigmas(SD3_SCHEDULER, 5)
    velocity = NonlinearVelocity(targets=[3])
    out = flowedit(velocity, x, sigmas, 1, n_max=2, n_avg=2, seed=4)
    z = x.double()
    for i in (3, 4):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        delta = torch.zeros_like(z)
        for k in range(2):
            eps = step_noise(SHAPE, 4, i, k).double()
            z_src = (1 - s) * x.double() + s * eps
            z_tar = z + z_src - x.double()
            delta += (velocity_by_hand(velocity, z_tar, s, 3) - velocity_by_hand(velocity, z_src, s, 0)) / 2
        z = z + (s_next - s) * delta
    torch.testing.assert_close(out.double(), z, atol=1e-5, rtol=1e-5)


def test_n_max_skips_and_n_min_samples_as_written() -> None:
    steps, n_max, n_min = 10, 6, 2
    assert flowedit_phases(steps, n_max, n_min) == [SKIP] * 4 + [EDIT] * 4 + [SAMPLE] * 2
    assert flowedit_phases(50, 33, 0) == [SKIP] * 17 + [EDIT] * 33  # SD3's defaults
    with pytest.raises(ValueError, match="n_min ≤ n_max ≤ steps"):
        flowedit_phases(10, 11, 0)
    x = source()
    sigmas = flow_sigmas(SD3_SCHEDULER, steps)
    velocity = LinearVelocity(targets=[1])
    hooked: list[tuple[int, int]] = []

    def hook(j: int, n: int, z: torch.Tensor) -> torch.Tensor:
        hooked.append((j, n))
        return z

    out = flowedit(velocity, x, sigmas, 1, n_max=n_max, n_min=n_min, seed=2, on_step=hook)
    assert velocity.calls == [(float(sigmas[i]), i < 8) for i in range(4, 10)]
    assert hooked == [(j, 4) for j in range(4)]  # SPL's hook: executed edit steps only
    # the tail by hand: x_tar = z_edit + (1 − σ_8)x + σ_8 ε − x, then two Euler steps of the target velocity
    edit_only = flowedit(LinearVelocity(targets=[1]), x, sigmas[:9], 1, n_max=4, seed=2)  # steps 4…7 alone
    s8 = float(sigmas[8])
    x_tar = edit_only.double() + (1 - s8) * x.double() + s8 * step_noise(SHAPE, 2, 8, 0).double() - x.double()
    for i in (8, 9):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x_tar = x_tar + (s_next - s) * velocity.of(x_tar.float(), s, [1]).double()
    torch.testing.assert_close(out.double(), x_tar, atol=1e-5, rtol=1e-5)


def test_several_targets_equal_their_single_runs_and_the_seed_fixes_the_edit() -> None:
    x = source()
    sigmas = flow_sigmas(SD3_SCHEDULER, 8)
    both = flowedit(NonlinearVelocity(targets=[1, 2]), x, sigmas, 2, n_max=5, n_min=1, seed=7)
    for row, c in enumerate((1, 2)):
        alone = flowedit(NonlinearVelocity(targets=[c]), x, sigmas, 1, n_max=5, n_min=1, seed=7)
        torch.testing.assert_close(both[row:row + 1], alone, atol=1e-6, rtol=0)
    again = flowedit(NonlinearVelocity(targets=[1, 2]), x, sigmas, 2, n_max=5, n_min=1, seed=7)
    other = flowedit(NonlinearVelocity(targets=[1, 2]), x, sigmas, 2, n_max=5, n_min=1, seed=8)
    assert torch.equal(both, again) and not torch.allclose(both, other)
    # the noise is drawn on the CPU from (seed, step, sample): the same wherever the latents live
    assert torch.equal(step_noise((2, 3), 1, 4, 0), step_noise((2, 3), 1, 4, 0))
    assert not torch.equal(step_noise((2, 3), 1, 4, 0), step_noise((2, 3), 1, 5, 0))


def test_flux_latents_pack_and_unpack() -> None:
    z = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(z)
    assert packed.shape == (2, 12, 64)
    assert torch.equal(unpack_latents(packed, 6, 8), z)
    # token (row r, column c) holds z[ch, 2r + dy, 2c + dx] at feature ch·4 + dy·2 + dx
    r, c, ch, dy, dx = 2, 1, 5, 1, 0
    assert packed[1, r * 4 + c, ch * 4 + dy * 2 + dx] == z[1, ch, 2 * r + dy, 2 * c + dx]
    ids = latent_image_ids(6, 8)
    assert ids.shape == (12, 3) and ids[r * 4 + c].tolist() == [0.0, r, c]
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 4, 5, 6))


def test_schedules_of_sd3_and_flux() -> None:
    sd3 = flow_sigmas(SD3_SCHEDULER, 28)
    assert sd3.shape == (29,) and float(sd3[0]) == pytest.approx(1.0) and float(sd3[-1]) == 0.0
    assert bool((sd3[1:] < sd3[:-1]).all())
    # FLUX: σ = e^μ / (e^μ + 1/s − 1) of s = linspace(1, 1/T, T), μ linear in the packed length
    steps, tokens = 7, 1024
    mu = dynamic_shift(tokens, FLUX_SCHEDULER)
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256))
    s = np.linspace(1.0, 1 / steps, steps)
    expected = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    flux = flow_sigmas(FLUX_SCHEDULER, steps, image_seq_len=tokens)
    np.testing.assert_allclose(flux[:-1].numpy(), expected, rtol=1e-6)
    assert float(flux[-1]) == 0.0
    with pytest.raises(ValueError, match="packed image length"):
        flow_sigmas(FLUX_SCHEDULER, steps)
