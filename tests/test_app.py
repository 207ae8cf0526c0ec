"""The web app (s2edit/app/, app.py) through its HTTP API, as `gradio_client` sees it: one app on
127.0.0.1 with the tiny model at 128², every edit checked against what infer.py writes and refuses.

- an edit returns the images, tables and the report.json that `infer.py` would write, and the command
  it reports reproduces the same edit through infer.py;
- a user's mistake is the CLI's one-line message (no traceback) and leaves no output folder;
- a second p2p edit of the same image and source prompt reuses the cached inversion;
- two users' concurrent edits run at the same time and do not mix;
- the Identity tab fine-tunes [I] in the app's process and that session's later edits use the export;
- the controls carry the settings dataclasses' defaults and the SPL app's; the shipped examples pass
  infer.py's checks; `python app.py` refuses a bad model in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from editkit.config import parse_config, run_main
from editkit.errors import InputError
from s2edit.app import run as app_script
from s2edit.core.settings import MaskSettings, P2PSettings, SPLSettings, VirtualSettings
from s2edit.editing import run as infer
from s2edit.editing.config import InferConfig
from s2edit.editing.request import INVERSIONS
from s2edit.training import run as train
from s2edit.training.config import TrainConfig

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import Status  # noqa: E402

from s2edit.app import binding, layout, ui  # noqa: E402

EXAMPLES = ROOT / "examples"
CAT, COFFEE, ASTRONAUT = EXAMPLES / "chelsea.png", EXAMPLES / "coffee.png", EXAMPLES / "astronaut.png"
EXAMPLE_COLUMNS = ["image", "source", "target", "method", "spl_area", "source_mask_words", "cpl", "p2p_mode",
                   "reweight"]
FAST = {"steps": 4, "iterations": 3}  # the edit's steps and SPL iterations: seconds on the CPU
OUTPUTS = ["edit", "comparison", "mask", "attention", "reconstruction", "psnr", "losses", "timings", "report",
           "seed", "summary"]
REPORT_KEYS = {"command", "settings", "seed", "model", "image", "method", "source", "targets",
               "edit_settings", "inversion", "metrics", "timings", "files", "versions",
               "removed_stale_outputs"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> ui.EditingApp:
    settings = ui.AppSettings(model="tiny", workdir=tmp_path_factory.mktemp("app"), resolution=128)
    editing_app = ui.EditingApp(settings)
    editing_app.launch(port=free_port(), block=False)
    yield editing_app
    editing_app.blocks.close()


@pytest.fixture(scope="module")
def url(app: ui.EditingApp) -> str:
    return app.blocks.local_url


def edit(client: Client, image: Path, source: str, target: str, **controls: object) -> dict:
    """One edit through the API: {output name: value}."""
    values = client.predict(image=handle_file(str(image)), source=source, target=target,
                            **{**FAST, **controls}, api_name="/edit")
    return dict(zip(OUTPUTS, values))


def refusal(client: Client, image: Path, source: str, target: str, **controls: object) -> str:
    with pytest.raises(AppError) as refused:
        edit(client, image, source, target, **controls)
    return str(refused.value)


def cli_refusal(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """The one line infer.py prints for a refused input, without its `error: ` prefix."""
    with pytest.raises(SystemExit) as exit_:
        run_main(infer.main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0].removeprefix("error: ")


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------- edits


def test_edit_returns_the_outputs_and_report_of_infer_py(app, url, tmp_path) -> None:
    client = Client(url, verbose=False)
    out = edit(client, CAT, "a photo of a cat", "a photo of a cat in the snow",
               spl_area="masked", source_mask_words="cat")

    report = json.loads(Path(out["report"]).read_text())
    assert set(report) == REPORT_KEYS
    assert report["method"] == "virtual" and report["seed"] == 0 == out["seed"]
    assert report["targets"] == ["a photo of a cat in the snow"] and report["model"]["ckpt"] is None
    assert report["image"]["sha256"] == sha256(CAT) and report["image"]["working_size"] == [128, 128]
    settings = report["settings"]
    assert settings["virtual"]["steps"] == 4 and settings["spl"]["iterations"] == 3
    assert settings["spl"]["structure_area"] == "masked" and settings["mask"]["source_words"] == ["cat"]
    # the images shown are the run's files, at the working size
    folder = Path(settings["out"])
    assert (pixels(out["edit"]) == pixels(folder / "edit_0.png")).all()
    assert pixels(out["edit"]).shape == (128, 128, 3)
    before, after = out["comparison"]
    assert (pixels(before) == pixels(folder / "source.png")).all()
    assert (pixels(after) == pixels(out["edit"])).all()
    assert (pixels(out["mask"]) == pixels(folder / "masks" / "mask_0.png")).all()
    assert (pixels(out["reconstruction"]) == pixels(folder / "reconstruction.png")).all()
    captions = {item["caption"] for item in out["attention"]}
    assert {"source: cat", "target: snow"} <= captions
    assert len(out["attention"]) == sum(len(maps) for maps in report["files"]["attention"].values())
    # numbers: PSNR, SPL before/after (SPL lowers it), timings
    metrics = report["metrics"]
    assert out["psnr"] == pytest.approx(metrics["reconstruction_psnr"], abs=0.01)
    target, spl_before, spl_after, cpl_before, _ = out["losses"]["data"][0]
    assert target == "a photo of a cat in the snow" and cpl_before is None
    assert spl_before == pytest.approx(metrics["targets"][0]["spl_loss_before"])
    assert spl_after == pytest.approx(metrics["targets"][0]["spl_loss_after"]) and spl_after < spl_before
    timings = dict(out["timings"]["data"])
    assert timings["total"] == pytest.approx(report["timings"]["total"], abs=1e-3)
    assert {"load", "inversion", "edit.denoise", "edit.preview", "write"} <= set(timings)
    assert "seed **0**" in out["summary"] and "no inversion" in out["summary"]

    # the reported command is infer.py's for the same edit: it parses to the same settings and, run
    # through infer.py (its own model; a random preset's weights come from the seed), makes the same image
    command = report["command"]
    assert command[0] == "infer.py"
    cfg = parse_config(InferConfig, command[1:])
    assert dataclasses.asdict(cfg) == settings
    again = infer.run(dataclasses.replace(cfg, out=str(tmp_path / "cli")))
    assert again["metrics"]["targets"][0]["spl_loss_after"] == pytest.approx(spl_after, rel=1e-4)
    assert np.abs(pixels(tmp_path / "cli" / "edit_0.png").astype(int) - pixels(out["edit"])).max() <= 1


def test_random_seed_is_drawn_and_shown(app, url) -> None:
    client = Client(url, verbose=False)
    out = edit(client, CAT, "a photo of a cat", "a photo of a tiger", random_seed=True, seed=0,
               steps=2, iterations=0)
    report = json.loads(Path(out["report"]).read_text())
    assert out["seed"] == report["seed"] == report["settings"]["seed"]
    assert f"seed **{report['seed']}**" in out["summary"]
    assert 0 <= report["seed"] <= layout.MAX_SEED


def test_a_users_mistake_is_the_cli_line_without_traceback(app, url, tmp_path, capsys) -> None:
    client = Client(url, verbose=False)
    edits = app.settings.workdir / "edits"
    folders = set(edits.iterdir()) if edits.exists() else set()
    cli = ["model=tiny", "resolution=128", f"out={tmp_path / 'cli'}"]

    # a mask word that is not in the prompt
    shown = refusal(client, CAT, "a photo of a cat", "a photo of a tiger",
                    spl_area="masked", source_mask_words="dog")
    expected = cli_refusal([*cli, f"image={CAT}", "source=a photo of a cat", "target=a photo of a tiger",
                            "spl.structure_area=masked", "mask.source_words=[dog]"], capsys)
    assert shown == expected and "'dog'" in shown

    # a prompt over the text encoder's 77 tokens
    long_target = "a photo of a " + "very " * 80 + "tiger"
    shown = refusal(client, CAT, "a photo of a cat", long_target)
    expected = cli_refusal([*cli, f"image={CAT}", "source=a photo of a cat", f"target={long_target}"], capsys)
    assert shown == expected and "tokens long" in shown

    # an unreadable image: named by its file name, not the server's temporary copy
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    shown = refusal(client, bad, "a photo of a cat", "a photo of a tiger")
    expected = cli_refusal([*cli, f"image={bad}", "source=a photo of a cat", "target=a photo of a tiger"],
                           capsys)
    assert shown == expected.replace(str(bad), bad.name) and shown.startswith("'bad.png' is not a readable")

    # an app-only field: reweight words typed without their factor
    shown = refusal(client, CAT, "a photo of a cat", "a photo of a tiger", method="direct",
                    reweight="tiger 2")
    assert shown == "reweight 'tiger 2' must be word: factor pairs, e.g. 'smiling: 2, tiger: 1.5'"

    for message in (shown, expected):
        assert "\n" not in message and "Traceback" not in message
    assert (set(edits.iterdir()) if edits.exists() else set()) == folders  # nothing left behind


def test_second_p2p_edit_of_the_same_image_reuses_the_inversion(app, url) -> None:
    client = Client(url, verbose=False)
    source = "a photo of a cup of coffee"
    first = edit(client, COFFEE, source, "a photo of a cup of tea", method="direct")
    second = edit(client, COFFEE, source, "a photo of a mug of tea", method="direct", p2p_mode="refine")
    reports = [json.loads(Path(out["report"]).read_text()) for out in (first, second)]
    assert [r["method"] for r in reports] == ["p2p", "p2p"]
    assert [r["inversion"]["method"] for r in reports] == ["direct", "direct"]
    assert [r["inversion"]["cached"] for r in reports] == [False, True]
    assert reports[0]["inversion"]["key"] == reports[1]["inversion"]["key"]
    assert "direct inversion computed" in first["summary"]
    assert "direct inversion from the cache" in second["summary"]
    assert reports[1]["timings"]["inversion"] < reports[0]["timings"]["inversion"]


def test_two_users_edit_at_once_without_mixing(app, url) -> None:
    users = [Client(url, verbose=False), Client(url, verbose=False)]
    jobs = [(CAT, "a photo of a cat", "a photo of a tiger"), (COFFEE, "a photo of a cup of coffee",
                                                                "a photo of a cup of tea")]

    def submit(client: Client, image: Path, source: str, target: str):
        return client.submit(image=handle_file(str(image)), source=source, target=target, **FAST,
                             api_name="/edit")

    # Hold the model so that both requests are in the app at the same time (the queue lets two edits run
    # at once; the editor's lock makes their model runs take turns), then let them go.
    lock = app.editors.default.lock
    with lock:
        running = [submit(client, *job) for client, job in zip(users, jobs)]
        deadline = time.monotonic() + 60
        while not all(
            job.status().code == Status.PROGRESS
            and job.status().progress_data[0].desc == "checking the inputs"
            for job in running
        ):
            assert time.monotonic() < deadline, [job.status().code for job in running]
            time.sleep(0.05)
    together = [dict(zip(OUTPUTS, job.result(timeout=120))) for job in running]

    for out, (image, source, target) in zip(together, jobs):
        report = json.loads(Path(out["report"]).read_text())
        assert report["image"]["sha256"] == sha256(image)
        assert report["source"] == source and report["targets"] == [target]
        # the same edit alone gives the same image
        alone = edit(users[0], image, source, target)
        assert (pixels(alone["edit"]) == pixels(out["edit"])).all()
    folders = {json.loads(Path(out["report"]).read_text())["settings"]["out"] for out in together}
    assert len(folders) == 2


# ----------------------------------------------------------------------------------------- identity


def test_identity_tab_fine_tunes_and_this_sessions_edits_use_the_export(app, url, tmp_path) -> None:
    client, other = Client(url, verbose=False), Client(url, verbose=False)

    # refused inputs: train.py's one line (a prompt without [I]; a reference without its attribute word)
    refusals = [{"prompt": "a photo of a woman"},
                {"reference": str(CAT), "reference_prompt": "a photo of a woman with [A] stripes"}]
    identities = app.settings.workdir / "identities"
    before = set(identities.iterdir()) if identities.exists() else set()
    for fields in refusals:
        uploads = {k: handle_file(v) if k == "reference" else v for k, v in fields.items()}
        with pytest.raises(AppError) as refused:
            client.predict(image=handle_file(str(ASTRONAUT)), object_word="woman", steps=2,
                           **{"prompt": "a photo of a [I] woman", **uploads}, api_name="/train")
        config = TrainConfig(model="tiny", image=str(ASTRONAUT), out=str(tmp_path / "train"), **fields)
        with pytest.raises(InputError) as expected:
            train.check_inputs(config)
        assert str(refused.value) == str(expected.value).replace(str(ASTRONAUT), ASTRONAUT.name)
    assert (set(identities.iterdir()) if identities.exists() else set()) == before

    status, masks, history, model_line, image, source, target, method = client.predict(
        image=handle_file(str(ASTRONAUT)), prompt="a photo of a [I] woman", object_word="woman", steps=2,
        api_name="/train")
    export = Path(status.split("→ `")[1].split("`")[0])
    assert (export / "manifest.json").is_file() and str(export) in model_line
    assert [row[0] for row in history["data"]] == [1, 2] and history["headers"][:2] == ["step", "loss"]
    assert all(np.isfinite(row[1]) for row in history["data"]) and "for 2 steps" in status
    assert len(masks) == 1 and pixels(masks[0]["image"]).shape[:2] == (128, 128)
    assert (pixels(image) == pixels(ASTRONAUT)).all()
    assert source == target == "a photo of a [I] woman" and method == InferConfig().inversion

    out = edit(client, ASTRONAUT, source, "a photo of a [I] woman with sunglasses", method="direct")
    report = json.loads(Path(out["report"]).read_text())
    assert report["model"]["ckpt"] == str(export) and report["model"]["placeholders"] == ["[I]"]
    assert report["method"] == "p2p" and "masks/object_I.png" in report["files"]["masks"].values()
    # another session still edits with the base model
    out = edit(other, ASTRONAUT, "a photo of a woman", "a photo of a woman smiling", steps=2, iterations=0)
    assert json.loads(Path(out["report"]).read_text())["model"]["ckpt"] is None


# ----------------------------------------------------------------------------------------- binding


def test_controls_carry_the_settings_defaults_and_the_spl_apps(app, url) -> None:
    parameters = {
        p["parameter_name"]: p["parameter_default"]
        for p in Client(url, verbose=False).view_api(return_format="dict", print_info=False)[
            "named_endpoints"]["/edit"]["parameters"]
    }
    assert list(parameters) == [f.name for f in dataclasses.fields(binding.EditForm)]
    bound = {
        "attention_schedule": VirtualSettings().cross_replace, "opt_schedule": SPLSettings().opt_schedule,
        "spl": SPLSettings().structure, "spl_area": SPLSettings().structure_area, "cpl": SPLSettings().color,
        "cpl_area": SPLSettings().color_area, "source_threshold": MaskSettings().source_threshold,
        "target_threshold": MaskSettings().target_threshold, "source_invert": MaskSettings().source_invert,
        "seed": InferConfig().seed, "steps": VirtualSettings().steps, "iterations": SPLSettings().iterations,
        "structure_weight": SPLSettings().structure_weight, "color_weight": SPLSettings().color_weight,
        "postprocess": SPLSettings().postprocess, "source_guidance": VirtualSettings().source_guidance,
        "target_guidance": VirtualSettings().target_guidance, "guidance": InferConfig().guidance,
        "p2p_mode": P2PSettings().mode, "self_attention_schedule": P2PSettings().self_replace,
    }
    assert {name: parameters[name] for name in bound} == bound
    # the SPL app's own defaults (gongms00/SPL app.py) are the settings' defaults
    spl_app = {"attention_schedule": 0.8, "opt_schedule": 0.8, "spl": True, "cpl": False, "steps": 15,
               "source_threshold": 0.5, "structure_weight": 10000, "color_weight": 1000, "iterations": 100,
               "postprocess": True, "source_guidance": 1, "target_guidance": 2, "seed": 0,
               "random_seed": False}
    assert {name: parameters[name] for name in spl_app} == spl_app
    assert parameters["method"] == "virtual"  # training-free without --ckpt, as infer.py's method=auto
    methods = [value for _, value in app.edit_controls["method"].choices]
    assert methods == ["virtual", *INVERSIONS]
    # building the page writes nothing into the package (Gradio stubs every Component subclass's module)
    assert not list((ROOT / "s2edit").glob("*.pyi"))
    # a control whose range goes beyond its field's is refused when the page is built
    with pytest.raises(InputError, match=r"SPLSettings\.opt_schedule"):
        binding.bound_slider(SPLSettings, "opt_schedule", "Optimization schedule", 0.0, 2.0, 0.1)


def test_shipped_examples_pass_infer_checks(app, tmp_path) -> None:
    defaults = {name: control.value for name, control in app.edit_controls.items()}
    columns = EXAMPLE_COLUMNS
    for row in layout.EDIT_EXAMPLES:
        form = binding.EditForm(**{**defaults, **dict(zip(columns, row)), "image": str(EXAMPLES / row[0])})
        cfg = binding.infer_config(form, model="tiny", ckpt=None, out=tmp_path, seed=0)
        plan = infer.check_inputs(cfg).plan  # refuses a bad example in one line
        assert list(plan.targets) == [row[2]] and Path(cfg.image).is_file()

    for image, prompt, word in layout.IDENTITY_EXAMPLES:
        train.check_inputs(TrainConfig(model="tiny", image=str(EXAMPLES / image), prompt=prompt, object=word,
                                       out=str(tmp_path / "train")))


def test_form_maps_to_infer_arguments_that_parse_back_to_it(app, tmp_path) -> None:
    defaults = {name: control.value for name, control in app.edit_controls.items()}
    form = binding.EditForm(**{
        **defaults, "image": str(CAT), "source": "a photo of a cat", "target": "a photo of a tiger",
        "method": "negative_prompt", "p2p_mode": "replace", "reweight": "tiger: 2, photo:0.5",
        "blend_source": "cat", "blend_target": "tiger", "cpl": True, "cpl_area": "masked",
        "target_mask_words": "tiger", "target_invert": True, "steps": 12, "guidance": 5.5,
    })
    cfg = binding.infer_config(form, model="tiny", ckpt=None, out=tmp_path, seed=3, resolution=128)
    assert cfg.p2p.reweight == {"tiger": 2.0, "photo": 0.5} and cfg.p2p.blend_words == ["cat", "tiger"]
    assert cfg.mask.target_words == ["tiger"] and cfg.mask.source_words == []
    assert cfg.method == "p2p" and cfg.inversion == "negative_prompt" and cfg.virtual == VirtualSettings()
    assert parse_config(InferConfig, binding.cli_arguments(cfg)) == cfg
    with pytest.raises(InputError, match="word: factor"):
        binding.word_factors("tiger 2")


# ----------------------------------------------------------------------------------------- app.py


def test_app_script_refuses_a_bad_model_in_one_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_main(app_script.main, ["--model", str(tmp_path / "no_such_model"), "--workdir", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "no_such_model" in lines[0]
    with pytest.raises(SystemExit) as exit_:
        app_script.parse_args(["--help"])
    assert exit_.value.code == 0 and "--ckpt" in capsys.readouterr().out



# ----------------------------------------------------------------------------------------- SDXL


def test_the_app_edits_and_fine_tunes_sdxl_at_its_native_size(tmp_path) -> None:
    """An SDXL model in the app (tiny-xl): the working size defaults to the family's native size, edits
    are infer.py's, and the Identity tab fine-tunes the SDXL way (LoRA on the UNet)."""
    settings = ui.AppSettings(model="tiny-xl", workdir=tmp_path / "app")
    xl_app = ui.EditingApp(settings)
    xl_app.launch(port=free_port(), block=False)
    try:
        model = xl_app.editors.default.model
        assert model.name == "sdxl" and xl_app.editors.default.resolution == model.native_resolution == 256
        client = Client(xl_app.blocks.local_url, verbose=False)
        out = edit(client, CAT, "a photo of a cat", "a photo of a tiger", steps=1, iterations=0)
        report = json.loads(Path(out["report"]).read_text())
        assert report["model"]["family"] == "sdxl" and report["method"] == "virtual"
        working = tuple(xl_app.editors.default.load_image(CAT).shape[-2:])  # area ≈ 256², sides of 32·k
        assert pixels(out["edit"]).shape[:2] == working and working[1] == 320 and working[0] % 32 == 0
        status, *_ = client.predict(image=handle_file(str(ASTRONAUT)), prompt="a photo of a [I] woman",
                                    object_word="woman", steps=1, api_name="/train")
        export = Path(status.split("→ `")[1].split("`")[0])
        manifest = json.loads((export / "manifest.json").read_text())
        assert (manifest["base_model"], manifest["method"]) == ("tiny-xl", "lora")
        out = edit(client, ASTRONAUT, "a photo of a [I] woman", "a photo of a [I] woman smiling",
                   method="direct", steps=1, iterations=0)
        report = json.loads(Path(out["report"]).read_text())
        assert report["model"]["ckpt"] == str(export) and report["model"]["family"] == "sdxl"
    finally:
        xl_app.blocks.close()


