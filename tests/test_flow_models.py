"""The flow families (SD3, FLUX) on the random `tiny-sd3` / `tiny-flux` presets, and FlowEdit on them
(SPEC §11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import IMAGE, run_cli
from editkit.errors import InputError
from editkit.images import load_image
from s2edit.core.family import Conditioning
from s2edit.core.loading import PRESET_DIR, load_model
from s2edit.core.tokenizer import t5_tokenizer
from s2edit.editing.flowedit import (
    FAMILY_DEFAULTS,
    FlowEditSettings,
    GuidedVelocity,
    flowedit_latents,
    resolved,
)

EQUAL_GUIDANCE = FlowEditSettings(steps=8, n_max=6, source_guidance=4.0, target_guidance=4.0)


@pytest.fixture(scope="module")
def sd3():
    return load_model("tiny-sd3")


@pytest.fixture(scope="module")
def source_latent(sd3) -> torch.Tensor:
    with torch.no_grad():
        return sd3.encode_image(load_image(IMAGE, resolution=128))


def test_the_preset_is_sd3_shaped(sd3) -> None:
    config = json.loads((PRESET_DIR / "tiny-sd3" / "text_encoder_3.json").read_text())
    assert config["vocab_size"] == len(t5_tokenizer())  # the offline T5 tokenizer's words
    assert sd3.name == "sd3" and sd3.prediction_type == "flow" and sd3.latent_channels == 16
    assert (sd3.latent_scale, sd3.latent_shift) == (1.5305, 0.0609)
    assert sd3.native_resolution == 128 and sd3.size_multiple == 16
    cond = sd3.encode_prompt(["a photo of a cat", "a dog"])
    # CLIP-L ‖ CLIP-G penultimate states (77 tokens), then T5's (max_sequence_length); pooled: both CLIPs'
    assert cond.context.shape == (2, 77 + sd3.max_sequence_length, 64) and cond.pooled.shape == (2, 64)
    with torch.no_grad():
        ids = sd3.tokenizers[2](["a dog"], padding="max_length", max_length=sd3.max_sequence_length,
                                return_tensors="pt").input_ids
        t5 = sd3.text_encoders[2](ids)[0]
    torch.testing.assert_close(cond.context[1:, 77:], t5)  # the T5 rows are T5's states of the prompt


def test_the_t5_stand_in_tokenizer_gives_word_offsets() -> None:
    tokenizer = t5_tokenizer()
    encoded = tokenizer("A red Car, parked", return_offsets_mapping=True)
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert tokens == ["a", "red", "car", ",", "parked", "</s>"]
    assert encoded.offset_mapping[2] == (6, 9)  # "Car": its characters in the prompt
    assert tokenizer("qqqzzz").input_ids == [2, 1]  # unknown word, end of sequence


def test_target_equal_to_source_returns_the_source_latent_exactly(sd3, source_latent) -> None:
    cat = "a photo of a cat"
    out = flowedit_latents(sd3, source_latent, cat, [cat], EQUAL_GUIDANCE, seed=1)
    assert torch.equal(out, source_latent.float())
    edited = flowedit_latents(sd3, source_latent, "a photo of a cat", ["a photo of a dog"], EQUAL_GUIDANCE,
                              seed=1)
    assert (edited - source_latent).abs().max() > 1e-2  # a different prompt does move it


def batched_velocities(model, latent: torch.Tensor, source: str, targets: list[str], seed: int):
    """(source conditioning, target conditionings, z_src, z_tar, guided v_src, guided v_tar) of one FlowEdit
    step at σ = 0.6 on noisy copies of `latent`, with the family's default guidance."""
    src, tar = model.encode_prompt([source]), model.encode_prompt(targets)
    velocity = GuidedVelocity(model, src, tar, resolved(FlowEditSettings(), model.name))
    gen = torch.Generator().manual_seed(seed)
    z_src = latent + 0.5 * torch.randn(latent.shape, generator=gen)
    z_tar = z_src.expand(len(targets), -1, -1, -1) + 0.1 * torch.randn((len(targets), *latent.shape[1:]),
                                                                       generator=gen)
    return (src, tar, z_src, z_tar, velocity, *velocity(z_src, z_tar, 0.6))


