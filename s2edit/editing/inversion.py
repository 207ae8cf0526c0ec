"""Inversion of a real image into the model's DDIM trajectory (SPEC §3); cached by :mod:`.cache`.

Four methods share one interface (:func:`invert` → :class:`Inversion`):

- ``null_text`` (Null-text Inversion, Mokady et al. 2023): DDIM inversion at guidance 1, then one null
  conditioning ∅_i per denoising step, optimised so that classifier-free guidance at the editing scale w
  retraces the inversion trajectory (every tensor of the unconditional input is optimised: SD's context;
  a family with a pooled embedding optimises it too, SPEC §10).
- ``direct`` (Direct Inversion, Ju et al. ICLR 2024 "PnP Inversion"): ∅ := the unconditional input, and
  one guided pass down the inversion trajectory stores per-step offsets z*_{t−1} − DDIM_step(z*_t); the
  edit adds them to the source branch only, which then retraces the trajectory exactly.
- ``negative_prompt`` (Miyake et al. 2023): ∅_i := the conditioning of the source prompt, no optimisation.
- ``ddim``: plain DDIM inversion; ∅_i := the unconditional input (the baseline that drifts at w > 1).

Every function takes a :class:`~s2edit.core.denoiser.GuidedDenoiser`, whose controller is the spatial
control of the prompt's placeholders (S2Edit Eq. 3) on the conditional rows, so that the edit's source
branch, which runs with it, retraces the same trajectory. All inversion math (DDIM steps, losses, the
optimised conditioning) runs in float32 whatever the model's dtype (float32 or bfloat16; float16 is
refused: the optimisation does not converge in it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from s2edit.core.attention import SpatialControl
from s2edit.core.denoiser import GuidedDenoiser
from s2edit.core.diffusion import DDIMSampler, DDIMSchedule, ddim_step, guided_noise
from s2edit.core.engine import DenoisingRun, OffsetHook, ProgressHook, denoise
from s2edit.core.family import Conditioning, ModelFamily
from s2edit.editing.request import InversionRequest

DIRECT_BATCH_STEPS = 5  # Direct Inversion: steps per model call (10 rows); independent of each other


def trajectory_steps(latents: torch.Tensor, schedule: DDIMSchedule) -> int:
    """N, the steps of `schedule`, after checking that `latents` is its N + 1 inversion latents."""
    n = len(schedule)
    if latents.shape[0] != n + 1:
        raise ValueError(f"expected {n + 1} inversion latents for {n} steps, got {latents.shape[0]}")
    return n


# ----------------------------------------------------------------------------------------- inversion


@torch.no_grad()
def ddim_inversion(
    denoiser: GuidedDenoiser,
    z0: torch.Tensor,
    cond: Conditioning,
    schedule: DDIMSchedule,
    progress: bool = True,
) -> torch.Tensor:
    """DDIM inversion at guidance 1 (conditional prediction only): z0 → z_N. Returns (N+1, C, h, w).

    Row k of the result is the latent at noise level k (row 0 = z0, row N = z_T); the step into level
    k+1 evaluates the model at the target timestep (the usual inversion approximation; SPEC §3).
    """
    z = z0.float()
    latents = [z]
    with denoiser.controlled():
        steps = range(len(schedule) - 1, -1, -1)
        for k in tqdm(steps, desc="DDIM inversion", disable=not progress, leave=False):
            alpha_from, alpha_to = float(schedule.alphas_prev[k]), float(schedule.alphas[k])
            eps = denoiser.conditional(z, schedule.timesteps[k], alpha_from, cond)
            z = ddim_step(z, eps, alpha_from, alpha_to)
            latents.append(z)
    return torch.cat(latents)


@dataclass
class NullTextResult:
    nulls: Conditioning  # (N rows) float32: ∅_i for denoising step i
    losses: list[float]  # loss of the stored ∅_i, per denoising step
    inner_steps: list[int]  # Adam updates made per denoising step
    unet_calls: int  # model evaluations (rows), for the benchmark


def null_text_optimization(
    denoiser: GuidedDenoiser,
    latents: torch.Tensor,
    cond: Conditioning,
    null: Conditioning,
    schedule: DDIMSchedule,
    guidance: float = 7.5,
    request: InversionRequest | None = None,
    progress: bool = True,
) -> NullTextResult:
    """Per-step optimisation of the unconditional input (Null-text Inversion; SPEC §3).

    For denoising step i (t from noisy to clean), starting from the previous step's ∅ (step 0: `null`,
    the model's unconditional input): Adam with nti.lr·(1 − i/100), at most `nti.inner_steps` updates of
    ∅ on MSE(DDIM_step(ε_∅ + w(ε_c − ε_∅), t, z̄_t), z_{t−1}). As the reference, each inner step computes
    the loss, takes the Adam step, and THEN stops if that loss was < nti.early_stop + i·nti.early_stop_growth,
    so every timestep keeps at least one update. ∅_i is the conditioning after the last update; z̄
    advances with it, and the loss of that advance is the one reported. (`request` gives `nti`; its other
    fields are the caller's.)

    Cost per step with k updates: one conditional prediction (no grad, computed once, under the
    denoiser's spatial control), k forward+backward passes of the ∅ row and one forward of it (the
    advance); the conditional row is never recomputed. ∅ holds no placeholder: its predictions run
    without attention control.
    """
    nti = (request or InversionRequest()).nti
    if denoiser.model.dtype == torch.float16:
        raise ValueError("null-text optimisation does not converge in float16: use fp32 or bf16 weights")
    n = trajectory_steps(latents, schedule)
    current = null.detach().float().map(torch.clone)
    z = latents[n : n + 1].float()
    result = NullTextResult(current, [], [], 0)
    stored: list[Conditioning] = []
    bar = tqdm(range(n), desc="null-text inversion", disable=not progress, leave=False)
    for i in bar:
        t = schedule.timesteps[i]
        alpha, alpha_prev = float(schedule.alphas[i]), float(schedule.alphas_prev[i])
        target = latents[n - 1 - i : n - i].float()
        with torch.no_grad(), denoiser.controlled():  # ε_c once per step
            eps_cond = denoiser.conditional(z, t, alpha, cond)
        result.unet_calls += 1

        current = current.map(lambda x: x.detach().clone().requires_grad_(True))  # Adam steps in place
        leaves = current.tensors()
        optimizer = torch.optim.Adam(leaves, lr=nti.lr * (1.0 - i / 100.0))
        threshold = nti.early_stop + i * nti.early_stop_growth
        updates = 0
        for _ in range(nti.inner_steps):
            eps_uncond = denoiser.unconditional(z, t, alpha, current)
            z_prev = ddim_step(z, guided_noise(eps_uncond, eps_cond, guidance), alpha, alpha_prev)
            loss = F.mse_loss(z_prev, target)
            grads = torch.autograd.grad(loss, leaves)  # ∅'s gradient only: no model weight grads
            for leaf, grad in zip(leaves, grads):
                leaf.grad = grad
            optimizer.step()
            updates += 1
            result.unet_calls += 1
            if loss.item() < threshold:  # checked after the update (SPEC §3, the reference's order)
                break
        with torch.no_grad():  # advance z̄ with the final ∅_i
            eps_uncond = denoiser.unconditional(z, t, alpha, current)
            z_prev = ddim_step(z, guided_noise(eps_uncond, eps_cond, guidance), alpha, alpha_prev)
        result.unet_calls += 1
        stored.append(current.detach().map(torch.clone))
        result.losses.append(F.mse_loss(z_prev, target).item())
        result.inner_steps.append(updates)
        z = z_prev
        bar.set_postfix(loss=f"{result.losses[-1]:.2e}", updates=updates)
    result.nulls = Conditioning.stack(stored) if stored else null.detach().float()[:0]
    return result


@torch.no_grad()
def direct_offsets(
    denoiser: GuidedDenoiser,
    latents: torch.Tensor,
    cond: Conditioning,
    null: Conditioning,
    schedule: DDIMSchedule,
    guidance: float = 7.5,
    progress: bool = True,
    batch_steps: int = DIRECT_BATCH_STEPS,
) -> torch.Tensor:
    """Direct Inversion's per-step offsets (SPEC §3; PnPInversion `offset_calculate`). Returns (N, C, h, w).

    Walking down from z*_N with ∅ = `null` and guidance w (spatial control on the conditional rows, as in
    the edit's source branch): z_rec = DDIM_step(CFG(ε_∅, ε_c, w), t, z*_t), offset_i = z*_{t−1} − z_rec,
    and the walk continues from z*_{t−1}. Since every step starts from the stored trajectory, the steps do
    not depend on each other: `batch_steps` of them share one model call (one guided pass per step, batched).
    """
    n = trajectory_steps(latents, schedule)
    offsets = []
    bar = tqdm(total=n, desc="direct inversion", disable=not progress, leave=False)
    with denoiser.controlled():
        for first in range(0, n, batch_steps):
            steps = list(range(first, min(first + batch_steps, n)))
            rows = len(steps)
            z = latents[[n - i for i in steps]].float()  # z*_t of each step, (rows, C, h, w)
            alpha = schedule.alphas[steps].float().view(-1, 1, 1, 1).to(z.device)
            alpha_prev = schedule.alphas_prev[steps].float().view(-1, 1, 1, 1).to(z.device)
            eps = denoiser.guided(z, schedule.timesteps[steps], alpha, cond.float().expand(rows),
                                  null.float().expand(rows), guidance)
            offsets.append(latents[[n - 1 - i for i in steps]].float() - ddim_step(z, eps, alpha, alpha_prev))
            bar.update(rows)
    bar.close()
    return torch.cat(offsets)


@dataclass
class Inversion:
    """A real image's inversion: everything the editor needs to retrace (and edit) the image.

    Denoising z_T with the prompt and ∅_i (:meth:`null`) at `guidance` reproduces z0 (for `direct`:
    adding `offsets[i]` after every step, exactly).
    """

    method: str
    prompt: str  # the prompt of the conditional predictions (P̃, placeholder kept)
    image: torch.Tensor  # (1, 3, H, W) float32 in [-1, 1]: the preprocessed input
    z0: torch.Tensor  # (1, C, h, w) float32: VAE posterior mean × scaling factor
    latents: torch.Tensor  # (N+1, C, h, w) float32: DDIM inversion trajectory, row k = noise level k
    nulls: Conditioning  # N rows, or 1 row when the same for every step (float32)
    null_prompt: str | None  # prompt of ∅: "" for ddim/direct, P̃ for negative_prompt, None when optimised
    steps: int
    guidance: float
    offsets: torch.Tensor | None = None  # (N, C, h, w) float32: Direct Inversion's per-step offsets
    losses: list[float] = field(default_factory=list)
    inner_steps: list[int] = field(default_factory=list)
    seconds: float = 0.0
    key: str = ""
    cached: bool = False

    @property
    def z_T(self) -> torch.Tensor:
        return self.latents[-1:]

    @property
    def null_is_prompt(self) -> bool:
        """∅ is the source prompt's own conditioning (negative_prompt): its placeholders are spatially
        controlled in the unconditional rows too."""
        return self.null_prompt == self.prompt

    def null(self, i: int) -> Conditioning:
        """∅_i (one row, float32)."""
        return self.nulls[min(i, len(self.nulls) - 1)]

    def report(self, cache_dir: str | Path | None) -> dict[str, Any]:
        """How the source was inverted, for an edit's report."""
        return {
            "method": self.method,
            "cached": self.cached,
            "key": self.key,
            "cache_dir": str(cache_dir) if cache_dir else None,
            "compute_seconds": self.seconds,
            "steps": self.steps,
            "guidance": self.guidance,
            "updates": sum(self.inner_steps),
            "final_loss": self.losses[-1] if self.losses else None,
        }


def invert(
    model: ModelFamily,
    image: torch.Tensor,
    prompt: str,
    request: InversionRequest | None = None,
    control: SpatialControl | None = None,
    progress: bool = True,
) -> Inversion:
    """Invert `image` ((1, 3, H, W) in [-1, 1], sides multiples of the model's size multiple) under
    `prompt` (SPEC §3). `control`: spatial control of the prompt's placeholders (conditional row 0)."""
    request = InversionRequest() if request is None else request
    start = time.perf_counter()
    denoiser = GuidedDenoiser(model, control)

    # 1. Encode image and prompts
    with torch.no_grad():
        z0 = model.encode_image(image.to(model.device)).float()
        cond = model.encode_prompt([prompt]).float()
    schedule = DDIMSchedule.from_scheduler(model.scheduler, request.steps)

    # 2. DDIM inversion at guidance 1
    latents = ddim_inversion(denoiser, z0, cond, schedule, progress)

    # 3. Unconditional input per step (and Direct Inversion's offsets)
    losses: list[float] = []
    taken: list[int] = []
    offsets = None
    null_prompt = {"null_text": None, "negative_prompt": prompt}.get(request.method, "")
    with torch.no_grad():
        null = model.unconditional().float() if null_prompt != prompt else cond
    if request.method == "null_text":
        result = null_text_optimization(denoiser, latents, cond, null, schedule, request.guidance, request,
                                        progress)
        null, losses, taken = result.nulls, result.losses, result.inner_steps
    elif request.method == "direct":
        offsets = direct_offsets(denoiser, latents, cond, null, schedule, request.guidance, progress)

    return Inversion(
        method=request.method,
        prompt=prompt,
        image=image.detach().float().cpu(),
        z0=z0.cpu(),
        latents=latents.cpu(),
        nulls=null.detach().to("cpu"),
        null_prompt=null_prompt,
        steps=request.steps,
        guidance=request.guidance,
        offsets=None if offsets is None else offsets.cpu(),
        losses=losses,
        inner_steps=taken,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def reconstruct(
    model: ModelFamily, inversion: Inversion, control: SpatialControl | None = None, progress: bool = False
) -> torch.Tensor:
    """Denoise z_T with the inversion's prompt and ∅_i at its guidance (and Direct Inversion's offsets):
    the reconstructed z0 (1, C, h, w), through the editing loop with the source branch alone.

    `control` (the inversion's spatial control) applies to the conditional row; for negative_prompt, give
    it `unconditional` columns too, exactly as in the edit's source branch.
    """
    device = model.device
    run = DenoisingRun(
        sampler=DDIMSampler(DDIMSchedule.from_scheduler(model.scheduler, inversion.steps)),
        latents=inversion.z_T.to(device).float(),
        cond=model.encode_prompt([inversion.prompt]).float(),
        uncond=lambda i: inversion.null(i).to(device),
        guidance=torch.tensor([float(inversion.guidance)]),
        controller=control if control is not None else SpatialControl(),
        source_row=0,
        target_rows=[],
        hooks=[OffsetHook(inversion.offsets)] if inversion.offsets is not None else [],
    )
    return denoise(model, run, [ProgressHook(inversion.steps, "reconstruction", progress)]).latents