# ----------------------------------------------------------------------------------------- flow models


def test_the_app_edits_a_flow_model_with_flowedit(tmp_path) -> None:
    """A flow model in the app (tiny-flux): the method is FlowEdit, its controls carry the family's paper
    settings, there is no Identity tab, and an edit is infer.py's method=flowedit with those settings."""
    from s2edit.editing.flowedit import FAMILY_DEFAULTS

    flow_app = ui.EditingApp(ui.AppSettings(model="tiny-flux", workdir=tmp_path / "app"))
    flow_app.launch(port=free_port(), block=False)
    try:
        controls = flow_app.edit_controls
        paper = FAMILY_DEFAULTS["flux"]
        assert controls["method"].value == "flowedit" and controls["method"].choices == [
            ("FlowEdit (inversion-free)", "flowedit")]
        assert (controls["steps"].value, controls["flow_n_max"].value) == (paper.steps, paper.n_max)
        assert (controls["flow_source_guidance"].value, controls["flow_target_guidance"].value) == (
            paper.source_guidance, paper.target_guidance)
        config = flow_app.blocks.get_config_file()
        tabs = [c["props"] for c in config["components"] if c.get("type") == "tabitem"]
        assert [t["visible"] for t in tabs if t["label"] == "Identity (S2Edit)"] == [False]
        client = Client(flow_app.blocks.local_url, verbose=False)
        out = edit(client, CAT, "a photo of a cat", "a photo of a tiger", method="flowedit", steps=6,
                   flow_n_max=4, flow_target_guidance=4.0, iterations=2)
        report = json.loads(Path(out["report"]).read_text())
        assert report["method"] == "flowedit" and report["model"]["family"] == "flux"
        assert report["edit_settings"]["flowedit"] == {"steps": 6, "n_max": 4, "n_min": 0, "n_avg": 1,
                                                       "source_guidance": 1.5, "target_guidance": 4.0}
        assert "no inversion" in out["summary"] and "tiger" in {i["caption"].split(": ")[1]
                                                                 for i in out["attention"]}
        cfg = parse_config(InferConfig, report["command"][1:])
        assert cfg.method == "flowedit" and cfg.flowedit.n_max == 4 and cfg.virtual == VirtualSettings()
        for row in layout.FLOW_EXAMPLES:  # the examples shown on a flow model pass infer.py's checks
            defaults = {name: control.value for name, control in controls.items()}
            form = binding.EditForm(**{**defaults, **dict(zip(EXAMPLE_COLUMNS, row)),
                                       "image": str(EXAMPLES / row[0])})
            cfg = binding.infer_config(form, model="tiny-flux", ckpt=None, out=tmp_path / "x", seed=0)
            assert infer.check_inputs(cfg).plan.method == "flowedit"
    finally:
        flow_app.blocks.close()