def test_the_cfg_rows_line_up_with_their_prompts(sd3, source_latent) -> None:
    """One batched call equals the per-prompt single-row calls; swapping the prompts swaps the results."""
    settings = resolved(FlowEditSettings(), "sd3")
    src, tar, z_src, z_tar, velocity, v_src, v_tar = batched_velocities(
        sd3, source_latent, "a photo of a cat", ["a watercolor of a dog", "a tiger"], seed=0)
    empty = sd3.encode_prompt([""])

    def alone(z: torch.Tensor, cond: Conditioning, w: float) -> torch.Tensor:
        u, c = sd3.velocity(z, 0.6, empty), sd3.velocity(z, 0.6, cond)
        return u + w * (c - u)

    with torch.no_grad():
        torch.testing.assert_close(v_src, alone(z_src, src, 3.5), atol=1e-4, rtol=1e-4)
        for row in range(2):
            torch.testing.assert_close(v_tar[row:row + 1], alone(z_tar[row:row + 1], tar[row], 13.5),
                                       atol=1e-4, rtol=1e-4)
        swapped_src, _ = GuidedVelocity(sd3, tar[0], Conditioning.cat([src, tar[1]]), settings)(z_src, z_tar,
                                                                                              0.6)
    assert not torch.allclose(swapped_src, v_src, atol=1e-3)
    _, tail = velocity(None, z_tar, 0.6)  # the sampling tail: target rows only
    torch.testing.assert_close(tail, v_tar, atol=1e-5, rtol=1e-5)


def test_defaults_per_family_and_refusals(sd3, source_latent) -> None:
    assert resolved(FlowEditSettings(), "sd3") == FAMILY_DEFAULTS["sd3"]
    assert resolved(FlowEditSettings(n_max=10), "flux").steps == 28
    with pytest.raises(InputError, match=r"n_min=5, n_max=4, steps=8"):
        resolved(FlowEditSettings(steps=8, n_max=4, n_min=5), "sd3")
    with pytest.raises(InputError, match="FlowEdit runs on the flow families"):
        flowedit_latents(load_model("tiny"), torch.zeros(1, 4, 8, 8), "a", ["b"])
    with pytest.raises(InputError, match="at least one target"):
        flowedit_latents(sd3, source_latent, "a cat", [])


def test_the_seed_fixes_the_edit(sd3, source_latent) -> None:
    settings = FlowEditSettings(steps=6, n_max=4, n_min=1)
    a = flowedit_latents(sd3, source_latent, "a cat", ["a dog"], settings, seed=3)
    b = flowedit_latents(sd3, source_latent, "a cat", ["a dog"], settings, seed=3)
    c = flowedit_latents(sd3, source_latent, "a cat", ["a dog"], settings, seed=4)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_a_saved_sd3_folder_loads_as_sd3(sd3, tmp_path: Path) -> None:
    sd3.pipeline().save_pretrained(tmp_path / "sd3")
    loaded = load_model(str(tmp_path / "sd3"))
    assert type(loaded) is type(sd3) and (tmp_path / "sd3" / "model_index.json").is_file()
    for name, module in sd3.components().items():
        theirs = loaded.components()[name].state_dict()
        assert all(torch.equal(value, theirs[key]) for key, value in module.state_dict().items()), name
    (tmp_path / "sd3" / "text_encoder_3" / "config.json").unlink()
    with pytest.raises(InputError, match=r"not a diffusers Stable Diffusion 3 folder: missing "
                                         r"text_encoder_3/config\.json"):
        load_model(str(tmp_path / "sd3"))


