"""Prompt-to-Prompt editing (SPEC §4): token alignment, attention injection, reweighting, LocalBlend.

The batch of conditional UNet rows is [source, target_1, …, target_n]. During the first steps of the
denoising loop each target takes the source's cross-attention maps (through a token mapping, so that
"a cat" → "a fluffy cat" keeps the cat where it was) and its self-attention maps (which carry the
layout). The unconditional half of a classifier-free-guidance batch is never touched. Every rule below
is prompt-to-prompt's (google/prompt-to-prompt, `seq_aligner.py`, `ptp_utils.py`, the notebook's
controllers), pinned by tests with hand-derived expectations:

- refine alignment: global alignment (gap 0, match +1, mismatch −1), traceback ties broken left, up,
  diagonal; target padding position p takes source position p;
- replace mapper: word by word while replaced words remain, then position p takes position p;
- cross-attention injection for steps i < int(cross_replace·(T+1)) (the per-word table has T+1 rows),
  self-attention for i < int(self_replace·T), in layers with at most (latent/2)² queries;
- reweighting scales the mapped source maps, so it acts only inside the injection;
- LocalBlend reads the maps summed over all steps so far and starts at step int(blend_start·T).

Driving it (one controller object holds every piece of cross-step state, STYLE habit 2)::

    p2p = build_p2p(tokenizer, source, targets, num_steps=T, blend_words=[["cat"], ["dog"]])
    store = AttentionStore()                                        # maps BEFORE the edit (SPEC §4)
    controller = ControllerChain([spatial_control, store, p2p])
    with controlled_attention(unet, controller):
        for i, t in enumerate(timesteps):
            controller.step = i
            controller.conditional_rows = slice(1 + n, 2 * (1 + n))  # batch [uncond…, cond…]
            ... UNet on the CFG batch, guidance, scheduler step → latents (1 + n, C, h, w)
            if p2p.local_blend is not None:
                latents = p2p.local_blend(latents, store, step=i)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from editkit.errors import InputError
from s2edit.attention import MASK_LEVEL, AttentionCall, AttentionController, AttentionStore, heads_view
from s2edit.tokenizer import token_ids, word_token_indices

MODES = ("refine", "replace")
NEW_TOKEN = -1  # refine mapping: a target token without a source partner keeps its own map
SELF_INJECTION_MIN_LEVEL = 2  # P2P injects self-attention only in layers with ≤ 32² queries at 512²
# (64² latent): those are the layers at least 2× coarser than the latent; the 64² ones hold too much
# texture and are left to the target.
BLEND_POOL = 3  # LocalBlend: 3×3 max-pool of the word maps (P2P)

_LEFT, _UP, _DIAGONAL = 1, 2, 3  # traceback moves of the global alignment


# ------------------------------------------------------------------------------------ token alignment


def global_alignment(
    source: Sequence[int], target: Sequence[int], gap: int = 0, match: int = 1, mismatch: int = -1
) -> list[int]:
    """Needleman–Wunsch alignment of two id sequences; for each target position, its source position.

    Returns a list as long as `target`: the aligned source index, or NEW_TOKEN (−1) where the target
    token is an insertion. As P2P's `seq_aligner`, each cell records ONE move, preferring left (a new
    target token), then up (a dropped source token), then diagonal, and the traceback follows those
    moves: a repeated token therefore pairs with its first candidate ("the the the cat" → "the cat"
    maps "the" to the first "the"). With gap 0 and mismatch −1 a diagonal is only taken on a match.
    """
    n, m = len(source), len(target)
    score = [[0] * (m + 1) for _ in range(n + 1)]  # (n+1, m+1)
    move = [[_LEFT] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        score[i][0] = i * gap
        move[i][0] = _UP
    for j in range(m + 1):
        score[0][j] = j * gap
    move[0] = [_LEFT] * (m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i][j - 1] + gap, score[i - 1][j] + gap
            diagonal = score[i - 1][j - 1] + (match if source[i - 1] == target[j - 1] else mismatch)
            best = max(left, up, diagonal)
            score[i][j] = best
            move[i][j] = _LEFT if best == left else _UP if best == up else _DIAGONAL

    mapping = [NEW_TOKEN] * m
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and move[i][j] == _DIAGONAL:
            i, j = i - 1, j - 1
            mapping[j] = i
        elif j > 0 and (i == 0 or move[i][j] == _LEFT):
            j -= 1  # target token j is new
        else:
            i -= 1  # source token i has no partner
    return mapping


def refine_mapping(
    source_ids: Sequence[int], target_ids: Sequence[int], context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """P2P `refine` mapping from unpadded token ids (start and end tokens included).

    Returns (index, alphas), both (context,): `index[t]` is the source position target position t takes
    its cross-attention map from (−1 for a new token), `alphas[t]` is 1 where mapped, 0 for new tokens.
    A target position p past the target's tokens (padding) takes source position p (P2P `get_mapper`).
    """
    aligned = global_alignment(source_ids, target_ids)
    index = torch.tensor(aligned + list(range(len(target_ids), context)), dtype=torch.long)  # (context,)
    return index, (index != NEW_TOKEN).float()


def replace_mapping(
    source_words: Sequence[Sequence[int]], target_words: Sequence[Sequence[int]], context: int
) -> torch.Tensor:
    """P2P `replace` mapper (context, context): `mapper[s, t]` = share of source column s given to target t.

    `*_words` are the token ids of each word (between the start and end tokens), with the same number of
    words on both sides. As P2P's `get_replacement_mapper_`: positions are walked from the start token;
    a replaced word maps one to one when both sides have as many tokens, else each of its source tokens
    is spread evenly over the target word's tokens; other positions map one to one (source i → target j,
    shifted by earlier uneven replacements) until the last replaced word, after which target position
    p takes source position p.
    """
    if len(source_words) != len(target_words):
        raise ValueError(f"{len(source_words)} source words but {len(target_words)} target words")
    source_length = 2 + sum(len(word) for word in source_words)  # with start and end tokens
    target_length = 2 + sum(len(word) for word in target_words)
    if max(source_length, target_length) > context:
        raise ValueError(f"prompts of {source_length} and {target_length} tokens exceed {context} tokens")
    replaced: list[tuple[int, int, int, int]] = []  # (source start, source count, target start, count)
    s = t = 1
    for source_word, target_word in zip(source_words, target_words):
        if list(source_word) != list(target_word):
            replaced.append((s, len(source_word), t, len(target_word)))
        s, t = s + len(source_word), t + len(target_word)

    mapper = torch.zeros(context, context)  # (source, target)
    i = j = done = 0
    while i < context and j < context:
        if done < len(replaced) and replaced[done][0] == i:
            _, source_count, _, target_count = replaced[done]
            sources, targets = slice(i, i + source_count), slice(j, j + target_count)
            if source_count == target_count:
                mapper[sources, targets] += torch.eye(source_count)
            else:
                mapper[sources, targets] = 1.0 / target_count
            i, j, done = i + source_count, j + target_count, done + 1
        else:
            mapper[i if done < len(replaced) else j, j] = 1.0
            i, j = i + 1, j + 1
    return mapper


def refine_mapped(
    source: torch.Tensor, target: torch.Tensor, index: torch.Tensor, alphas: torch.Tensor
) -> torch.Tensor:
    """P2P refine: the source maps (..., K) rearranged into the target's token order where a target token
    has a source partner (α = 1), the target's own maps for new tokens (α = 0): α·A_S[index] + (1 − α)·A_T."""
    alphas = alphas.to(target)
    return alphas * source[..., index.to(source.device)] + (1 - alphas) * target


