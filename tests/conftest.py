"""Shared test fixtures."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from s2edit.export import ExportManifest, ExportToken, base_model_probe, write_export
from s2edit.models import StableDiffusion
from s2edit.tokenizer import add_placeholder_token

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "examples" / "chelsea.png"

TokenSpec = tuple[str, str, str]  # (placeholder, prompt P̃ with it, initialiser word)


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
