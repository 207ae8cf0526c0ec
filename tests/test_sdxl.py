"""The SDXL family (SPEC §10) on `tiny-xl`: prompt encoding equals diffusers' SDXL pipeline, the added
conditioning travels with its rows, the VAE upcasts, folders load as SDXL (and half folders are refused),
the random full-size preset has SDXL base's parameter counts, and `lora=` fuses a LoRA into the UNet."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
from safetensors.torch import save_file

from conftest import lora_file, tolerance
from editkit.errors import InputError
from s2edit.core.attention import stored_map_bytes, unet_attention_layers
from s2edit.core.family import Conditioning, NonFiniteError
from s2edit.core.loading import load_model, preset_components
from s2edit.core.stable_diffusion_xl import StableDiffusionXL

PROMPT = "a photo of a cat"
EOS, EXCLAMATION = 49407, 0  # CLIP's end token; "!" pads SDXL's second tokenizer


@pytest.fixture(scope="module")
def xl() -> StableDiffusionXL:
    return load_model("tiny-xl")


def sdxl_pipeline(model: StableDiffusionXL, force_zeros: bool = True) -> StableDiffusionXLPipeline:
    """diffusers' own SDXL pipeline around the same components: the reference."""
    return StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
        tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=model.unet,
        scheduler=EulerDiscreteScheduler.from_config(model.scheduler_config),
        force_zeros_for_empty_prompt=force_zeros, add_watermarker=False,
    )


def test_tiny_xl_answers_the_interface_with_sdxl_geometry(xl) -> None:
    assert isinstance(xl, StableDiffusionXL) and xl.name == "sdxl" and xl.default_finetune == "lora"
    assert (xl.native_resolution, xl.size_multiple, xl.vae_scale_factor) == (256, 32, 8)
    assert xl.mask_level == xl.self_replace_level == 4  # side image/32: 32² at 1024², 8² at 256²
    assert xl.upcast_vae and xl.fused_self_attention and xl.force_zeros_for_empty_prompt
    cross_levels = {layer.level for layer in xl.attention_layers().values() if layer.is_cross}
    assert cross_levels == {2, 4}  # cross-attention only at latent/2 and latent/4 (REFERENCES)
    assert list(xl.trainable_components()) == ["unet"]  # the encoders train only the placeholder rows
    # editing runs the DDIM chain of the model's betas, whatever scheduler the folder ships (Euler)
    assert xl.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert isinstance(xl.scheduler, DDIMScheduler)
    assert (xl.scheduler.config.timestep_spacing, xl.scheduler.config.steps_offset) == ("leading", 1)
    scheduler = DDIMScheduler.from_config(xl.scheduler.config)
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[0] == 981 and scheduler.timesteps[-1] == 1


@torch.no_grad()
def test_prompt_encoding_equals_diffusers_sdxl_pipeline(xl) -> None:
    context, uncond, pooled, uncond_pooled = sdxl_pipeline(xl).encode_prompt(PROMPT, device="cpu")
    ours = xl.encode_prompt([PROMPT])
    assert ours.context.shape == (1, 77, 64)  # 32 + 32 channels: both encoders' penultimate states
    torch.testing.assert_close(ours.context, context, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)
    null = xl.unconditional()  # force_zeros_for_empty_prompt: zeros, as the pipeline
    assert not uncond.any() and not uncond_pooled.any()
    assert torch.equal(null.context, uncond) and torch.equal(null.pooled, uncond_pooled)
    # a model that does not force zeros: the encoding of "", as the pipeline's negative prompt ""
    no_zeros = StableDiffusionXL(unet=xl.unet, vae=xl.vae, text_encoders=xl.text_encoders,
                                 tokenizers=xl.tokenizers, scheduler=xl.scheduler, source="tiny-xl",
                                 pipeline_config={"force_zeros_for_empty_prompt": False})
    _, uncond, _, uncond_pooled = sdxl_pipeline(xl, force_zeros=False).encode_prompt(PROMPT, device="cpu")
    torch.testing.assert_close(no_zeros.unconditional().context, uncond, rtol=0, atol=0)
    torch.testing.assert_close(no_zeros.unconditional().pooled, uncond_pooled, rtol=0, atol=0)