def prompt_word_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[list[int]]:
    """Token ids of each whitespace-separated word of `prompt` (start/end tokens excluded)."""
    encoding = tokenizer(prompt, return_offsets_mapping=True, truncation=False)
    spans = [m.span() for m in re.finditer(r"\S+", prompt)]
    tokens = [(i, a, b) for i, (a, b) in zip(encoding.input_ids, encoding.offset_mapping) if b > a]
    return [[i for i, a, b in tokens if a < end and b > start] for start, end in spans]


# ------------------------------------------------------------------------------- per-word schedules


def injection_steps(fraction: float, rows: int) -> int:
    """P2P's step count: int(fraction · rows), Python's truncation exactly as the reference computes it
    (cross-attention: rows = T + 1, the alpha table's length; self-attention and LocalBlend: rows = T)."""
    return int(fraction * rows)


def _check_fraction(name: str, value: float, meaning: str = "a fraction of the denoising steps") -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise InputError(f"{name}={value!r} must be {meaning} in [0, 1]")


def _word_positions(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], word: str, option: str
) -> list[list[int]]:
    """Token positions of `word` in each prompt ([] where absent); refused when it is in none of them."""
    positions = []
    for prompt in prompts:
        try:
            positions.append(word_token_indices(tokenizer, prompt, word))
        except InputError:
            positions.append([])
    if not any(positions):
        shown = " | ".join(f"'{p}'" for p in prompts)
        raise InputError(f"{option} word '{word}' is in no target prompt ({shown}): use a word of one")
    return positions


