"""Shared test fixtures."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from s2edit.export import ExportManifest, ExportToken, base_model_probe, write_export
from s2edit.models import StableDiffusion, load_stable_diffusion
from s2edit.tokenizer import add_placeholder_token

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "examples" / "chelsea.png"

TokenSpec = tuple[str, str, str]  # (placeholder, prompt P̃ with it, initialiser word)

# A random UNet's ε̂ is ~10-Lipschitz in z (a trained one is ~1): its DDIM trajectories are chaotic, and
# float32 rounding differences between batch layouts grow ~20× per step. Damping the output layer makes
# ε̂ smooth like a trained model's, so reconstruction errors measure the algorithm, not the chaos.
OUTPUT_DAMPING = 0.1


@pytest.fixture(scope="session")
def tame_tiny_model() -> Callable[[], StableDiffusion]:
    """Factory: a fresh tiny model (seed 0) with its UNet output layer damped by OUTPUT_DAMPING."""

    def make() -> StableDiffusion:
        sd = load_stable_diffusion("tiny", seed=0)
        with torch.no_grad():
            sd.unet.conv_out.weight.mul_(OUTPUT_DAMPING)
            sd.unet.conv_out.bias.mul_(OUTPUT_DAMPING)
        return sd

    return make


@pytest.fixture(scope="session")
def tame_editor(tame_tiny_model):
    """An Editor on the damped tiny model (no placeholders, no cache, no progress bars)."""
    from s2edit.editing import Editor

    return Editor(tame_tiny_model(), weights="tiny-damped", progress=False)


@pytest.fixture(scope="session")
def chelsea_128(tame_editor) -> torch.Tensor:
    """examples/chelsea.png at 128² (the editing tests' working size), (1, 3, 128, 128) in [-1, 1]."""
    return tame_editor.load_image(IMAGE, 128)


@pytest.fixture(scope="session")
def make_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: an export folder as train.py writes it, for a tiny model `sd` (no training needed).

    `make_export(sd, tokens, masks, resolution=128)` adds each token of `tokens` to `sd` (initialised from
    its word), writes the export with `masks[i]` as token i's object mask, and returns the folder. The
    base probe is read before the tokens are added, so `sd` must be a freshly loaded base model (its
    UNet output may be scaled: the full-weight export stores it).
    """

    def make(
        sd: StableDiffusion, tokens: Sequence[TokenSpec], masks: Sequence[torch.Tensor], resolution: int = 128
    ) -> Path:
        probe = base_model_probe(sd)
        sha = hashlib.sha256(IMAGE.read_bytes()).hexdigest()
        exported = []
        for placeholder, prompt, word in tokens:
            token_id = add_placeholder_token(sd.tokenizer, sd.text_encoder, placeholder, word)
            source_prompt = prompt.replace(f"{placeholder} ", "")
            exported.append(
                ExportToken(placeholder, token_id, prompt, source_prompt, word, str(IMAGE), sha, "")
            )
        manifest = ExportManifest(
            base_model="tiny",
            method="full",
            resolution=resolution,
            tokens=exported,
            config={},
            base_probe=probe,
        )
        return write_export(tmp_path_factory.mktemp("ckpt"), sd, manifest, masks)

    return make
