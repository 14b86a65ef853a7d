"""Deterministic evaluation batches: resize + centre crop of an ImageFolder split, sharded by rank.

Evaluation (kNN, linear probe and fine-tuning validation) decodes with PIL in a PyTorch
DataLoader, as MAE's evaluation does; pre-training decodes with DALI. Every rank gets the
same number of samples: the split is padded to a multiple of the world size by repeating
its first images with label -1, so collective forwards (ZeRO-3) and all-gathers line up and
the padding is dropped by its label.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset

from symmim.data.folder import DataError, ImageList, read_exclusions, scan_imagefolder
from symmim.data.loader import data_root
from symmim.data.folder import normalize
from symmim.data.torch_loader import center_crop, open_rgb, to_tensor

if TYPE_CHECKING:
    from symmim.core.config import DataConfig


def train_val_splits(data: DataConfig) -> tuple[ImageList, ImageList]:
    """The ``train/`` and ``val/`` ImageFolder splits of the run's data set (less ``data.exclude``)."""
    root = data_root(data)
    exclude = read_exclusions(root, data.exclude)
    train, val = scan_imagefolder(root / "train", exclude), scan_imagefolder(root / "val", exclude)
    if train.classes != val.classes:
        raise DataError(f"{root}: train/ and val/ hold different classes ({len(train.classes)} vs {len(val.classes)} folders)")
    return train, val


class _CenterCrops(Dataset):
    """Index -> (uint8 ``[3, S, S]`` centre crop, label); positions past the split are padding (label -1)."""

    def __init__(self, items: ImageList, size: int, positions: list[int]):
        self.items, self.size, self.positions = items, size, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        pos = self.positions[i]
        n = len(self.items)
        label = self.items.labels[pos] if pos < n else -1
        return to_tensor(center_crop(open_rgb(self.items.files[pos % n]), self.size)), label


def eval_batches(items: ImageList, size: int, batch: int, rank: int, world: int, workers: int,
                 device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``(images [B, 3, S, S] float normalised, labels [B])``; label -1 = padding.

    Rank ``r`` gets positions ``r, r + W, r + 2W, ...`` of the split padded to ``ceil(n / W) * W``.
    """
    per_rank = math.ceil(len(items) / world)
    dataset = _CenterCrops(items, size, list(range(rank, per_rank * world, world)))
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda")
    for images, labels in loader:
        yield normalize(images.to(device, non_blocking=True)), labels.to(device)
