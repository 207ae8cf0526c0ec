"""`python evaluate.py` end to end on the tiny model: resuming after a kill, two DDP processes giving the
same per-item results as one, skipped metrics, summary numbers recomputed by hand, comparing runs, per-item
fine-tuning; plus the pieces (seeds, shards, folders, mask alignment, the writer's marker) on their own.

Runs go in-process through `run_main` (the same path as `__main__`) where they can; the killed run and the
DDP run are real subprocesses (each pays the interpreter's torch/lightning imports).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import ROOT
from editkit.config import parse_config, run_main
from editkit.files import file_sha256
from editkit.images import load_image
from s2edit.evaluation import run as evaluate
from s2edit.evaluation.config import EvaluateConfig
from s2edit.evaluation.datasets import EditItem, read_dataset
from s2edit.evaluation.items import (
    DONE,
    ITEM_ERROR,
    EvaluationDataModule,
    check_item_folders,
    item_folder,
    item_seed,
    mask_to_working_size,
    shard,
    tuned_prompts,
    with_placeholder,
)
from s2edit.evaluation.report import collect_items
from s2edit.evaluation.runner import ItemOutput, write_item

DATASET = ROOT / "examples" / "dataset.jsonl"  # 4 items, 5 edits, one edit mask, edit types 1, 2, 4, 8
PIE_MINI = ROOT / "examples" / "pie_bench_mini"
BASE = ["model=tiny", "resolution=128", "spl.iterations=3", "progress=false"]
FAST = [*BASE, "virtual.steps=3"]  # the virtual method (a p2p setting beside it would be refused)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
START_TIMEOUT_S = 300


def evaluate_in_process(argv: list[str]) -> tuple[int, str]:
    """evaluate.py in this process: (exit code, stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            run_main(evaluate.main, argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    return code, stderr.getvalue()


def same_cell(ours: str, theirs: str) -> bool:
    """Two metrics.csv cells agree: equal text, or numbers within float tolerance (NaN equals NaN)."""
    try:
        a, b = float(ours), float(theirs)
    except ValueError:
        return ours == theirs
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5, abs=1e-7)


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def lpips_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random squeezenet1_1 state dict: LPIPS is computed (with meaningless weights), CLIP/DINO skipped."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "squeezenet1_1-random.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    return path


def run_args(out: Path, lpips: Path, *extra: str) -> list[str]:
    return [f"data={DATASET}", *FAST, f"metrics.lpips={lpips}", f"out={out}", *extra]


# ----------------------------------------------------------------------------------------- resuming


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory, lpips_backbone: Path) -> dict:
    """A run killed (SIGKILL) right after its first item was complete, with a half-written item planted,
    then rerun in-process with the same command."""
    out = tmp_path_factory.mktemp("resume") / "run"
    argv = run_args(out, lpips_backbone)
    process = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), *argv], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not list(out.glob(f"items/*/{DONE}")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # a crash: no cleanup of any kind
    _, first_stderr = process.communicate(timeout=60)
    items = read_dataset(DATASET)
    done = [item.id for item in items if (out / "items" / item_folder(item.id) / DONE).is_file()]
    assert done, f"no item finished before the kill: {first_stderr}"
    snapshot = {path: (path.stat().st_mtime_ns, path.read_bytes())
                for item_id in done for path in (out / "items" / item_folder(item_id)).rglob("*")
                if path.is_file()}
    victim = items[-1].id  # not reached when the run was killed: plant a half-written attempt of it
    assert victim not in done
    folder = out / "items" / item_folder(victim)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text('{"id": "half-writ')
    (folder / "stale.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match=r"took over the lock .* of a run that is no longer running") as lock:
        code, stderr = evaluate_in_process(argv)
    assert len(lock) == 1 and f"pid {process.pid} " in str(lock[0].message)
    return {"out": out, "done": done, "snapshot": snapshot, "victim": victim, "code": code,
            "stderr": stderr, "items": items}


def test_a_killed_run_resumes_without_redoing_finished_items(resumed_run: dict) -> None:
    out, items = resumed_run["out"], resumed_run["items"]
    assert resumed_run["code"] == 0, resumed_run["stderr"]
    assert len(resumed_run["done"]) < len(items)  # the kill did land in the middle of the run
    done = len(resumed_run["done"])
    expected = f"{len(items)} items: {done} done earlier, {len(items) - done} to evaluate"
    assert expected in resumed_run["stderr"]
    for path, (mtime, content) in resumed_run["snapshot"].items():  # finished items were not redone
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content, path
    for item in items:  # every item complete now
        folder = out / "items" / item_folder(item.id)
        report = json.loads((folder / "metrics.json").read_text())
        assert (folder / DONE).is_file() and report["id"] == item.id
        assert {"source.png", "reconstruction.png"} <= set(report["files"])
        assert len([t for t in report["targets"]]) == len(item.targets)
        assert all((folder / name).is_file() for name in report["files"])
    victim = out / "items" / item_folder(resumed_run["victim"])
    assert not (victim / "stale.png").exists()  # the half-written attempt was discarded, not completed
    rows = read_rows(out)
    keys = [(row["id"], row["target_index"]) for row in rows]
    assert len(keys) == len(set(keys)) == sum(len(item.targets) for item in items) == 5
    assert [row["id"] for row in rows] == [item.id for item in items for _ in item.targets]


def test_an_unchanged_rerun_only_rewrites_the_report(resumed_run: dict, lpips_backbone: Path) -> None:
    out = resumed_run["out"]
    before = {p: p.stat().st_mtime_ns for p in (out / "items").rglob("*") if p.is_file()}
    code, stderr = evaluate_in_process(run_args(out, lpips_backbone))
    assert code == 0 and "were evaluated earlier" in stderr, stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "items").rglob("*") if p.is_file()} == before


