"""Word maps from the joint attention of flow transformers (SPEC §11, for the §6 masks).

In a joint-attention block the image queries attend over the keys of BOTH streams, softmax over
[image; text] (SD3's `JointAttnProcessor2_0` concatenates image first, then text). The image→text block of
that softmax, (image tokens × text tokens), is what the UNet families' cross-attention maps are: column j
says how much each image token reads text token j. A word's map is the sum of the columns of its tokens;
rows of the block sum to the text share of each softmax row (not to 1). :class:`JointMapStore` reads the
block beside the model's own processors (their outputs are untouched), averaged over heads, summed over
the joint blocks and the steps it is active in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def joint_probs(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """The joint softmax of the image queries, (B, heads, N_img, N_img + L): keys [image; text], with the
    block's own projections and q/k norms (SD3's joint attention)."""
    batch = hidden_states.shape[0]
    heads = attn.heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)

    query, key = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    text_key = split(attn.add_k_proj(encoder_hidden_states))
    if attn.norm_added_k is not None:
        text_key = attn.norm_added_k(text_key)
    keys = torch.cat([key, text_key], dim=2)
    scores = (query.float() @ keys.float().transpose(-1, -2)) * query.shape[-1] ** -0.5
    return scores.softmax(dim=-1)


def image_text_block(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor
                     ) -> torch.Tensor:
    """(B, N_img, L): the image→text block of the joint softmax, averaged over heads."""
    probs = joint_probs(attn, hidden_states, encoder_hidden_states)
    return probs[..., hidden_states.shape[1]:].mean(dim=1)


class _Reader:
    """Calls the block's own processor, and hands the image→text block of the rows asked for to the store."""

    def __init__(self, original: Any, store: JointMapStore) -> None:
        self.original, self.store = original, store

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if encoder_hidden_states is not None and self.store.active:
            rows = self.store.rows if self.store.rows is not None else slice(None)
            with torch.no_grad():
                self.store.add(image_text_block(attn, hidden_states[rows], encoder_hidden_states[rows]))
        return self.original(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


class JointMapStore:
    """A running sum of the image→text blocks of every joint block (see the module docstring).

    `rows`: the batch rows to read (e.g. the conditional target rows), None = all; `active` can be switched
    per step. `average()` is the mean over the calls read, (rows, N_img, L)."""

    def __init__(self, rows: Sequence[int] | None = None) -> None:
        self.rows = list(rows) if rows is not None else None
        self.active = True
        self.total: torch.Tensor | None = None
        self.calls = 0

    def add(self, block: torch.Tensor) -> None:
        block = block.detach().float()
        self.total = block if self.total is None else self.total + block
        self.calls += 1

    def average(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("no joint attention was read")
        return self.total / self.calls

    @contextlib.contextmanager
    def reading(self, transformer: torch.nn.Module) -> Iterator[JointMapStore]:
        """Read the joint blocks of `transformer` (SD3: every `transformer_blocks` block) while inside."""
        blocks = list(getattr(transformer, "transformer_blocks", []))
        originals = [block.attn.processor for block in blocks]
        try:
            for block, original in zip(blocks, originals):
                block.attn.set_processor(_Reader(original, self))
            yield self
        finally:
            for block, original in zip(blocks, originals):
                block.attn.set_processor(original)


def word_map(block: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """(rows, N_img) map of a word: the sum of its token columns of the image→text block."""
    if not positions:
        raise ValueError("a word needs at least one token position")
    return block[..., list(positions)].sum(dim=-1)
