"""Word maps from the joint attention of flow transformers (SPEC §11, for the §6 masks).

In a joint-attention block the image queries attend over the keys of BOTH streams: SD3's
`JointAttnProcessor2_0` takes the softmax over [image; text] keys, FLUX's double-stream `FluxAttnProcessor`
over [text; image] keys after rotary position embedding of queries and keys. The image→text block of that
softmax, (image tokens × text tokens), is what the UNet families' cross-attention maps are: column j says
how much each image token reads text token j. A word's map is the sum of the columns of its tokens; rows
of the block sum to the text share of each softmax row (not to 1). :class:`JointMapStore` reads the block
beside the model's own processors (their outputs are untouched), averaged over heads, summed over the
joint / double-stream blocks (FLUX's single-stream blocks **[choice]**: not read) and the steps it is
active in. The softmax is taken over chunks of image queries, so its memory stays bounded at 1024².
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

QUERY_CHUNK = 1024  # image queries per softmax: bounds the (B, heads, chunk, N_img + L) scores in memory

# (attn, image hidden states, text hidden states, processor kwargs) → (B, N_img, L) image→text block
BlockReader = Callable[..., torch.Tensor]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads·D) → (B, heads, N, D)."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _text_share(query: torch.Tensor, keys: torch.Tensor, text: slice) -> torch.Tensor:
    """(B, N_q, L): the `text` key columns of softmax(q kᵀ / √d) per query, averaged over heads, computed
    over chunks of queries. query (B, H, N_q, D), keys (B, H, N_k, D)."""
    keys = keys.float()
    scale = query.shape[-1] ** -0.5
    blocks = [((chunk.float() @ keys.transpose(-1, -2)) * scale).softmax(dim=-1)[..., text].mean(dim=1)
              for chunk in query.split(QUERY_CHUNK, dim=2)]
    return torch.cat(blocks, dim=1)


def joint_probs(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """SD3: the joint softmax of the image queries, (B, heads, N_img, N_img + L): keys [image; text], with
    the block's own projections and q/k norms."""
    query, keys = _sd3_query_keys(attn, hidden_states, encoder_hidden_states)
    return ((query.float() @ keys.float().transpose(-1, -2)) * query.shape[-1] ** -0.5).softmax(dim=-1)


def _sd3_query_keys(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    query, key = _heads(attn.to_q(hidden_states), attn.heads), _heads(attn.to_k(hidden_states), attn.heads)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    text_key = _heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
    if attn.norm_added_k is not None:
        text_key = attn.norm_added_k(text_key)
    return query, torch.cat([key, text_key], dim=2)


def image_text_block(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     **_: Any) -> torch.Tensor:
    """SD3: (B, N_img, L), the image→text block of the joint softmax, averaged over heads."""
    query, keys = _sd3_query_keys(attn, hidden_states, encoder_hidden_states)
    return _text_share(query, keys, slice(hidden_states.shape[1], None))


def _flux_query_keys(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX double-stream: image queries (B, H, N_img, D) and keys [text; image] (B, H, L + N_img, D), as
    `FluxAttnProcessor` makes them (q/k norms per stream, then rotary embedding over the joint sequence)."""
    from diffusers.models.embeddings import apply_rotary_emb

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (B, N, H·D) → (B, N, H, D), FLUX's layout
        return x.unflatten(-1, (-1, attn.head_dim))

    query = attn.norm_q(tokens(attn.to_q(hidden_states)))
    keys = torch.cat([attn.norm_added_k(tokens(attn.add_k_proj(encoder_hidden_states))),
                      attn.norm_k(tokens(attn.to_k(hidden_states)))], dim=1)
    if image_rotary_emb is not None:
        text = encoder_hidden_states.shape[1]
        image_emb = tuple(part[text:] for part in image_rotary_emb)  # the image queries' positions
        query = apply_rotary_emb(query, image_emb, sequence_dim=1)
        keys = apply_rotary_emb(keys, image_rotary_emb, sequence_dim=1)
    return query.transpose(1, 2), keys.transpose(1, 2)


def flux_joint_probs(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """FLUX double-stream: the joint softmax of the image queries, (B, heads, N_img, L + N_img), keys
    [text; image]."""
    query, keys = _flux_query_keys(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
    return ((query.float() @ keys.float().transpose(-1, -2)) * query.shape[-1] ** -0.5).softmax(dim=-1)


def flux_image_text_block(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                          image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None, **_: Any
                          ) -> torch.Tensor:
    """FLUX double-stream: (B, N_img, L), the image→text block of the joint softmax, averaged over heads."""
    query, keys = _flux_query_keys(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
    return _text_share(query, keys, slice(0, encoder_hidden_states.shape[1]))


class _Reader:
    """Calls the block's own processor, and hands the image→text block of the rows asked for to the store.
    Its parameters are named: diffusers drops keyword arguments a processor's signature does not name
    (FLUX's `image_rotary_emb` would be lost behind a bare **kwargs)."""

    def __init__(self, original: Any, store: JointMapStore, read: BlockReader) -> None:
        self.original, self.store, self.read = original, store, read

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, **kwargs: Any
                 ) -> Any:
        if image_rotary_emb is not None:
            kwargs["image_rotary_emb"] = image_rotary_emb
        if encoder_hidden_states is not None and self.store.active:
            rows = self.store.rows if self.store.rows is not None else slice(None)
            with torch.no_grad():
                self.store.add(self.read(attn, hidden_states[rows], encoder_hidden_states[rows], **kwargs))
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


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
    def reading(self, transformer: torch.nn.Module, read: BlockReader = image_text_block
                ) -> Iterator[JointMapStore]:
        """Read the joint blocks of `transformer` (its `transformer_blocks`: SD3's joint blocks, FLUX's
        double-stream blocks) with `read` (the family's block reader) while inside."""
        blocks = list(getattr(transformer, "transformer_blocks", []))
        originals = [block.attn.processor for block in blocks]
        try:
            for block, original in zip(blocks, originals):
                block.attn.set_processor(_Reader(original, self, read))
            yield self
        finally:
            for block, original in zip(blocks, originals):
                block.attn.set_processor(original)


def word_map(block: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """(rows, N_img) map of a word: the sum of its token columns of the image→text block."""
    if not positions:
        raise ValueError("a word needs at least one token position")
    return block[..., list(positions)].sum(dim=-1)