def test_a_rerun_with_other_settings_is_refused(resumed_run: dict, lpips_backbone: Path) -> None:
    out = resumed_run["out"]
    code, stderr = evaluate_in_process(run_args(out, lpips_backbone, "virtual.steps=4"))
    assert code == 2 and stderr.strip().splitlines() == [
        f"error: out='{out}' holds a run made with virtual.steps=3, not 4: resume it with the same "
        "settings, or pass a new out="]
    # execution keys may change: more processes, a progress bar, a limit
    config = parse_config(EvaluateConfig, run_args(out, lpips_backbone, "devices=2", "limit=1"))
    evaluate.check_resumable(out, config)


# ----------------------------------------------------------------------------------------- several processes


def test_two_ddp_processes_give_the_single_process_results(resumed_run: dict, lpips_backbone: Path,
                                                           tmp_path: Path) -> None:
    reference, items = resumed_run["out"], resumed_run["items"]
    out = tmp_path / "ddp"
    kept = items[0].id  # finished earlier: the two processes share the 3 others (2 + 1)
    shutil.copytree(reference / "items" / item_folder(kept), out / "items" / item_folder(kept))
    kept_files = {p: p.stat().st_mtime_ns for p in (out / "items").rglob("*") if p.is_file()}
    argv = run_args(out, lpips_backbone, "devices=2", "strategy=ddp", "accelerator=cpu")
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *argv], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=START_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 items: 1 done earlier, 3 to evaluate (virtual) on 2 processes" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in kept_files} == kept_files
    assert sorted(p.name for p in (out / "items").iterdir()) == sorted(item_folder(i.id) for i in items)
    ranks = {json.loads((out / "items" / item_folder(i.id) / "metrics.json").read_text())["rank"]
             for i in items[1:]}
    assert ranks == {0, 1}  # both processes edited items
    rows, expected = read_rows(out), read_rows(reference)
    assert [(r["id"], r["target_index"]) for r in rows] == [(r["id"], r["target_index"]) for r in expected]
    for row, want in zip(rows, expected):  # same seeds, same per-item results: no duplicates, none missing
        for key, value in want.items():
            assert key == "item_seconds" or same_cell(row[key], value), (row["id"], key, row[key], value)
    for item in items:
        for k in range(len(item.targets)):
            name = f"items/{item_folder(item.id)}/edit_{k}.png"
            ours = np.asarray(Image.open(out / name), dtype=np.int16)
            theirs = np.asarray(Image.open(reference / name), dtype=np.int16)
            assert np.abs(ours - theirs).max() <= 1, name


