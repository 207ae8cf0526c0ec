"""Training data of S2Edit fine-tuning: one image-prompt pair, or two for compositional editing (§3.3).

A :class:`~s2edit.training.pairs.TrainingPair` is what the user gives (checked by
:func:`s2edit.training.pairs.check_pair` before any model work). :class:`S2EditDataModule` prepares each
pair ONCE in `setup` (image → VAE latent mean × scaling; the placeholder, EOS and object-word positions in
P̃ and the source prompt P; the object mask) and serves an "epoch" of `max_steps` batches: both pairs in
one batch when their latents share a size, else alternating single-pair batches. The prompts travel as
text: the model family tokenizes them for each of its text encoders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from editkit.errors import InputError
from editkit.files import file_sha256
from editkit.images import load_image
from s2edit.core.family import ModelFamily
from s2edit.core.tokenizer import eos_index
from s2edit.training.object_mask import load_object_mask, object_mask
from s2edit.training.pairs import TrainingPair


@dataclass
class PreparedPair:
    """A pair after `setup`: everything a training step needs, computed once."""

    pair: TrainingPair
    pixels: torch.Tensor  # (1, 3, H, W) in [-1, 1], the working-size image (for logs and export)
    latents: torch.Tensor  # (1, C, H/8, W/8) VAE latent mean × scaling factor
    token_id: int  # the placeholder's vocabulary id
    placeholder_position: int  # index of the placeholder in P̃'s tokens
    source_eos_position: int  # index of the first EOS token in P's tokens
    object_tokens: torch.Tensor  # (L,) 1 at the object word's token(s) in P̃
    mask: torch.Tensor  # (H/8, W/8) binary object mask
    image_sha256: str


@torch.no_grad()
def prepare_pair(
    model: ModelFamily,
    pair: TrainingPair,
    token_id: int,
    resolution: int | None,
    mask_timesteps: Sequence[int] = (200, 400, 600),
    mask_threshold: float = 0.3,
    seed: int = 0,
) -> PreparedPair:
    """Encode the image once and compute positions and the object mask with the CURRENT model.

    Call it before fine-tuning: M_obj must come from the pretrained denoiser (SPEC §2).
    """
    pixels = load_image(pair.image, resolution, multiple=model.size_multiple)  # as the editing stage loads it
    latents = model.encode_image(pixels.to(model.device, model.vae.dtype)).float()  # (1, C, h, w)
    ids = torch.tensor(model.token_ids(pair.prompt))
    positions = (ids == token_id).nonzero().flatten()
    if positions.numel() != 1:
        raise InputError(f"placeholder '{pair.placeholder}' must occur once in '{pair.prompt}'")
    object_tokens = torch.zeros(model.tokenizer.model_max_length, dtype=torch.float32)
    object_tokens[model.word_positions(pair.prompt, pair.object)[0]] = 1.0
    if pair.mask is not None:
        mask = load_object_mask(pair.mask, tuple(latents.shape[-2:]))
    else:
        mask = object_mask(model, latents, pair.source_prompt, pair.object, mask_timesteps, mask_threshold,
                           seed)
    return PreparedPair(
        pair=pair,
        pixels=pixels.cpu(),
        latents=latents.cpu(),
        token_id=token_id,
        placeholder_position=int(positions[0]),
        source_eos_position=int(eos_index(model.token_ids(pair.source_prompt), model.tokenizer.eos_token_id)),
        object_tokens=object_tokens,
        mask=mask.cpu(),
        image_sha256=file_sha256(pair.image),
    )


class _RepeatedPairs(Dataset):
    """`length` items cycling through the prepared pairs (item i is pair i mod n)."""

    def __init__(self, items: list[dict[str, Any]], length: int) -> None:
        self.items = items
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index % len(self.items)]


class S2EditDataModule(L.LightningDataModule):
    """One (or two) image-prompt pairs; an epoch is `max_steps` optimisation steps.

    Both pairs go in one batch of 2 when their latents have the same size, else they alternate.
    `resolution=None` keeps each image's own scale (sides rounded to the model's size multiple).
    `token_ids` maps each pair's placeholder to its id (added to the model's tokenizers beforehand).
    """

    def __init__(
        self,
        pairs: Sequence[TrainingPair],
        model: ModelFamily,
        token_ids: dict[str, int],
        max_steps: int,
        resolution: int | None = 512,
        mask_timesteps: Sequence[int] = (200, 400, 600),
        mask_threshold: float = 0.3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.pairs = list(pairs)
        self.model = model
        self.token_ids = dict(token_ids)
        self.max_steps = max_steps
        self.resolution = resolution
        self.mask_timesteps = list(mask_timesteps)
        self.mask_threshold = mask_threshold
        self.seed = seed
        self.prepared: list[PreparedPair] = []

    def setup(self, stage: str | None = None) -> None:
        if self.prepared:  # latents and masks are computed once (and from the pretrained model)
            return
        if self.trainer is not None:  # Lightning moves the model after setup: compute on the device now
            self.model.to(self.trainer.strategy.root_device)
        self.prepared = [
            prepare_pair(
                self.model, pair, self.token_ids[pair.placeholder], self.resolution,
                self.mask_timesteps, self.mask_threshold, seed=self.seed,
            )
            for pair in self.pairs
        ]

    @property
    def batch_size(self) -> int:
        shapes = {tuple(p.latents.shape) for p in self.prepared}
        return len(self.prepared) if len(shapes) == 1 else 1

    def items(self) -> list[dict[str, Any]]:
        """One training item per prepared pair (what a batch row holds)."""
        return [
            {
                "pair_index": torch.tensor(index),
                "latents": p.latents[0],
                "prompt": p.pair.prompt,
                "source_prompt": p.pair.source_prompt,
                "token_id": torch.tensor(p.token_id),
                "placeholder_position": torch.tensor(p.placeholder_position),
                "source_eos_position": torch.tensor(p.source_eos_position),
                "object_tokens": p.object_tokens,
                "mask": p.mask,
            }
            for index, p in enumerate(self.prepared)
        ]

    def train_dataloader(self) -> DataLoader:
        batch_size = self.batch_size
        dataset = _RepeatedPairs(self.items(), self.max_steps * batch_size)
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