def test_the_unet_methods_refuse_a_flow_model_in_one_line(sd3, tmp_path: Path) -> None:
    from s2edit.editing.editor import Editor

    with pytest.raises(InputError, match=r"^method=p2p does not run on model 'tiny-sd3' \(Stable Diffusion "
                                         r"3\): flow models edit with method=flowedit$"):
        Editor(sd3).invert(IMAGE, "a photo of a cat")
    lora = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_down.lora_down.weight": torch.zeros(1, 1)}, str(lora))
    with pytest.raises(InputError, match=r"^model 'tiny-sd3' is Stable Diffusion 3, a flow-matching model: "
                                         r"lora= needs a UNet family"):
        load_model("tiny-sd3", lora=lora)
    from s2edit.training.config import TrainConfig
    from s2edit.training.run import check_inputs

    config = TrainConfig(model="tiny-flux", image=str(IMAGE), prompt="a photo of a [I] cat", object="cat",
                         out=str(tmp_path / "train"))
    with pytest.raises(InputError, match=r"^model 'tiny-flux' is FLUX\.1, a flow-matching model: identity "
                                         r"fine-tuning needs a UNet family .*method=flowedit$"):
        check_inputs(config)
    assert not (tmp_path / "train").exists()


# ------------------------------------------------------------------------------------------------- FLUX


@pytest.fixture(scope="module")
def flux():
    return load_model("tiny-flux")


@pytest.fixture(scope="module")
def flux_latent(flux) -> torch.Tensor:
    with torch.no_grad():  # a non-square latent (14 × 20): packing works on any even sides
        return flux.encode_image(load_image(IMAGE, resolution=128, multiple=flux.size_multiple))


def test_the_flux_preset_and_its_packed_velocity(flux, flux_latent) -> None:
    assert flux.name == "flux" and flux.guidance_embedding and flux.latent_channels == 16
    assert (flux.latent_scale, flux.latent_shift) == (0.3611, 0.1159)
    assert flux.native_resolution == 128 and flux.size_multiple == 16 and flux_latent.shape[-2:] == (14, 20)
    cond = flux.encode_prompt(["a photo of a cat"])
    assert cond.context.shape == (1, flux.max_sequence_length, 64) and cond.pooled.shape == (1, 32)
    with torch.no_grad():
        v = flux.velocity(flux_latent, 0.7, cond, guidance=torch.tensor([3.0]))
        # the same call made by hand on packed latents (the transformer's own layout)
        from s2edit.core.flow import latent_image_ids, pack_latents, unpack_latents

        packed = flux.transformer(hidden_states=pack_latents(flux_latent), timestep=torch.tensor([0.7]),
                                  guidance=torch.tensor([3.0]), pooled_projections=cond.pooled,
                                  encoder_hidden_states=cond.context, txt_ids=torch.zeros(32, 3),
                                  img_ids=latent_image_ids(14, 20), return_dict=False)[0]
    assert v.shape == flux_latent.shape
    torch.testing.assert_close(v, unpack_latents(packed, 14, 20))
    with pytest.raises(ValueError, match="guidance value per row"):
        flux.velocity(flux_latent, 0.7, cond)
    sigmas = flux.sigmas(28, (14, 20))  # FLUX's μ from the packed length (7 · 10 tokens)
    assert sigmas.shape == (29,) and float(sigmas[0]) == pytest.approx(1.0) and float(sigmas[-1]) == 0.0


