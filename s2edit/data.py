"""Training data of S2Edit fine-tuning: one image-prompt pair, or two for compositional editing (§3.3).

A :class:`~s2edit.pairs.TrainingPair` is what the user gives (checked by :func:`s2edit.pairs.check_pair`
before any model work). :class:`S2EditDataModule` prepares each pair ONCE in `setup` (image → VAE latent
mean × scaling, token ids of P̃ and of the source prompt P, placeholder / EOS / object positions, object
mask) and serves an
"epoch" of `max_steps` batches: both pairs in one batch when their latents share a size, else
alternating single-pair batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import CLIPTokenizer

from editkit.errors import InputError
from editkit.images import load_image
from s2edit.export import file_sha256
from s2edit.models import StableDiffusion
from s2edit.object_mask import MASK_LEVEL, load_object_mask, object_mask
from s2edit.pairs import TrainingPair
from s2edit.tokenizer import eos_index, token_ids, word_token_indices


@dataclass
class PreparedPair:
    """A pair after `setup`: everything a training step needs, computed once."""

    pair: TrainingPair
    pixels: torch.Tensor  # (1, 3, H, W) in [-1, 1], the working-size image (for logs and export)
    latents: torch.Tensor  # (1, C, H/8, W/8) VAE latent mean × scaling factor
    input_ids: torch.Tensor  # (L,) padded ids of P̃
    source_input_ids: torch.Tensor  # (L,) padded ids of P
    token_id: int  # the placeholder's vocabulary id
    placeholder_position: int  # index of the placeholder in input_ids
    source_eos_position: int  # index of the first EOS token in source_input_ids
    object_tokens: torch.Tensor  # (L,) 1 at the object word's token(s) in P̃
    mask: torch.Tensor  # (H/8, W/8) binary object mask
    image_sha256: str


def _padded_ids(tokenizer: CLIPTokenizer, prompt: str) -> torch.Tensor:
    token_ids(tokenizer, prompt)  # length check: never truncate silently
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids[0]


@torch.no_grad()
def prepare_pair(
    sd: StableDiffusion,
    pair: TrainingPair,
    token_id: int,
    resolution: int | None,
    mask_timesteps: Sequence[int] = (200, 400, 600),
    mask_threshold: float = 0.3,
    mask_level: int = MASK_LEVEL,
    seed: int = 0,
) -> PreparedPair:
    """Encode the image once and compute ids, positions and the object mask with the CURRENT model.

    Call it before fine-tuning: M_obj must come from the pretrained UNet (SPEC §2).
    """
    pixels = load_image(pair.image, resolution)  # sides multiples of 64, like the editing stage
    latents = sd.encode_image(pixels.to(sd.device, sd.vae.dtype)).float()  # (1, C, h, w)
    tokenizer = sd.tokenizer
    input_ids = _padded_ids(tokenizer, pair.prompt)
    source_ids = _padded_ids(tokenizer, pair.source_prompt)
    positions = (input_ids == token_id).nonzero().flatten()
    if positions.numel() != 1:
        raise InputError(f"placeholder '{pair.placeholder}' must occur once in '{pair.prompt}'")
    object_tokens = torch.zeros(input_ids.shape, dtype=torch.float32)
    object_tokens[word_token_indices(tokenizer, pair.prompt, pair.object)] = 1.0
    if pair.mask is not None:
        mask = load_object_mask(pair.mask, tuple(latents.shape[-2:]))
    else:
        mask = object_mask(
            sd, latents, pair.source_prompt, pair.object, mask_timesteps, mask_threshold, mask_level, seed
        )
    return PreparedPair(
        pair=pair,
        pixels=pixels.cpu(),
        latents=latents.cpu(),
        input_ids=input_ids,
        source_input_ids=source_ids,
        token_id=token_id,
        placeholder_position=int(positions[0]),
        source_eos_position=int(eos_index(source_ids, tokenizer.eos_token_id)),
        object_tokens=object_tokens,
        mask=mask.cpu(),
        image_sha256=file_sha256(pair.image),
    )


class _RepeatedPairs(Dataset):
    """`length` items cycling through the prepared pairs (item i is pair i mod n)."""

    def __init__(self, items: list[dict[str, torch.Tensor]], length: int) -> None:
        self.items = items
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index % len(self.items)]


class S2EditDataModule(L.LightningDataModule):
    """One (or two) image-prompt pairs; an epoch is `max_steps` optimisation steps.

    Both pairs go in one batch of 2 when their latents have the same size, else they alternate.
    `resolution=None` keeps each image's own scale (sides rounded to multiples of 64).
    `token_ids` maps each pair's placeholder to its id (added to `sd.tokenizer` beforehand).
    """

    def __init__(
        self,
        pairs: Sequence[TrainingPair],
        sd: StableDiffusion,
        token_ids: dict[str, int],
        max_steps: int,
        resolution: int | None = 512,
        mask_timesteps: Sequence[int] = (200, 400, 600),
        mask_threshold: float = 0.3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.pairs = list(pairs)
        self.sd = sd
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
            self.sd.to(self.trainer.strategy.root_device)
        self.prepared = [
            prepare_pair(
                self.sd, pair, self.token_ids[pair.placeholder], self.resolution,
                self.mask_timesteps, self.mask_threshold, seed=self.seed,
            )
            for pair in self.pairs
        ]

    @property
    def batch_size(self) -> int:
        shapes = {tuple(p.latents.shape) for p in self.prepared}
        return len(self.prepared) if len(shapes) == 1 else 1

    def items(self) -> list[dict[str, torch.Tensor]]:
        """One training item per prepared pair (what a batch row holds)."""
        return [
            {
                "pair_index": torch.tensor(index),
                "latents": p.latents[0],
                "input_ids": p.input_ids,
                "source_input_ids": p.source_input_ids,
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
