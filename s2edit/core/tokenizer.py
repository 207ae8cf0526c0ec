"""The CLIP tokenizer, built offline, and the token bookkeeping every later stage relies on (SPEC §2).

`clip_tokenizer` rebuilds the exact CLIP BPE vocabulary (the one SD v1.x uses) from the merges file that
`open_clip_torch` ships, so the tiny / random models and the tests never need the Hugging Face hub.
The other helpers add the placeholder tokens (`[I]`, `[A]`), refuse prompts that would be truncated,
find a word's token positions and the EOS position (never trust `eos_token_id` of SD1 configs: it is 2).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

from editkit.errors import InputError
from editkit.files import atomic_path

if TYPE_CHECKING:  # importing the model classes costs seconds; train.py's input checks need none
    from transformers import CLIPTextModel

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # shipped inside the open_clip package
NUM_BYTE_TOKENS = 256
NUM_MERGES = 49152 - NUM_BYTE_TOKENS - 2  # CLIP keeps merges lines [1 : 49152-256-2+1] (line 0 is a header)
CONTEXT_LENGTH = 77  # CLIP's text context, incl. start and end tokens
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 2 * NUM_BYTE_TOKENS + NUM_MERGES + 2  # 49408
MERGES_HEADER = "#version: 0.2"  # first line of Hugging Face merges.txt files; skipped when read
FALLBACK_INIT_WORD = "person"  # SPEC §2 [choice]: init word when none is given
PROMPT_PREVIEW_CHARS = 60


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable unicode character table (GPT-2 byte-level BPE), in CLIP's order:
    printable bytes map to themselves, the others to chr(256 + n) in increasing byte order."""
    keys = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = keys[:]
    unprintable = [b for b in range(NUM_BYTE_TOKENS) if b not in keys]
    keys += unprintable
    chars += [NUM_BYTE_TOKENS + n for n in range(len(unprintable))]
    return dict(zip(keys, map(chr, chars)))


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merges exactly as CLIP's `SimpleTokenizer` builds them from the BPE file."""
    bpe_path = resources.files("open_clip") / BPE_FILE
    with bpe_path.open("rb") as raw, gzip.open(raw) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def default_cache_dir() -> Path:
    """`$S2EDIT_CACHE/clip_tokenizer`, else `~/.cache/s2edit/clip_tokenizer`."""
    root = os.environ.get("S2EDIT_CACHE") or Path.home() / ".cache" / "s2edit"
    return Path(root).expanduser() / "clip_tokenizer"


def _write_tokenizer_files(folder: Path) -> None:
    """Write vocab.json + merges.txt atomically, so that a reader racing a writer never sees half a file:
    a new folder is filled under a temporary name and renamed; in an existing folder (a stale cache, or
    one another process just created) each file is replaced atomically. Nothing else there is touched."""
    vocab, merges = _clip_vocab_and_merges()
    contents = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "\n".join([MERGES_HEADER, *merges]) + "\n",
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not folder.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            for name, text in contents.items():
                (tmp / name).write_text(text, encoding="utf-8")
            os.rename(tmp, folder)
            return
        except OSError:  # the folder appeared meanwhile: fall through to per-file replacement
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for name, text in contents.items():
        with atomic_path(folder / name) as tmp_file:
            tmp_file.write_text(text, encoding="utf-8")


@functools.lru_cache(maxsize=4)
def _read_tokenizer_files(folder: Path) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    with (folder / "merges.txt").open(encoding="utf-8") as f:
        merges = tuple(tuple(line.split()) for line in f if line.strip() and not line.startswith("#version"))
    return vocab, merges


