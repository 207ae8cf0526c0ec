"""The model-family interface on its second implementation: `tiny-v`, the tiny model predicting v (SD 2.x
768-v style). Inversions reconstruct, Prompt-to-Prompt with identical prompts returns the source, and a
fine-tune step exports and reloads as the same family."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import IMAGE, tolerance
from editkit.config import parse_config
from s2edit.core.family import Conditioning, ModelFamily, TextEncoding
from s2edit.core.settings import SPLSettings, VirtualSettings
from s2edit.core.stable_diffusion import StableDiffusion2
from s2edit.editing.editor import Editor
from s2edit.editing.inversion import reconstruct
from s2edit.editing.request import InversionRequest
from s2edit.training.config import TrainConfig
from s2edit.training.export import load_export
from s2edit.training.pairs import TrainingPair
from s2edit.training.run import fit

SOURCE = "a photo of a cat"
STEPS = 8
NO_SPL = SPLSettings(structure=False, postprocess=False)


@pytest.fixture(scope="module")
def v_editor(tame_tiny_model) -> Editor:
    """An Editor on tiny-v, its output damped like the tiny model's (conftest.py)."""
    return Editor(tame_tiny_model("tiny-v"), weights="tiny-v-damped", progress=False)


@pytest.fixture(scope="module")
def inversions(v_editor, image) -> dict:
    return {method: v_editor.invert(image, SOURCE, InversionRequest(method, STEPS))
            for method in ("ddim", "direct", "negative_prompt")}


def latent_error(model: ModelFamily, inversion) -> float:
    return float((reconstruct(model, inversion).cpu() - inversion.z0).pow(2).mean())


def test_tiny_v_answers_the_interface(v_editor) -> None:
    model = v_editor.model
    assert isinstance(model, StableDiffusion2)
    assert (model.name, model.prediction_type) == ("sd2", "v_prediction")
    assert (model.native_resolution, model.size_multiple, model.mask_level) == (256, 64, 4)
    encoding = model.encode_text(["a photo of a cat", ""])
    assert isinstance(encoding, TextEncoding) and isinstance(encoding.conditioning, Conditioning)
    assert encoding.conditioning.pooled is None and encoding.hidden[0] is encoding.conditioning.context
    torch.testing.assert_close(model.unconditional().context, encoding.conditioning.context[1:])
    assert model.word_positions("a photo of a cat", "cat") == [[5]]


def test_direct_inversion_reconstructs_exactly_and_ddim_converges(v_editor, inversions, image) -> None:
    """Direct Inversion retraces the v-model's trajectory to float precision at w = 7.5. Plain DDIM
    inversion is exact only in the limit of small steps: at guidance 1 (the inversion's own regime) its
    reconstruction error falls with the steps (first order in the step: ~1/N² in the squared error)."""
    model = v_editor.model
    assert latent_error(model, inversions["direct"]) < 1e-8

    def at_guidance_one(inversion) -> float:
        return latent_error(model, type(inversion)(**{**inversion.__dict__, "guidance": 1.0}))

    coarse = at_guidance_one(inversions["ddim"])
    fine = at_guidance_one(v_editor.invert(image, SOURCE, InversionRequest("ddim", 20)))
    variance = float(inversions["ddim"].z0.var())
    assert fine < coarse / 4 and fine < 0.02 * variance, (coarse, fine, variance)  # measured: /4.9, 1.6 %


def test_identical_prompts_return_the_source(v_editor, inversions, image) -> None:
    """Target = source: the target row is the source branch (two rows of one batch: to float32 rounding),
    which retraces the inversion (the reconstruction, a 1-row run)."""
    inversion = inversions["negative_prompt"]  # ∅ is the same for both rows (Direct's offsets are not)
    result = v_editor.edit(inversion, [SOURCE], spl=NO_SPL)
    close = tolerance(torch.float32, scale=float(result.latents.abs().max()))
    torch.testing.assert_close(result.latents[1], result.latents[0], **close)
    torch.testing.assert_close(result.latents[:1], reconstruct(v_editor.model, inversion).cpu(), **close)
    same = VirtualSettings(steps=4, target_guidance=1.0)  # target = source at the source's guidance
    virtual = v_editor.edit_virtual(image, SOURCE, [SOURCE], spl=NO_SPL, virtual=same)
    torch.testing.assert_close(virtual.latents[1], virtual.latents[0], **close)


def test_a_fine_tune_step_exports_and_reloads_as_sd2(tmp_path) -> None:
    image = tmp_path / "cat.png"
    Image.open(IMAGE).crop((0, 0, 256, 256)).save(image)
    config = parse_config(TrainConfig, ["model=tiny-v", f"image={image}", "prompt=a photo of a [I] cat",
                                        "object=cat", "resolution=64", "max_steps=1", "finetune.lr=1e-3"])
    module, data = fit(config, [TrainingPair(str(image), config.prompt, "[I]", "cat")], progress=False)
    assert module.model.prediction_type == "v_prediction"
    export = module.export(tmp_path / "run", data.prepared)
    loaded, manifest = load_export(export)
    assert loaded.name == "sd2" and manifest.base_model == "tiny-v"
    trained, reloaded = module.model.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(trained[k].float(), reloaded[k].float()) for k in trained)
    token = manifest.tokens[0].token_id
    torch.testing.assert_close(loaded.text_encoder.get_input_embeddings().weight[token],
                               module.model.text_encoder.get_input_embeddings().weight[token].detach())
    editor = Editor.from_export(export, device="cpu", progress=False)
    result = editor.run(editor.load_image(image), "a photo of a [I] cat", ["a photo of a [I] cat smiling"],
                        method="virtual", request=None)
    assert result.images.shape == (1, 3, 64, 64) and torch.isfinite(result.images).all()
