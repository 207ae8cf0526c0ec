"""Attention control: explicit-probability processors, a per-run attention store, spatial control.

The UNet's behaviour is changed only by swapping processors with `unet.set_attn_processor(dict)`
(STYLE: never patch `forward`). :class:`AttentionProcessor` mirrors diffusers' plain `AttnProcessor` but
hands the softmaxed probabilities to a controller before multiplying with the values. All state that
spans layers and steps lives in controller objects (`step`, `reset()`), never in globals.

A controller acts at two points of each routed layer: :meth:`AttentionController.edit_qkv` may swap
queries, keys and values between rows before the scores (mutual self-attention, SPEC §9), and
``__call__`` may edit the softmaxed probabilities (spatial control, Prompt-to-Prompt, stores). A layer
whose probabilities no controller reads or edits runs torch's fused attention on the (edited) q, k, v;
a layer no controller wants at all keeps its original processor (:func:`controlled_attention`).

Terms used throughout:
- *level* of a layer: how much smaller its query grid is than the latent (1, 2, 4, 8). SD v1 at 512²
  has a 64×64 latent, so its "16×16 layers" (S2Edit, P2P, SPL) are the level-4 layers (the model
  family's `mask_level`). Which layers exist, and of which kind, is the family's to say
  (:class:`AttentionLayer`; :func:`unet_attention_layers` for diffusers' UNets).
- *rows*: the denoiser batch index. With classifier-free guidance the batch is [unconditional…,
  conditional…]; whoever calls the denoiser tells the controllers which rows are conditional
  (`AttentionController.conditional_rows`); controllers address rows relative to the conditional half.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

CROSS_SUFFIX = "attn2.processor"  # diffusers' BasicTransformerBlock: attn1 = self, attn2 = cross


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer of a denoiser: cross- or self-attention, and its level."""

    is_cross: bool
    level: int  # latent size / query grid size


@dataclass(frozen=True)
class AttentionCall:
    """What a controller knows about the attention layer it is called from."""

    name: str  # processor key, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    is_cross: bool
    heads: int
    size: tuple[int, int]  # (h, w) of the query grid
    level: int  # latent size / query grid size


def layer_level(name: str, num_blocks: int) -> int:
    """Level of an attention processor from its key in a UNet with `num_blocks` down (and up) blocks:
    down block k → 2^k, the mid block → 2^(n−1), up block k → 2^(n−1−k)."""
    part = name.split(".")
    if part[0] == "down_blocks":
        return 2 ** int(part[1])
    if part[0] == "up_blocks":
        return 2 ** (num_blocks - 1 - int(part[1]))
    return 2 ** (num_blocks - 1)


def unet_attention_layers(unet: torch.nn.Module) -> dict[str, AttentionLayer]:
    """The attention layers of a diffusers `UNet2DConditionModel`, by processor key: `attn2` layers are
    cross-attention, `attn1` self-attention; the level follows from the block (:func:`layer_level`)."""
    num_blocks = len(unet.config.block_out_channels)
    return {
        name: AttentionLayer(name.endswith(CROSS_SUFFIX), layer_level(name, num_blocks))
        for name in unet.attn_processors
    }


def grid_size(queries: int, latent_size: tuple[int, int]) -> tuple[tuple[int, int], int]:
    """((h, w), level) of a layer with `queries` tokens inside a UNet run on a latent of `latent_size`."""
    height, width = latent_size
    level = round(math.sqrt(height * width / queries))
    h, w = math.ceil(height / level), math.ceil(width / level)
    if h * w != queries:
        raise ValueError(f"{queries} queries do not tile a {height}x{width} latent")
    return (h, w), level


