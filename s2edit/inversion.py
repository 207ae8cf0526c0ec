"""Inversion of a real image into Stable Diffusion's DDIM trajectory (SPEC §3), cached on disk.

Four methods share one interface (:func:`invert` → :class:`Inversion`):

- ``null_text`` (Null-text Inversion, Mokady et al. 2023): DDIM inversion at guidance 1, then one null
  embedding ∅_i per denoising step, optimised so that classifier-free guidance at the editing scale w
  retraces the inversion trajectory.
- ``direct`` (Direct Inversion, Ju et al. ICLR 2024 "PnP Inversion"): ∅ := embedding of "", and one
  guided pass down the inversion trajectory stores per-step offsets z*_{t−1} − DDIM_step(z*_t); the edit
  adds them to the source branch only, which then retraces the trajectory exactly.
- ``negative_prompt`` (Miyake et al. 2023): ∅_i := embedding of the source prompt, no optimisation.
- ``ddim``: plain DDIM inversion; ∅_i := embedding of "" (the baseline that drifts at w > 1).

All inversion math (DDIM steps, losses, the optimised embedding) runs in float32 whatever the UNet's
dtype (float32 or bfloat16; float16 is refused: the optimisation does not converge in it).
A :class:`~s2edit.attention.SpatialControl` of the prompt's placeholder tokens (S2Edit Eq. 3) can be
active for every conditional prediction, so that the edit's source branch, which runs with it,
retraces the same trajectory.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from editkit.errors import InputError
from editkit.files import atomic_path
from s2edit.attention import ColumnMask, SpatialControl
from s2edit.diffusion import DDIMSampler, DDIMSchedule, ddim_step, guided_noise, predict_noise
from s2edit.engine import DenoisingRun, OffsetHook, ProgressHook, denoise
from s2edit.settings import NullTextSettings

METHODS = ("null_text", "direct", "negative_prompt", "ddim")
GUIDED_METHODS = ("null_text", "direct")  # methods whose result depends on the guidance scale w
CACHE_FORMAT = "s2edit-inversion"
CACHE_VERSION = 2  # 2: null-text early stop after the update (SPEC §3), direct offsets
DIRECT_BATCH_STEPS = 5  # Direct Inversion: steps per UNet call (10 rows); independent of each other
STALE_TEMP_SECONDS = 60  # a cache temp file this old belongs to no running save: a killed run left it
CACHE_KEY_CHARS = 20  # hex characters of the key's sha256 used in cache file names

PlaceholderMask = tuple[int, torch.Tensor]  # (token position in the prompt, (H, W) mask in [0, 1])


def trajectory_steps(latents: torch.Tensor, schedule: DDIMSchedule) -> int:
    """N, the steps of `schedule`, after checking that `latents` is its N + 1 inversion latents."""
    n = len(schedule)
    if latents.shape[0] != n + 1:
        raise ValueError(f"expected {n + 1} inversion latents for {n} steps, got {latents.shape[0]}")
    return n


def _columns(masks: Sequence[PlaceholderMask], rows: Sequence[int]) -> list[ColumnMask]:
    return [ColumnMask(row, token, mask) for row in rows for token, mask in masks]


# ----------------------------------------------------------------------------------------- inversion


@torch.no_grad()
def ddim_inversion(
    unet: torch.nn.Module,
    z0: torch.Tensor,
    prompt_embeds: torch.Tensor,
    schedule: DDIMSchedule,
    placeholder_masks: Sequence[PlaceholderMask] = (),
    renormalize: bool = False,
    progress: bool = True,
) -> torch.Tensor:
    """DDIM inversion at guidance 1 (conditional prediction only): z0 → z_N. Returns (N+1, C, h, w).

    Row k of the result is the latent at noise level k (row 0 = z0, row N = z_T); the step into level
    k+1 evaluates the UNet at the target timestep (the usual inversion approximation; SPEC §3).
    """
    columns = _columns(placeholder_masks, rows=[0])
    z = z0.float()
    latents = [z]
    n = len(schedule)
    for k in tqdm(range(n - 1, -1, -1), desc="DDIM inversion", disable=not progress, leave=False):
        alpha_from, alpha_to = float(schedule.alphas_prev[k]), float(schedule.alphas[k])
        t = schedule.timesteps[k]
        kind = schedule.prediction_type
        eps = predict_noise(unet, z, t, prompt_embeds, alpha_from, kind, columns, renormalize)
        z = ddim_step(z, eps, alpha_from, alpha_to)
        latents.append(z)
    return torch.cat(latents)


DEFAULT_NTI = NullTextSettings()  # SPEC §3 defaults


@dataclass
class NullTextResult:
    null_embeddings: torch.Tensor  # (N, L, D) float32: ∅_i for denoising step i
    losses: list[float]  # loss of the stored ∅_i, per denoising step
    inner_steps: list[int]  # Adam updates made per denoising step
    unet_calls: int  # UNet evaluations (rows), for the benchmark


def null_text_optimization(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    null_embeds: torch.Tensor,
    schedule: DDIMSchedule,
    guidance: float = 7.5,
    nti: NullTextSettings = DEFAULT_NTI,
    placeholder_masks: Sequence[PlaceholderMask] = (),
    renormalize: bool = False,
    progress: bool = True,
) -> NullTextResult:
    """Per-step optimisation of the null embedding (Null-text Inversion; SPEC §3).

    For denoising step i (t from noisy to clean), starting from the previous step's ∅ (step 0: the
    embedding of ""): Adam with nti.lr·(1 − i/100), at most `nti.inner_steps` updates of ∅ on
    MSE(DDIM_step(ε_∅ + w(ε_c − ε_∅), t, z̄_t), z_{t−1}). As the reference, each inner step computes the
    loss, takes the Adam step, and THEN stops if that loss was < nti.early_stop + i·nti.early_stop_growth,
    so every timestep keeps at least one update. ∅_i is the embedding after the last update; z̄ advances
    with it, and the loss of that advance is the one reported.

    Cost per step with k updates: one conditional prediction (no grad, computed once), k
    forward+backward passes of the ∅ row and one forward of it (the advance); the conditional row is
    never recomputed.
    """
    if next(unet.parameters()).dtype == torch.float16:
        raise ValueError("null-text optimisation does not converge in float16: use fp32 or bf16 weights")
    n = trajectory_steps(latents, schedule)
    cond_columns = _columns(placeholder_masks, rows=[0])
    kind = schedule.prediction_type
    null = null_embeds.detach().float().clone()
    z = latents[n : n + 1].float()
    result = NullTextResult(torch.empty(0), [], [], 0)
    stored: list[torch.Tensor] = []
    bar = tqdm(range(n), desc="null-text inversion", disable=not progress, leave=False)
    for i in bar:
        t = schedule.timesteps[i]
        alpha, alpha_prev = float(schedule.alphas[i]), float(schedule.alphas_prev[i])
        target = latents[n - 1 - i : n - i].float()
        with torch.no_grad():  # ε_c once per step
            eps_cond = predict_noise(unet, z, t, prompt_embeds, alpha, kind, cond_columns, renormalize)
        result.unet_calls += 1

        null = null.detach().clone().requires_grad_(True)  # Adam updates in place: a fresh leaf
        optimizer = torch.optim.Adam([null], lr=nti.lr * (1.0 - i / 100.0))
        threshold = nti.early_stop + i * nti.early_stop_growth
        updates = 0
        for _ in range(nti.inner_steps):
            eps_uncond = predict_noise(unet, z, t, null, alpha, kind)
            z_prev = ddim_step(z, guided_noise(eps_uncond, eps_cond, guidance), alpha, alpha_prev)
            loss = F.mse_loss(z_prev, target)
            (null.grad,) = torch.autograd.grad(loss, [null])  # ∅'s gradient only: no UNet weight grads
            optimizer.step()
            updates += 1
            result.unet_calls += 1
            if loss.item() < threshold:  # checked after the update (SPEC §3, the reference's order)
                break
        with torch.no_grad():  # advance z̄ with the final ∅_i
            eps_uncond = predict_noise(unet, z, t, null, alpha, kind)
            z_prev = ddim_step(z, guided_noise(eps_uncond, eps_cond, guidance), alpha, alpha_prev)
        result.unet_calls += 1
        stored.append(null.detach()[0].clone())
        result.losses.append(F.mse_loss(z_prev, target).item())
        result.inner_steps.append(updates)
        z = z_prev
        bar.set_postfix(loss=f"{result.losses[-1]:.2e}", updates=updates)
    result.null_embeddings = torch.stack(stored) if stored else null_embeds.new_zeros(0)
    return result


@torch.no_grad()
def direct_offsets(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    null_embeds: torch.Tensor,
    schedule: DDIMSchedule,
    guidance: float = 7.5,
    placeholder_masks: Sequence[PlaceholderMask] = (),
    renormalize: bool = False,
    progress: bool = True,
    batch_steps: int = DIRECT_BATCH_STEPS,
) -> torch.Tensor:
    """Direct Inversion's per-step offsets (SPEC §3; PnPInversion `offset_calculate`). Returns (N, C, h, w).

    Walking down from z*_N with ∅ = `null_embeds` and guidance w (spatial control on the conditional
    rows, as in the edit's source branch): z_rec = DDIM_step(CFG(ε_∅, ε_c, w), t, z*_t),
    offset_i = z*_{t−1} − z_rec, and the walk continues from z*_{t−1}. Since every step starts from the
    stored trajectory, the steps do not depend on each other: `batch_steps` of them share one UNet call
    (one guided pass per step, batched).
    """
    n = trajectory_steps(latents, schedule)
    offsets = []
    bar = tqdm(total=n, desc="direct inversion", disable=not progress, leave=False)
    for first in range(0, n, batch_steps):
        steps = list(range(first, min(first + batch_steps, n)))
        rows = len(steps)
        z = latents[[n - i for i in steps]].float()  # z*_t of each step, (rows, C, h, w)
        t = schedule.timesteps[steps].repeat(2)
        alpha = schedule.alphas[steps].float().view(-1, 1, 1, 1).to(z.device)
        alpha_prev = schedule.alphas_prev[steps].float().view(-1, 1, 1, 1).to(z.device)
        embeds = torch.cat([null_embeds.float(), prompt_embeds.float()]).repeat_interleave(rows, dim=0)
        columns = _columns(placeholder_masks, rows=range(rows, 2 * rows))  # the conditional rows
        eps = predict_noise(unet, torch.cat([z, z]), t, embeds, alpha.repeat(2, 1, 1, 1),
                            schedule.prediction_type, columns, renormalize)
        reconstructed = ddim_step(z, guided_noise(eps[:rows], eps[rows:], guidance), alpha, alpha_prev)
        offsets.append(latents[[n - 1 - i for i in steps]].float() - reconstructed)
        bar.update(rows)
    bar.close()
    return torch.cat(offsets)


@dataclass
class Inversion:
    """A real image's inversion: everything the editor needs to retrace (and edit) the image.

    Denoising z_T with the prompt and ∅_i (:meth:`null_embedding`) at `guidance` reproduces z0 (for
    `direct`: adding `offsets[i]` after every step, exactly).
    """

    method: str
    prompt: str  # the prompt of the conditional predictions (P̃, placeholder kept)
    image: torch.Tensor  # (1, 3, H, W) float32 in [-1, 1]: the preprocessed input
    z0: torch.Tensor  # (1, C, h, w) float32: VAE posterior mean × scaling factor
    latents: torch.Tensor  # (N+1, C, h, w) float32: DDIM inversion trajectory, row k = noise level k
    null_embeddings: torch.Tensor  # (N, L, D), or (1, L, D) when the same for every step
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
        """∅ is the source prompt's own embedding (negative_prompt): its placeholders are spatially
        controlled in the unconditional rows too."""
        return self.null_prompt == self.prompt

    def null_embedding(self, i: int) -> torch.Tensor:
        """∅_i as (1, L, D) float32."""
        return self.null_embeddings[min(i, len(self.null_embeddings) - 1)].unsqueeze(0)


def invert(
    sd: Any,
    image: torch.Tensor,
    prompt: str,
    method: str = "null_text",
    steps: int = 50,
    guidance: float = 7.5,
    nti: NullTextSettings = DEFAULT_NTI,
    placeholder_masks: Sequence[PlaceholderMask] = (),
    renormalize: bool = False,
    progress: bool = True,
) -> Inversion:
    """Invert `image` ((1, 3, H, W) in [-1, 1], sides multiples of 64) under `prompt` (SPEC §3).

    `sd` is an :class:`s2edit.models.StableDiffusion` (unet, scheduler, encode_prompt, encode_image).
    `placeholder_masks` are (token position in `prompt`, mask) pairs of spatial control.
    """
    # 1. Check inputs
    if method not in METHODS:
        raise InputError(f"inversion method '{method}' must be one of {', '.join(METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps={steps!r} must be a positive number of DDIM steps")
    start = time.perf_counter()

    # 2. Encode image and prompts
    with torch.no_grad():
        z0 = sd.encode_image(image.to(sd.device)).float()
        prompt_embeds = sd.encode_prompt([prompt]).float()
    schedule = DDIMSchedule.from_scheduler(sd.scheduler, steps)

    # 3. DDIM inversion at guidance 1
    latents = ddim_inversion(sd.unet, z0, prompt_embeds, schedule, placeholder_masks, renormalize, progress)

    # 4. Unconditional embeddings per step (and Direct Inversion's offsets)
    losses: list[float] = []
    taken: list[int] = []
    offsets = None
    if method == "null_text":
        with torch.no_grad():
            empty = sd.encode_prompt([""]).float()
        result = null_text_optimization(
            sd.unet,
            latents,
            prompt_embeds,
            empty,
            schedule,
            guidance,
            nti,
            placeholder_masks,
            renormalize,
            progress,
        )
        null_embeddings, null_prompt = result.null_embeddings, None
        losses, taken = result.losses, result.inner_steps
    else:
        null_prompt = prompt if method == "negative_prompt" else ""
        with torch.no_grad():
            null_embeddings = sd.encode_prompt([null_prompt]).float()
        if method == "direct":
            offsets = direct_offsets(
                sd.unet, latents, prompt_embeds, null_embeddings, schedule, guidance,
                placeholder_masks, renormalize, progress,
            )

    return Inversion(
        method=method,
        prompt=prompt,
        image=image.detach().float().cpu(),
        z0=z0.cpu(),
        latents=latents.cpu(),
        null_embeddings=null_embeddings.cpu(),
        null_prompt=null_prompt,
        steps=steps,
        guidance=guidance,
        offsets=None if offsets is None else offsets.cpu(),
        losses=losses,
        inner_steps=taken,
        seconds=time.perf_counter() - start,
    )


# ----------------------------------------------------------------------------------------- reconstruction


@torch.no_grad()
def reconstruct(
    sd: Any,
    inversion: Inversion,
    placeholder_masks: Sequence[PlaceholderMask] = (),
    renormalize: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Denoise z_T with the inversion's prompt and ∅_i at its guidance (and Direct Inversion's offsets):
    the reconstructed z0 (1, C, h, w), through the editing loop with the source branch alone.

    Spatial control applies to the conditional row, and to the unconditional row too when ∅ is the
    embedding of the prompt itself (negative_prompt), exactly as in the edit's source branch.
    """
    device = sd.device
    rows = [0, 1] if inversion.null_is_prompt else [1]
    run = DenoisingRun(
        sampler=DDIMSampler(DDIMSchedule.from_scheduler(sd.scheduler, inversion.steps)),
        latents=inversion.z_T.to(device).float(),
        cond=sd.encode_prompt([inversion.prompt]).float(),
        uncond=lambda i: inversion.null_embedding(i).to(device),
        guidance=torch.tensor([float(inversion.guidance)]),
        controller=SpatialControl(_columns(placeholder_masks, rows), renormalize),
        source_row=0,
        target_rows=[],
        hooks=[OffsetHook(inversion.offsets)] if inversion.offsets is not None else [],
    )
    return denoise(sd.unet, run, [ProgressHook(inversion.steps, "reconstruction", progress)]).latents


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1], computed on [0, 1] (peak 1)."""

    def unit(x: torch.Tensor) -> torch.Tensor:
        return (x.detach().float().cpu().clamp(-1, 1) + 1) / 2

    mse = F.mse_loss(unit(image), unit(reference))
    return float("inf") if mse == 0 else float(-10.0 * torch.log10(mse))


# ----------------------------------------------------------------------------------------- cache


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and values (on CPU)."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)}|{data.dtype}|".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """A cheap fingerprint of model weights: per tensor, its name, shape, dtype, sum and sum of squares.

    One float64 reduction per tensor (no hashing of gigabytes); any fine-tuning changes it. Use the
    export manifest's fingerprint instead when there is one.
    """
    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            stats = torch.stack([tensor.double().sum(), tensor.double().square().sum()]).tolist()
            digest.update(
                f"{index}.{name}|{tuple(tensor.shape)}|{tensor.dtype}|{stats[0]!r}|{stats[1]!r};".encode()
            )
    return digest.hexdigest()


def inversion_key(
    image: torch.Tensor,
    prompt: str,
    method: str,
    steps: int,
    guidance: float,
    weights: str,
    dtype: torch.dtype,
    nti: NullTextSettings = DEFAULT_NTI,
    placeholder_masks: Sequence[PlaceholderMask] = (),
    renormalize: bool = False,
    scheduler_config: dict | None = None,
) -> dict[str, Any]:
    """Everything the inversion depends on, as a JSON-able dict (hashes for tensors and weights)."""
    key: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "image_sha256": tensor_sha256(image.float()),
        "image_size": list(image.shape[-2:]),
        "prompt": prompt,
        "method": method,
        "steps": steps,
        "guidance": float(guidance) if method in GUIDED_METHODS else None,  # null-text and direct use w
        "weights": weights,
        "dtype": str(dtype).removeprefix("torch."),
        "spatial_control": [[token, tensor_sha256(mask.float())] for token, mask in placeholder_masks],
        "renormalize": renormalize if placeholder_masks else None,
        "scheduler": {
            k: scheduler_config.get(k)
            for k in (
                "beta_start",
                "beta_end",
                "beta_schedule",
                "num_train_timesteps",
                "prediction_type",
                "set_alpha_to_one",
                "steps_offset",
                "timestep_spacing",
            )
        }
        if scheduler_config
        else None,
    }
    if method == "null_text":
        key["nti"] = asdict(nti)
    return key


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_paths(cache_dir: str | Path, key: dict[str, Any]) -> tuple[Path, Path]:
    """(tensors .safetensors, keys .json) of the cache entry for `key`."""
    stem = Path(cache_dir) / f"inversion-{key_digest(key)[:CACHE_KEY_CHARS]}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_inversion(inversion: Inversion, cache_dir: str | Path, key: dict[str, Any]) -> Path:
    """Write the cache entry atomically: tensors first, then the JSON (which marks the entry complete)."""
    tensors_path, json_path = cache_paths(cache_dir, key)
    tensors = {
        "image": inversion.image,
        "z0": inversion.z0,
        "latents": inversion.latents,
        "null_embeddings": inversion.null_embeddings,
    }
    if inversion.offsets is not None:
        tensors["offsets"] = inversion.offsets
    with atomic_path(tensors_path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    record = {
        "key": key,
        "digest": key_digest(key),
        "method": inversion.method,
        "prompt": inversion.prompt,
        "null_prompt": inversion.null_prompt,
        "steps": inversion.steps,
        "guidance": inversion.guidance,
        "losses": inversion.losses,
        "inner_steps": inversion.inner_steps,
        "seconds": inversion.seconds,
        "tensors": tensors_path.name,
    }
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return json_path


def _invalid_entry(inversion: Inversion, key: dict[str, Any]) -> str | None:
    """Why a loaded cache entry cannot be trusted (None: it is valid): shapes, dtypes, finite values."""
    n, (height, width) = inversion.steps, key["image_size"]
    image, z0, latents, nulls = inversion.image, inversion.z0, inversion.latents, inversion.null_embeddings
    expected_nulls = n if inversion.method == "null_text" else 1
    offsets = inversion.offsets
    checks = [
        (image.shape == (1, 3, height, width), f"image of shape {tuple(image.shape)}"),
        (z0.dim() == 4 and z0.shape[0] == 1, f"z0 of shape {tuple(z0.shape)}"),
        (latents.shape == (n + 1, *z0.shape[1:]), f"latents of shape {tuple(latents.shape)}"),
        (nulls.dim() == 3 and nulls.shape[0] == expected_nulls, f"null embeddings of {tuple(nulls.shape)}"),
        (inversion.method == key["method"] and inversion.steps == key["steps"], "settings not as keyed"),
        ((offsets is not None) == (inversion.method == "direct"), "offsets missing or unexpected"),
        (offsets is None or offsets.shape == (n, *z0.shape[1:]), "offsets of the wrong shape"),
    ]
    for ok, problem in checks:
        if not ok:
            return problem
    tensors = {"image": image, "z0": z0, "latents": latents, "null embeddings": nulls, "offsets": offsets}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.dtype != torch.float32:
            return f"{name} of dtype {tensor.dtype}"
        if not bool(torch.isfinite(tensor).all()):
            return f"non-finite values in the {name}"
    return None


def load_inversion(cache_dir: str | Path, key: dict[str, Any]) -> Inversion | None:
    """The cached inversion for exactly `key`, or None (missing or stale entry).

    Raises ValueError naming the problem for an entry that exists but is corrupt (unreadable files,
    wrong shapes or dtypes, NaN or infinite values), so the caller can replace it.
    """
    tensors_path, json_path = cache_paths(cache_dir, key)
    if not (json_path.is_file() and tensors_path.is_file()):
        return None
    try:
        record = json.loads(json_path.read_text())
        if record.get("key") != json.loads(json.dumps(key)):  # digest collision or stale format
            return None
        tensors = load_file(str(tensors_path))
        inversion = Inversion(
            method=record["method"],
            prompt=record["prompt"],
            image=tensors["image"],
            z0=tensors["z0"],
            latents=tensors["latents"],
            null_embeddings=tensors["null_embeddings"],
            null_prompt=record["null_prompt"],
            steps=int(record["steps"]),
            guidance=float(record["guidance"]),
            offsets=tensors.get("offsets"),
            losses=[float(x) for x in record["losses"]],
            inner_steps=[int(x) for x in record["inner_steps"]],
            seconds=float(record["seconds"]),
            key=record["digest"],
            cached=True,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as error:
        reason = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(f"unreadable ({type(error).__name__}: {reason})") from None
    problem = _invalid_entry(inversion, key)
    if problem is not None:
        raise ValueError(problem)
    return inversion


def remove_stale_temporaries(cache_dir: str | Path, older_than_s: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete cache temp files (`.inversion-….tmp`) that a killed run left behind; a save in progress
    holds its temp file for milliseconds, so only files older than `older_than_s` are touched."""
    removed = []
    now = time.time()
    for path in Path(cache_dir).glob(".inversion-*.tmp"):
        try:
            if now - path.stat().st_mtime > older_than_s:
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


