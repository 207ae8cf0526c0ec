"""Model-free image operations: box/guided filters, SPL/CPL losses, refine, mask upsampling (SPEC §5, §6)."""

from spl.filters import box_filter, box_sum, guided_filter
from spl.losses import SPLReference, color_preservation_loss, structure_preservation_loss
from spl.masks import binarize_attention, upsample_mask
from spl.refine import refine

__all__ = [
    "SPLReference",
    "binarize_attention",
    "box_filter",
    "box_sum",
    "color_preservation_loss",
    "guided_filter",
    "refine",
    "structure_preservation_loss",
    "upsample_mask",
]