@pytest.mark.filterwarnings("ignore:Total length")
def test_a_process_without_pending_items_is_allowed(tmp_path: Path) -> None:
    from lightning.pytorch.utilities.data import has_len_all_ranks

    class OthersHaveItems:  # the strategy's view when another rank still has items
        root_device = torch.device("cpu")

        def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
            return tensor + 3

    data = EvaluationDataModule([], tmp_path)
    data.setup("predict")
    loader = data.predict_dataloader()
    assert len(loader) == 0
    allowed = data.allow_zero_length_dataloader_with_multiple_devices
    assert has_len_all_ranks(loader, OthersHaveItems(), allowed)  # a rank without items does not fail


# ----------------------------------------------------------------------------------------- outputs


def test_skipped_weight_metrics_are_reported_as_skipped(resumed_run: dict) -> None:
    out = resumed_run["out"]
    rows = read_rows(out)
    for key in ("clip_score", "clip_score_edit_region", "clip_score_source", "structure_distance"):
        assert {row[key] for row in rows} == {"skipped"}, key
    assert all(math.isfinite(float(row["lpips"])) for row in rows)  # weights given: numbers
    summary = (out / "summary.md").read_text()
    assert "| CLIP score ↑ | skipped | skipped |" in summary
    assert "| DINO structure distance ↓ | skipped |" in summary
    assert "- clip: skipped: CLIP weights not found (no path given)" in summary
    assert "- fid: skipped: FID weights are not installed: run `python -m s2edit.metrics install fid`" \
        in summary
    assert "- dists: skipped: DISTS weights are not installed" in summary
    skipped = summary[summary.index("## Skipped metrics"):]
    assert "- lpips:" not in skipped
    weights = summary[summary.index("## Metric weights"):summary.index("## Skipped metrics")]
    lpips_file = Path(json.loads((out / "summary.json").read_text())["weights"]["lpips"].split("`")[1])
    assert f"- lpips: `{lpips_file}` (sha256 {file_sha256(lpips_file)})" in weights
    data = json.loads((out / "summary.json").read_text())
    assert data["set_metrics"]["fid"].startswith("skipped: ")
    assert data["metrics"]["clip_score"]["all"]["skipped"] and data["metrics"]["clip_score"]["all"]["n"] == 0


def test_summary_holds_means_computed_by_hand(resumed_run: dict) -> None:
    out = resumed_run["out"]
    rows = read_rows(out)
    summary = json.loads((out / "summary.json").read_text())
    text = (out / "summary.md").read_text()
    psnr = [float(row["psnr"]) for row in rows]
    mean, std = sum(psnr) / len(psnr), statistics.stdev(psnr)
    assert summary["metrics"]["psnr"]["all"] == pytest.approx({"mean": mean, "std": std, "n": 5,
                                                                "skipped": False})
    assert f"| PSNR (dB) ↑ | {mean:.4g} ± {std:.4g} (n=5) |" in text
    snow = [float(row["psnr"]) for row in rows if row["edit_type"] == "8"]  # two targets of one item
    assert len(snow) == 2
    stat = summary["metrics"]["psnr"]["8 change background"]
    assert (stat["mean"], stat["std"], stat["n"]) == pytest.approx((sum(snow) / 2, statistics.stdev(snow), 2))
    # unedited-region metrics: only the item with an edit mask has a number; NaN rows are not counted
    unedited = [float(row["mse_unedited"]) for row in rows]
    assert sum(not math.isnan(v) for v in unedited) == 1
    assert summary["metrics"]["mse_unedited"]["all"]["n"] == 1
    assert summary["metrics"]["mse_unedited"]["all"]["mean"] == pytest.approx(np.nanmean(unedited))
    assert "(4 items)" in text and "8 change background (1 item)" in text
    assert summary["items"] == 4 and summary["done"] == 4 and summary["edits"] == 5
    plot = out / "plots" / "metrics_by_edit_type.png"
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 200


