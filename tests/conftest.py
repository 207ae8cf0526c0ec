"""Shared test fixtures and helpers."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from s2edit.core.attention import AttentionCall, AttentionController
from s2edit.core.engine import StepState
from s2edit.core.family import ModelFamily
from s2edit.core.loading import load_model
from s2edit.training.export import ExportManifest, ExportToken, base_model_probe, write_export

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "examples" / "chelsea.png"
CONFIG_DIR = ROOT / "configs"  # the documented defaults files (a test keeps them equal to the schemas)

TokenSpec = tuple[str, str, str]  # (placeholder, prompt P̃ with it, initialiser word)

# A random UNet's ε̂ is ~10-Lipschitz in z (a trained one is ~1): its DDIM trajectories are chaotic, and
# float32 rounding differences between batch layouts grow ~20× per step. Damping the output layer makes
# ε̂ smooth like a trained model's, so reconstruction errors measure the algorithm, not the chaos.
OUTPUT_DAMPING = 0.1


@pytest.fixture(scope="session", autouse=True)
def empty_weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test (and the commands they start) sees an empty metric-weights cache, never the user's
    ~/.cache: a test that wants weights installs them into its own folder."""
    path = tmp_path_factory.mktemp("weights-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("S2EDIT_WEIGHTS", str(path))
        yield path


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> dict[str, float]:
    """`torch.testing.assert_close` tolerances for results that went through DIFFERENT kernels (another
    batch row or batch size, a fused vs explicit attention): a few units of the dtype's rounding,
    relative to the values' `scale`. Bit-equality is only for the same computation repeated."""
    eps = torch.finfo(dtype).eps
    return {"atol": 64 * eps * scale, "rtol": 64 * eps}


class Recorder(AttentionController):
    """Keeps a copy of the probabilities it sees, per layer."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, tuple[torch.Tensor, AttentionCall]] = {}

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        self.seen[call.name] = (probs.detach().clone(), call)
        return probs


class MapLog(AttentionController):
    """Every cross-attention call's head-averaged maps (conditional rows) at one level, in call order: the
    brute-force reference of AttentionStore."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level
        self.calls: list[tuple[int, str, torch.Tensor]] = []  # (step, layer, (rows, h, w, K))

    def wants(self, is_cross: bool, level: int) -> bool:
        return is_cross and level == self.level

    def reads_probs(self, call: AttentionCall) -> bool:
        return call.is_cross and call.level == self.level

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if self.reads_probs(call):
            maps = probs.view(-1, call.heads, *probs.shape[1:])
            maps = maps[list(self.rows(maps.shape[0]))].mean(dim=1)
            maps = maps.detach().float().reshape(maps.shape[0], *call.size, -1)
            self.calls.append((self.step, call.name, maps))
        return probs

    def mean(self) -> torch.Tensor:
        """Mean over every recorded call (rows, h, w, K)."""
        return torch.stack([maps for *_, maps in self.calls]).mean(dim=0)


def run_cli(main: Callable[[list[str]], object], argv: list[str], capsys: pytest.CaptureFixture
            ) -> tuple[int, str]:
    """A script's `main` in-process as its command line runs it (one-line errors, exit codes):
    (exit code, stderr)."""
    from editkit.config import run_main

    try:
        run_main(main, argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def record(attribute: str, into: list) -> Callable[[StepState], None]:
    """A step callback that keeps a copy of `state.<attribute>` after every step."""

    def callback(state: StepState) -> None:
        into.append(getattr(state, attribute).clone())

    return callback


@pytest.fixture(scope="session")
def tame_tiny_model() -> Callable[..., ModelFamily]:
    """Factory: a fresh tiny model (seed 0; `name` another tiny preset) with its UNet output layer damped
    by OUTPUT_DAMPING."""

    def make(name: str = "tiny") -> ModelFamily:
        model = load_model(name, seed=0)
        with torch.no_grad():
            model.unet.conv_out.weight.mul_(OUTPUT_DAMPING)
            model.unet.conv_out.bias.mul_(OUTPUT_DAMPING)
        return model

    return make


@pytest.fixture(scope="session")
def editor(tame_tiny_model):
    """An Editor on the damped tiny model (no placeholders, no cache, no progress bars)."""
    from s2edit.editing.editor import Editor

    return Editor(tame_tiny_model(), weights="tiny-damped", progress=False)


@pytest.fixture(scope="session")
def image() -> torch.Tensor:
    """examples/chelsea.png at 128² (the editing tests' working size), (1, 3, 128, 128) in [-1, 1]."""
    from editkit.images import load_image

    return load_image(IMAGE, 128)


@pytest.fixture(scope="session")
def make_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: an export folder as train.py writes it, for a tiny model (no training needed).

    `make_export(model, tokens, masks, resolution=128)` adds each token of `tokens` to `model`
    (initialised from its word), writes the export with `masks[i]` as token i's object mask, and returns
    the folder. The base probe is read before the tokens are added, so `model` must be a freshly loaded
    base model (its UNet output may be scaled: the full-weight export stores it).
    """

    def make(
        model: ModelFamily, tokens: Sequence[TokenSpec], masks: Sequence[torch.Tensor], resolution: int = 128
    ) -> Path:
        probe = base_model_probe(model)
        sha = hashlib.sha256(IMAGE.read_bytes()).hexdigest()
        exported = []
        for placeholder, prompt, word in tokens:
            token_id = model.add_placeholder(placeholder, word)
            source_prompt = prompt.replace(f"{placeholder} ", "")
            exported.append(
                ExportToken(placeholder, token_id, prompt, source_prompt, word, str(IMAGE), sha, "")
            )
        manifest = ExportManifest(
            base_model=model.source,
            method="full",
            resolution=resolution,
            tokens=exported,
            config={},
            base_probe=probe,
        )
        return write_export(tmp_path_factory.mktemp("ckpt"), model, manifest, masks)

    return make


@pytest.fixture(scope="session")
def compositional_editor(make_export, tame_tiny_model):
    """An Editor on an export with [I] (this image's subject, a centred square mask) and [A] (an attribute,
    its mask drawn on another image: the left stripe), damped tiny model, working size 128."""
    from s2edit.editing.editor import Editor

    identity, attribute = torch.zeros(2, 128, 128)
    identity[32:96, 32:96] = 1.0
    attribute[:, :40] = 1.0
    tokens = [("[I]", "a photo of a [I] cat", "cat"), ("[A]", "a photo of a dog with [A] stripes", "stripes")]
    ckpt = make_export(tame_tiny_model(), tokens, [identity, attribute], resolution=128)
    return Editor.from_export(ckpt, device="cpu", progress=False)


def lora_file(model: ModelFamily, path: Path, prefix: str = "unet.", rank: int = 4) -> torch.nn.Module:
    """A random LoRA on the model's UNet attention projections, saved as safetensors with `prefix`
    keys (diffusers' layout); returns a copy of the UNet with the adapter active: the reference."""
    unet = load_model(model.source).unet
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:  # gaussian init leaves B at zero: give the adapter an effect
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    state = get_peft_model_state_dict(unet)
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return unet
