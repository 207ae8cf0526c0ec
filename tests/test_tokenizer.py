"""The offline CLIP tokenizer equals CLIP's; placeholder tokens, prompt limits, word and EOS positions."""

import html
import json

import ftfy
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from editkit.errors import InputError
from s2edit.core.loading import PRESET_DIR
from s2edit.core.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    VOCAB_SIZE,
    add_placeholder_token,
    clip_tokenizer,
    eos_index,
    token_ids,
    word_token_indices,
)

SENTENCES = [
    "a photo of a woman with bangs",
    "Hello, World! It's 2024... isn't it?",
    "café naïve résumé 東京 😀",
    "don't you'll we've I'M THE Best",
    "x=3.14; y:=2**8 #tag @user (brackets) [square] {curly}",
    "  multiple   spaces\tand\nnewlines  ",
    "an astronaut riding a horse, 4k, trending on artstation",
    "Ünïcödé ÀÉÎÕÜ ßtraße — dash",
]
# open_clip cleans text with ftfy + html.unescape first; Hugging Face's CLIPTokenizer (what SD checkpoints
# load in this stack, and what we build) does not. Only text that ftfy would "fix" tokenizes differently:
FTFY_FIXED = ["“curly quotes” ‘single’", "A&amp;B", "ﬁne ligature"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("clip_tokenizer")


@pytest.fixture()
def tokenizer(cache_dir) -> CLIPTokenizer:
    return clip_tokenizer(cache_dir)


@pytest.fixture()
def text_encoder() -> CLIPTextModel:
    """A fresh tiny CLIP text encoder (the `tiny` model's config: real vocabulary, SD1's eos_token_id 2)."""
    config = json.loads((PRESET_DIR / "tiny" / "text_encoder.json").read_text())
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig.from_dict(config)).eval()


def test_known_clip_ids(tokenizer):
    assert tokenizer("a photo").input_ids == [49406, 320, 1125, 49407]
    special = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]
    assert special == [BOS_TOKEN, EOS_TOKEN, EOS_TOKEN]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) == VOCAB_SIZE == 49408
    padded = tokenizer("a photo", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert padded == [49406, 320, 1125] + [49407] * 74  # SD v1-4 pads with EOS


def test_matches_open_clip_simple_tokenizer(tokenizer):
    reference = SimpleTokenizer()
    renamed = {"<start_of_text>": BOS_TOKEN, "<end_of_text>": EOS_TOKEN}
    assert tokenizer.get_vocab() == {renamed.get(token, token): i for token, i in reference.encoder.items()}
    for sentence in SENTENCES:
        ids = tokenizer(sentence).input_ids
        assert ids[1:-1] == reference.encode(sentence), sentence
        assert (ids[0], ids[-1]) == (reference.sot_token_id, reference.eot_token_id)


def test_differs_from_open_clip_only_by_its_text_cleaning(tokenizer):
    reference = SimpleTokenizer()
    for sentence in FTFY_FIXED:
        assert tokenizer(sentence).input_ids[1:-1] != reference.encode(sentence)
        cleaned = html.unescape(ftfy.fix_text(sentence))
        assert tokenizer(cleaned).input_ids[1:-1] == reference.encode(sentence)


def test_cache_files_and_fresh_instances(cache_dir, tokenizer):
    vocab = json.loads((cache_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB_SIZE
    # The cache folder is a Hugging Face tokenizer folder, like SD v1-4's tokenizer/ (vocab.json + merges.txt)
    from_folder = CLIPTokenizer.from_pretrained(cache_dir)
    assert from_folder(SENTENCES[1]).input_ids == tokenizer(SENTENCES[1]).input_ids
    # Each call is a new instance: a token added to one does not leak into the next
    tokenizer.add_tokens("[X]")
    assert len(clip_tokenizer(cache_dir)) == VOCAB_SIZE


def test_corrupt_cache_is_rebuilt_in_place(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "unrelated.txt").write_text("kept")
    assert clip_tokenizer(tmp_path)("a photo").input_ids == [49406, 320, 1125, 49407]
    assert len(json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))) == VOCAB_SIZE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "unrelated.txt", "vocab.json"]


