"""Typed key=value configuration: defaults of SPEC §7, overrides, and one-line errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CONFIG_DIR, ROOT
from editkit.config import explicit_keys, parse_config, run_main
from editkit.errors import InputError
from s2edit.core.loading import FAMILIES
from s2edit.core.settings import P2PSettings, VirtualSettings
from s2edit.editing.config import InferConfig
from s2edit.editing.request import EditRequest, choose_method
from s2edit.evaluation.config import EvaluateConfig
from s2edit.training.config import TrainConfig

TRAIN_YAML = CONFIG_DIR / "train.yaml"
INFER_YAML = CONFIG_DIR / "infer.yaml"
EVALUATE_YAML = CONFIG_DIR / "evaluate.yaml"


@pytest.mark.parametrize(("schema", "path"), [(TrainConfig, TRAIN_YAML), (InferConfig, INFER_YAML),
                                              (EvaluateConfig, EVALUATE_YAML)])
def test_yaml_defaults_equal_schema_defaults(schema: type, path: Path) -> None:
    """configs/*.yaml list every key with the schema's default (the scripts read no YAML by default:
    copy one and pass config=…; a copy that keeps the defaults sets nothing)."""
    assert yaml.safe_load(path.read_text()) == dataclasses.asdict(schema())
    assert parse_config(schema, [f"config={path}"]) == schema()
    assert explicit_keys(schema, [f"config={path}"]) == set()


def test_spec_section7_defaults() -> None:
    train = parse_config(TrainConfig, [])
    assert train.model == "CompVis/stable-diffusion-v1-4"
    assert (train.finetune.lr, train.max_steps, train.semantic.weight) == (2e-6, 200, 0.1)
    assert (train.finetune.weight_decay, train.finetune.grad_clip, train.finetune.method) == (
        1e-2,
        1.0,
        "auto",
    )
    # auto: the paper's full fine-tuning on SD 1.x/2.x, LoRA on SDXL (SPEC §10)
    unet_families = {name: family for name, family in FAMILIES.items() if family.denoiser == "unet"}
    assert {name: family.default_finetune for name, family in unet_families.items()} == {
        "sd1": "full", "sd2": "full", "sdxl": "lora"}
    assert (train.finetune.lora_rank, train.finetune.lora_lr) == (16, 1e-4)
    assert (train.spatial.mask_timesteps, train.spatial.mask_threshold, train.spatial.loss_weight) == (
        [200, 400, 600],
        0.3,
        0.01,
    )
    assert train.seed == 0

    infer = parse_config(InferConfig, [])
    assert (infer.steps, infer.guidance, infer.inversion) == (50, 7.5, "null_text")
    assert (infer.nti.inner_steps, infer.nti.early_stop, infer.nti.early_stop_growth) == (10, 1e-5, 2e-5)
    assert (infer.p2p.cross_replace, infer.p2p.self_replace, infer.p2p.mode) == (0.8, 0.5, "refine")
    assert (infer.p2p.blend_threshold, infer.p2p.blend_start) == (0.3, 0.2)
    virtual = infer.virtual  # SPEC §9: the SPL app's editor
    assert (virtual.steps, virtual.source_guidance, virtual.target_guidance) == (15, 1.0, 2.0)
    assert (virtual.cross_replace, virtual.self_replace, virtual.eta) == (0.8, 0.8, 1.0)
    assert (virtual.thresh_e, virtual.thresh_m) == (0.6, 0.6)
    assert infer.method == "auto" and choose_method(infer, set(), infer.default_method) == "virtual"
    spl = infer.spl
    assert (spl.structure, spl.color, spl.structure_weight, spl.color_weight) == (True, False, 1e4, 1e3)
    assert (spl.iterations, spl.opt_schedule, spl.postprocess, spl.radius, spl.eps) == (
        100,
        0.8,
        True,
        5,
        1e-4,
    )
    assert (spl.structure_area, spl.color_area) == ("whole", "whole")
    mask = infer.mask
    assert (mask.source_threshold, mask.target_threshold, mask.source_invert, mask.target_invert) == (
        0.5,
        0.5,
        False,
        False,
    )
    assert (mask.radius, mask.eps, mask.inputs) == (1, 1e-2, "preview")
    assert infer.seed == 0


def test_overrides_are_typed_by_the_schema() -> None:
    cfg = parse_config(
        InferConfig,
        [
            "target=a photo of a [I] woman with bangs",  # brackets stay part of a string
            "target=a [I] man",  # a repeated list key appends
            "steps=20",
            "guidance=5",
            "spatial_control=false",
            "p2p.reweight={bangs: 2}",
            "mask.source_words=[woman, hair]",
            "nti.lr=0.02",
            "ckpt=null",
        ],
    )
    assert cfg.target == ["a photo of a [I] woman with bangs", "a [I] man"]
    assert cfg.steps == 20 and isinstance(cfg.steps, int)
    assert cfg.guidance == 5.0 and isinstance(cfg.guidance, float)
    assert cfg.spatial_control is False
    assert cfg.p2p.reweight == {"bangs": 2.0}
    assert cfg.mask.source_words == ["woman", "hair"]
    assert cfg.nti.lr == 0.02 and cfg.ckpt is None
    assert parse_config(
        TrainConfig, ["placeholder=[I]", "spatial.mask_timesteps=[100, 300]"]
    ).spatial.mask_timesteps == [
        100,
        300,
    ]


def test_config_file_then_overrides(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("steps: 30\nspl:\n  iterations: 7\np2p:\n  reweight: {a: 0.5}\n")
    cfg = parse_config(InferConfig, [f"config={tmp_path / 'mine.yaml'}", "steps=40"])
    assert (cfg.steps, cfg.spl.iterations, cfg.p2p.reweight) == (40, 7, {"a": 0.5})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["stpes=3"], "unknown config key 'stpes'; did you mean 'steps'?"),
        (["spl.iteratons=3"], "did you mean 'spl.iterations'?"),
        (["lr=3"], "did you mean 'spl.lr'?"),
        (["steps=abc"], "config key 'steps' expects int, got 'abc'"),
        (["steps=2.5"], "config key 'steps' expects int"),
        (["guidance=high"], "config key 'guidance' expects float"),
        (["spl.structure=maybe"], "config key 'spl.structure' expects bool"),
        (["p2p.mode=foo"], "p2p.mode='foo' must be one of refine, replace"),
        (["inversion=nti"], "must be one of null_text, direct, negative_prompt, ddim"),
        (["p2p.reweight=3"], "config key 'p2p.reweight' expects mapping"),
        (["steps=null"], "config key 'steps' expects int, got 'null'"),
        (["hello"], "argument 'hello' is not of the form key=value"),
        (["config=/nonexistent/x.yaml"], "config file '/nonexistent/x.yaml' does not exist"),
    ],
)
def test_bad_overrides_fail_in_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(InputError) as err:
        parse_config(InferConfig, argv, prog="infer.py")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_key_in_a_config_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("spl:\n  iteratons: 3\n")
    with pytest.raises(InputError, match=r"did you mean 'spl\.iterations'"):
        parse_config(InferConfig, [f"config={tmp_path / 'bad.yaml'}"])


def test_help_lists_every_key_with_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, ["--help"], prog="train.py")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key in [
        "model",
        "image",
        "prompt",
        "finetune.lr",
        "finetune.method",
        "semantic.embedding",
        "spatial.control",
    ]:
        assert f"  {key} " in text
    assert "2e-06" in text and "full | lora" in text


def test_run_main_turns_input_errors_into_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    def main(argv: list[str]) -> None:
        parse_config(InferConfig, argv)

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, ["stpes=3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: unknown config key 'stpes'; did you mean 'steps'?\n"


@pytest.mark.parametrize("script", ["train.py", "infer.py"])
def test_scripts_help_and_bad_key(script: str) -> None:
    help_run = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert help_run.returncode == 0, help_run.stderr
    assert "usage:" in help_run.stdout and "  model " in help_run.stdout
    bad = subprocess.run([sys.executable, script, "modell=tiny"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: unknown config key 'modell'; did you mean 'model'?"


def test_explicit_keys_are_the_command_line_and_a_files_changed_values(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("steps: 50\nvirtual:\n  steps: 4\nspl:\n  iterations: 100\n")
    given = explicit_keys(InferConfig, [f"config={tmp_path / 'mine.yaml'}", "inversion=null_text", "+seed=3"])
    assert given == {"inversion", "seed", "virtual.steps"}  # steps and spl.iterations keep their defaults


@pytest.mark.parametrize(("argv", "ckpt", "method"), [
    ([], False, "virtual"),  # training-free: the SPL authors' editor
    ([], True, "p2p"),  # an S2Edit checkpoint: the paper's editor
    (["inversion=null_text"], False, "p2p"),  # a p2p setting picks p2p, even at its default value
    (["nti.inner_steps=3", "steps=20"], False, "p2p"),
    (["virtual.steps=4"], True, "virtual"),  # a virtual setting picks virtual, even with a checkpoint
    (["spl.iterations=3", "mask.source_words=[cat]", "spatial_control=false"], True, "p2p"),  # shared keys
    (["method=p2p", "p2p.mode=replace"], False, "p2p"),
])
def test_auto_picks_the_method_whose_settings_are_given(argv: list[str], ckpt: bool, method: str) -> None:
    cfg = parse_config(InferConfig, [*argv, *(["ckpt=some/export"] if ckpt else [])])
    assert choose_method(cfg, explicit_keys(InferConfig, argv), cfg.default_method) == method


@pytest.mark.parametrize(("argv", "message"), [
    (["method=virtual", "inversion=direct"],
     "inversion='direct' is a setting of method=p2p, which this edit does not use (method=virtual)"),
    (["method=virtual", "steps=20"], "steps=20 is a setting of method=p2p"),
    (["method=p2p", "virtual.steps=4"], "virtual.steps=4 is a setting of method=virtual"),
    (["inversion=direct", "virtual.eta=0.5"],
     "settings of several methods are given (p2p: inversion; virtual: virtual.eta)"),
])
def test_a_setting_the_chosen_method_ignores_is_refused(argv: list[str], message: str) -> None:
    cfg = parse_config(InferConfig, argv)
    with pytest.raises(InputError) as err:
        choose_method(cfg, explicit_keys(InferConfig, argv), cfg.default_method)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_python_api_chooses_and_refuses_by_the_changed_settings() -> None:
    assert choose_method(EditRequest()) == "virtual"
    assert choose_method(EditRequest(p2p=P2PSettings(mode="replace"))) == "p2p"
    assert choose_method(EditRequest(virtual=VirtualSettings(steps=4)), default="p2p") == "virtual"
    with pytest.raises(InputError, match=r"virtual\.steps=4 is a setting of method=virtual"):
        choose_method(EditRequest(method="p2p", virtual=VirtualSettings(steps=4)))
