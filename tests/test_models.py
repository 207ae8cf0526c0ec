"""Model loading: the tiny / random SD architectures, diffusers folders and their family, offline failures,
DDIM settings."""

import json
import logging
import shutil

import diffusers
import pytest
import torch
from diffusers import PNDMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from conftest import ROOT
from editkit.errors import InputError
from s2edit.core.family import ModelFamily
from s2edit.core.loading import PRESET_DIR, ddim_scheduler, load_model, preset_names, random_model
from s2edit.core.stable_diffusion import StableDiffusion, StableDiffusion2
from s2edit.core.tokenizer import default_cache_dir

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Parameter counts of CompVis/stable-diffusion-v1-4 (UNet ~860M, VAE ~84M, CLIP ViT-L/14 text ~123M)
SD_V1_PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


@pytest.fixture(scope="module")
def tiny() -> ModelFamily:
    return load_model("tiny")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_properties(tiny):
    assert (tiny.vae_scale_factor, tiny.latent_channels, tiny.size_multiple) == (8, 4, 64)
    assert tiny.device == torch.device("cpu") and tiny.dtype == torch.float32
    assert tiny.text_encoder.config.vocab_size == len(tiny.tokenizer) == 49408
    assert tiny.tokenizer.model_max_length == tiny.text_encoder.config.max_position_embeddings == 77
    assert not tiny.unet.training and not tiny.vae.training and not tiny.text_encoder.training
    assert tiny.source == "tiny" and tiny.name == "sd1" and isinstance(tiny, StableDiffusion)
    assert preset_names() == ["flux-random", "sd-v1-random", "sd3-random", "sdxl-random", "shapes", "tiny",
                              "tiny-flux", "tiny-lcm", "tiny-sd3", "tiny-v", "tiny-xl", "tiny-xl-lcm"]