def clip_tokenizer(cache_dir: str | Path | None = None, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """A fresh CLIP tokenizer identical to SD v1-4's (ids of CLIP ViT-L/14, 77 tokens, padded with EOS;
    `pad_token="!"` gives the OpenCLIP tokenizers of SD 2.x and SDXL's second encoder).

    Built offline from open_clip's BPE file; vocab.json/merges.txt are written once under `cache_dir`
    (default `default_cache_dir()`), and read once per process. Every call returns a NEW instance,
    since callers add placeholder tokens to it.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        vocab, merges = _read_tokenizer_files(folder)
    except (OSError, ValueError):  # not written yet, or unreadable
        vocab, merges = {}, ()
    if len(vocab) != VOCAB_SIZE or len(merges) != NUM_MERGES:  # missing or corrupt: (re)build it
        _read_tokenizer_files.cache_clear()
        _write_tokenizer_files(folder)
        vocab, merges = _read_tokenizer_files(folder)
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=CONTEXT_LENGTH,  # without it diffusers asks for a 1e30-token max length
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
    )


def prompt_preview(text: str) -> str:
    return text if len(text) <= PROMPT_PREVIEW_CHARS else text[: PROMPT_PREVIEW_CHARS - 3] + "..."


def token_ids(tokenizer: CLIPTokenizer, text: str) -> list[int]:
    """Ids of `text` with start and end tokens, unpadded. A prompt longer than the text encoder's context
    is refused instead of being silently truncated (REFERENCES: known traps)."""
    ids = tokenizer(text, add_special_tokens=True, truncation=False, verbose=False).input_ids
    if len(ids) > tokenizer.model_max_length:
        raise InputError(
            f"prompt '{prompt_preview(text)}' is {len(ids)} tokens long (with start/end tokens), more than "
            f"the {tokenizer.model_max_length} the text encoder takes: shorten it"
        )
    return ids


def _word_ids(tokenizer: CLIPTokenizer, word: str) -> list[int]:
    return tokenizer(word, add_special_tokens=False).input_ids


def add_placeholder_token(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, placeholder: str, init_word: str | None = None
) -> int:
    """Add `placeholder` (e.g. "[I]") as ONE new token and give it an embedding row (SPEC §2).

    The row is the embedding of `init_word` (default "person"); a word of several BPE tokens gives the
    mean of its rows. Adding a placeholder that is already an added token is idempotent: its id is
    returned and its row is left as it is (e.g. a fine-tuned checkpoint being reloaded). Added tokens
    are matched after lower-casing, so "[I]" and "[i]" are the same token.
    Refused: an empty placeholder, one with whitespace, and one that already is a vocabulary token
    (e.g. "cat"): training would overwrite the meaning of that word.
    """
    if not placeholder or not placeholder.strip() or any(c.isspace() for c in placeholder):
        raise InputError(f"placeholder '{placeholder}' must be a non-empty string without spaces, e.g. '[I]'")
    base_vocab_size = tokenizer.vocab_size  # without added tokens
    existing = _word_ids(tokenizer, placeholder)
    if len(existing) == 1 and existing[0] >= base_vocab_size:
        _ensure_embedding_rows(tokenizer, text_encoder)
        return existing[0]
    if len(existing) == 1:
        raise InputError(
            f"placeholder '{placeholder}' is already the vocabulary token {existing[0]}: "
            f"choose a string that is not a word, e.g. '[I]'"
        )

    word = init_word if init_word and init_word.strip() else FALLBACK_INIT_WORD
    init_ids = _word_ids(tokenizer, word)
    tokenizer.add_tokens(placeholder)
    new_ids = _word_ids(tokenizer, placeholder)
    if len(new_ids) != 1:  # defensive: the tokenizer must now see exactly one token
        raise InputError(
            f"placeholder '{placeholder}' is not one token once added ({new_ids}): choose another"
        )
    _ensure_embedding_rows(tokenizer, text_encoder)
    embeddings = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[new_ids[0]] = embeddings[init_ids].mean(dim=0)
    return new_ids[0]


def _ensure_embedding_rows(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> None:
    if text_encoder.get_input_embeddings().num_embeddings < len(tokenizer):
        # mean_resizing=False: we set the new row ourselves; no need for sampling from the row statistics
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)


def _word_pattern(word: str) -> re.Pattern[str]:
    """`word` as a whole word: no letter/digit glued to it where its own edge is a letter/digit."""
    before = r"(?<!\w)" if re.match(r"\w", word[0]) else ""
    after = r"(?!\w)" if re.match(r"\w", word[-1]) else ""
    return re.compile(before + re.escape(word) + after, re.IGNORECASE)


def word_token_indices(tokenizer: CLIPTokenizer, prompt: str, word: str) -> list[int]:
    """Positions of `word`'s token(s) in `prompt`'s padded token sequence (start token at 0).

    A word may be several BPE tokens (all are returned) or a phrase; every occurrence counts (like P2P's
    `get_word_inds`). Matching is case-insensitive, like the tokenizer. A word not in the prompt is refused.
    """
    token_ids(tokenizer, prompt)  # length check first
    word = word.strip()
    spans = [m.span() for m in _word_pattern(word).finditer(prompt)] if word else []
    offsets = tokenizer(prompt, return_offsets_mapping=True, truncation=False, verbose=False).offset_mapping
    positions = [
        k for k, (start, end) in enumerate(offsets)
        if end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
    ]
    if not positions:
        raise InputError(f"word '{word}' is not in the prompt '{prompt_preview(prompt)}': use a word of the "
                         "prompt")
    return positions


def eos_index(input_ids: torch.Tensor | Sequence[int], eos_token_id: int) -> torch.Tensor:
    """First position whose id is `eos_token_id`, per row: (..., L) → (...) long.

    Pass `tokenizer.eos_token_id` (49407 for CLIP). SD1 text-encoder configs say `eos_token_id: 2`, which
    makes transformers pool at the LARGEST id, i.e. at an added placeholder token (SPEC §2).
    """
    ids = torch.as_tensor(input_ids)
    is_eos = ids == eos_token_id
    if not bool(is_eos.any(dim=-1).all()):
        raise ValueError(f"a token sequence has no end token {eos_token_id}; was it truncated?")
    return is_eos.int().argmax(dim=-1)


# ------------------------------------------------------------------------------------------------ T5

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2, as T5's own vocabulary


@functools.lru_cache(maxsize=1)
def _t5_words() -> tuple[str, ...]:
    """The whole-word tokens of the CLIP vocabulary ("cat</w>" → "cat"), in CLIP's order."""
    vocab, _ = _clip_vocab_and_merges()
    words = [token[: -len("</w>")] for token in sorted(vocab, key=vocab.get) if token.endswith("</w>")]
    return tuple(dict.fromkeys(word for word in words if word))


def t5_tokenizer(max_length: int = 256) -> PreTrainedTokenizerFast:
    """An offline stand-in for T5's SentencePiece tokenizer (no T5 tokenizer file can be downloaded here):
    a word-level `tokenizers` model over the CLIP vocabulary's whole words (lower-cased; words and
    punctuation split as `\\w+|[^\\w\\s]+`), ids 0/1/2 = <pad>/</s>/<unk> and "</s>" appended, as T5 does.
    Offsets map every id to its characters, so a word's positions come from the offsets. For the random
    flow presets only; a real SD3 / FLUX folder ships its own tokenizer."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {T5_PAD: 0, T5_EOS: 1, T5_UNK: 2}
    for word in _t5_words():
        vocab.setdefault(word, len(vocab))
    model = Tokenizer(WordLevel(vocab, unk_token=T5_UNK))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.post_processor = processors.TemplateProcessing(single=f"$A {T5_EOS}", special_tokens=[(T5_EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token=T5_PAD, eos_token=T5_EOS,
                                   unk_token=T5_UNK, model_max_length=max_length, padding_side="right")