def test_placeholders_get_new_ids_and_rows(tokenizer, text_encoder):
    embeddings = text_encoder.get_input_embeddings
    woman = tokenizer("woman", add_special_tokens=False).input_ids
    assert add_placeholder_token(tokenizer, text_encoder, "[I]", "woman") == 49408
    assert add_placeholder_token(tokenizer, text_encoder, "[A]", None) == 49409
    assert embeddings().num_embeddings == len(tokenizer) == 49410
    assert torch.equal(embeddings().weight[49408], embeddings().weight[woman[0]])
    person = tokenizer("person", add_special_tokens=False).input_ids  # the fallback init word
    assert torch.equal(embeddings().weight[49409], embeddings().weight[person].mean(0))
    # "[I]" is ONE token inside a prompt
    assert tokenizer("a photo of a [I] woman").input_ids == [49406, 320, 1125, 539, 320, 49408, 2308, 49407]
    # Adding again is idempotent: same id, row kept
    row = embeddings().weight[49408].clone()
    assert add_placeholder_token(tokenizer, text_encoder, "[I]", "cat") == 49408
    assert len(tokenizer) == 49410 and torch.equal(embeddings().weight[49408], row)


def test_multi_token_init_word_uses_mean(tokenizer, text_encoder):
    init_ids = tokenizer("unbelievableness", add_special_tokens=False).input_ids
    assert len(init_ids) > 1
    new_id = add_placeholder_token(tokenizer, text_encoder, "<my-token>", "unbelievableness")
    weight = text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(weight[new_id], weight[init_ids].mean(0))


@pytest.mark.parametrize(
    ("placeholder", "message"),
    [("", "non-empty"), ("   ", "non-empty"), ("[I] x", "without spaces"),
     ("cat", "already the vocabulary token 2368"), ("a", "already the vocabulary token 320"),
     ("<|endoftext|>", "already the vocabulary token 49407")],
)
def test_placeholder_refusals(tokenizer, text_encoder, placeholder, message):
    with pytest.raises(InputError, match=message) as error:
        add_placeholder_token(tokenizer, text_encoder, placeholder, "woman")
    assert f"'{placeholder}'" in str(error.value)
    assert len(tokenizer) == VOCAB_SIZE


def test_prompt_length_limit(tokenizer):
    longest = " ".join(["a"] * (tokenizer.model_max_length - 2))
    assert len(token_ids(tokenizer, longest)) == tokenizer.model_max_length
    too_long = longest + " photo"
    with pytest.raises(InputError, match="is 78 tokens long") as error:
        token_ids(tokenizer, too_long)
    message = str(error.value)
    assert "77" in message and "a a a a" in message and "..." in message and len(message) < 200


def test_word_token_indices(tokenizer, text_encoder):
    add_placeholder_token(tokenizer, text_encoder, "[I]", "woman")
    prompt = "a photo of a [I] woman with unbelievableness"
    assert word_token_indices(tokenizer, prompt, "[I]") == [5]
    assert word_token_indices(tokenizer, prompt, "woman") == [6]
    multi = word_token_indices(tokenizer, prompt, "unbelievableness")
    word_ids = tokenizer("unbelievableness", add_special_tokens=False).input_ids
    assert multi == [8, 9, 10] and tokenizer(prompt).input_ids[8:11] == word_ids
    assert word_token_indices(tokenizer, "A Cat and a cat", "cat") == [2, 5]  # every occurrence, any case
    assert word_token_indices(tokenizer, "a woman with red hair", "red hair") == [4, 5]


@pytest.mark.parametrize("word", ["man", "dog", ""])
def test_word_not_in_prompt(tokenizer, word):
    with pytest.raises(InputError, match="is not in the prompt") as error:
        word_token_indices(tokenizer, "a photo of a woman", word)
    assert f"word '{word}'" in str(error.value) and "'a photo of a woman'" in str(error.value)


def test_eos_index_with_added_token(tokenizer, text_encoder):
    add_placeholder_token(tokenizer, text_encoder, "[I]", "woman")
    ids = tokenizer(["a photo of a [I] woman", "a photo"], padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    eos = eos_index(ids, tokenizer.eos_token_id)
    assert eos.tolist() == [7, 3]
    assert ids.argmax(-1).tolist() == [5, 3]  # argmax pooling picks "[I]" (the largest id), not EOS
    # transformers pools that way because SD1 configs say eos_token_id=2 (SPEC §2 trap)
    assert text_encoder.config.eos_token_id == 2
    with torch.no_grad():
        out = text_encoder(ids)
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, 5])
    assert eos_index(ids[0].tolist(), tokenizer.eos_token_id).item() == 7
    with pytest.raises(ValueError, match="no end token"):
        eos_index(ids[:, :5], tokenizer.eos_token_id)
