"""SDXL end to end on `tiny-xl` (SPEC §10): every inversion, Prompt-to-Prompt at SDXL's attention levels,
virtual inversion with LCM timesteps, SPL in the loop, identity fine-tuning (LoRA on the UNet, the
placeholder rows of both encoders) with its export, and the command-line front ends."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention
from PIL import Image

from conftest import IMAGE, ROOT, lora_file, tolerance
from editkit.config import parse_config, run_main
from editkit.errors import InputError
from s2edit.core.attention import stored_map_bytes
from s2edit.core.engine import denoise
from s2edit.core.loading import load_model
from s2edit.core.settings import NullTextSettings, P2PSettings, SPLSettings, VirtualSettings
from s2edit.editing import run as infer
from s2edit.editing.cache import inversion_key, weights_fingerprint
from s2edit.editing.editor import Editor
from s2edit.editing.inversion import invert, reconstruct
from s2edit.editing.methods import edit_method
from s2edit.editing.plan import export_placeholders
from s2edit.editing.request import EditRequest, InversionRequest
from s2edit.evaluation import run as evaluate
from s2edit.training import run as train
from s2edit.training.config import TrainConfig
from s2edit.training.export import load_export, read_manifest
from s2edit.training.pairs import TrainingPair
from s2edit.training.run import fit

SOURCE = "a photo of a cat"
TARGET = "a photo of a tiger"
STEPS = 8
NO_SPL = SPLSettings(structure=False, postprocess=False)
DATASET = Path(__file__).resolve().parent.parent / "examples" / "dataset.jsonl"


@pytest.fixture(scope="module")
def xl_editor(tame_tiny_model) -> Editor:
    """An Editor on tiny-xl, its output damped like the tiny model's (conftest.py)."""
    return Editor(tame_tiny_model("tiny-xl"), weights="tiny-xl-damped", progress=False, resolution=64)


@pytest.fixture(scope="module")
def image(xl_editor) -> torch.Tensor:
    return xl_editor.load_image(IMAGE)


@pytest.fixture(scope="module")
def inversions(xl_editor, image) -> dict:
    nti = NullTextSettings(inner_steps=4, lr=0.1)  # the tiny encoders' ∅ moves ε̂ weakly (test_inversion)
    return {method: xl_editor.invert(image, SOURCE, InversionRequest(method, STEPS, nti=nti))
            for method in ("ddim", "null_text", "direct", "negative_prompt")}


def latent_error(model, inversion) -> float:
    return float((reconstruct(model, inversion).cpu() - inversion.z0).pow(2).mean())


# ----------------------------------------------------------------------------------------- inversions


def test_direct_is_exact_and_null_text_beats_ddim_at_guidance_7_5(xl_editor, inversions) -> None:
    model = xl_editor.model
    errors = {method: latent_error(model, inversions[method]) for method in ("ddim", "null_text", "direct")}
    assert errors["direct"] < 1e-7 and errors["direct"] < 1e-6 * errors["ddim"], errors  # float32 rounding
    assert errors["null_text"] < 0.2 * errors["ddim"], errors
    nulls = inversions["null_text"].nulls  # null-text optimises the null context AND the pooled embedding
    assert nulls.context.shape == (STEPS, 77, 64) and nulls.pooled.shape == (STEPS, 32)
    assert nulls.pooled.abs().max() > 0 and nulls.context.abs().max() > 0  # moved off the zero init
    assert torch.equal(inversions["direct"].null(0).pooled, torch.zeros(1, 32))  # force_zeros: ∅ = 0