def load_or_invert(
    sd: Any,
    image: torch.Tensor,
    prompt: str,
    cache_dir: str | Path | None,
    weights: str,
    method: str = "null_text",
    steps: int = 50,
    guidance: float = 7.5,
    nti: NullTextSettings = DEFAULT_NTI,
    placeholder_masks: Sequence[PlaceholderMask] = (),
    renormalize: bool = False,
    progress: bool = True,
) -> Inversion:
    """:func:`invert`, reusing `cache_dir`'s entry when every input is the same (`Inversion.cached`).

    `weights` fingerprints the model weights (export manifest, or :func:`weights_fingerprint`).
    `cache_dir=None` disables the cache. A corrupt entry is recomputed and replaced, with one warning.
    """
    key = inversion_key(
        image,
        prompt,
        method,
        steps,
        guidance,
        weights,
        next(sd.unet.parameters()).dtype,
        nti,
        placeholder_masks,
        renormalize,
        dict(sd.scheduler.config),
    )
    if cache_dir is not None and Path(cache_dir).is_dir():
        remove_stale_temporaries(cache_dir)
        try:
            cached = load_inversion(cache_dir, key)
        except ValueError as problem:
            warnings.warn(
                f"inversion cache entry {cache_paths(cache_dir, key)[0].name} is corrupt ({problem}): "
                "recomputing and replacing it",
                stacklevel=2,
            )
            cached = None
        if cached is not None:
            return cached
    inversion = invert(
        sd, image, prompt, method, steps, guidance, nti, placeholder_masks, renormalize, progress
    )
    inversion.key = key_digest(key)
    if cache_dir is not None:
        try:
            save_inversion(inversion, cache_dir, key)
        except OSError as err:  # a read-only checkpoint folder must not cost the user the inversion
            warnings.warn(f"could not cache the inversion in '{cache_dir}': {err}", stacklevel=2)
    return inversion
