"""Training data of the shapes model: rendered scenes as tensors, and the caption token tables."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer

from s2edit.core.tokenizer import word_token_indices
from s2edit.shapes.world import BACKGROUNDS, COLOURS, SHAPES, SceneSpec, caption, render


@dataclass(frozen=True)
class SceneTensors:
    """Rendered scenes: images (N, H, W, 3) uint8, coverage (N, H, W) float32, caption index (N,) long."""

    images: torch.Tensor
    coverage: torch.Tensor
    captions: torch.Tensor


def all_captions() -> list[str]:
    """Every caption of the world (held-out pairs included), in a fixed order: index = caption id."""
    return [caption(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def render_tensors(specs: list[SceneSpec]) -> SceneTensors:
    scenes = [render(spec) for spec in specs]
    index = {text: i for i, text in enumerate(all_captions())}
    return SceneTensors(
        images=torch.from_numpy(np.stack([s.image for s in scenes])),
        coverage=torch.from_numpy(np.stack([s.coverage for s in scenes])),
        captions=torch.tensor([index[s.caption] for s in scenes], dtype=torch.long),
    )


def images_to_model(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float in [−1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def model_to_images(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [−1, 1] → (B, H, W, 3) uint8 (clamped, rounded)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def pooled_coverage(coverage: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W) → (N, size, size): the object's share of each cell of a coarser grid (area mean)."""
    return F.adaptive_avg_pool2d(coverage.unsqueeze(1), size).squeeze(1)


@dataclass(frozen=True)
class CaptionTables:
    """Token ids (C, L) of every caption, the empty prompt's ids (L,), and per caption (C, L) bool masks
    of the colour + shape word tokens and of the background word's tokens."""

    ids: torch.Tensor
    empty_ids: torch.Tensor
    object_tokens: torch.Tensor
    background_tokens: torch.Tensor


def caption_tables(tokenizer: CLIPTokenizer) -> CaptionTables:
    captions = all_captions()
    length = tokenizer.model_max_length

    def ids(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=length, truncation=False,
                         return_tensors="pt").input_ids

    object_tokens = torch.zeros(len(captions), length, dtype=torch.bool)
    background_tokens = torch.zeros_like(object_tokens)
    for row, (colour, shape, background) in enumerate(
        (c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS
    ):
        text = captions[row]
        for word in (colour, shape):
            object_tokens[row, word_token_indices(tokenizer, text, word)] = True
        background_tokens[row, word_token_indices(tokenizer, text, background)] = True
    return CaptionTables(ids(captions), ids([""])[0], object_tokens, background_tokens)