def test_compare_makes_one_table_and_one_plot(resumed_run: dict, tmp_path: Path) -> None:
    reference = resumed_run["out"]
    rows = read_rows(reference)

    def fake_run(name: str, change) -> Path:  # a second run: the same rows, one metric changed
        folder = tmp_path / name
        folder.mkdir()
        with open(folder / "metrics.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows([change(dict(row)) for row in rows])
        return folder

    brighter = fake_run("brighter", lambda row: {**row, "psnr": str(float(row["psnr"]) + 1.0)})
    out = tmp_path / "compare"
    code, stderr = evaluate_in_process(["compare", f"runs=[{reference}, {brighter}]", "names=[base, plus1]",
                                        f"out={out}"])
    assert code == 0, stderr
    table = (out / "compare.md").read_text()
    psnr = [float(row["psnr"]) for row in rows]
    mean, std = sum(psnr) / 5, statistics.stdev(psnr)
    line = next(line for line in table.splitlines() if line.startswith("| plus1 |"))
    assert f"| {mean + 1:.4g} ± {std:.4g} (n=5) |" in line
    assert line.count("skipped") == 6  # CLIP ×3, DINO, DISTS ×2
    assert "LPIPS (x) against PSNR (dB) (y)" in table and "CLIP score → PSNR (dB)" in table
    with Image.open(out / "compare.png") as image:
        assert image.format == "PNG"
    with open(out / "compare.csv") as file:
        means = {(r["run"], r["metric"]): float(r["mean"]) for r in csv.DictReader(file)}
    assert means["plus1", "psnr"] - means["base", "psnr"] == pytest.approx(1.0)

    no_lpips = fake_run("no_lpips", lambda row: {**row, "lpips": "skipped"})
    code, stderr = evaluate_in_process(["compare", f"runs=[{reference}, {no_lpips}]", f"out={out}"])
    assert code == 0, stderr
    assert "SPL structure distance (x) against PSNR (dB) (y)" in (out / "compare.md").read_text()
    assert "LPIPS → SPL structure distance" in (out / "compare.md").read_text()
    code, stderr = evaluate_in_process(["compare", f"runs=[{tmp_path / 'nowhere'}]", f"out={out}"])
    assert code == 2 and "has no metrics.csv" in stderr


# ----------------------------------------------------------------------------------------- fine-tuning


def test_per_item_finetuning_resets_the_weights_between_items(tmp_path: Path) -> None:
    args = [f"data={PIE_MINI}", *BASE, "finetune=true", "tune.steps=2", "inversion=direct", "steps=3"]
    code, stderr = evaluate_in_process([*args, "save_attention=true", f"out={tmp_path / 'both'}"])
    assert code == 0, stderr
    both = tmp_path / "both" / "items"
    report = json.loads((both / "121000000000" / "metrics.json").read_text())
    assert report["method"] == "p2p" and report["inversion"]["method"] == "direct"
    assert report["finetune"]["steps"] == 2 and report["finetune"]["object"] == "cat"
    assert report["edited_source_prompt"] == "a close-up photo of a [I] cat"
    assert report["targets"][0]["edited_prompt"] == "a close-up photo of a [I] tiger"
    assert math.isfinite(report["finetune"]["final"]["loss"])
    assert {"masks/object_I.png", "masks/edit_region.png", "attention/source/I.png",
            "attention/target_0/tiger.png"} <= set(report["files"])
    assert math.isfinite(report["targets"][0]["metrics"]["psnr_unedited"])  # PIE-Bench masks
    # the cat alone gives the same edit: nothing of the first item's fine-tuning carried over
    code, stderr = evaluate_in_process([*args, "edit_types=[1]", f"out={tmp_path / 'alone'}"])
    assert code == 0, stderr
    alone = tmp_path / "alone" / "items"
    assert [p.name for p in alone.iterdir()] == ["121000000000"]
    assert (alone / "121000000000" / "edit_0.png").read_bytes() == (both / "121000000000" / "edit_0.png"
                                                                    ).read_bytes()


def test_a_failing_item_is_recorded_when_asked_and_raised_otherwise(tmp_path: Path) -> None:
    from editkit.errors import InputError
    from s2edit.evaluation.runner import EvaluationModule

    item = EditItem("gone", tmp_path / "deleted.png", "a photo of a cat", ("a photo of a dog",))
    for keep_going in (True, False):
        config = parse_config(EvaluateConfig, [*FAST, f"continue_on_error={keep_going}"])
        module = EvaluationModule(config, "virtual")
        module.setup("predict")
        if keep_going:
            output = module.predict_step(item, 0)
            assert output.error == f"InputError: image '{tmp_path / 'deleted.png'}' does not exist"
        else:
            with pytest.raises(InputError, match="does not exist"):
                module.predict_step(item, 0)


# ----------------------------------------------------------------------------------------- refusals


def write_jsonl(path: Path, *records: dict) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(("records", "extra", "fragment"), [
    (None, [], "no dataset: pass data="),
    ([{"id": "long", "image": "astronaut.png", "source": "a photo", "target": "a " + "very " * 80 + "long"}],
     [], "item 'long':"),
    ([{"id": "no-object", "image": "chelsea.png", "source": "a photo of a cat",
       "target": "a photo of a dog"}], ["finetune=true"], "item 'no-object': no object word for fine-tuning"),
    ([{"id": "blend", "image": "chelsea.png", "source": "a photo of a cat", "target": "a photo of a dog",
       "blend_words": "cat cow"}], ["item_blend=true"], "item 'blend':"),
])
def test_bad_inputs_fail_in_one_line_before_any_model_loads(tmp_path: Path, records: list | None,
                                                            extra: list[str], fragment: str) -> None:
    out = tmp_path / "out"
    data = []
    if records is not None:
        for record in records:
            record["image"] = str(ROOT / "examples" / record["image"])
        data = [f"data={write_jsonl(tmp_path / 'data.jsonl', *records)}"]
    code, stderr = evaluate_in_process([*data, *FAST, f"out={out}", *extra])
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], stderr
    assert not out.exists()