class AttentionController:
    """Base controller: sees the probabilities of every controlled layer; returns them (maybe edited).

    `step` is set by whoever drives the UNet (training step or denoising index); `latent_size` is set
    automatically by :func:`controlled_attention` before each UNet forward. Subclasses say which layers
    they need (:meth:`wants`) and whether they read the probabilities of a call (:meth:`reads_probs`);
    the base controller reads every layer.
    """

    def __init__(self) -> None:
        self.step = 0
        self.latent_size: tuple[int, int] | None = None
        self.conditional_rows: slice | None = None  # None: every row is conditional (no CFG batch)

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        return probs

    def edit_qkv(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values (B·heads, N, d) before the scores; returned unchanged by default."""
        return query, key, value

    def wants(self, is_cross: bool, level: int) -> bool:
        """Whether layers of this kind must be routed through the controller at all."""
        return True

    def reads_probs(self, call: AttentionCall) -> bool:
        """Whether `__call__` must see this call's probabilities (else fused attention is used)."""
        return True

    def reset(self) -> None:
        self.step = 0

    def rows(self, batch: int) -> range:
        """Batch rows this controller acts on: the conditional ones (the second half under CFG)."""
        return range(batch)[self.conditional_rows] if self.conditional_rows is not None else range(batch)

    def unconditional_rows(self, batch: int) -> list[int]:
        """The other rows of the batch: the unconditional half under CFG."""
        conditional = set(self.rows(batch))
        return [row for row in range(batch) if row not in conditional]


class ControllerChain(AttentionController):
    """Apply several controllers in order (e.g. spatial control, then P2P editing, then a store)."""

    def __init__(self, controllers: Sequence[AttentionController]) -> None:
        super().__init__()
        self.controllers = list(controllers)

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        for controller in self.controllers:
            if controller.reads_probs(call):
                probs = controller(probs, call)
        return probs

    def edit_qkv(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        for controller in self.controllers:
            query, key, value = controller.edit_qkv(query, key, value, call)
        return query, key, value

    def wants(self, is_cross: bool, level: int) -> bool:
        return any(controller.wants(is_cross, level) for controller in self.controllers)

    def reads_probs(self, call: AttentionCall) -> bool:
        return any(controller.reads_probs(call) for controller in self.controllers)

    def reset(self) -> None:
        super().reset()
        for controller in self.controllers:
            controller.reset()

    def __setattr__(self, name: str, value: object) -> None:
        # step, latent_size and conditional_rows are shared state: forward them to every member
        super().__setattr__(name, value)
        if name in ("step", "latent_size", "conditional_rows") and "controllers" in self.__dict__:
            for controller in self.controllers:
                setattr(controller, name, value)


class AttentionProcessor:
    """diffusers `AttnProcessor` with explicit probabilities handed to a controller (P2P-style hook)."""

    def __init__(self, controller: AttentionController, name: str) -> None:
        self.controller = controller
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch, sequence_length, _ = (encoder_hidden_states if is_cross else hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))  # (B·heads, N, d)

        latent_size = self.controller.latent_size
        if latent_size is None:
            raise RuntimeError("attention controller has no latent size: use controlled_attention(...)")
        size, level = grid_size(query.shape[1], latent_size)
        call = AttentionCall(self.name, is_cross, attn.heads, size, level)
        query, key, value = self.controller.edit_qkv(query, key, value, call)
        if self.controller.reads_probs(call):
            probs = attn.get_attention_scores(query, key, attention_mask)  # (B·heads, Q, K)
            probs = self.controller(probs, call)
            hidden_states = torch.bmm(probs.to(value.dtype), value)
        else:  # nobody reads these probabilities: torch's fused kernel, same math
            mask = None if attention_mask is None else attention_mask.to(query.dtype)
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=attn.scale
            )
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def heads_view(probs: torch.Tensor, heads: int) -> torch.Tensor:
    """(B·heads, Q, K) → (B, heads, Q, K) view (diffusers' head_to_batch_dim is batch-major)."""
    return probs.view(-1, heads, *probs.shape[1:])