def cross_replace_schedule(
    tokenizer: PreTrainedTokenizerBase,
    targets: Sequence[str],
    num_steps: int,
    cross_replace: float = 0.8,
    words: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """(T+1, targets, context) table: 1 where target token k takes the source's map at step i.

    As P2P's `get_time_words_attention_alpha`: every token is injected for i < int(cross_replace·(T+1));
    a word in `words` gets its own fraction instead (in each target prompt that contains it; a word in
    no target prompt is refused). Row i is read at step i; the last row is never reached.
    """
    _check_fraction("cross_replace", cross_replace)
    context = tokenizer.model_max_length
    rows = num_steps + 1
    schedule = torch.zeros(rows, len(targets), context)
    schedule[: injection_steps(cross_replace, rows)] = 1.0
    for word, fraction in (words or {}).items():
        _check_fraction(f"cross_replace_words['{word}']", fraction)
        for k, positions in enumerate(_word_positions(tokenizer, targets, word, "cross_replace_words")):
            schedule[:, k, positions] = 0.0
            schedule[: injection_steps(fraction, rows), k, positions] = 1.0
    return schedule


def reweight_table(
    tokenizer: PreTrainedTokenizerBase, targets: Sequence[str], reweight: Mapping[str, float] | None
) -> torch.Tensor | None:
    """(targets, context) factors of the injected source maps' columns (1 = unchanged)."""
    if not reweight:
        return None
    table = torch.ones(len(targets), tokenizer.model_max_length)
    for word, value in reweight.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"reweight['{word}']={value!r} must be a finite number")
        for k, positions in enumerate(_word_positions(tokenizer, targets, word, "reweight")):
            table[k, positions] = float(value)
    return table


# ------------------------------------------------------------------------------------ the controller