def test_the_methods_default_and_the_edit_requests_defaults() -> None:
    from s2edit.editing.request import choose_method

    config = parse_config(EvaluateConfig, [])
    assert choose_method(config, set(), config.default_method) == "virtual"
    tuned = parse_config(EvaluateConfig, ["finetune=true"])
    assert choose_method(tuned, set(), tuned.default_method) == "p2p"
    assert choose_method(config, {"inversion"}, config.default_method) == "p2p"  # as infer.py's auto
    assert (config.spl.structure_weight, config.virtual.steps, config.steps) == (1e4, 15, 50)  # SPEC §7


# ----------------------------------------------------------------------------------------- pieces


def test_item_seeds_are_stable_hashes_and_shards_partition_the_items() -> None:
    assert item_seed("chelsea-tiger", 0) == 2059168817078327998  # sha256-based: the same in every process
    assert item_seed("chelsea-tiger", 0) != item_seed("chelsea-tiger", 1) != item_seed("coffee-tea", 0)
    assert all(0 <= item_seed(str(i), 7) < 2**62 for i in range(100))
    for n in range(8):
        items = list(range(n))
        for world in range(1, 5):
            shares = [shard(items, rank, world) for rank in range(world)]
            flat = [i for share in shares for i in share]
            assert sorted(flat) == items  # no repeats (no padding), none missing
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_item_folders_are_safe_and_distinct() -> None:
    assert item_folder("422000000000") == "422000000000"
    assert item_folder("chelsea-tiger") == "chelsea-tiger"
    odd = [item_folder(i) for i in ("a/b", "a b", "a:b", "../x", "DONE")]
    assert len(set(odd)) == 5 and all("/" not in name and not name.startswith(".") for name in odd)
    items = [EditItem(i, Path("x.png"), "a", ("b",)) for i in ("Cat", "cat")]
    with pytest.raises(Exception, match="would share the folder"):
        check_item_folders(items)


def test_placeholders_go_before_the_object_word() -> None:
    assert with_placeholder("a photo of a cat", "cat", "[I]") == "a photo of a [I] cat"
    assert with_placeholder("a category of cats", "cat", "[I]") is None  # whole words only
    item = EditItem("x", Path("x.png"), "a photo of a cat", ("a photo of a tiger", "a cat in the snow",
                                                              "a sunny day"), blend_words=("cat", "tiger"))
    assert tuned_prompts(item, "[I]", "cat") == ("a photo of a [I] cat", [
        "a photo of a [I] tiger", "a [I] cat in the snow", "a sunny day"])