def test_fast_null_text_equals_the_straightforward_reference_on_sdxl(xl_editor, image) -> None:
    """benchmarks/edit_bench.py's full-CFG-batch null-text inversion, optimising the null context and the
    null pooled embedding, takes the same updates to float32 rounding (SPEC §10)."""
    spec = importlib.util.spec_from_file_location("edit_bench", ROOT / "benchmarks" / "edit_bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    nti = NullTextSettings(inner_steps=3, lr=0.1)
    model = xl_editor.model
    fast = invert(model, image, SOURCE, InversionRequest("null_text", 4, 7.5, nti), progress=False)
    reference = bench.reference_null_text(model, image, SOURCE, 4, 7.5, nti)
    for ours, theirs in zip(fast.nulls.tensors(), reference.nulls.tensors(), strict=True):
        # Adam divides by √v: where a gradient is ~0 the rounding of the two batch layouts shows most
        difference = (ours - theirs).abs()
        assert float(difference.mean()) < 1e-3 * float(theirs.abs().mean()), float(difference.mean())
        assert float(difference.max()) < 1e-3, float(difference.max())
    assert fast.inner_steps == reference.inner_steps
    assert fast.losses == pytest.approx(reference.losses, rel=1e-3)


def test_the_cache_key_holds_the_family_and_both_encoders(xl_editor, image) -> None:
    model = load_model("tiny-xl")
    key = inversion_key(image, SOURCE, InversionRequest("ddim", STEPS), model, weights_fingerprint(
        *model.components().values()))
    assert key["family"] == "sdxl"
    before = weights_fingerprint(*model.components().values())
    with torch.no_grad():
        model.text_encoders[1].text_projection.weight[0, 0] += 1.0  # encoder 2 alone
    assert weights_fingerprint(*model.components().values()) != before


# ----------------------------------------------------------------------------------------- P2P


def test_identical_prompts_return_the_source(xl_editor, inversions, image) -> None:
    inversion = inversions["negative_prompt"]
    result = xl_editor.edit(inversion, [SOURCE], spl=NO_SPL)
    close = tolerance(torch.float32, scale=float(result.latents.abs().max()))
    torch.testing.assert_close(result.latents[1], result.latents[0], **close)
    # a 2-row batch against the 1-row reconstruction: kernel rounding, grown by every step at w = 7.5
    trajectory = tolerance(torch.float32, scale=float(result.latents.abs().max()) * STEPS * 7.5)
    alone = reconstruct(xl_editor.model, inversion).cpu()
    torch.testing.assert_close(result.latents[:1], alone, **trajectory)
    same = VirtualSettings(steps=4, target_guidance=1.0)
    virtual = xl_editor.edit_virtual(image, SOURCE, [SOURCE], spl=NO_SPL, virtual=same)
    torch.testing.assert_close(virtual.latents[1], virtual.latents[0], **close)


def test_fused_self_attention_injection_equals_the_explicit_maps(xl_editor) -> None:
    """SPEC §10: softmax(Q_S K_Sᵀ)·V_T by the fused kernel is P2P's replaced maps times V_T."""
    model = xl_editor.model
    request = EditRequest(method="p2p", steps=4, p2p=P2PSettings(self_replace=1.0))
    plan = xl_editor.plan(SOURCE, [TARGET], request)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompt([SOURCE, TARGET])
    outputs = {}
    for fused in (True, False):
        controller = edit_method("p2p").controller(plan, model)
        controller.fused_self = fused
        controller.conditional_rows = slice(0, 2)
        with torch.no_grad(), model.attention_control(controller):
            outputs[fused] = model.predict(z, torch.tensor(700), cond)
    scale = float(outputs[False].abs().max())
    torch.testing.assert_close(outputs[True], outputs[False], **tolerance(torch.float32, scale=scale))
    plain = model.predict(z, torch.tensor(700), cond)
    assert (plain[1] - outputs[True][1]).abs().max() > 1e-3  # the injection acts on the target row
    torch.testing.assert_close(outputs[True][0], plain[0], **tolerance(torch.float32, scale=scale))


def test_an_sdxl_edit_never_materialises_a_self_attention_map(xl_editor, inversions, monkeypatch) -> None:
    """Only cross-attention maps are computed explicitly (77 keys); the store keeps one sum at the mask
    level (image/32), whose size stored_map_bytes computes."""
    key_lengths = []
    original = Attention.get_attention_scores

    def spy(self, query, key, attention_mask=None):
        key_lengths.append(key.shape[1])
        return original(self, query, key, attention_mask)

    monkeypatch.setattr(Attention, "get_attention_scores", spy)
    stores = []

    def keep_store(model, run, hooks=()):
        stores.append(run.store)
        return denoise(model, run, hooks)

    monkeypatch.setattr("s2edit.editing.editor.denoise", keep_store)
    blend = P2PSettings(self_replace=0.8, blend_words=["cat", "tiger"])
    inversion = inversions["direct"]
    xl_editor.edit(inversion, [TARGET], p2p=blend, spl=NO_SPL)
    assert key_lengths and set(key_lengths) == {77}
    store = stores[-1]
    assert list(store.sums) == [xl_editor.model.mask_level] == [4]
    height, width = inversion.z0.shape[-2:]  # the photo is 5:3
    expected = stored_map_bytes(xl_editor.model.attention_layers(), (height, width), (4,), rows=2, tokens=77)
    assert store.stored_bytes() == expected == 2 * (height // 4) * (width // 4) * 77 * 4


def test_spl_in_the_loop_changes_only_its_steps(xl_editor, inversions) -> None:
    trajectories = {}
    in_loop = SPLSettings(iterations=5, opt_schedule=0.7, postprocess=False)
    for name, spl in (("off", NO_SPL), ("on", in_loop)):
        latents: list[torch.Tensor] = []
        xl_editor.edit(inversions["direct"], [TARGET], spl=spl,
                       callback=lambda state, into=latents: into.append(state.latents.clone()))
        trajectories[name] = latents
    first = 6  # i/T >= 0.7 with T = 8: steps 6 and 7
    for step in range(STEPS):
        same = torch.equal(trajectories["on"][step], trajectories["off"][step])
        assert same == (step < first), step


# ----------------------------------------------------------------------------------------- virtual (§9)


def test_virtual_with_lcm_timesteps_on_sdxl(image) -> None:
    """tiny-xl-lcm (an LCMScheduler config) and tiny-xl with virtual.schedule=lcm (an LCM-LoRA on the
    Euler model) sample the same LCM timesteps: the same edit. The DDIM chain gives another."""
    lcm = Editor.from_model("tiny-xl-lcm", device="cpu", progress=False, resolution=128)
    euler = Editor.from_model("tiny-xl", device="cpu", progress=False, resolution=128)
    settings = VirtualSettings(steps=4)
    by_scheduler = lcm.edit_virtual(image, SOURCE, [TARGET], virtual=settings, spl=NO_SPL, seed=3)
    by_setting = euler.edit_virtual(image, SOURCE, [TARGET], spl=NO_SPL, seed=3,
                                    virtual=VirtualSettings(steps=4, schedule="lcm"))
    ddim = euler.edit_virtual(image, SOURCE, [TARGET], virtual=settings, spl=NO_SPL, seed=3)
    assert torch.equal(by_scheduler.latents, by_setting.latents)
    assert not torch.allclose(ddim.latents, by_setting.latents)
    assert torch.isfinite(by_scheduler.images).all()


# ----------------------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("xl_train")
    image = tmp / "cat.png"
    Image.open(IMAGE).crop((0, 0, 256, 256)).save(image)
    config = parse_config(TrainConfig, ["model=tiny-xl", f"image={image}", "prompt=a photo of a [I] cat",
                                        "object=cat", "resolution=64", "max_steps=2",
                                        "finetune.lora_lr=1e-2"])
    base = load_model("tiny-xl")
    module, data = fit(config, [TrainingPair(str(image), config.prompt, "[I]", "cat")], progress=False)
    export = module.export(tmp / "run", data.prepared)
    return {"module": module, "data": data, "export": export, "base": base, "image": image, "tmp": tmp}


def test_sdxl_fine_tuning_trains_unet_lora_and_the_placeholder_rows_of_both_encoders(trained) -> None:
    module, base = trained["module"], trained["base"]
    model = module.model
    assert module.method == "lora"  # finetune.method=auto on SDXL
    token = module.token_ids["[I]"]
    for trained_encoder, base_encoder in zip(model.text_encoders, base.text_encoders, strict=True):
        rows = trained_encoder.get_input_embeddings().weight
        base_rows = base_encoder.get_input_embeddings().weight
        others = torch.ones(rows.shape[0], dtype=torch.bool)
        others[token] = False
        assert torch.equal(rows[others][: base_rows.shape[0]], base_rows)  # every other row bit-identical
        assert not torch.equal(rows[token], base_rows[int(module.model.token_ids("cat")[1])])  # [I] learned
        trained_state, base_state = trained_encoder.state_dict(), base_encoder.state_dict()
        frozen = [k for k in base_state if "token_embedding" not in k]
        assert all(torch.equal(trained_state[k], base_state[k]) for k in frozen)  # the encoder stays frozen
    lora = {k: v for k, v in model.unet.state_dict().items() if "lora_" in k}
    assert lora and any("lora_B" in k and v.abs().max() > 0 for k, v in lora.items())  # the adapters moved
    base_unet = base.unet.state_dict()
    plain = {k.replace(".base_layer", ""): v for k, v in model.unet.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(plain[k], base_unet[k]) for k in base_unet)  # the base weights did not


def test_the_semantic_loss_is_the_mean_over_both_encoders(trained) -> None:
    """L_sem = ½ Σ_k |cos(e_P^k, e_[I]^k)| with each encoder's last hidden state (SPEC §10)."""
    module, data = trained["module"], trained["data"]
    batch = next(iter(data.train_dataloader()))
    torch.manual_seed(0)
    terms = module._step(batch)
    with torch.no_grad():
        encoding = module.model.encode_text([*batch["prompt"], *batch["source_prompt"]])
    by_hand = []
    for k in range(2):
        prompt, source = encoding.hidden[k][:1], encoding.hidden[k][1:]
        e_p = source[0, int(batch["source_eos_position"][0])]
        e_i = prompt[0, int(batch["placeholder_position"][0])]
        by_hand.append(torch.nn.functional.cosine_similarity(e_p, e_i, dim=0).abs())
    torch.testing.assert_close(terms["semantic"].detach(), sum(by_hand) / 2, rtol=1e-5, atol=1e-6)


def test_export_reload_edits_like_the_model_in_memory(trained) -> None:
    module, export = trained["module"], trained["export"]
    manifest = read_manifest(export)
    assert manifest.method == "lora"
    assert set(manifest.files) == {"unet_lora.safetensors", "embeddings.safetensors"}  # no encoder weights
    module.model.eval()
    for component in module.model.components().values():
        component.requires_grad_(False)
    in_memory = Editor(module.model, export_placeholders(export, manifest), weights="in-memory",
                       progress=False, resolution=manifest.resolution)
    reloaded = Editor.from_export(export, device="cpu", progress=False)
    assert reloaded.model.name == "sdxl"
    image = reloaded.load_image(trained["image"])
    prompts = ("a photo of a [I] cat", ["a photo of a [I] cat smiling"])
    ours = [editor.edit_virtual(image, *prompts, virtual=VirtualSettings(steps=3), spl=NO_SPL, seed=1)
            for editor in (in_memory, reloaded)]
    torch.testing.assert_close(ours[1].latents, ours[0].latents,
                               **tolerance(torch.float32, scale=float(ours[0].latents.abs().max())))


def test_an_sd1_export_on_an_sdxl_base_is_refused_in_one_line(make_export) -> None:
    mask = torch.ones(64, 64)
    export = make_export(load_model("tiny", seed=0), [("[I]", "a photo of a [I] cat", "cat")], [mask])
    with pytest.raises(InputError) as error:
        load_export(export, base_model="tiny-xl")
    message = str(error.value)
    assert "\n" not in message and "tiny-xl" in message
    assert "differs from the one the export was trained on" in message


# ----------------------------------------------------------------------------------------- the front ends


def main_in_process(main, argv: list[str]) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            run_main(main, argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    return code, stderr.getvalue()


def test_train_infer_and_evaluate_run_sdxl_from_the_command_line(trained, tmp_path) -> None:
    train_args = ["model=tiny-xl", f"image={trained['image']}", "prompt=a photo of a [I] cat", "object=cat",
                  "resolution=64", "max_steps=1", "image_log_every=0", f"out={tmp_path / 'train'}"]
    code, err = main_in_process(train.main, train_args)
    assert code == 0, err
    export = tmp_path / "train" / "export"
    assert read_manifest(export).method == "lora"
    edit = tmp_path / "edit"
    code, err = main_in_process(infer.main, [f"ckpt={export}", "target=a photo of a [I] cat smiling",
                                             "inversion=direct", "steps=3", "spl.iterations=2",
                                             f"out={edit}"])
    assert code == 0, err
    report = json.loads((edit / "report.json").read_text())
    assert report["model"]["family"] == "sdxl" and report["inversion"]["method"] == "direct"
    assert Image.open(edit / "edit_0.png").size == (64, 64)
    virtual = tmp_path / "virtual"
    code, err = main_in_process(infer.main, ["model=tiny-xl-lcm", f"image={IMAGE}", f"source={SOURCE}",
                                             f"target={TARGET}", "resolution=128", "virtual.steps=2",
                                             "spl.iterations=2", f"out={virtual}"])
    assert code == 0, err
    assert json.loads((virtual / "report.json").read_text())["method"] == "virtual"
    code, err = main_in_process(evaluate.main, [f"data={DATASET}", "model=tiny-xl", "resolution=128",
                                                "limit=1", "virtual.steps=2", "spl.iterations=2",
                                                "progress=false", f"out={tmp_path / 'eval'}"])
    assert code == 0, err
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert (summary["items"], summary["done"], summary["model"]) == (1, 1, "tiny-xl")


def test_an_lcm_lora_on_sdxl_edits_and_fine_tunes_through_lora(trained, tmp_path) -> None:
    """SDXL + LCM-LoRA (here a random LoRA file of tiny-xl's UNet): `lora=` fuses it, virtual.schedule=lcm
    samples the LCM timesteps; an export trained on base + LoRA records the file and reloads only with
    the same file (moved: lora= says where)."""
    lora = tmp_path / "lcm_lora.safetensors"
    lora_file(load_model("tiny-xl"), lora)
    out = tmp_path / "edit"
    code, err = main_in_process(infer.main, ["model=tiny-xl", f"lora={lora}", f"image={IMAGE}",
                                             f"source={SOURCE}", f"target={TARGET}", "resolution=64",
                                             "virtual.steps=2",
                                             "virtual.schedule=lcm", "spl.iterations=0", f"out={out}"])
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    plain = load_model("tiny-xl")
    assert report["model"]["weights"] != weights_fingerprint(*plain.components().values())  # the UNet changed
    assert report["edit_settings"]["virtual"]["schedule"] == "lcm"

    run = tmp_path / "train"
    code, err = main_in_process(train.main, ["model=tiny-xl", f"lora={lora}", f"image={trained['image']}",
                                             "prompt=a photo of a [I] cat", "object=cat", "resolution=64",
                                             "max_steps=1", "image_log_every=0", f"out={run}"])
    assert code == 0, err
    manifest = read_manifest(run / "export")
    assert manifest.base_lora == str(lora.resolve()) and manifest.base_lora_sha256
    moved = lora.rename(tmp_path / "moved.safetensors")
    with pytest.raises(InputError, match="pass lora=<where the file is now>"):
        load_export(run / "export")
    model, _ = load_export(run / "export", base_lora=str(moved))
    assert model.name == "sdxl"
    other = tmp_path / "other.safetensors"
    lora_file(load_model("tiny-xl"), other, rank=2)
    with pytest.raises(InputError, match=r"is not the LoRA the export .* was trained with"):
        load_export(run / "export", base_lora=str(other))


