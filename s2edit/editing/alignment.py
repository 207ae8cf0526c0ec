"""Token alignment of a target prompt onto the source prompt (Prompt-to-Prompt's `seq_aligner`, SPEC §4).

Both attention-control methods map each target token to the source token whose attention it takes:
`refine` by a global alignment of the token ids (any two prompts), `replace` word by word (prompts with
the same number of words). Every rule is prompt-to-prompt's, pinned by tests with hand-derived answers:

- refine: global alignment (gap 0, match +1, mismatch −1), traceback ties broken left, up, diagonal;
  target padding position p takes source position p;
- replace: word by word while replaced words remain, then position p takes position p.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from editkit.errors import InputError
from s2edit.core.tokenizer import token_ids

MODES = ("refine", "replace")
NEW_TOKEN = -1  # refine mapping: a target token without a source partner keeps its own map

_LEFT, _UP, _DIAGONAL = 1, 2, 3  # traceback moves of the global alignment


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