@torch.no_grad()
def test_tiny_shapes_non_square(tiny):
    image = torch.rand(1, 3, 256, 192) * 2 - 1
    latents = tiny.encode_image(image).expand(2, -1, -1, -1)
    assert latents.shape == (2, tiny.latent_channels, 256 // 8, 192 // 8)
    states = tiny.encode_prompt(["a photo of a woman", "a cat"]).context
    assert states.shape == (2, tiny.tokenizer.model_max_length, tiny.text_encoder.config.hidden_size)
    out = tiny.unet(latents, torch.tensor([500, 20]), encoder_hidden_states=states).sample
    assert out.shape == latents.shape
    decoded = tiny.decode_latents(latents)
    assert decoded.shape == (2, *image.shape[1:]) and decoded.min() >= -1 and decoded.max() <= 1


@torch.no_grad()
def test_encode_is_scaled_posterior_mean_and_decode_inverts_the_scaling(tiny):
    image = torch.rand(1, 3, 128, 64) * 2 - 1
    scaling = tiny.vae.config.scaling_factor
    latents = tiny.encode_image(image)
    assert torch.equal(latents, tiny.encode_image(image))  # the mean: no sampling
    torch.testing.assert_close(latents, tiny.vae.encode(image).latent_dist.mean * scaling)
    raw = tiny.vae.decode(latents / scaling).sample
    torch.testing.assert_close(tiny.decode_latents(latents, clamp=False), raw)
    with pytest.raises(ValueError, match="multiple of 64"):
        tiny.encode_image(torch.zeros(1, 3, 100, 64))


def test_encode_prompt_refuses_long_prompts(tiny):
    with pytest.raises(InputError, match="tokens long"):
        tiny.encode_prompt(["a " * 80])


class _QueryRecorder(AttnProcessor2_0):
    """Standard attention that records the query count of each cross-attention call."""

    def __init__(self, name: str, seen: dict[str, int]):
        super().__init__()
        self.name, self.seen = name, seen

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            self.seen[self.name] = hidden_states.shape[1]
        return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


@torch.no_grad()
def test_tiny_has_sd_v1_attention_layout(tiny):
    with torch.device("meta"):
        sd_v1 = random_model("sd-v1-random")
    assert list(tiny.unet.attn_processors) == list(sd_v1.unet.attn_processors)  # same layers, same names
    seen: dict[str, int] = {}
    tiny.unet.set_attn_processor({name: _QueryRecorder(name, seen) for name in tiny.unet.attn_processors})
    try:
        h, w = 32, 24  # latent of a 256×192 image
        states = tiny.encode_prompt(["a photo"]).context
        tiny.unet(torch.randn(1, 4, h, w), torch.tensor([10]), encoder_hidden_states=states)
    finally:
        tiny.unet.set_attn_processor(AttnProcessor2_0())
    assert len(seen) == sum(name.endswith("attn2.processor") for name in tiny.unet.attn_processors)
    by_block = {}
    for name, queries in seen.items():
        by_block.setdefault(name.split(".attentions")[0], set()).add(queries)
    # Cross-attention at latent/1, /2, /4 going down and up (as SD v1), and latent/8 in the middle
    assert by_block == {
        "down_blocks.0": {h * w}, "down_blocks.1": {h * w // 4}, "down_blocks.2": {h * w // 16},
        "mid_block": {h * w // 64},
        "up_blocks.1": {h * w // 16}, "up_blocks.2": {h * w // 4}, "up_blocks.3": {h * w},
    }
    # The "16×16 layers" of SD at 512² (image/32) exist in both directions
    assert sum(q == (h * 8 // 32) * (w * 8 // 32) for q in seen.values()) == 2 + 3


def test_same_seed_same_weights():
    state = torch.get_rng_state()
    a, b, c = (random_model("tiny", seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    for part in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(m, part).state_dict() for m in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_sd_v1_random_is_full_size_without_allocating():
    with torch.device("meta"):
        sd = random_model("sd-v1-random")
    assert sd.unet.device == torch.device("meta")
    assert {part: _count(getattr(sd, part)) for part in SD_V1_PARAMS} == SD_V1_PARAMS
    assert sd.vae_scale_factor == 8
    assert sd.text_encoder.config.hidden_size == sd.unet.config.cross_attention_dim


def test_tiny_is_small(tiny):
    assert _count(tiny.unet) < 5e6 and _count(tiny.vae) < 1e6 and _count(tiny.text_encoder) < 2e6


def test_dtype_argument():
    sd = load_model("tiny", dtype=torch.bfloat16)
    assert {sd.unet.dtype, sd.vae.dtype, sd.text_encoder.dtype} == {torch.bfloat16}
    with torch.no_grad():
        latents = sd.encode_image(torch.zeros(1, 3, 64, 64))
    assert latents.dtype == torch.float32  # follows the input


def test_ddim_scheduler_settings():
    config = json.loads((PRESET_DIR / "sd-v1-random" / "scheduler.json").read_text())
    for source in (config, PNDMScheduler.from_config(config)):
        scheduler = ddim_scheduler(source)
        assert scheduler.config.clip_sample is False and scheduler.config.set_alpha_to_one is False
        assert scheduler.config.steps_offset == 1 and scheduler.config.beta_schedule == "scaled_linear"
        assert scheduler.final_alpha_cumprod == scheduler.alphas_cumprod[0]
        scheduler.set_timesteps(50)
        assert len(scheduler.timesteps) == 50
        assert (scheduler.timesteps[0].item(), scheduler.timesteps[-1].item()) == (981, 1)
    v_prediction = ddim_scheduler({**config, "prediction_type": "v_prediction", "clip_sample": True})
    assert v_prediction.config.prediction_type == "v_prediction" and v_prediction.config.clip_sample is False


def test_hub_id_offline_fails_fast_with_a_hint():
    with pytest.raises(InputError) as error:
        load_model("s2edit-tests/no-such-model", local_files_only=True)
    message = str(error.value)
    assert "could not load model 's2edit-tests/no-such-model'" in message
    assert "model=/path/to/stable-diffusion-v1-4" in message and "model=tiny" in message
    assert "\n" not in message


def test_hub_offline_env_is_honoured(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"'s2edit-tests/no-such-model'.*offline mode"):
        load_model("s2edit-tests/no-such-model")


def test_hub_id_without_network_fails(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens: like an unreachable hub
    monkeypatch.setattr("s2edit.core.loading.hub_constants.ENDPOINT", "https://127.0.0.1:9")
    monkeypatch.setattr("s2edit.core.loading.hub_constants.HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InputError, match=r"could not load model 's2edit-tests/no-such-model'.*unreachable"):
        load_model("s2edit-tests/no-such-model")


@pytest.mark.parametrize("model", ["not a model name!", "owner/name/extra/../x y"])
def test_bad_model_names(model):
    with pytest.raises(InputError, match="model"):
        load_model(model)


def test_incomplete_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "weights.ckpt").write_text("")
    with pytest.raises(InputError, match="is a file, not a folder"):
        load_model(str(tmp_path / "weights.ckpt"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(InputError) as error:
        load_model(str(tmp_path))
    message = str(error.value)
    assert "not a diffusers Stable Diffusion folder" in message and str(tmp_path) in message
    for piece in ("unet/diffusion_pytorch_model.safetensors", "vae/config.json", "text_encoder/config.json",
                  "tokenizer/tokenizer.json or vocab.json", "scheduler/scheduler_config.json"):
        assert piece in message
    assert "unet/config.json" not in message


def _save_folder(sd: ModelFamily, folder) -> None:
    for part in COMPONENTS:
        getattr(sd, part).save_pretrained(folder / part)
    classes = {"unet": "diffusers", "vae": "diffusers", "scheduler": "diffusers",
               "text_encoder": "transformers", "tokenizer": "transformers"}
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             **{part: [library, type(getattr(sd, part)).__name__] for part, library in classes.items()}}
    (folder / "model_index.json").write_text(json.dumps(index))


@torch.no_grad()
def test_diffusers_folder_round_trip(tmp_path):
    sd = load_model("tiny", seed=3)
    sd.add_placeholder("[I]", "woman")
    _save_folder(sd, tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.source == str(tmp_path) and loaded.name == "sd1"
    prompt = "a photo of a [I] woman"
    assert loaded.tokenizer(prompt).input_ids == sd.tokenizer(prompt).input_ids
    assert loaded.tokenizer.model_max_length == 77
    for part in ("unet", "vae", "text_encoder"):
        saved, back = getattr(sd, part).state_dict(), getattr(loaded, part).state_dict()
        assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved), part
    # Same weights; outputs agree to float rounding (loaded tensors may sit differently in memory)
    image = torch.rand(1, 3, 128, 128) * 2 - 1
    latents, states = sd.encode_image(image), sd.encode_prompt([prompt]).context
    torch.testing.assert_close(loaded.encode_prompt([prompt]).context, states, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded.encode_image(image), latents, rtol=0, atol=1e-5)
    timestep = torch.tensor([10])
    torch.testing.assert_close(loaded.unet(latents, timestep, states).sample,
                               sd.unet(latents, timestep, states).sample, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded.decode_latents(latents), sd.decode_latents(latents), rtol=0, atol=1e-5)
    assert loaded.scheduler.config.clip_sample is False and loaded.scheduler.config.steps_offset == 1

    # SD v1-4's tokenizer folder may hold only vocab.json + merges.txt (no max length): taken from the encoder
    shutil.rmtree(tmp_path / "tokenizer")
    (tmp_path / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(default_cache_dir() / name, tmp_path / "tokenizer" / name)
    plain = load_model(str(tmp_path))
    assert plain.tokenizer.model_max_length == 77
    assert plain.tokenizer("a photo").input_ids == [49406, 320, 1125, 49407]


def test_the_empty_float32_list_warning_of_diffusers_is_filtered() -> None:
    import s2edit.core.loading  # noqa: F401  (installs the filter)

    logger = logging.getLogger("diffusers.models.modeling_utils")

    def record(message: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, message, None, None)

    noise = "There are modules in UNet2DConditionModel that should be kept in float32: []. Casting directly"
    assert not logger.filter(record(noise))
    assert logger.filter(record("There are modules in X that should be kept in float32: ['norm']"))


def test_a_local_lcm_folder_keeps_its_scheduler_for_the_virtual_editor(tmp_path):
    """A diffusers folder whose scheduler is an LCMScheduler (as SimianLuo/LCM_Dreamshaper_v7) loads through
    model=PATH; the inversion path still gets SPEC §3's DDIM, the virtual editor LCM timesteps (SPEC §9)."""
    from diffusers import LCMScheduler

    from s2edit.core.diffusion import is_lcm
    from s2edit.core.settings import SPLSettings, VirtualSettings
    from s2edit.editing.editor import Editor

    _save_folder(load_model("tiny-lcm", seed=0), tmp_path)
    lcm_config = json.loads((PRESET_DIR / "tiny-lcm" / "scheduler.json").read_text())
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(lcm_config))
    sd = load_model(str(tmp_path))
    assert is_lcm(sd.scheduler_config) and type(sd.scheduler).__name__ == "DDIMScheduler"
    assert sd.scheduler.config.set_alpha_to_one is False  # SPEC §3 DDIM for inversions
    timesteps = []
    editor = Editor(sd, weights="lcm-folder", progress=False)
    image = editor.load_image(ROOT / "examples" / "chelsea.png", 128)
    editor.edit_virtual(image, "a photo of a cat", ["a photo of a tiger"], virtual=VirtualSettings(steps=4),
                        spl=SPLSettings(structure=False, postprocess=False),
                        callback=lambda state: timesteps.append(int(state.timestep)))
    reference = LCMScheduler.from_config(lcm_config)
    reference.set_timesteps(4, original_inference_steps=50)
    assert timesteps == reference.timesteps.tolist()


def test_tiny_v_is_the_sd2_family_predicting_v():
    model = load_model("tiny-v")
    assert isinstance(model, StableDiffusion2) and model.name == "sd2"
    assert model.prediction_type == model.scheduler.config.prediction_type == "v_prediction"
    tiny = load_model("tiny")
    for part in ("unet", "vae", "text_encoder"):  # tiny's architecture and seed-0 weights, another scheduler
        a, b = getattr(model, part).state_dict(), getattr(tiny, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    z, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    alpha = 0.3  # v = √ᾱ·ε − √(1−ᾱ)·x0 and z = √ᾱ·x0 + √(1−ᾱ)·ε  ⇒  ε = √ᾱ·v + √(1−ᾱ)·z
    x0 = (z - (1 - alpha) ** 0.5 * eps) / alpha ** 0.5
    v = alpha ** 0.5 * eps - (1 - alpha) ** 0.5 * x0
    torch.testing.assert_close(model.to_epsilon(v, z, alpha), eps, atol=1e-5, rtol=1e-5)
    assert torch.equal(tiny.to_epsilon(eps, z, alpha), eps)


@pytest.mark.parametrize(("change", "family"), [
    ({}, "sd1"),
    ({"scheduler": {"prediction_type": "v_prediction"}}, "sd2"),  # SD 2.x 768-v
    ({"text_encoder": {"hidden_size": 1024}}, "sd2"),  # SD 2.x base: OpenCLIP ViT-H, ε
])
def test_the_family_is_detected_from_the_folder(change, family):
    configs = {"scheduler": {"prediction_type": "epsilon"}, "text_encoder": {"hidden_size": 768}}
    for part, values in change.items():
        configs[part] = {**configs[part], **values}
    matches = [cls.name for cls in (StableDiffusion, StableDiffusion2) if cls.matches("", configs)]
    assert matches == [family]


@torch.no_grad()
def test_a_v_prediction_folder_loads_as_sd2(tmp_path):
    _save_folder(load_model("tiny-v", seed=0), tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.name == "sd2" and loaded.prediction_type == "v_prediction"