@torch.no_grad()
def test_the_pooled_embedding_is_taken_at_the_end_token_even_after_a_placeholder() -> None:
    """transformers pools configs with `eos_token_id: 2` at the LARGEST id: an added placeholder token.
    SPEC §10 pools at the end token."""
    model = load_model("tiny-xl")
    token = model.add_placeholder("[I]", "cat")
    prompt = "a photo of a [I] cat"
    ids = model.tokenize([prompt], 1)
    end = int((ids[0] == EOS).nonzero()[0])
    encoding = model.encode_text([prompt])
    by_hand = model.text_encoders[1].text_projection(encoding.hidden[1][0, end])
    torch.testing.assert_close(encoding.conditioning.pooled[0], by_hand, rtol=0, atol=0)
    argmax_rule = model.text_encoders[1](ids).text_embeds[0]  # pooled at the placeholder (id 49408)
    assert int(ids[0].argmax()) == int((ids[0] == token).nonzero()[0])
    assert not torch.allclose(argmax_rule, by_hand)


def test_both_tokenizers_give_the_same_positions_and_one_placeholder_token() -> None:
    model = load_model("tiny-xl")
    first, second = model.tokenize([PROMPT], 0)[0], model.tokenize([PROMPT], 1)[0]
    end = int((first == EOS).nonzero()[0])
    assert torch.equal(first[: end + 1], second[: end + 1])  # only the padding differs
    assert set(first[end + 1 :].tolist()) == {EOS} and set(second[end + 1 :].tolist()) == {EXCLAMATION}
    assert model.word_positions(PROMPT, "cat") == [[5], [5]]
    rows = [encoder.get_input_embeddings().weight for encoder in model.text_encoders]
    cat = [row[int(first[5])].clone() for row in rows]
    token = model.add_placeholder("[I]", "cat")
    assert [t("[I]", add_special_tokens=False).input_ids for t in model.tokenizers] == [[token], [token]]
    for row, init in zip((e.get_input_embeddings().weight for e in model.text_encoders), cat, strict=True):
        assert torch.equal(row[token], init)  # each encoder's row starts from its own row of the word
    assert model.word_positions("a photo of a [I] cat", "[I]") == [[5], [5]]


@torch.no_grad()
def test_pooled_embeddings_and_time_ids_travel_with_their_rows(xl) -> None:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor(500)
    cond = xl.encode_prompt(["a photo of a cat", "a photo of a dog"])
    out = xl.predict(z, t, cond)
    close = tolerance(torch.float32, scale=float(out.abs().max()))
    torch.testing.assert_close(xl.predict(z.flip(0), t, cond[[1, 0]]), out.flip(0), **close)  # rows swap
    swapped = Conditioning(cond.context, cond.pooled.flip(0))  # each row now carries the other's pooled
    mixed = xl.predict(z, t, swapped)
    assert (mixed[0] - out[0]).abs().max() > 100 * close["atol"]  # the UNet reads the pooled embedding …
    torch.testing.assert_close(mixed[:1], xl.predict(z[:1], t, swapped[0]), **close)  # … of its own row
    # time ids = (H, W, 0, 0, H, W) at the working size, exactly as diffusers' pipeline builds them
    pipeline = sdxl_pipeline(xl)
    time_ids = pipeline._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32,
                                          text_encoder_projection_dim=32).repeat(2, 1)
    assert torch.equal(xl.time_ids((8, 8), 2, cond.context), time_ids)
    reference = xl.unet(z, t, encoder_hidden_states=cond.context,
                        added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": time_ids}).sample
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    other_size = xl.time_ids((16, 16), 2, cond.context)  # the same latents said to be 128² instead of 64²
    resized = xl.unet(z, t, encoder_hidden_states=cond.context,
                      added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": other_size}).sample
    assert (resized - out).abs().max() > 100 * close["atol"]


@torch.no_grad()
def test_the_vae_runs_in_float32_in_a_bf16_model_and_nan_is_refused() -> None:
    model = load_model("tiny-xl", dtype=torch.bfloat16)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    image = model.decode_latents(latents.bfloat16(), clamp=False)
    assert model.vae.dtype == torch.bfloat16 and image.dtype == torch.bfloat16  # cast back afterwards
    vae = model.vae
    in_fp32 = vae.float().decode(latents.bfloat16().float() / model.latent_scale).sample
    in_bf16 = vae.to(torch.bfloat16).decode(latents.bfloat16() / model.latent_scale).sample.float()
    error_ours, error_bf16 = (image.float() - in_fp32).abs().max(), (in_bf16 - in_fp32).abs().max()
    assert error_ours <= 0.01 * float(in_fp32.abs().max()) and error_ours < error_bf16 / 4
    with pytest.raises(NonFiniteError, match=r"NaN or infinite pixels \(from the latents"):
        model.decode_latents(torch.full((1, 4, 8, 8), float("nan"), dtype=torch.bfloat16))


def test_a_saved_sdxl_folder_loads_as_sdxl_and_a_half_folder_is_refused(xl, tmp_path) -> None:
    folder = tmp_path / "sdxl"
    sdxl_pipeline(xl).save_pretrained(folder)
    loaded = load_model(str(folder))
    assert isinstance(loaded, StableDiffusionXL) and loaded.force_zeros_for_empty_prompt
    assert loaded.tokenizers[1].pad_token == "!"
    assert loaded.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    z, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor(300)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(z, t, loaded.encode_prompt([PROMPT])),
                                   xl.predict(z, t, xl.encode_prompt([PROMPT])), rtol=0, atol=0)
    for part in ("text_encoder_2", "tokenizer_2"):  # half an SDXL folder: one line naming the part
        half = tmp_path / f"no_{part}"
        sdxl_pipeline(xl).save_pretrained(half)
        for file in (half / part).iterdir():
            file.unlink()
        with pytest.raises(InputError, match=rf"not a diffusers SDXL folder: missing {part}/"):
            load_model(str(half))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"


def test_sdxl_random_has_sdxl_base_parameter_counts() -> None:
    parts = preset_components("sdxl-random", device="meta")  # no memory: shapes only
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}