def test_flux_guidance_rows_line_up_and_target_equal_to_source_is_exact(flux, flux_latent) -> None:
    src, tar, z_src, z_tar, _, v_src, v_tar = batched_velocities(
        flux, flux_latent, "a photo of a cat", ["a photo of a dog", "a tiger"], seed=1)
    with torch.no_grad():  # one row per branch, each with its own guidance value: as single calls
        torch.testing.assert_close(v_src, flux.velocity(z_src, 0.6, src, torch.tensor([1.5])),
                                   atol=1e-4, rtol=1e-4)
        for k in range(2):
            alone = flux.velocity(z_tar[k:k + 1], 0.6, tar[k], torch.tensor([5.5]))
            torch.testing.assert_close(v_tar[k:k + 1], alone, atol=1e-4, rtol=1e-4)
        swapped = flux.velocity(z_src, 0.6, src, torch.tensor([5.5]))  # the guidance really enters
    assert not torch.allclose(swapped, v_src, atol=1e-4)
    cat = "a photo of a cat"
    same = FlowEditSettings(steps=6, n_max=4, source_guidance=3.0, target_guidance=3.0)
    assert torch.equal(flowedit_latents(flux, flux_latent, cat, [cat], same, seed=2), flux_latent.float())


def test_a_saved_flux_folder_loads_as_flux(flux, tmp_path: Path) -> None:
    flux.pipeline().save_pretrained(tmp_path / "flux")
    loaded = load_model(str(tmp_path / "flux"))
    assert loaded.name == "flux" and loaded.guidance_embedding
    state = loaded.transformer.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in flux.transformer.state_dict().items())
    for name in ("model.safetensors", "config.json"):  # a FLUX folder without its T5
        (tmp_path / "flux" / "text_encoder_2" / name).unlink()
    with pytest.raises(InputError, match=r"^model folder '.*flux' is not a diffusers FLUX\.1 folder: "
                                         r"missing text_encoder_2/config\.json, text_encoder_2/model\."):
        load_model(str(tmp_path / "flux"))


# --------------------------------------------------------------------------------- method=flowedit


def infer_run(argv: list[str], capsys) -> tuple[int, str]:
    from s2edit.editing import run as infer

    return run_cli(infer.main, argv, capsys)