def test_item_blend_words_go_where_each_method_blends() -> None:
    from s2edit.editing.request import EditRequest
    from s2edit.evaluation.items import item_request

    item = EditItem("x", Path("x.png"), "a photo of a cat", ("a photo of a tiger",),
                    blend_words=("cat", "tiger"))
    request = EditRequest()
    assert item_request(item, request, "p2p", item_blend=True).p2p.blend_words == ["cat", "tiger"]
    virtual = item_request(item, request, "virtual", item_blend=True).virtual
    assert (virtual.blend_target, virtual.blend_source) == (["tiger"], [])
    assert item_request(item, request, "p2p", item_blend=False) is request


def test_edit_masks_follow_the_images_resize_and_crop(tmp_path: Path) -> None:
    width, height = 330, 200  # working size 192×128 at resolution 128: the cover-resize crops the sides
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[40:160, 12:90] = 255  # a bright block near the left edge
    Image.fromarray(array).save(tmp_path / "block.png")
    mask = torch.from_numpy(array[..., 0] > 0)
    image = load_image(tmp_path / "block.png", 128)
    size = tuple(image.shape[-2:])
    assert size == (128, 192)
    aligned = mask_to_working_size(mask, (height, width), size)
    bright = image[0].mean(0) > 0

    def iou(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a & b).sum() / (a | b).sum())

    assert aligned.shape == size and set(aligned.unique().tolist()) == {0.0, 1.0}
    assert iou(aligned.bool(), bright) > 0.95
    stretched = torch.nn.functional.interpolate(mask[None, None].float(), size=size)[0, 0].bool()
    assert iou(stretched, bright) < 0.9  # a plain resize would miss the crop


def test_the_marker_is_written_last_and_failures_are_retried(tmp_path: Path) -> None:
    item = EditItem("x", Path("x.png"), "a", ("b",))
    image = torch.zeros(1, 3, 64, 64)
    output = ItemOutput(item, 1, {"id": "x", "targets": []}, {"source.png": image, "edit_0.png": image},
                        {"edit_region": torch.ones(64, 64)})
    folder = tmp_path / "items" / "x"
    write_item(folder, output)
    written = {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    assert set(written) == {"source.png", "edit_0.png", "edit_region.png", "metrics.json", DONE}
    assert written[DONE] == max(written.values())
    assert not list(folder.rglob(".*.tmp"))  # atomic writes leave no temporaries
    write_item(folder, ItemOutput(item, 1, error="RuntimeError: out of memory"))  # a later failed attempt
    assert sorted(p.name for p in folder.iterdir()) == [ITEM_ERROR]
    reports, missing, failed = collect_items([item], tmp_path / "items")
    assert reports == [] and missing == ["x"] and failed == {"x": "RuntimeError: out of memory"}


def test_a_flow_model_is_evaluated_with_flowedit(tmp_path: Path) -> None:
    """evaluate.py on tiny-flux: method=auto is flowedit, every item's report records its settings (the
    family's paper values where none are given), and the summary's method row is flowedit."""
    out = tmp_path / "flow"
    code, stderr = evaluate_in_process([f"data={DATASET}", "model=tiny-flux", "resolution=128",
                                        "spl.iterations=2", "progress=false", "flowedit.steps=4",
                                        "flowedit.n_max=3", "edit_types=[1,8]", "save_attention=true",
                                        f"out={out}"])
    assert code == 0, stderr
    reports = {p.parent.name: json.loads(p.read_text()) for p in (out / "items").glob("*/metrics.json")}
    assert set(reports) == {"chelsea-tiger", "chelsea-snow"}
    for report in reports.values():
        assert report["method"] == "flowedit" and report["inversion"] is None and report["family"] == "flux"
        assert report["edit_settings"]["flowedit"] == {"steps": 4, "n_max": 3, "n_min": 0, "n_avg": 1,
                                                  "source_guidance": 1.5, "target_guidance": 5.5}
    assert len(reports["chelsea-snow"]["targets"]) == 2  # two targets in one batch
    assert "attention/target_1/beach.png" in reports["chelsea-snow"]["files"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "flowedit"
