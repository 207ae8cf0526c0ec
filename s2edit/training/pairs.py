"""What the user gives to fine-tuning, checked before any model work (SPEC §2; STYLE habit 5).

A :class:`TrainingPair` is one image with its enhanced prompt P̃ (containing the placeholder), the object
word and an optional mask. :func:`check_pair` refuses a pair that cannot be trained in one line. This
module imports only the tokenizer and image I/O, so `train.py` refuses bad input in a second or two.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import CLIPTokenizer

from editkit.errors import InputError
from editkit.images import read_image
from s2edit.core.tokenizer import token_ids, word_token_indices


@dataclass(frozen=True)
class TrainingPair:
    """One image and its enhanced prompt, as the user gave them."""

    image: str
    prompt: str  # P̃, e.g. "a photo of a [I] woman"
    placeholder: str  # e.g. "[I]"
    object: str  # word of the prompt naming the region the placeholder may attend to
    mask: str | None = None  # user mask instead of the attention-derived M_obj

    @property
    def source_prompt(self) -> str:
        return source_prompt(self.prompt, self.placeholder)


def source_prompt(prompt: str, placeholder: str) -> str:
    """P from P̃: placeholder removed, spaces collapsed ("a photo of a [I] woman" → "a photo of a woman")."""
    return " ".join(prompt.replace(placeholder, " ").split())


def check_pair(tokenizer: CLIPTokenizer, pair: TrainingPair, role: str = "prompt") -> None:
    """Refuse a pair that cannot be trained, in one line, before any model work (SPEC §2).

    `tokenizer` must be a fresh CLIP tokenizer (the placeholder is added to it to check it is one token).
    Checks: the image is readable; the prompt contains the placeholder exactly once; the placeholder is a
    new single token; the prompt fits the text encoder; the object word is in the prompt; the mask exists.
    """
    read_image(pair.image)  # refuses missing, unreadable and tiny images
    placeholder = pair.placeholder
    if not placeholder or any(c.isspace() for c in placeholder):
        raise InputError(f"placeholder '{placeholder}' must be one token without spaces, e.g. '[I]'")
    count = pair.prompt.count(placeholder)
    if count != 1:
        found = "does not contain" if count == 0 else f"contains {count} times"
        raise InputError(
            f"{role} '{pair.prompt}' {found} the placeholder '{placeholder}'; write it once before the "
            f"object word, e.g. 'a photo of a {placeholder} {pair.object or 'woman'}'"
        )
    before = tokenizer(placeholder, add_special_tokens=False).input_ids
    if len(before) == 1:
        raise InputError(
            f"placeholder '{placeholder}' is already the vocabulary token {before[0]}: choose a string that "
            f"is not a word, e.g. '[I]'"
        )
    tokenizer.add_tokens(placeholder)
    after = tokenizer(placeholder, add_special_tokens=False).input_ids
    if len(after) != 1:
        raise InputError(f"placeholder '{placeholder}' is not one token ({after}): choose e.g. '[I]'")
    token_ids(tokenizer, pair.prompt)  # refuses prompts longer than the text encoder's context
    if not pair.object or not pair.object.strip():
        raise InputError(f"no object word given for {role} '{pair.prompt}': name the subject (object=woman)")
    if pair.object.strip().lower() == placeholder.lower():
        raise InputError(f"the object word must be a word of the prompt, not the placeholder '{placeholder}'")
    word_token_indices(tokenizer, pair.source_prompt, pair.object)  # refuses a word missing from P
    if pair.mask is not None:
        read_image(pair.mask)


