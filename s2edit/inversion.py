"""Inversion of a real image into Stable Diffusion's DDIM trajectory (SPEC §3), cached on disk.

Three methods share one interface (:func:`invert` → :class:`Inversion`):

- ``null_text`` (Null-text Inversion, Mokady et al. 2023): DDIM inversion at guidance 1, then one null
  embedding ∅_i per denoising step, optimised so that classifier-free guidance at the editing scale w
  retraces the inversion trajectory.
- ``negative_prompt`` (Miyake et al. 2023): ∅_i := embedding of the source prompt, no optimisation.
- ``ddim``: plain DDIM inversion; ∅_i := embedding of "" (the baseline that drifts at w > 1).

All inversion math (DDIM steps, losses, the optimised embedding) runs in float32 whatever the UNet's
dtype (float32 or bfloat16; float16 is refused: the optimisation does not converge in it).
A :class:`~s2edit.attention.SpatialControl` of the prompt's placeholder tokens (S2Edit Eq. 3) can be
active for every conditional prediction, so that the edit's source branch, which runs with it,
retraces the same trajectory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
import warnings
from collections.abc import Iterator, Sequence
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
from s2edit.attention import ColumnMask, SpatialControl, controlled_attention, cross_attention_layers

METHODS = ("null_text", "negative_prompt", "ddim")
CACHE_FORMAT = "s2edit-inversion"
CACHE_VERSION = 1
CACHE_KEY_CHARS = 20  # hex characters of the key's sha256 used in cache file names

PlaceholderMask = tuple[int, torch.Tensor]  # (token position in the prompt, (H, W) mask in [0, 1])


# ----------------------------------------------------------------------------------------- DDIM math


@dataclass(frozen=True)
class DDIMSchedule:
    """The discrete DDIM chain of one run: timesteps from noisy to clean and their ᾱ values.

    Step i goes from ``timesteps[i]`` (ᾱ = ``alphas[i]``) to the next, less noisy timestep
    (ᾱ = ``alphas_prev[i]``; after the last step the scheduler's ``final_alpha_cumprod``).
    """

    timesteps: torch.Tensor  # (N,) long, descending
    alphas: torch.Tensor  # (N,) float64
    alphas_prev: torch.Tensor  # (N,) float64
    prediction_type: str

    @classmethod
    def from_scheduler(cls, scheduler: Any, steps: int) -> DDIMSchedule:
        """Read the chain from a diffusers DDIM scheduler (``set_timesteps(steps)`` is called on it)."""
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps.detach().cpu().long()
        alphas_cumprod = scheduler.alphas_cumprod.detach().cpu().double()
        final = torch.as_tensor(scheduler.final_alpha_cumprod).detach().cpu().double().reshape(1)
        alphas = alphas_cumprod[timesteps]
        alphas_prev = torch.cat([alphas[1:], final])
        return cls(timesteps, alphas, alphas_prev, scheduler.config.prediction_type)

    def __len__(self) -> int:
        return len(self.timesteps)


def to_epsilon(output: torch.Tensor, z: torch.Tensor, alpha: float, prediction_type: str) -> torch.Tensor:
    """The UNet's output as a noise prediction ε (v-prediction models: ε = √ᾱ·v + √(1−ᾱ)·z)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return math.sqrt(alpha) * output + math.sqrt(1 - alpha) * z
    if prediction_type == "sample":
        return (z - math.sqrt(alpha) * output) / math.sqrt(1 - alpha)
    raise ValueError(f"unsupported scheduler prediction_type '{prediction_type}'")


def predicted_x0(z: torch.Tensor, eps: torch.Tensor, alpha: float) -> torch.Tensor:
    """x̂0 = (z_t − √(1−ᾱ_t)·ε) / √ᾱ_t (SPEC §3)."""
    return (z - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)


def ddim_step(z: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """Deterministic DDIM move from noise level ᾱ_from to ᾱ_to with the noise estimate ε (SPEC §3).

    Denoising uses (ᾱ_t, ᾱ_{t−Δ}); inversion the same formula with (ᾱ_{t−Δ}, ᾱ_t).
    """
    return math.sqrt(alpha_to) * predicted_x0(z, eps, alpha_from) + math.sqrt(1 - alpha_to) * eps


def guided_noise(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: ε_∅ + w·(ε_c − ε_∅)."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


@contextlib.contextmanager
def _spatial_control(
    unet: torch.nn.Module, columns: Sequence[ColumnMask], renormalize: bool
) -> Iterator[None]:
    """Spatial control of placeholder columns (cross-attention layers only) while inside, if any."""
    if not columns:
        yield
        return
    with controlled_attention(unet, SpatialControl(columns, renormalize), layers=cross_attention_layers):
        yield


def predict_noise(
    unet: torch.nn.Module,
    z: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    alpha: float,
    prediction_type: str,
    columns: Sequence[ColumnMask] = (),
    renormalize: bool = False,
) -> torch.Tensor:
    """ε̂(z, t, embeds) in float32; `z` (1 or B rows) is broadcast to the B rows of `embeds`.

    `columns` are spatial-control masks for rows of THIS batch. Gradients flow when enabled.
    """
    dtype = next(unet.parameters()).dtype
    if z.shape[0] != embeds.shape[0]:
        z = z.expand(embeds.shape[0], *z.shape[1:])
    with _spatial_control(unet, columns, renormalize):
        out = unet(z.to(dtype), t.to(z.device), encoder_hidden_states=embeds.to(dtype)).sample
    return to_epsilon(out.float(), z.float(), alpha, prediction_type)


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


@dataclass(frozen=True)
class NullTextSettings:
    """Null-text optimisation settings (SPEC §3): at most `inner_steps` Adam updates of ∅ per denoising
    step, learning rate lr·(1 − i/100), early stop once a loss is < early_stop + i·early_stop_growth."""

    inner_steps: int = 10
    lr: float = 1e-2
    early_stop: float = 1e-5
    early_stop_growth: float = 2e-5

    def __post_init__(self) -> None:
        if self.inner_steps < 0:
            raise InputError(f"nti inner_steps={self.inner_steps} must be >= 0")


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
    MSE(DDIM_step(ε_∅ + w(ε_c − ε_∅), t, z̄_t), z_{t−1}), stopping as soon as an evaluated loss is
    < nti.early_stop + i·nti.early_stop_growth. ∅_i is the last EVALUATED embedding (the one that met the
    threshold, or the one after the last update), so z̄ advances with exactly the move whose loss is
    reported, and that move is reused rather than recomputed.

    Cost per step with k updates: one conditional prediction (no grad, computed once), k
    forward+backward passes of the ∅ row and one last forward (the advance); the conditional row
    is never recomputed and there is no separate advance pass.
    """
    if next(unet.parameters()).dtype == torch.float16:
        raise ValueError("null-text optimisation does not converge in float16: use fp32 or bf16 weights")
    n = len(schedule)
    if latents.shape[0] != n + 1:
        raise ValueError(f"expected {n + 1} inversion latents for {n} steps, got {latents.shape[0]}")
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
        for update in range(nti.inner_steps + 1):
            last = update == nti.inner_steps  # budget spent: evaluate the final ∅ without a graph
            with torch.set_grad_enabled(not last):
                eps_uncond = predict_noise(unet, z, t, null, alpha, kind)
                z_prev = ddim_step(z, guided_noise(eps_uncond, eps_cond, guidance), alpha, alpha_prev)
                loss = F.mse_loss(z_prev, target)
            result.unet_calls += 1
            if last or loss.item() < threshold:
                break
            (null.grad,) = torch.autograd.grad(loss, [null])  # ∅'s gradient only: no UNet weight grads
            optimizer.step()
        stored.append(null.detach()[0].clone())
        result.losses.append(loss.item())
        result.inner_steps.append(update)
        z = z_prev.detach()
        bar.set_postfix(loss=f"{result.losses[-1]:.2e}", updates=update)
    result.null_embeddings = torch.stack(stored) if stored else null_embeds.new_zeros(0)
    return result


@dataclass
class Inversion:
    """A real image's inversion: everything the editor needs to retrace (and edit) the image.

    Denoising z_T with the prompt and ∅_i (:meth:`null_embedding`) at `guidance` reproduces z0.
    """

    method: str
    prompt: str  # the prompt of the conditional predictions (P̃, placeholder kept)
    image: torch.Tensor  # (1, 3, H, W) float32 in [-1, 1]: the preprocessed input
    z0: torch.Tensor  # (1, C, h, w) float32: VAE posterior mean × scaling factor
    latents: torch.Tensor  # (N+1, C, h, w) float32: DDIM inversion trajectory, row k = noise level k
    null_embeddings: torch.Tensor  # (N, L, D), or (1, L, D) when the same for every step
    null_prompt: str | None  # prompt of ∅: "" for ddim, P̃ for negative_prompt, None when optimised
    steps: int
    guidance: float
    losses: list[float] = field(default_factory=list)
    inner_steps: list[int] = field(default_factory=list)
    seconds: float = 0.0
    key: str = ""
    cached: bool = False

    @property
    def z_T(self) -> torch.Tensor:
        return self.latents[-1:]

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
        raise ValueError(f"inversion method must be one of {', '.join(METHODS)}; got '{method}'")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    start = time.perf_counter()

    # 2. Encode image and prompts
    with torch.no_grad():
        z0 = sd.encode_image(image.to(sd.device)).float()
        prompt_embeds = sd.encode_prompt([prompt]).float()
    schedule = DDIMSchedule.from_scheduler(sd.scheduler, steps)

    # 3. DDIM inversion at guidance 1
    latents = ddim_inversion(sd.unet, z0, prompt_embeds, schedule, placeholder_masks, renormalize, progress)

    # 4. Unconditional embeddings per step
    losses: list[float] = []
    taken: list[int] = []
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
    """Denoise z_T with the inversion's prompt and ∅_i at its guidance: the reconstructed z0 (1, C, h, w).

    Spatial control applies to the conditional row, and to the unconditional row too when ∅ is the
    embedding of the prompt itself (negative_prompt), exactly as in the edit's source branch.
    """
    schedule = DDIMSchedule.from_scheduler(sd.scheduler, inversion.steps)
    prompt_embeds = sd.encode_prompt([inversion.prompt]).float()
    rows = [0, 1] if inversion.null_prompt == inversion.prompt else [1]
    columns = _columns(placeholder_masks, rows)
    z = inversion.z_T.to(sd.device)
    for i in tqdm(range(len(schedule)), desc="reconstruction", disable=not progress, leave=False):
        alpha, alpha_prev = float(schedule.alphas[i]), float(schedule.alphas_prev[i])
        embeds = torch.cat([inversion.null_embedding(i).to(sd.device), prompt_embeds])
        eps = predict_noise(
            sd.unet, z, schedule.timesteps[i], embeds, alpha, schedule.prediction_type, columns, renormalize
        )
        z = ddim_step(z, guided_noise(eps[:1], eps[1:], inversion.guidance), alpha, alpha_prev)
    return z


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
        "guidance": float(guidance) if method == "null_text" else None,  # only NTI depends on w
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


def load_inversion(cache_dir: str | Path, key: dict[str, Any]) -> Inversion | None:
    """The cached inversion for exactly `key`, or None (missing, incomplete, corrupt or stale entry)."""
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
            steps=record["steps"],
            guidance=record["guidance"],
            losses=record["losses"],
            inner_steps=record["inner_steps"],
            seconds=record["seconds"],
            key=record["digest"],
            cached=True,
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None
    if inversion.latents.shape[0] != inversion.steps + 1:
        return None
    return inversion


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
    `cache_dir=None` disables the cache.
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
    if cache_dir is not None:
        cached = load_inversion(cache_dir, key)
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