def test_stored_attention_at_1024_is_one_map_sum_per_level() -> None:
    """The store of an SDXL edit at 1024²: masks, LocalBlend and the word maps need only the level-4
    (32²) cross-attention maps, summed over layers and steps; 64² maps and self-attention maps are never
    stored."""
    layers = unet_attention_layers(preset_components("sdxl-random", device="meta")["unet"])
    cross = [layer.level for layer in layers.values() if layer.is_cross]
    assert (cross.count(4), cross.count(2), len(cross)) == (60, 10, 70)  # 2·10 + 10 + 3·10 at 32², 64²
    rows, tokens = 1 + 3, 77  # the source and three targets
    stored = stored_map_bytes(layers, (128, 128), levels=(4,), rows=rows, tokens=tokens)
    assert stored == rows * 32 * 32 * tokens * 4 == 1_261_568  # 1.2 MiB, whatever the steps
    per_step_and_layer = 50 * 60 * rows * 32 * 32 * tokens * 4  # keeping every step's every layer
    assert per_step_and_layer / stored == 3000


# ----------------------------------------------------------------------------------------- lora=


@torch.no_grad()
@pytest.mark.parametrize("prefix", ["unet.", ""])
def test_a_lora_file_fuses_into_the_unet(xl, tmp_path, prefix) -> None:
    path = tmp_path / "lora.safetensors"
    adapted = lora_file(xl, path, prefix)
    fused = load_model("tiny-xl", lora=path)
    assert not any("lora" in name for name, _ in fused.unet.named_parameters())  # merged, adapter gone
    z, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor(400)
    cond = fused.encode_prompt([PROMPT])
    expected = adapted(z, t, **fused.unet_inputs(cond, (8, 8))).sample
    out = fused.predict(z, t, cond)
    torch.testing.assert_close(out, expected, **tolerance(torch.float32, scale=float(expected.abs().max())))
    assert (out - xl.predict(z, t, cond)).abs().max() > 1e-3  # and it changed the model


def test_lora_files_that_cannot_load_are_refused_in_one_line(xl, tmp_path) -> None:
    sd_lora = tmp_path / "sd1.safetensors"
    lora_file(load_model("tiny"), sd_lora)  # a LoRA of the SD1-layout UNet
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not safetensors")
    text_only = tmp_path / "text.safetensors"
    save_file({"text_encoder.layer.lora_A.weight": torch.zeros(2, 2)}, str(text_only))
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"")
    cases = {
        str(tmp_path / "missing.safetensors"): "does not exist",
        str(tmp_path): "is a folder",
        str(pickle): r"is a pickle \(.bin\)",
        str(corrupt): "is not a readable safetensors file",
        str(text_only): "holds no UNet LoRA weights",
        str(sd_lora): "does not fit the UNet of 'tiny-xl'",
    }
    for path, message in cases.items():
        with pytest.raises(InputError, match=message) as error:
            load_model("tiny-xl", lora=path)
        assert "\n" not in str(error.value) and path in str(error.value)
