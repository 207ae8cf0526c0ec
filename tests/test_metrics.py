"""Metrics: closed forms for the pixel metrics, PIE-Bench masking, and the weight-backed metrics on tiny
random stand-ins saved to disk (LPIPS vs torchmetrics' reference, CLIP / DINO vs direct computation)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from editkit.errors import InputError
from s2edit.evaluation.metrics import (
    FID,
    LPIPS,
    CLIPScore,
    DinoStructureDistance,
    MetricSuite,
    _dino_state_from_hf,
    mask_leak,
    mse,
    psnr,
    ssim,
    structure_distance_spl,
)
from spl.losses import structure_preservation_loss

H, W = 48, 64


def random_images(batch: int = 2, seed: int = 0, size: tuple[int, int] = (H, W)) -> Tensor:
    """(B, 3, H, W) in [-0.8, 0.8], so that small offsets stay inside [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *size, generator=gen) * 1.6 - 0.8


def left_half_mask() -> Tensor:
    mask = torch.zeros(H, W)
    mask[:, : W // 2] = 1.0  # 1 = edit region
    return mask


# --------------------------------------------------------------------------------------- pixel metrics


def test_psnr_and_mse_of_a_constant_offset() -> None:
    source = random_images()
    offset = 0.1  # on [0, 1]; 0.2 on [-1, 1]
    edited = source + 2 * offset
    assert torch.allclose(mse(source, edited), torch.full((2,), offset**2), rtol=1e-5)
    expected_psnr = -20 * math.log10(offset)  # 10·log10(1 / MSE) = 20 dB
    assert torch.allclose(psnr(source, edited), torch.full((2,), expected_psnr), rtol=1e-5)
    assert torch.isinf(psnr(source, source)).all()
    assert torch.equal(mse(source, source), torch.zeros(2))


def test_ssim_of_identical_images_is_one_and_drops_with_noise() -> None:
    source = random_images()
    assert torch.allclose(ssim(source, source), torch.ones(2))
    noisy = (source + 0.2 * random_images(seed=1)).clamp(-1, 1)
    assert (ssim(source, noisy) < 0.99).all()


def test_unedited_region_metrics_mask_both_images_like_pie_bench() -> None:
    source = random_images()
    offset = 0.1
    mask = left_half_mask()
    edited = source + 2 * offset  # changed everywhere
    # By hand: (1 − mask) zeroes the left half of both; the right half differs by 0.1 → MSE = 0.01 / 2.
    assert torch.allclose(mse(source, edited, mask), torch.full((2,), offset**2 / 2), rtol=1e-5)
    expected_psnr = 10 * math.log10(2 / offset**2)
    assert torch.allclose(psnr(source, edited, mask), torch.full((2,), expected_psnr), rtol=1e-5)
    s01, e01 = (source + 1) / 2 * (1 - mask), (edited + 1) / 2 * (1 - mask)
    expected_ssim = structural_similarity_index_measure(e01, s01, data_range=1.0, reduction="none")
    assert torch.allclose(ssim(source, edited, mask), expected_ssim)
    # An edit that stays inside the mask leaves the unedited region identical.
    inside = source.clone()
    inside[..., : W // 2] += 0.3
    assert torch.equal(mse(source, inside, mask), torch.zeros(2))
    assert torch.allclose(ssim(source, inside, mask), torch.ones(2))
    assert torch.isinf(psnr(source, inside, mask)).all()


def test_masks_of_every_layout_and_a_full_mask_gives_nan() -> None:
    source, edited = random_images(), random_images(seed=1)
    mask = left_half_mask()
    for layout in (mask, mask[None].expand(2, H, W), mask[None, None].expand(2, 1, H, W), mask.bool()):
        assert torch.allclose(mse(source, edited, layout), mse(source, edited, mask))
    per_item = torch.stack([mask, torch.ones(H, W)])[:, None]  # item 1: everything edited
    for metric in (psnr, ssim, mse, mask_leak):
        values = metric(source, edited, per_item)
        assert not math.isnan(values[0]) and math.isnan(values[1]), metric.__name__


def test_mask_leak_is_the_mean_change_outside_the_mask() -> None:
    source = random_images(batch=1)
    mask = left_half_mask()
    edited = source.clone()
    edited[..., : W // 2] += 0.6  # inside: ignored
    edited[..., : H // 2, W // 2:] += 0.2  # top half of the outside, 0.1 on [0, 1]
    assert torch.allclose(mask_leak(source, edited, mask), torch.tensor([0.05]), rtol=1e-5)
    assert torch.equal(mask_leak(source, source, mask), torch.zeros(1))


def test_structure_distance_spl_is_the_spl_loss_per_item() -> None:
    source, edited = random_images(), random_images(seed=1)
    values = structure_distance_spl(source, edited)
    for i in range(2):
        expected = structure_preservation_loss(source[i: i + 1], edited[i: i + 1], radius=5, eps=1e-4)
        assert torch.allclose(values[i], expected)
    same = structure_distance_spl(source, source)  # > 0 only through ε: a = σ²/(σ² + ε) < 1
    brighter = structure_distance_spl(source, source * 0.5 + 0.2)  # an affine change keeps the structure
    assert (same < 1e-2 * values).all() and (brighter < 1e-1 * values).all()


# --------------------------------------------------------------------------------------- skipped metrics


def test_a_suite_without_weights_reports_skipped_strings_never_numbers(tmp_path: Path) -> None:
    suite = MetricSuite(clip=tmp_path / "no-clip-here", cache=tmp_path / "empty-cache")
    assert suite.available() == []
    skipped = suite.skipped()
    assert set(skipped) == {"lpips", "dists", "clip", "dino", "fid"}
    assert all(reason.startswith("skipped: ") for reason in skipped.values())
    assert "CLIP" in skipped["clip"] and "no-clip-here" in skipped["clip"] and "not found" in skipped["clip"]
    assert "no path given" in skipped["dino"]
    for name in ("lpips", "dists", "fid"):  # the registry-backed ones say how to get them
        assert skipped[name].endswith(f"not installed: run `python -m s2edit.metrics install {name}`")
    source, edited = random_images(batch=1), random_images(batch=1, seed=1)
    result = suite.per_item(source[0], edited[0], "a photo", left_half_mask())
    for key in ("lpips", "lpips_unedited", "dists", "dists_unedited", "clip_score", "clip_score_edit_region",
                "clip_score_source",
                "structure_distance"):
        assert isinstance(result[key], str) and result[key].startswith("skipped: "), key
    for key in ("psnr", "ssim", "mse", "psnr_unedited", "ssim_unedited", "mse_unedited", "mask_leak",
                "structure_distance_spl"):
        assert isinstance(result[key], float), key
    assert result["mse_unedited"] == pytest.approx(float(mse(source, edited, left_half_mask())[0]))
    assert math.isnan(suite.per_item(source, edited, "a photo")["psnr_unedited"])
    assert suite.fid([source], [edited]) == skipped["fid"]


# ------------------------------------------------------------------------------------------------ LPIPS


@pytest.fixture(scope="module")
def squeezenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "squeezenet1_1-random.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    return path


def test_lpips_matches_torchmetrics_reference_on_the_same_backbone(squeezenet_file: Path) -> None:
    from torchmetrics.functional.image.lpips import _LPIPS

    lpips = LPIPS.from_files(squeezenet_file, "squeeze")
    reference = _LPIPS(pretrained=True, net="squeeze", pnet_rand=True)  # shipped lin layers, random backbone
    features = nn.Sequential(*[module for piece in reference.net.slices for module in piece])
    state = torch.load(squeezenet_file, weights_only=True)
    features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
    source, edited = random_images(), random_images(seed=1)
    assert torch.allclose(lpips(source, edited), reference(source, edited).flatten(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(lpips(source, source), torch.zeros(2), atol=1e-6)
    # Unedited region: both images × (1 − mask) on [0, 1], back to [-1, 1].
    mask = left_half_mask()
    masked = [((x + 1) / 2 * (1 - mask)) * 2 - 1 for x in (source, edited)]
    assert torch.allclose(lpips(source, edited, mask), reference(*masked).flatten(), rtol=1e-4, atol=1e-6)


def test_lpips_in_the_suite_and_refusals(squeezenet_file: Path, tmp_path: Path) -> None:
    suite = MetricSuite(lpips=squeezenet_file)
    assert suite.available() == ["lpips"]
    source, edited = random_images(batch=1), random_images(batch=1, seed=1)
    result = suite.per_item(source, edited, "a photo", left_half_mask())
    lpips = LPIPS.from_files(squeezenet_file)
    assert result["lpips"] == pytest.approx(float(lpips(source, edited)[0]), rel=1e-5)
    expected = float(lpips(source, edited, left_half_mask())[0])
    assert result["lpips_unedited"] == pytest.approx(expected, rel=1e-5)
    garbage = tmp_path / "broken.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"broken\.pth") as err:
        MetricSuite(lpips=garbage)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match=r"squeezenet1_1-random\.pth.*do not fit"):
        LPIPS.from_files(squeezenet_file, "alex")  # squeezenet weights for an AlexNet


# ------------------------------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("clip")
    model = CLIPModel(config)
    model.save_pretrained(folder / "as-initialised")  # no tokenizer files: the offline tokenizer is used
    with torch.no_grad():
        model.text_projection.weight.neg_()  # flips the sign of every cosine
    model.save_pretrained(folder / "flipped")
    return folder / "as-initialised"


def direct_clip_cosine(folder: Path, images: Tensor, prompt: str) -> Tensor:
    """cos(image, text) straight from CLIPModel.forward, pixels normalised by hand (32 px: no resize)."""
    from transformers import CLIPModel

    from s2edit.core.tokenizer import clip_tokenizer

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    ids = clip_tokenizer()([prompt] * len(images), padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask,
                    pixel_values=((images + 1) / 2 - mean) / std)
    return (out.image_embeds * out.text_embeds).sum(-1)  # both unit length


def test_clip_score_is_100_times_the_clamped_cosine(clip_folder: Path) -> None:
    images = random_images(batch=4, size=(32, 32))
    signs = set()
    for folder in (clip_folder, clip_folder.parent / "flipped"):  # cosines of both signs
        scorer = CLIPScore.from_pretrained(folder)
        for prompt in ("a photo of a cat", "an astronaut on the moon"):
            cosine = direct_clip_cosine(folder, images, prompt)
            signs |= set(cosine.sign().tolist())
            assert torch.allclose(scorer(images, prompt), 100 * cosine.clamp(min=0), atol=1e-4)
    assert signs == {-1.0, 1.0}
    scorer = CLIPScore.from_pretrained(clip_folder.parent / "flipped")
    mask = torch.zeros(32, 32)
    mask[8:24, 4:20] = 1
    masked = ((images + 1) / 2 * mask) * 2 - 1  # PIE-Bench: image × mask
    expected = 100 * direct_clip_cosine(clip_folder.parent / "flipped", masked, "a red car").clamp(min=0)
    assert (expected > 0).all()
    assert torch.allclose(scorer(images, "a red car", mask), expected, atol=1e-4)


def test_why_the_clip_score_is_our_own_torchmetrics_takes_no_local_folder(clip_folder: Path) -> None:
    """torchmetrics' CLIPScore accepts only its listed hub ids (or a callable): a local CLIP folder, the only
    kind this offline project can load, is refused. Ours scores from that folder."""
    from torchmetrics.multimodal.clip_score import CLIPScore as TorchmetricsCLIPScore

    with pytest.raises(ValueError, match="Not supported"):
        TorchmetricsCLIPScore(model_name_or_path=str(clip_folder))
    images = random_images(batch=1, size=(32, 32))
    assert 0 <= float(CLIPScore.from_pretrained(clip_folder)(images, "a cat")[0]) <= 100


def test_clip_resizes_and_centre_crops_like_the_image_processor(clip_folder: Path) -> None:
    scorer = CLIPScore.from_pretrained(clip_folder)
    wide = torch.rand(1, 3, 32, 48) * 2 - 1
    pixels = scorer._pixels((wide + 1) / 2)
    assert pixels.shape == (1, 3, 32, 32)
    assert torch.allclose(scorer._pixels((wide[..., 8:40] + 1) / 2), pixels)  # same height: a pure crop


def test_clip_in_the_suite_and_a_folder_that_does_not_load(clip_folder: Path, tmp_path: Path) -> None:
    suite = MetricSuite(clip=clip_folder)
    assert suite.available() == ["clip"]
    source, edited = random_images(batch=1, size=(32, 32)), random_images(batch=1, seed=1, size=(32, 32))
    mask = torch.zeros(32, 32)
    mask[4:20, 4:20] = 1
    result = suite.per_item(source, edited, "a red car", mask, source_prompt="a cat")
    scorer = CLIPScore.from_pretrained(clip_folder)
    assert result["clip_score"] == pytest.approx(float(scorer(edited, "a red car")[0]), abs=1e-4)
    expected = float(scorer(edited, "a red car", mask)[0])
    assert result["clip_score_edit_region"] == pytest.approx(expected, abs=1e-4)
    assert result["clip_score_source"] == pytest.approx(float(scorer(source, "a cat")[0]), abs=1e-4)
    assert isinstance(result["lpips"], str)
    broken = tmp_path / "clip"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(InputError, match=r"CLIP weights '.*clip'") as err:
        MetricSuite(clip=broken)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------- DINO


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    # 12 blocks like ViT-B (block 11 is read); 64 wide with one 64-channel head, as DINO's checkpoints imply
    config = ViTConfig(hidden_size=64, num_hidden_layers=12, num_attention_heads=1, intermediate_size=128,
                       image_size=224, patch_size=16, layer_norm_eps=1e-6)
    folder = tmp_path_factory.mktemp("dino-vit")
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def _hf_key_self_similarity(folder: Path, pixels: Tensor) -> Tensor:
    """Reference: keys of block 11 read by a forward hook on the transformers ViT's key projection."""
    from transformers import ViTModel

    model = ViTModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False).eval()
    key_layers = [m for name, m in model.named_modules() if name.endswith(("11.attention.k_proj",
                                                                          "11.attention.attention.key"))]
    captured = []
    handle = key_layers[0].register_forward_hook(lambda module, args, out: captured.append(out))
    with torch.no_grad():
        model(pixel_values=pixels)
    handle.remove()
    keys = captured[0][0]  # (T, D)
    norms = keys.norm(dim=-1, keepdim=True)
    return (keys @ keys.T) / (norms @ norms.T).clamp(min=1e-8)


def test_dino_structure_distance_matches_the_transformers_vit(vit_folder: Path) -> None:
    metric = DinoStructureDistance.from_path(vit_folder)
    source, edited = random_images(batch=1, size=(64, 64)), random_images(batch=1, seed=1, size=(64, 64))
    # PnPInversion's preprocessing by hand: 0–255 values, 224×224 bilinear, ImageNet mean / std.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def pixels(x: Tensor) -> Tensor:
        x = torch.nn.functional.interpolate((x + 1) * 127.5, size=(224, 224), mode="bilinear")
        return (x - mean) / std

    sim_source, sim_edited = (_hf_key_self_similarity(vit_folder, pixels(x)) for x in (source, edited))
    expected = (sim_edited - sim_source).square().mean()
    value = metric(source, edited)
    assert value.shape == (1,) and value[0] == pytest.approx(float(expected), rel=1e-4)
    assert metric(source, source)[0] == pytest.approx(0.0, abs=1e-10)


def test_dino_checkpoint_file_gives_the_same_distance_and_bad_files_are_refused(vit_folder: Path,
                                                                                 tmp_path: Path) -> None:
    from transformers import ViTModel

    hf = ViTModel.from_pretrained(vit_folder, local_files_only=True, add_pooling_layer=False)
    checkpoint = tmp_path / "dino_vit_random.pth"
    torch.save(_dino_state_from_hf(hf.state_dict()), checkpoint)  # DINO's own names: blocks.N.attn.qkv, …
    source, edited = random_images(batch=1, size=(56, 80)), random_images(batch=1, seed=1, size=(56, 80))
    from_folder = DinoStructureDistance.from_path(vit_folder)(source, edited)
    suite = MetricSuite(dino=checkpoint)
    assert suite.available() == ["dino"]
    result = suite.per_item(source, edited, "a photo")
    assert result["structure_distance"] == pytest.approx(float(from_folder[0]), rel=1e-5)
    shallow = tmp_path / "shallow.pth"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith(("blocks.11.", "blocks.10."))}, shallow)
    with pytest.raises(InputError, match=r"shallow\.pth' have 10 blocks"):
        DinoStructureDistance.from_path(shallow)
    not_dino = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, not_dino)
    with pytest.raises(InputError, match=r"other\.pth' are not a DINO ViT checkpoint"):
        MetricSuite(dino=not_dino)


# -------------------------------------------------------------------------------------------------- FID


class ChannelStats(nn.Module):
    """A tiny feature extractor: per-channel means and the red channel's std of uint8 images → (B, 4)."""

    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0
        return torch.cat([x.mean(dim=(2, 3)), x[:, :1].flatten(1).std(dim=1, keepdim=True)], dim=1)


def frechet_by_hand(a: Tensor, b: Tensor) -> float:
    """|μa − μb|² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½), via symmetric eigendecompositions (float64)."""
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def test_fid_matches_the_frechet_distance_of_the_features() -> None:
    fid = FID.from_feature_extractor(ChannelStats())
    real, fake = random_images(batch=12, size=(16, 16)), random_images(batch=10, seed=1, size=(16, 16)) * 0.5
    fid.update(real[:5], real=True)
    fid.update(real[5:], real=True)
    assert math.isnan(fid.compute())  # no fake images yet
    fid.update(fake, real=False)
    to_uint8 = lambda x: ((x + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    expected = frechet_by_hand(ChannelStats()(to_uint8(real)), ChannelStats()(to_uint8(fake)))
    assert fid.compute() == pytest.approx(expected, rel=1e-4, abs=1e-8)
    fid.reset()
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert fid.compute() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity installed")
def test_fid_without_torch_fidelity_is_skipped_even_with_a_weights_file(tmp_path: Path) -> None:
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"placeholder")
    suite = MetricSuite(fid=weights)
    assert suite.fid([random_images()], [random_images(seed=1)]).startswith("skipped: torch-fidelity")