class PromptToPrompt(AttentionController):
    """Edits the target rows' attention from the source row's (conditional rows only).

    Args:
        num_steps: T, the number of denoising steps; `step` must stay in 0…T−1.
        cross_schedule: (T+1, targets, K) per-step, per-token injection switch (cross_replace_schedule).
        self_replace: fraction of the steps with self-attention injection (i < int(self_replace·T)).
        index: (targets, K) refine mapping (source position per target position, −1 new) with
        alphas: (targets, K) 1 where a target token has a source partner, 0 for new tokens; or
        mapper: (targets, K, K) replace mapping (`mapper[s, t]`); exactly one of index and mapper.
        reweight: (targets, K) factors of the mapped source maps (P2P `AttentionReweight`).
        local_blend: kept here for the denoising loop (`p2p.local_blend(latents, store, step)`).

    Per target k and step i, with own maps A_k, mapped source maps M_k = refine: α·A_S[index] + (1−α)·A_k,
    replace: A_S·mapper, times the reweight factors, and the time-word switch a_i:
    A_k ← a_i·M_k + (1 − a_i)·A_k.
    """

    def __init__(
        self,
        num_steps: int,
        cross_schedule: torch.Tensor,
        self_replace: float = 0.5,
        index: torch.Tensor | None = None,
        alphas: torch.Tensor | None = None,
        mapper: torch.Tensor | None = None,
        reweight: torch.Tensor | None = None,
        local_blend: LocalBlend | None = None,
    ) -> None:
        super().__init__()
        if (index is None) == (mapper is None) or (index is None) != (alphas is None):
            raise ValueError("give a refine index with its alphas, or a replace mapper")
        self.num_steps = num_steps
        self.cross_schedule = cross_schedule
        self.self_steps = injection_steps(self_replace, num_steps)
        self.index = index.clamp_min(0) if index is not None else None  # new tokens: α = 0 anyway
        self.alphas = alphas
        self.mapper = mapper
        self.reweight = reweight
        self.local_blend = local_blend

    @property
    def num_targets(self) -> int:
        return self.cross_schedule.shape[1]

    def wants(self, is_cross: bool, level: int) -> bool:
        return is_cross or (level >= SELF_INJECTION_MIN_LEVEL and self.self_steps > 0)

    def reads_probs(self, call: AttentionCall) -> bool:
        if call.is_cross:
            return bool(self.cross_schedule[self.step].any())
        return call.level >= SELF_INJECTION_MIN_LEVEL and self.step < self.self_steps

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if not 0 <= self.step < self.num_steps:
            raise ValueError(f"step {self.step} is outside the {self.num_steps} denoising steps of this edit")
        rows = list(self.rows(probs.shape[0] // call.heads))
        if len(rows) != 1 + self.num_targets:
            raise ValueError(f"{len(rows)} conditional rows for 1 source + {self.num_targets} target prompts")
        if call.is_cross:
            return self._edit_cross(probs, call, rows)
        if call.level >= SELF_INJECTION_MIN_LEVEL and self.step < self.self_steps:
            return self._inject_self(probs, call, rows)
        return probs

    def _mapped(self, source: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
        """The source maps (heads, Q, K) rearranged into target k's token order, reweighted."""
        if self.index is not None:
            mapped = refine_mapped(source, target, self.index[k], self.alphas[k])
        else:
            mapped = source @ self.mapper[k].to(source)  # Σ_s source[..., s]·mapper[s, t]
        if self.reweight is not None:
            mapped = mapped * self.reweight[k].to(mapped)  # no renormalisation (SPEC §4)
        return mapped

    def _edit_cross(self, probs: torch.Tensor, call: AttentionCall, rows: list[int]) -> torch.Tensor:
        maps = heads_view(probs, call.heads)  # (B, heads, Q, K)
        context = self.cross_schedule.shape[-1]
        if maps.shape[-1] != context:
            raise ValueError(f"cross-attention over {maps.shape[-1]} tokens, but a mapping for {context}")
        source, edited = maps[rows[0]], maps.clone()
        for k, row in enumerate(rows[1:]):
            switch = self.cross_schedule[self.step, k]  # (K,), on the CPU: no device sync
            if bool(switch.any()):
                switch = switch.to(maps)
                target = maps[row]
                edited[row] = switch * self._mapped(source, target, k) + (1 - switch) * target
        return edited.reshape(probs.shape)

    def _inject_self(self, probs: torch.Tensor, call: AttentionCall, rows: list[int]) -> torch.Tensor:
        maps = heads_view(probs, call.heads)  # (B, heads, Q, Q)
        edited = maps.clone()
        edited[rows[1:]] = maps[rows[0]]
        return edited.reshape(probs.shape)


# -------------------------------------------------------------------------------------- local blend


class LocalBlend:
    """Keep the source latent outside the edited words' region (P2P LocalBlend, SPEC §4).

    `word_alphas` (prompts, K) marks the blend words' tokens in each prompt [source, targets…]. Called
    by the denoising loop after each step with the conditional latents (1 + n, C, h, w) and the
    AttentionStore of the run: the mask comes from the words' maps at `level` (the "16×16" layers of SD)
    summed over all steps so far (the normalisation by the maximum makes sum and mean the same).
    """

    def __init__(
        self,
        word_alphas: torch.Tensor,
        num_steps: int,
        threshold: float = 0.3,
        start: float = 0.2,
        level: int = MASK_LEVEL,
    ) -> None:
        self.word_alphas = word_alphas
        self.threshold = threshold
        self.start_step = injection_steps(start, num_steps)
        self.level = level

    def masks(self, maps: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """(prompts, h, w, K) head- and layer-averaged maps → (prompts, 1, H, W) binary word masks."""
        words = (maps * self.word_alphas.to(maps)[:, None, None, :]).sum(dim=-1)[:, None]  # (P, 1, h, w)
        words = F.max_pool2d(words, BLEND_POOL, stride=1, padding=BLEND_POOL // 2)
        words = F.interpolate(words, size=latent_size, mode="nearest")  # P2P's resize
        peak = words.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(words.dtype).tiny)
        return words / peak > self.threshold

    def __call__(
        self, latents: torch.Tensor, store: AttentionStore, step: int, alpha: float | None = None
    ) -> torch.Tensor:
        """z[target] = z[source] + mask·(z[target] − z[source]), mask = target words ∪ source words.
        (`alpha`, the step's ᾱ, is unused: P2P's thresholds do not depend on it.)"""
        if step < self.start_step:
            return latents
        maps = store.average(self.level, until=step)  # (P, h, w, K)
        if maps.shape[0] != latents.shape[0]:
            raise ValueError(f"{maps.shape[0]} stored attention rows for {latents.shape[0]} latents")
        masks = self.masks(maps, tuple(latents.shape[-2:]))
        mask = (masks[1:] | masks[:1]).to(latents.dtype)  # (n, 1, H, W)
        source = latents[:1]
        return torch.cat([source, source + mask * (latents[1:] - source)])


# ------------------------------------------------------------------------------------------ factory


def blend_alphas(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], blend_words: Sequence[Sequence[str]]
) -> torch.Tensor:
    """(prompts, K) marks of each prompt's blend words (one word list per prompt, source first)."""
    if len(blend_words) != len(prompts) or any(isinstance(w, str) for w in blend_words):
        raise InputError(
            f"blend_words={list(blend_words)!r} must hold one list of words per prompt "
            f"(source first, then each of the {len(prompts) - 1} targets), e.g. [['cat'], ['dog']]"
        )
    alphas = torch.zeros(len(prompts), tokenizer.model_max_length)
    for row, (prompt, words) in enumerate(zip(prompts, blend_words)):
        for word in words:
            alphas[row, word_token_indices(tokenizer, prompt, word)] = 1.0  # InputError if absent
    if not bool(alphas.any()):
        raise InputError("blend_words names no word at all: give at least one, or leave LocalBlend off")
    return alphas


def token_mapping(
    tokenizer: PreTrainedTokenizerBase, source: str, targets: Sequence[str], mode: str = "refine"
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(index, alphas, mapper) of every target onto the source: refine gives index and alphas
    (targets, K), replace gives mapper (targets, K, K); the others are None."""
    if mode not in MODES:
        raise InputError(f"mode='{mode}' is not one of {', '.join(MODES)}")
    context = tokenizer.model_max_length
    if mode == "refine":
        source_ids = token_ids(tokenizer, source)  # InputError when too long
        pairs = [refine_mapping(source_ids, token_ids(tokenizer, target), context) for target in targets]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), None
    source_words = prompt_word_ids(tokenizer, source)
    mappers = []
    for target in targets:
        token_ids(tokenizer, target)
        words = prompt_word_ids(tokenizer, target)
        if len(words) != len(source_words):
            raise InputError(
                f"mode=replace needs prompts with the same number of words, but '{source}' has "
                f"{len(source_words)} and '{target}' has {len(words)}: use mode=refine"
            )
        mappers.append(replace_mapping(source_words, words, context))
    return None, None, torch.stack(mappers)


def build_p2p(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    targets: Sequence[str],
    num_steps: int,
    mode: str = "refine",
    cross_replace: float = 0.8,
    cross_replace_words: Mapping[str, float] | None = None,
    self_replace: float = 0.5,
    reweight: Mapping[str, float] | None = None,
    blend_words: Sequence[Sequence[str]] | None = None,
    blend_threshold: float = 0.3,
    blend_start: float = 0.2,
) -> PromptToPrompt:
    """A Prompt-to-Prompt controller (with `.local_blend`, or None) for [source, *targets].

    Everything a user can get wrong (prompt length, mode, fractions, words) is refused here, before any
    UNet call, with an InputError naming the bad value.
    """
    # 1. Check inputs
    if isinstance(targets, str) or not targets:
        raise InputError(f"targets={targets!r} must be a non-empty list of target prompts")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise InputError(f"num_steps={num_steps!r} must be a positive number of denoising steps")
    _check_fraction("self_replace", self_replace)
    _check_fraction("blend_start", blend_start)
    _check_fraction("blend_threshold", blend_threshold, "a threshold on the max-normalised word map")

    # 2. Token mapping of each target onto the source
    index, alphas, mapper = token_mapping(tokenizer, source, targets, mode)

    # 3. Schedules, reweighting, LocalBlend
    schedule = cross_replace_schedule(tokenizer, targets, num_steps, cross_replace, cross_replace_words)
    local_blend = None
    if blend_words is not None:
        word_alphas = blend_alphas(tokenizer, [source, *targets], blend_words)
        local_blend = LocalBlend(word_alphas, num_steps, blend_threshold, blend_start)
    return PromptToPrompt(
        num_steps,
        schedule,
        self_replace,
        index=index,
        alphas=alphas,
        mapper=mapper,
        reweight=reweight_table(tokenizer, targets, reweight),
        local_blend=local_blend,
    )
