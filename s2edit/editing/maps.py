"""Attention maps and preservation masks of an edit, as plain functions (SPEC §4, §6).

The maps come from an :class:`~s2edit.core.attention.AttentionStore` of the run (conditional rows, the
"16×16" layers, maps as each layer computed them before any Prompt-to-Prompt injection), averaged over
layers, heads and the chosen steps: (rows, h, w, K).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from s2edit.core.attention import AttentionStore
from s2edit.core.settings import MaskSettings
from spl.masks import binarize_attention, upsample_mask

if TYPE_CHECKING:
    from s2edit.editing.plan import EditPlan

WORD_PATTERN = re.compile(r"\[[^\]\s]+\]|[\w'-]+")  # words of a prompt for attention maps; keeps "[I]"


def map_words(prompt: str) -> list[str]:
    """Distinct words of a prompt whose attention maps are saved (placeholders such as "[I]" kept whole)."""
    return list(dict.fromkeys(WORD_PATTERN.findall(prompt)))


def word_maps(maps: torch.Tensor, positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """(h, w, K) token maps → (words, h, w): each word's map is the sum of its tokens' columns."""
    return torch.stack([maps[..., list(p)].sum(dim=-1) for p in positions])


def attention_maps(
    maps: torch.Tensor, words: Sequence[Sequence[str]], positions: Sequence[Sequence[Sequence[int]]]
) -> list[dict[str, torch.Tensor]]:
    """Per prompt row, each word's map divided by its maximum: [{word: (h, w)}, …] on the CPU.

    maps: (rows, h, w, K); words[r] the words of row r and positions[r] their token positions."""
    result = []
    for row, (row_words, row_positions) in enumerate(zip(words, positions)):
        if not row_words:
            result.append({})
            continue
        per_word = word_maps(maps[row], row_positions)  # (words, h, w)
        peak = per_word.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(per_word.dtype).tiny)
        result.append({w: m.cpu() for w, m in zip(row_words, per_word / peak)})
    return result


def coarse_mask(maps: torch.Tensor, positions: Sequence[int], threshold: float) -> torch.Tensor:
    """The SPL app's rough mask of one row: every token column of the mask words divided by its own
    maximum, OR over tokens of (> threshold). maps: (h, w, K) → (h, w) of 0/1."""
    columns = maps[..., list(positions)].permute(2, 0, 1)  # (tokens, h, w)
    return binarize_attention(columns, threshold)


def preservation_masks(
    maps: torch.Tensor,
    source_positions: Sequence[int],
    target_positions: Sequence[Sequence[int]],
    source_image: torch.Tensor,
    target_guides: torch.Tensor,
    settings: MaskSettings,
) -> dict[str, torch.Tensor]:
    """Preservation masks of SPEC §6 at image size: "source", "target_k" and the final "mask_k".

    maps: (1 + n, h, w, K) rows [source, targets…]; `*_positions` the token positions of the mask words
    (empty: that side has no words); source_image (1, 3, H, W) guides the source mask, target_guides
    (n, 3, H, W) (the preview's edits) the target masks. Each side is upsampled ×2 per stage by the guided
    filter, then inverted on its own when asked; the final mask is max(source, target), a side without
    words contributing zeros. Returns (H, W) tensors in [0, 1].
    """
    size = tuple(source_image.shape[-2:])
    zeros = torch.zeros(size, device=source_image.device)
    masks: dict[str, torch.Tensor] = {}
    source_mask = zeros
    if source_positions:
        coarse = coarse_mask(maps[0], source_positions, settings.source_threshold)
        source_mask = upsample_mask(coarse, source_image, settings.radius, settings.eps)
        source_mask = 1.0 - source_mask if settings.source_invert else source_mask
        masks["source"] = source_mask
    for k, positions in enumerate(target_positions):
        target_mask = zeros
        if positions:
            coarse = coarse_mask(maps[k + 1], positions, settings.target_threshold)
            target_mask = upsample_mask(coarse, target_guides[k : k + 1], settings.radius, settings.eps)
            target_mask = 1.0 - target_mask if settings.target_invert else target_mask
            masks[f"target_{k}"] = target_mask
        masks[f"mask_{k}"] = torch.maximum(source_mask, target_mask)
    return masks


def loss_masks(masks: dict[str, torch.Tensor], n_targets: int) -> torch.Tensor:
    """The final masks of the targets as one (n, 1, H, W) batch for `spl.refine`."""
    return torch.stack([masks[f"mask_{k}"] for k in range(n_targets)])[:, None]


def plan_masks(plan: EditPlan, store: AttentionStore, source_image: torch.Tensor,
               target_guides: torch.Tensor) -> dict[str, torch.Tensor]:
    """SPEC §6 masks of an edit from a run's stored maps (every step so far) and the target guides
    (n, 3, H, W)."""
    maps = store.average()[: len(plan.prompts)]  # (1 + n, h, w, K)
    return preservation_masks(maps, plan.mask_source_positions, plan.mask_target_positions, source_image,
                              target_guides, plan.masks)


def loss_mask_pair(plan: EditPlan, masks: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(structure, color) loss masks (n, 1, H, W) of the preservation areas set to `masked`, else None."""
    if not masks:
        return None, None
    batch = loss_masks(masks, plan.n_targets)
    structure = batch if plan.spl.structure_area == "masked" else None
    color = batch if plan.spl.color_area == "masked" else None
    return structure, color
