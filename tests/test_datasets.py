"""Dataset readers: PIE-Bench mapping files (RLE masks, brackets), JSONL / CSV, and their refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.errors import InputError
from s2edit.evaluation.datasets import (
    PIE_MASK_SIZE,
    EditItem,
    decode_pie_mask,
    read_csv,
    read_dataset,
    read_jsonl,
    read_pie_bench,
    strip_brackets,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def encode_rle(mask: torch.Tensor) -> list[int]:
    """[start, length, …] runs of True over the row-major flattened mask (PIE-Bench's encoding)."""
    flat = mask.flatten().tolist()
    runs, start = [], None
    for i, value in enumerate([*flat, False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            runs += [start, i - start]
            start = None
    return runs


def reference_decode(encoded: list[int], shape: tuple[int, int]) -> torch.Tensor:
    """PnPInversion's `mask_decode`, loop for loop."""
    length = shape[0] * shape[1]
    mask = np.zeros((length,))
    for i in range(0, len(encoded), 2):
        for j in range(min(encoded[i + 1], length - encoded[i])):
            mask[encoded[i] + j] = 1
    mask = mask.reshape(shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return torch.from_numpy(mask).bool()


def with_border(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.clone()
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


# ---------------------------------------------------------------------------------------------- RLE masks


def test_decode_pie_mask_round_trips_a_drawn_mask_and_sets_the_border() -> None:
    drawn = torch.zeros(PIE_MASK_SIZE, dtype=torch.bool)
    drawn[100:200, 50:300] = True  # a rectangle
    yy, xx = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    drawn |= (yy - 400) ** 2 + (xx - 400) ** 2 < 60**2  # a disc
    drawn[511, 100:] = True  # a run that reaches the last pixel
    decoded = decode_pie_mask(encode_rle(drawn))
    assert decoded.shape == PIE_MASK_SIZE and decoded.dtype == torch.bool
    assert torch.equal(decoded, with_border(drawn))
    assert decoded[0].all() and decoded[-1].all() and decoded[:, 0].all() and decoded[:, -1].all()
    assert not decoded[1:-1, 1:-1][~drawn[1:-1, 1:-1]].any()  # nothing else was set


def test_decode_pie_mask_matches_the_reference_loop_on_random_runs() -> None:
    gen = torch.Generator().manual_seed(0)
    shape = (9, 13)
    for _ in range(20):
        starts = torch.randint(0, 9 * 13, (6,), generator=gen).tolist()
        lengths = torch.randint(0, 40, (6,), generator=gen).tolist()  # overlapping and overlong runs
        encoded = [v for pair in zip(starts, lengths) for v in pair]
        assert torch.equal(decode_pie_mask(encoded, shape), reference_decode(encoded, shape))


def test_decode_pie_mask_clips_a_run_past_the_end_and_ignores_empty_runs() -> None:
    mask = decode_pie_mask([3 * 4 - 2, 100, 5, 0], size=(3, 4))  # last two pixels, then a zero-length run
    expected = with_border(torch.zeros(3, 4, dtype=torch.bool))
    assert torch.equal(mask, expected)  # (border covers them all at this size)
    interior = decode_pie_mask([], size=(5, 5))
    assert int(interior.sum()) == 16 and not interior[1:4, 1:4].any()


@pytest.mark.parametrize(
    ("encoded", "message"),
    [([1, 2, 3], "pairs"), ([1.5, 2], "integers"), ([25, 1], "outside"), ([-1, 1], "outside"),
     ([0, -3], "negative")],
)
def test_decode_pie_mask_refuses_malformed_runs(encoded: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_pie_mask(encoded, size=(5, 5))


# ---------------------------------------------------------------------------------------------- brackets


def test_strip_brackets_removes_them_and_returns_the_bracketed_phrases() -> None:
    assert strip_brackets("a slanted [rusty] bicycle") == ("a slanted rusty bicycle", ("rusty",))
    assert strip_brackets("[a dog] sitting on a [ red ] bench") == ("a dog sitting on a  red  bench",
                                                                   ("a dog", "red"))
    assert strip_brackets("no edit words") == ("no edit words", ())


def test_strip_brackets_strict_refuses_unbalanced_and_lenient_deletes_them() -> None:
    for bad in ("a [rusty bike", "a rusty] bike", "a [[rusty]] bike"):
        with pytest.raises(ValueError, match="unbalanced"):
            strip_brackets(bad)
    assert strip_brackets("a [rusty bike", strict=False) == ("a rusty bike", ())


# ---------------------------------------------------------------------------------------------- PIE-Bench


def test_read_pie_bench_reads_the_shipped_mini_benchmark() -> None:
    items = read_pie_bench(EXAMPLES / "pie_bench_mini")
    assert [item.id for item in items] == ["422000000000", "121000000000"]
    face, cat = items
    images = EXAMPLES / "pie_bench_mini" / "annotation_images"
    assert face.image_path == images / "4_change_attribute_content_40/2_natural/2_human/422000000000.jpg"
    assert face.image_path.is_file() and Image.open(face.image_path).size == (512, 512)
    assert face.source_prompt == "a smiling woman in an orange spacesuit"
    assert face.targets == ("an angry woman in an orange spacesuit",)
    assert face.edited_words == (("angry",),) and face.source_words == ("smiling",)
    assert face.blend_words == ("woman", "woman") and face.edit_type == 4
    assert face.instruction == "Make the woman look angry"
    assert cat.blend_words == ("cat", "tiger") and cat.edit_type == 1
    assert cat.targets == ("a close-up photo of a tiger",)
    raw = json.loads((EXAMPLES / "pie_bench_mini" / "mapping_file.json").read_text())
    for item in items:
        assert item.mask is not None and item.mask.shape == PIE_MASK_SIZE
        assert torch.equal(item.mask, reference_decode(raw[item.id]["mask"], PIE_MASK_SIZE))
        assert item.mask[0].all() and item.mask[:, -1].all()
    assert 0.04 < face.mask.float().mean() < 0.1  # the face, not the whole picture


def test_read_pie_bench_accepts_the_mapping_file_and_filters_edit_types() -> None:
    mapping = EXAMPLES / "pie_bench_mini" / "mapping_file.json"
    assert [item.id for item in read_pie_bench(mapping, edit_types=[1])] == ["121000000000"]
    items = read_dataset(EXAMPLES / "pie_bench_mini", edit_types=[4, 9])
    assert [item.id for item in items] == ["422000000000"]


def _pie_root(tmp_path: Path, **changes: object) -> Path:
    images = tmp_path / "annotation_images" / "0_random_140"
    images.mkdir(parents=True)
    Image.new("RGB", (512, 512), (90, 120, 30)).save(images / "000000000000.jpg")
    entry = {
        "image_path": "0_random_140/000000000000.jpg",
        "original_prompt": "a [round] cake",
        "editing_prompt": "a [square] cake",
        "editing_instruction": "make the cake square",
        "editing_type_id": "0",
        "blended_word": "cake cake",
        "mask": [1000, 20, 2000, 30],
    }
    entry.update(changes)
    entry = {k: v for k, v in entry.items() if v is not None}
    (tmp_path / "mapping_file.json").write_text(json.dumps({"000000000000": entry}))
    return tmp_path


def test_read_pie_bench_good_entry(tmp_path: Path) -> None:
    (item,) = read_pie_bench(_pie_root(tmp_path, blended_word=""))
    assert item.source_prompt == "a round cake" and item.targets == ("a square cake",)
    assert item.blend_words is None and item.edit_type == 0
    assert int(item.mask[1:-1, 1:-1].sum()) == 50


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"mask": [1000, 20, 2000]}, "mask"),
        ({"mask": "1000 20"}, "mask"),
        ({"mask": [600000, 3]}, "mask"),
        ({"editing_type_id": "seven"}, "editing_type_id"),
        ({"editing_prompt": None}, "editing_prompt"),
        ({"original_prompt": 3}, "original_prompt"),
        ({"blended_word": "cake tart pie"}, "blended_word"),
        ({"image_path": "0_random_140/missing.jpg"}, "image_path"),
    ],
)
def test_read_pie_bench_refuses_a_bad_entry_naming_file_id_and_field(tmp_path: Path, changes: dict,
                                                                       field: str) -> None:
    root = _pie_root(tmp_path, **changes)
    with pytest.raises(InputError) as err:
        read_pie_bench(root)
    message = str(err.value)
    assert "\n" not in message
    assert "mapping_file.json" in message and "id 000000000000" in message and f"'{field}'" in message


def test_read_pie_bench_refuses_a_missing_or_broken_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_pie_bench(tmp_path)
    (tmp_path / "mapping_file.json").write_text("{not json")
    with pytest.raises(InputError, match="not a readable JSON"):
        read_pie_bench(tmp_path)


# ---------------------------------------------------------------------------------------------- JSONL / CSV


def test_read_jsonl_reads_the_shipped_example() -> None:
    items = read_jsonl(EXAMPLES / "dataset.jsonl")
    ids = ["astronaut-sunglasses", "chelsea-tiger", "chelsea-snow", "coffee-tea"]
    assert [item.id for item in items] == ids
    glasses, tiger, snow, tea = items
    assert glasses.image_path == EXAMPLES / "astronaut.png"
    assert glasses.targets == ("a photo of a woman with sunglasses in an orange spacesuit",)
    assert glasses.edited_words == (("sunglasses",),) and glasses.edit_type == 2
    assert glasses.mask is not None and glasses.mask.shape == (512, 512) and glasses.mask.dtype == torch.bool
    assert 0 < glasses.mask.float().mean() < 0.05
    assert tiger.source_prompt == "a photo of a cat" and tiger.source_words == ("cat",)
    assert tiger.blend_words == ("cat", "tiger") and tiger.mask is None
    assert snow.targets == ("a photo of a cat in the snow", "a photo of a cat on a beach")
    assert snow.edited_words == (("snow",), ("beach",)) and snow.instruction is None
    assert tea.targets == ("a photo of a cup of tea",) and tea.edit_type == 4


def _write_mask(path: Path, size: tuple[int, int]) -> None:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[10:30, 20:60] = 255
    Image.fromarray(mask).save(path)


def test_read_csv_columns_targets_mask_and_defaults(tmp_path: Path) -> None:
    Image.new("RGB", (96, 64)).save(tmp_path / "a.png")
    _write_mask(tmp_path / "m.png", (96, 64))
    (tmp_path / "set.csv").write_text(
        "image,source,target,mask,blend_words,edit_type,instruction\n"
        "a.png,a [cat],a [dog] | a [fox],m.png,cat dog,1,swap it\n"
        "a.png,a cat,a cat in snow,,,,\n"
    )
    first, second = read_csv(tmp_path / "set.csv")
    assert (first.id, second.id) == ("2", "3")  # default ids are the line numbers
    assert first.targets == ("a dog", "a fox") and first.edited_words == (("dog",), ("fox",))
    assert first.source_prompt == "a cat" and first.blend_words == ("cat", "dog") and first.edit_type == 1
    assert first.instruction == "swap it" and first.image_path == tmp_path / "a.png"
    expected = torch.zeros(64, 96, dtype=torch.bool)
    expected[10:30, 20:60] = True
    assert torch.equal(first.mask, expected)
    assert second.mask is None and second.blend_words is None and second.edit_type is None
    assert isinstance(read_dataset(tmp_path / "set.csv")[0], EditItem)


def test_a_mask_of_another_size_is_resized_to_the_image(tmp_path: Path) -> None:
    Image.new("RGB", (96, 64)).save(tmp_path / "a.png")
    _write_mask(tmp_path / "m.png", (192, 128))  # twice the image's size
    (tmp_path / "set.jsonl").write_text(json.dumps({"image": "a.png", "source": "s", "target": "t",
                                                    "mask": "m.png"}) + "\n")
    (item,) = read_jsonl(tmp_path / "set.jsonl")
    expected = torch.zeros(64, 96, dtype=torch.bool)
    expected[5:15, 10:30] = True  # the 20x40 box at half size
    assert torch.equal(item.mask, expected)


JSONL_BAD_ROWS = [
    ({"image": "a.png", "source": "s", "taget": "t"}, "taget"),
    ({"image": "a.png", "source": "s"}, "'target'"),
    ({"image": "a.png", "source": "s", "target": []}, "'target'"),
    ({"image": "a.png", "source": "s", "target": ["ok", 3]}, "'target'"),
    ({"image": "a.png", "source": "s", "target": "a [dog"}, "'target'"),
    ({"image": "missing.png", "source": "s", "target": "t"}, "'image'"),
    ({"image": "a.png", "source": "", "target": "t"}, "'source'"),
    ({"image": "a.png", "source": "s", "target": "t", "edit_type": -1}, "'edit_type'"),
    ({"image": "a.png", "source": "s", "target": "t", "edit_type": "two"}, "'edit_type'"),
    ({"image": "a.png", "source": "s", "target": "t", "blend_words": "cat"}, "'blend_words'"),
    ({"image": "a.png", "source": "s", "target": "t", "mask": "nomask.png"}, "'mask'"),
    ({"image": "a.png", "source": "s", "target": "t", "mask": "black.png"}, "'mask'"),
    ({"image": "a.png", "source": "s", "target": "t", "id": [1]}, "'id'"),
]


@pytest.mark.parametrize(("record", "field"), JSONL_BAD_ROWS)
def test_read_jsonl_refuses_a_bad_row_naming_file_line_and_field(tmp_path: Path, record: dict,
                                                                   field: str) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    Image.new("L", (64, 64)).save(tmp_path / "black.png")
    good = {"image": "a.png", "source": "s", "target": "t"}
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(InputError) as err:
        read_jsonl(path)
    message = str(err.value)
    assert "\n" not in message and "set.jsonl:3" in message and field in message


def test_read_jsonl_refuses_broken_json_and_duplicate_ids(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    path = tmp_path / "set.jsonl"
    path.write_text('{"image": "a.png", "source": "s", "target": "t"}\n{"image": \n')
    with pytest.raises(InputError, match=r"set\.jsonl:2: not valid JSON"):
        read_jsonl(path)
    row = {"id": "x", "image": "a.png", "source": "s", "target": "t"}
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(InputError, match="id 'x' appears more than once"):
        read_jsonl(path)


def test_read_csv_refuses_a_bad_header_or_row(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    path = tmp_path / "set.csv"
    path.write_text("image,source\na.png,s\n")
    with pytest.raises(InputError, match=r"set\.csv:1: header lacks column\(s\) target"):
        read_csv(path)
    path.write_text("image,source,target\na.png,s,t\na.png,s,t,extra\n")
    with pytest.raises(InputError, match=r"set\.csv:3: 4 cells for 3 columns"):
        read_csv(path)
    path.write_text("image,source,target,edit_type\na.png,s,t,x\n")
    with pytest.raises(InputError, match=r"set\.csv:2: field 'edit_type'"):
        read_csv(path)


def test_read_dataset_refuses_an_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown format"):
        read_dataset(tmp_path / "set.txt")