def test_infer_edits_a_flow_model_with_flowedit_and_spl(tmp_path: Path, capsys) -> None:
    """method=auto on a flow model is flowedit; SPL in the loop runs at the executed steps j with
    (j + 1)/n_exec ≥ opt_schedule only, and post-processing lowers each edit's SPL loss."""
    out = tmp_path / "edit"
    code, err = infer_run(["model=tiny-sd3", f"image={IMAGE}", "source=a photo of a cat",
                           "target=a photo of a dog", "target=a cat in the snow", "flowedit.steps=10",
                           "flowedit.n_max=8", "spl.iterations=4", "spl.opt_schedule=0.7", f"out={out}"],
                          capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "flowedit" and report["model"]["family"] == "sd3"
    assert report["edit_settings"]["flowedit"] == {"steps": 10, "n_max": 8, "n_min": 0, "n_avg": 1,
                                                   "source_guidance": 3.5, "target_guidance": 13.5}
    assert [r["step"] for r in report["metrics"]["spl_in_loop"]] == [5, 6, 7]  # (j+1)/8 ≥ 0.7
    for record in report["metrics"]["spl_in_loop"]:
        assert all(a < b for a, b in zip(record["after"]["spl"], record["before"]["spl"]))
    for target in report["metrics"]["targets"]:
        assert target["spl_loss_after"] < target["spl_loss_before"]
    assert {p.name for p in out.iterdir()} >= {"source.png", "reconstruction.png", "edit_0.png",
                                               "edit_1.png"}


def test_spl_in_the_loop_changes_only_its_steps(sd3, source_latent) -> None:
    """The hook replaces z_edit exactly at the scheduled executed steps; an edit without them is the same
    as one whose hook returns z unchanged."""
    from s2edit.editing.methods.flowedit import spl_flow_steps

    assert spl_flow_steps(8, 0.8) == [6, 7] and spl_flow_steps(8, 1.0) == [7]
    assert spl_flow_steps(5, 0.0) == [0, 1, 2, 3, 4]
    settings = FlowEditSettings(steps=8, n_max=6)
    seen: list[int] = []

    def shift_at_4(j: int, n: int, z: torch.Tensor) -> torch.Tensor:
        seen.append(j)
        return z + 0.5 if j == 4 else z

    plain = flowedit_latents(sd3, source_latent, "a cat", ["a dog"], settings, seed=0)
    same = flowedit_latents(sd3, source_latent, "a cat", ["a dog"], settings, seed=0,
                            on_step=lambda j, n, z: z)
    hooked = flowedit_latents(sd3, source_latent, "a cat", ["a dog"], settings, seed=0, on_step=shift_at_4)
    assert seen == [0, 1, 2, 3, 4, 5] and torch.equal(plain, same) and not torch.allclose(plain, hooked)


@pytest.mark.parametrize(("args", "fragment"), [
    (["model=tiny-sd3", "method=p2p"], "method=p2p does not run on model 'tiny-sd3' (Stable Diffusion 3): "
                                       "flow models edit with method=flowedit"),
    (["model=tiny-sd3", "virtual.steps=3"], "method=virtual does not run on model 'tiny-sd3'"),
    (["model=tiny", "method=flowedit"], "method=flowedit does not run on model 'tiny' (Stable Diffusion)"),
    (["model=tiny-sd3", "flowedit.n_max=60", "flowedit.steps=50"],
     "flowedit.n_max=60 exceeds flowedit.steps=50"),
    (["model=tiny-flux", "mask.source_words=[tiger]"], "mask.source_words word 'tiger' is not in the prompt"),
    (["model=tiny-flux", "target=" + " ".join(["a photo of a tiger"] * 10)],
     "is 51 T5 tokens long (with the end token), more than the 32 of model 'tiny-flux'"),
    (["model=tiny-sd3", "offload=true", "device=cpu"], "offload=true moves each component to an accelerator"),
    (["model=tiny", "offload=true"], "offload=true is for the flow families (SD3, FLUX), not model 'tiny'"),
    (["model=tiny-sd3", "method=virtual", "flowedit.n_max=3"],
     "flowedit.n_max=3 is a setting of method=flowedit"),
])
def test_refusals_of_flow_models_and_flowedit(args, fragment, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, err = infer_run([*args, f"image={IMAGE}", "source=a photo of a cat", "target=a photo of a dog",
                           f"out={out}"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert not out.exists()


# --------------------------------------------------------------------------------- joint-attention maps


def test_joint_attention_block_is_the_attention_the_block_computes(sd3) -> None:
    """The image queries' joint softmax, recomputed beside SD3's processor, reproduces that processor's
    image output; each row sums to 1, and its image→text block to the row's text share."""
    import torch.nn.functional as F

    from s2edit.core.joint_attention import image_text_block, joint_probs

    attn = sd3.transformer.transformer_blocks[0].attn
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, 32, generator=gen)
    context = torch.randn(2, 9, 32, generator=gen)
    with torch.no_grad():
        expected, _ = attn.processor(attn, hidden, context)
        probs = joint_probs(attn, hidden, context)
        heads = attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(2, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        values = torch.cat([split(attn.to_v(hidden)), split(attn.add_v_proj(context))], dim=2)
        mixed = (probs @ values).transpose(1, 2).reshape(2, 16, -1)
        torch.testing.assert_close(attn.to_out[0](mixed), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, heads, 16))
    text_share = 1 - probs[..., :16].sum(-1)
    torch.testing.assert_close(probs[..., 16:].sum(-1), text_share, atol=1e-6, rtol=0)
    block = image_text_block(attn, hidden, context)
    assert block.shape == (2, 16, 9)
    torch.testing.assert_close(block.sum(-1), text_share.mean(1), atol=1e-6, rtol=0)
    assert F.mse_loss(block.sum(-1), torch.ones(2, 16)) > 1e-3  # the text share is not 1


def test_word_maps_come_from_the_words_own_columns(sd3, source_latent) -> None:
    from s2edit.core.joint_attention import JointMapStore, word_map

    prompt = "a photo of a cat on the grass"
    cond = sd3.encode_prompt(["", prompt])
    columns = sd3.context_columns(prompt, "cat")
    assert columns == [5, 77 + 4]  # CLIP: <start> a photo of a cat; T5: a photo of a cat (no start token)
    plain = sd3.velocity(source_latent.expand(2, -1, -1, -1), 0.5, cond).detach()
    store = JointMapStore(rows=[1])  # the conditional row only
    with torch.no_grad(), store.reading(sd3.transformer):
        read = sd3.velocity(source_latent.expand(2, -1, -1, -1), 0.5, cond)
    assert torch.equal(read, plain)  # reading changes nothing
    assert store.calls == len(sd3.transformer.transformer_blocks)
    block = store.average()
    assert block.shape == (1, 8 * 8, 77 + sd3.max_sequence_length)
    cat, grass = word_map(block, columns), word_map(block, sd3.context_columns(prompt, "grass"))
    torch.testing.assert_close(cat, block[..., 5] + block[..., 81])
    assert not torch.allclose(cat, grass)
    with pytest.raises(InputError, match="word 'dog' is not in the prompt"):
        sd3.context_columns(prompt, "dog")


def test_the_light_family_tables_agree_with_the_family_classes(tmp_path: Path) -> None:
    from s2edit.core import detect
    from s2edit.core.flow_family import FlowFamily
    from s2edit.core.loading import FAMILIES, preset_names

    assert {name: family.label for name, family in FAMILIES.items()} == detect.LABELS
    assert sorted(name for name, family in FAMILIES.items() if issubclass(family, FlowFamily)) == \
        sorted(detect.FLOW_FAMILIES)
    families = {name: detect.family_name(name) for name in preset_names()}
    assert families == {"sd-v1-random": "sd1", "sdxl-random": "sdxl", "sd3-random": "sd3",
                        "flux-random": "flux", "shapes": "sd1", "tiny": "sd1", "tiny-flux": "flux",
                        "tiny-lcm": "sd1", "tiny-sd3": "sd3", "tiny-v": "sd2", "tiny-xl": "sdxl",
                        "tiny-xl-lcm": "sdxl"}
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    assert detect.family_name(str(tmp_path)) == "flux"
    assert detect.family_name("nobody/not-cached-anywhere") is None


def test_flowedit_masks_come_from_the_joint_maps_of_the_edit_steps(sd3, source_latent, tmp_path: Path,
                                                                     capsys) -> None:
    """The store reads the conditional rows [source, target] at every edit step (not in the sampling
    tail); infer.py turns the mask words' maps into SPEC §6 masks (mask_0 = max(source, target_0))."""
    from editkit.images import load_mask
    from s2edit.core.joint_attention import JointMapStore

    store = JointMapStore()
    settings = FlowEditSettings(steps=8, n_max=5, n_min=2)
    flowedit_latents(sd3, source_latent, "a photo of a cat", ["a photo of a dog"], settings, maps=store)
    assert store.rows == [1, 3] and store.calls == 3 * len(sd3.transformer.transformer_blocks)
    tokens = (source_latent.shape[-2] // 2) * (source_latent.shape[-1] // 2)  # patch 2
    assert store.average().shape == (2, tokens, 77 + sd3.max_sequence_length)
    out = tmp_path / "edit"
    code, err = infer_run(["model=tiny-sd3", f"image={IMAGE}", "source=a photo of a cat",
                           "target=a photo of a dog", "flowedit.steps=8", "flowedit.n_max=6",
                           "spl.iterations=3", "mask.source_words=[cat]", "mask.target_words=[dog]",
                           "mask.source_threshold=0.99", "mask.target_threshold=0.99",  # random maps: flat
                           "spl.structure_area=masked", f"out={out}"], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert set(report["files"]["masks"]) == {"source", "target_0", "mask_0"}
    size = load_image(IMAGE, resolution=128, multiple=16).shape[-2:]
    source, target, final = (load_mask(out / report["files"]["masks"][k], tuple(size))
                             for k in ("source", "target_0", "mask_0"))
    torch.testing.assert_close(final, torch.maximum(source, target), atol=1 / 255, rtol=0)
    assert 0 < float(final.mean()) < 0.5 and not torch.allclose(source, target, atol=0.05)


def test_flux_joint_block_is_the_attention_the_double_stream_block_computes(flux) -> None:
    """FLUX's image queries' softmax over [text; image] keys after the rotary embedding, recomputed beside
    `FluxAttnProcessor`, reproduces its image output; the image→text block sums to the text share."""
    from s2edit.core.flow import latent_image_ids
    from s2edit.core.joint_attention import flux_image_text_block, flux_joint_probs

    attn = flux.transformer.transformer_blocks[0].attn
    gen = torch.Generator().manual_seed(0)
    text, image = 5, 12  # a 3 × 4 token grid
    hidden = torch.randn(2, image, attn.inner_dim, generator=gen)
    context = torch.randn(2, text, attn.inner_dim, generator=gen)
    ids = torch.cat([torch.zeros(text, 3), latent_image_ids(6, 8)])
    rotary = flux.transformer.pos_embed(ids)
    with torch.no_grad():
        expected, _ = attn.processor(attn, hidden, context, image_rotary_emb=rotary)
        probs = flux_joint_probs(attn, hidden, context, rotary)
        without_rope = flux_joint_probs(attn, hidden, context)
        values = torch.cat([attn.add_v_proj(context), attn.to_v(hidden)], dim=1)
        values = values.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        mixed = (probs @ values).transpose(1, 2).reshape(2, image, -1)
        torch.testing.assert_close(attn.to_out[0](mixed), expected, atol=1e-5, rtol=1e-5)
        block = flux_image_text_block(attn, hidden, context, image_rotary_emb=rotary)
    assert not torch.allclose(probs, without_rope, atol=1e-4)  # the positions enter the softmax
    text_share = probs[..., :text].sum(-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, attn.heads, image))
    assert block.shape == (2, image, text)
    torch.testing.assert_close(block.sum(-1), text_share.mean(1), atol=1e-6, rtol=0)


def test_flux_word_maps_read_every_double_stream_block_and_change_nothing(flux, flux_latent) -> None:
    """Reading keeps FLUX's output bit-identical (the rotary embedding still reaches the processor); the
    store sees the double-stream blocks only, and a word's columns are its T5 positions."""
    from s2edit.core.joint_attention import JointMapStore, word_map

    prompt = "a photo of a cat on the grass"
    cond = flux.encode_prompt([prompt])
    guidance = torch.tensor([3.0])
    with torch.no_grad():
        plain = flux.velocity(flux_latent, 0.5, cond, guidance)
        store = JointMapStore()
        with store.reading(flux.transformer, flux.read_joint_block):
            read = flux.velocity(flux_latent, 0.5, cond, guidance)
    assert torch.equal(read, plain)
    assert store.calls == len(flux.transformer.transformer_blocks)
    assert flux.context_columns(prompt, "cat") == [4]  # T5: a photo of a cat (no start token)
    block = store.average()
    assert block.shape == (1, 7 * 10, flux.max_sequence_length)  # (14/2) × (20/2) packed tokens
    torch.testing.assert_close(word_map(block, [4]), block[..., 4])


def test_flowedit_on_flux_writes_masks_and_word_maps(tmp_path: Path, capsys) -> None:
    """The issue's command on tiny-flux: the edit, the §6 masks from the double-stream maps, each word's
    map per prompt, and the report."""
    out = tmp_path / "edit"
    code, err = infer_run(["model=tiny-flux", f"image={IMAGE}", "source=a photo of a cat",
                           "target=a photo of a tiger", "method=flowedit", "flowedit.steps=6",
                           "flowedit.n_max=4", "spl.iterations=2", "mask.source_words=[cat]",
                           "mask.target_words=[tiger]", "mask.source_threshold=0.99",
                           "mask.target_threshold=0.99", f"out={out}"], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "flowedit" and report["model"]["family"] == "flux"
    assert set(report["files"]["masks"]) == {"source", "target_0", "mask_0"}
    maps = report["files"]["attention"]
    assert set(maps) == {"source", "target_0"}
    assert set(maps["source"]) == {"a", "photo", "of", "cat"} and "tiger" in maps["target_0"]
    assert all((out / path).is_file() for row in maps.values() for path in row.values())
    assert (out / "edit_0.png").is_file()


def test_offload_hooks_every_component_and_changes_no_value(sd3, source_latent) -> None:
    """`offload=True`: diffusers' model CPU offload over the family's own modules (one hook per component,
    chained text encoders → transformer → VAE); the edit is the same as without it. Here the "accelerator"
    is the CPU itself, so the test sees the hooks and the values, not the transfers."""
    offloaded = load_model("tiny-sd3", offload=True, device="cpu")
    assert offloaded.offload_device == torch.device("cpu", 0) == offloaded.device
    hooked = [m for m in offloaded.components().values() if hasattr(m, "_hf_hook")]
    assert len(hooked) == len(offloaded.components()) == len(offloaded.pipeline()._all_hooks) == 5
    settings = FlowEditSettings(steps=6, n_max=4)
    with torch.no_grad():
        latent = offloaded.encode_image(load_image(IMAGE, resolution=128))
    torch.testing.assert_close(latent, source_latent)
    plain = flowedit_latents(sd3, source_latent, "a photo of a cat", ["a photo of a dog"], settings, seed=3)
    moved = flowedit_latents(offloaded, latent, "a photo of a cat", ["a photo of a dog"], settings, seed=3)
    torch.testing.assert_close(moved, plain)
    with pytest.raises(TypeError, match="is offloaded to cpu:0"):
        offloaded.to("cpu")
    with pytest.raises(InputError, match="offload=true is for the flow families"):
        load_model("tiny", offload=True)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_bf16_flow_models_match_fp32_to_bf16_precision(name: str) -> None:
    """precision=bf16: every component in bfloat16, the velocity (returned in fp32) within bf16's rounding
    of the fp32 model's, and the same FlowEdit schedule."""
    full, half = load_model(name), load_model(name, dtype=torch.bfloat16)
    assert {m.dtype for m in half.components().values()} == {torch.bfloat16}
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, 8, 8, generator=gen)
    guidance = torch.tensor([3.0]) if full.guidance_embedding else None
    with torch.no_grad():
        exact = full.velocity(z, 0.6, full.encode_prompt(["a photo of a cat"]), guidance)
        rounded = half.velocity(z, 0.6, half.encode_prompt(["a photo of a cat"]), guidance)
    assert rounded.dtype == torch.float32
    error = float((rounded - exact).norm() / exact.norm())
    assert 0 < error < 0.05, error
    assert torch.equal(full.sigmas(10, (8, 8)), half.sigmas(10, (8, 8)))


def test_the_full_size_flow_presets_have_the_published_parameter_counts() -> None:
    """sd3-random / flux-random are SD3-medium's and FLUX.1-dev's architectures (built on the meta device:
    shapes only). T5-XXL's token table has the offline stand-in tokenizer's 34 486 rows instead of 32 128."""
    from s2edit.core.loading import preset_components

    t5_xxl = 4_762_310_656 + (len(t5_tokenizer()) - 32_128) * 4096
    counts = {name: {part: sum(p.numel() for p in module.parameters())
                     for part, module in preset_components(name, device="meta").items()}
              for name in ("sd3-random", "flux-random")}
    assert counts["sd3-random"] == {"transformer": 2_028_328_000, "vae": 83_819_683,
                                    "text_encoder": 123_650_304, "text_encoder_2": 694_659_840,
                                    "text_encoder_3": t5_xxl}
    assert counts["flux-random"] == {"transformer": 11_901_408_320, "vae": 83_819_683,
                                     "text_encoder": 123_060_480, "text_encoder_2": t5_xxl}
