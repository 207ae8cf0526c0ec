"""What an edit produces (:class:`EditResult`), its metrics, and the images every front end writes of it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from editkit.files import slug
from editkit.images import psnr
from s2edit.core.engine import RefineSettings, preservation_losses


@dataclass
class EditResult:
    """Everything one edit produces. Images are (B, 3, H, W) in [-1, 1] on the CPU."""

    method: str  # "p2p", "virtual", …
    prompts: list[str]  # [source, *targets]
    images: torch.Tensor  # (n, 3, H, W) the edits, post-processed when asked
    raw_images: torch.Tensor  # (n, 3, H, W) the decoded edits before post-processing
    reconstruction: torch.Tensor  # (1, 3, H, W) the source branch (p2p: the inversion's reconstruction)
    source: torch.Tensor  # (1, 3, H, W) the input image (preprocessed)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # name → (H, W) in [0, 1]
    attention_maps: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per prompt: word → (h, w)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    latents: torch.Tensor | None = None  # (1 + n, C, h, w) final latents [source, *targets]
    settings: dict[str, Any] = field(default_factory=dict)  # the typed settings used, as plain values
    inversion: dict[str, Any] | None = None  # how the source was inverted (p2p), None without inversion
    object_masks: dict[str, torch.Tensor] = field(default_factory=dict)  # placeholder → its object mask
    inversion_seconds: float = 0.0  # wall time of the inversion this edit started from (cache hit: the load)

    def to_report(self) -> dict[str, Any]:
        """The edit's part of infer.py's `report.json` (JSON-ready): method, prompts, settings, inversion,
        metrics and timings."""
        return {
            "method": self.method,
            "source": self.prompts[0],
            "targets": list(self.prompts[1:]),
            "edit_settings": self.settings,
            "inversion": self.inversion,
            "metrics": self.metrics,
            "timings": self.timings,
        }

    def output_masks(self) -> dict[str, torch.Tensor]:
        """Every mask to save, at the image size: `object_<placeholder>` (spatial control, nearest) and the
        preservation masks of SPEC §6."""
        size = tuple(self.source.shape[-2:])
        masks = {f"object_{slug(text)}": mask for text, mask in self.object_masks.items()}
        masks.update(self.masks)
        return {name: F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0]
                for name, m in masks.items()}

    def attention_images(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per prompt row ("source", "target_0", …), each word's map upsampled (bilinear) to the image
        size."""
        size = tuple(self.source.shape[-2:])
        return {
            "source" if row == 0 else f"target_{row - 1}": {
                word: F.interpolate(attention[None, None].float(), size=size, mode="bilinear")[0, 0]
                for word, attention in maps.items()
            }
            for row, maps in enumerate(self.attention_maps)
        }


def edit_metrics(
    targets: Sequence[str],
    source_image: torch.Tensor,
    round_trip: torch.Tensor,
    reconstruction: torch.Tensor,
    raw: torch.Tensor,
    final: torch.Tensor,
    settings: RefineSettings,
    loss_masks: tuple[torch.Tensor | None, torch.Tensor | None],
) -> dict[str, Any]:
    """PSNR of the source branch and of the VAE round trip against the input, and per target the SPL (and
    CPL, when optimised) loss against the input before and after post-processing (SPEC §5)."""
    before = preservation_losses(source_image, raw, settings, *loss_masks)
    after = preservation_losses(source_image, final, settings, *loss_masks)
    return {
        "reconstruction_psnr": float(psnr(reconstruction, source_image)),
        "vae_round_trip_psnr": float(psnr(round_trip, source_image)),
        "targets": [
            {
                "prompt": target,
                "spl_loss_before": before["spl"][k],
                "spl_loss_after": after["spl"][k],
                "cpl_loss_before": before["cpl"][k],
                "cpl_loss_after": after["cpl"][k],
            }
            for k, target in enumerate(targets)
        ],
    }
