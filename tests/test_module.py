"""S2EditModule on the tiny model: spatial control in every cross-attention layer during a training step,
which embedding rows learn (full and LoRA), compositional batching, resuming, and NaN reporting."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import Recorder
from editkit.config import parse_config
from s2edit.core.attention import CROSS_SUFFIX, AttentionController, AttentionProcessor, heads_view
from s2edit.core.trainer import make_trainer
from s2edit.training import run as train
from s2edit.training.config import TrainConfig
from s2edit.training.data import S2EditDataModule
from s2edit.training.module import NonFiniteLossError, S2EditModule

SIZE = 128


def _write(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, str]:
    """A 128² astronaut crop, a right-half mask, a cat crop of the same size and a wider one."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2 :] = 255
    return {
        "image": _write(tmp_path / "astronaut.png", skdata.astronaut()[:SIZE, SIZE : 2 * SIZE]),
        "mask": _write(tmp_path / "mask.png", mask),
        "cat": _write(tmp_path / "cat.png", skdata.chelsea()[:SIZE, :SIZE]),
        "wide_cat": _write(tmp_path / "wide_cat.png", skdata.chelsea()[:SIZE, : SIZE * 5 // 2]),
    }


def _config(tmp_path: Path, inputs: dict[str, str], *overrides: str) -> TrainConfig:
    argv = [f"image={inputs['image']}", f"mask={inputs['mask']}", "model=tiny", f"resolution={SIZE}",
            f"out={tmp_path / 'run'}", "max_steps=2", "image_log_every=0", *overrides]
    return parse_config(TrainConfig, argv)


def _fit(module: S2EditModule, config: TrainConfig, steps: int, **trainer_args: object) -> S2EditDataModule:
    pairs = train.check_inputs(config)
    datamodule = S2EditDataModule(pairs, module.model, module.token_ids, steps, config.resolution)
    trainer = make_trainer(accelerator="cpu", max_steps=steps, progress=False, **trainer_args)
    trainer.fit(module, datamodule=datamodule)
    return datamodule


class ProbedModule(S2EditModule):
    """Records every controlled layer's probabilities before and after the module's own controllers."""

    def attention_controllers(self, batch: dict) -> list[AttentionController]:
        self.before, self.after = Recorder(), Recorder()
        self.batch = batch
        return [self.before, *super().attention_controllers(batch), self.after]


def test_spatial_control_masks_the_placeholder_column_in_every_cross_attention_layer(
    tmp_path: Path, inputs: dict[str, str]
) -> None:
    config = _config(tmp_path, inputs)
    module = ProbedModule(config)
    original_processors = {name: type(p) for name, p in module.unet.attn_processors.items()}
    _fit(module, config, steps=1)

    cross_layers = {name for name in original_processors if name.endswith(CROSS_SUFFIX)}
    assert len(cross_layers) >= 4 and set(module.after.seen) == cross_layers == set(module.before.seen)
    position = int(module.batch["placeholder_position"][0])
    mask = module.batch["mask"][0]
    assert 0 < mask.mean() < 1  # the half mask: the test would be vacuous with an all-ones mask
    for name in cross_layers:
        before, call = module.before.seen[name]
        after, _ = module.after.seen[name]
        layer_mask = F.interpolate(mask[None, None], size=call.size, mode="nearest").flatten()  # (Q,)
        before, after = heads_view(before, call.heads), heads_view(after, call.heads)  # (B, heads, Q, K)
        torch.testing.assert_close(after[..., position], before[..., position] * layer_mask, rtol=0, atol=0)
        others = [k for k in range(before.shape[-1]) if k != position]
        assert torch.equal(after[..., others], before[..., others])
    # self-attention layers keep their own processors; after the fit every processor is restored
    assert {name: type(p) for name, p in module.unet.attn_processors.items()} == original_processors
    assert not any(isinstance(p, AttentionProcessor) for p in module.unet.attn_processors.values())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_only_the_placeholder_row_of_the_token_embedding_changes(
    tmp_path: Path, inputs: dict[str, str], method: str
) -> None:
    config = _config(tmp_path, inputs, f"finetune.method={method}", "finetune.lr=1e-3")
    module = S2EditModule(config)
    token_id = module.token_ids["[I]"]
    before = module.text_encoder.get_input_embeddings().weight.detach().clone()
    unet_before = {k: v.clone() for k, v in module.unet.state_dict().items()}
    _fit(module, config, steps=2, grad_clip=1.0)

    after = module.text_encoder.get_input_embeddings().weight.detach()
    others = torch.ones(after.shape[0], dtype=torch.bool)
    others[token_id] = False
    assert not torch.equal(after[token_id], before[token_id])
    assert torch.equal(after[others], before[others])
    unet_after = module.unet.state_dict()
    changed = {k for k in unet_before if not torch.equal(unet_before[k], unet_after[k])}
    if method == "lora":  # only adapters train; the base weights are frozen
        assert changed and all("lora_" in k for k in changed)
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        assert all("lora_" in n or n.endswith("token_embedding.weight") for n in trainable)
    else:
        assert any("lora_" not in k and k.endswith("weight") for k in changed)
    assert not any(p.requires_grad for p in module.vae.parameters())


def test_compositional_pairs_share_a_batch_when_sizes_match_else_alternate(
    tmp_path: Path, inputs: dict[str, str]
) -> None:
    reference = ["reference_prompt=a photo of a [A] cat", "reference_object=cat"]
    for image, batch_size in ((inputs["cat"], 2), (inputs["wide_cat"], 1)):
        config = _config(tmp_path, inputs, f"reference={image}", *reference)
        module = S2EditModule(config)
        assert set(module.token_ids) == {"[I]", "[A]"}
        datamodule = S2EditDataModule(train.check_inputs(config), module.model, module.token_ids, 3, SIZE)
        datamodule.setup("fit")
        batches = list(datamodule.train_dataloader())
        assert len(batches) == 3 and datamodule.batch_size == batch_size
        rows = [int(i) for b in batches for i in b["pair_index"]]
        assert rows == ([0, 1] * 3 if batch_size == 2 else [0, 1, 0])
        if batch_size == 2:  # one step trains both tokens, each with its own mask and semantic loss
            terms = module._step(batches[0])
            assert all(torch.isfinite(v) for v in terms.values())
            assert not torch.equal(batches[0]["mask"][0], batches[0]["mask"][1])


def test_a_nan_loss_stops_training_naming_the_step_and_term(tmp_path: Path, inputs: dict[str, str]) -> None:
    config = _config(tmp_path, inputs)
    module = S2EditModule(config)
    with torch.no_grad():
        module.unet.conv_out.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"loss term 'recon' became nan at step 0"):
        _fit(module, config, steps=2)


def test_resume_continues_the_step_count(tmp_path: Path, inputs: dict[str, str]) -> None:
    argv = [f"image={inputs['image']}", f"mask={inputs['mask']}", "model=tiny", f"resolution={SIZE}",
            f"out={tmp_path / 'run'}", "image_log_every=0"]
    train.main([*argv, "max_steps=2"])
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2
    assert not any(k.startswith("vae.") for k in saved["state_dict"])  # frozen: rebuilt on resume

    export = train.main([*argv, "max_steps=4", "resume=true"])
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == 4
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    steps = sorted(e.step for e in events.Scalars("train/loss"))
    assert steps == [0, 1, 2, 3]  # the resumed run logged steps 2 and 3, not 0 and 1 again
    assert (export / "manifest.json").is_file()


def test_a_run_without_resume_starts_afresh_beside_an_old_checkpoint(
    tmp_path: Path, inputs: dict[str, str]
) -> None:
    """Only resume=true continues last.ckpt: a new run into the same out trains from step 0."""
    argv = [f"image={inputs['image']}", f"mask={inputs['mask']}", "model=tiny", f"resolution={SIZE}",
            f"out={tmp_path / 'run'}", "image_log_every=0"]
    train.main([*argv, "max_steps=2"])
    train.main([*argv, "max_steps=1"])
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == 1


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path, inputs: dict[str, str]) -> None:
    config = _config(tmp_path, inputs)
    checkpoints = Path(config.out) / "checkpoints"
    _fit(S2EditModule(config), config, steps=1, checkpoints=checkpoints)
    last = checkpoints / "last.ckpt"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]  # no top-k files, no temporaries
    other = _config(tmp_path, inputs, "prompt=a photo of a [I] astronaut", "object=astronaut", "resume=true")
    with pytest.raises(train.InputError, match="was trained with prompt="):
        train.check_resumable(last, other)


def test_the_checkpoint_is_written_every_n_steps_at_the_end_and_on_ctrl_c(
    tmp_path: Path, inputs: dict[str, str]
) -> None:
    """Lightning's ModelCheckpoint(save_last) and OnExceptionCheckpoint through one atomic writer."""
    config = _config(tmp_path, inputs)
    checkpoints = Path(config.out) / "checkpoints"
    saved: list[int] = []

    class Interrupt(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            if checkpoints.joinpath("last.ckpt").is_file():
                saved.append(torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"])
            if trainer.global_step == 3:
                raise KeyboardInterrupt

    with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C (train.py turns it into exit 130)
        _fit(S2EditModule(config), config, steps=5, checkpoints=checkpoints, checkpoint_every=2,
             callbacks=[Interrupt()])
    assert saved == [2]  # written at step 2 (every 2 steps; Lightning runs checkpointing last: seen at 3)
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3  # on Ctrl-C
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