@contextlib.contextmanager
def controlled_attention(
    network: torch.nn.Module,
    layers: Mapping[str, AttentionLayer],
    controller: AttentionController,
    select: Callable[[str], bool] | None = None,
) -> Iterator[AttentionController]:
    """Route the selected attention layers of `network` (a denoiser whose `layers` are given by its
    model family) through `controller`.

    Default selection: the layers the controller :meth:`~AttentionController.wants` (by kind and level).
    Other layers keep their processors (the fast fused default). On exit the original processors are
    restored, also after an error.
    """
    original = dict(network.attn_processors)
    if select is None:

        def select(name: str) -> bool:
            return controller.wants(layers[name].is_cross, layers[name].level)

    processors = {n: AttentionProcessor(controller, n) if select(n) else p for n, p in original.items()}

    def record_latent_size(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        controller.latent_size = tuple(sample.shape[-2:])

    network.set_attn_processor(processors)
    hook = network.register_forward_pre_hook(record_latent_size, with_kwargs=True)
    try:
        yield controller
    finally:
        hook.remove()
        network.set_attn_processor(original)


# ----------------------------------------------------------------------------------------- controllers


class AttentionStore(AttentionController):
    """Accumulate head-averaged cross-attention maps of chosen levels over layers and steps.

    Every reader wants the mean over the layers of one level and over all steps recorded so far (masks,
    LocalBlend, saved word maps, L_attn), so the store keeps ONE running sum per level, (rows, h, w, K),
    added to in call order (step by step, layer by layer): its memory grows with neither the steps nor
    the layers (:func:`stored_map_bytes`). A layer called again within the same step (gradient
    checkpointing recomputes the forward) is counted once. With `detach=False` the graph is kept (for
    attention losses in training); otherwise maps are detached and summed in float32.
    """

    def __init__(self, levels: Sequence[int], detach: bool = True) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.detach = detach
        self.sums: dict[int, torch.Tensor] = {}  # level → Σ over recorded (step, layer) of (rows, h, w, K)
        self.counts: dict[int, int] = {}  # level → recorded (step, layer) pairs
        self._recorded: set[tuple[int, str]] = set()

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if call.is_cross and call.level in self.levels:
            # the same operations on a recomputation, which checkpointing requires; added once
            maps = heads_view(probs, call.heads)
            maps = maps[list(self.rows(maps.shape[0]))].mean(dim=1)  # (rows, Q, K)
            if (self.step, call.name) not in self._recorded:
                self.add(call.level, maps.reshape(maps.shape[0], *call.size, -1))
                self._recorded.add((self.step, call.name))
        return probs

    def add(self, level: int, maps: torch.Tensor) -> None:
        """Record one layer's head-averaged maps (rows, h, w, K) at `level`."""
        if self.detach:
            maps = maps.detach().float()
        total = self.sums.get(level)
        self.sums[level] = maps if total is None else total + maps
        self.counts[level] = self.counts.get(level, 0) + 1

    def wants(self, is_cross: bool, level: int) -> bool:
        return is_cross and level in self.levels

    def reads_probs(self, call: AttentionCall) -> bool:
        return call.is_cross and call.level in self.levels

    def reset(self) -> None:
        super().reset()
        self.sums, self.counts, self._recorded = {}, {}, set()

    def average(self, level: int | None = None) -> torch.Tensor:
        """Mean over heads (already), the layers of `level` (default: the first stored level; down and
        up) and every step recorded since the last reset: (rows, h, w, K)."""
        level = self.levels[0] if level is None else level
        if level not in self.sums:
            raise ValueError(f"no stored cross-attention maps at level {level} (stored levels {self.levels})")
        return self.sums[level] / self.counts[level]

    def stored_bytes(self) -> int:
        """Bytes of maps the store holds now."""
        return sum(t.numel() * t.element_size() for t in self.sums.values())


def stored_map_bytes(layers: Mapping[str, AttentionLayer], latent_size: tuple[int, int],
                     levels: Sequence[int], rows: int, tokens: int, bytes_per_value: int = 4) -> int:
    """What an :class:`AttentionStore` of `levels` holds for a run on a latent of `latent_size` with `rows`
    conditional rows and `tokens` text tokens: one (rows, h, w, tokens) sum per level that has
    cross-attention layers, whatever the number of layers and steps."""
    height, width = latent_size
    present = {layer.level for layer in layers.values() if layer.is_cross and layer.level in levels}
    return sum(rows * math.ceil(height / level) * math.ceil(width / level) * tokens * bytes_per_value
               for level in present)


@dataclass
class ColumnMask:
    """Spatial control of one token column in conditional rows: A*[:, :, token] = A[:, :, token] ⊙ mask."""

    row: int | None  # conditional row (0 = the first; with no CFG batch, the batch row); None: every one
    token: int  # position in the prompt's token sequence
    mask: torch.Tensor  # (H, W) in [0, 1] at any resolution; resized (nearest) to each layer


class SpatialControl(AttentionController):
    """S2Edit Eq. 3: multiply a placeholder's cross-attention probabilities by the object mask.

    `columns` address conditional rows; `unconditional` columns ((token, mask) pairs) apply to every
    unconditional row, for an unconditional input that holds the placeholder too (negative-prompt
    inversion: ∅ = P̃). No renormalisation by default (SPEC §2 [choice]); `renormalize=True` rescales each
    edited row of probabilities to sum to one again.
    """

    def __init__(
        self,
        columns: Sequence[ColumnMask] = (),
        renormalize: bool = False,
        unconditional: Sequence[tuple[int, torch.Tensor]] = (),
    ) -> None:
        super().__init__()
        self.columns = list(columns)
        self.unconditional = list(unconditional)
        self.renormalize = renormalize
        self._resized: dict[tuple[int, tuple[int, int]], torch.Tensor] = {}

    def _mask_at(self, mask: torch.Tensor, size: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        key = (id(mask), size)
        if key not in self._resized:
            self._resized[key] = F.interpolate(mask.float()[None, None], size=size, mode="nearest").flatten()
        return self._resized[key].to(device=like.device, dtype=like.dtype)

    @property
    def active(self) -> bool:
        return bool(self.columns or self.unconditional)

    def wants(self, is_cross: bool, level: int) -> bool:
        return is_cross and self.active

    def reads_probs(self, call: AttentionCall) -> bool:
        return call.is_cross and self.active

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if not call.is_cross or not self.active:
            return probs
        maps = heads_view(probs, call.heads)  # (B, heads, Q, K)
        conditional = list(self.rows(maps.shape[0]))
        placed = [(row, c.token, c.mask) for c in self.columns
                  for row in (conditional if c.row is None else conditional[c.row : c.row + 1])]
        placed += [(row, token, mask) for row in self.unconditional_rows(maps.shape[0])
                   for token, mask in self.unconditional]
        scale = torch.ones_like(maps[:, :1])  # (B, 1, Q, K)
        for row, token, mask in placed:
            scale[row, 0, :, token] = self._mask_at(mask, call.size, probs)
        maps = maps * scale  # out of place: keeps autograd intact in training
        if self.renormalize:
            maps = maps / maps.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
        return maps.reshape(probs.shape)
