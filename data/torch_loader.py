"""Plain PyTorch fallback loader (PIL decode in DataLoader workers), same interface as DALI's.

Order and augmentation are functions of ``(seed, epoch, index)`` alone, so an epoch can be
resumed at any step and the output does not depend on the number of workers.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from symmim.data.folder import DataError, ImageList, batches_per_epoch, normalize, pixel_stats, scan_imagefolder

if TYPE_CHECKING:
    from symmim.core.config import DataConfig


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], rng: np.random.Generator, ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """Crop box ``(left, top, right, bottom)`` as torchvision's RandomResizedCrop draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    # Fallback: the largest central crop whose aspect ratio lies in range.
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w = min(width, int(round(height * aspect)))
    h = min(height, int(round(w / aspect)))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def open_rgb(path: str) -> Image.Image:
    """The decoded RGB image at ``path``; DataError naming the file if it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise DataError(f"cannot decode image {path}: {err}") from None


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 ``[3, H, W]``."""
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Evaluation view: short side resized to ``size / 0.875``, then the central ``size`` square."""
    scale = size / 0.875 / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BILINEAR)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


class _AugmentedImages(Dataset):
    """Index ``(epoch, i)`` -> (uint8 ``[3, S, S]`` random-resized-crop (+ flip) of image ``i``, label)."""

    def __init__(self, items: ImageList, size: int, scale: tuple[float, float], hflip: bool, seed: int):
        self.items, self.size, self.scale, self.hflip, self.seed = items, size, scale, hflip, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        img = open_rgb(self.items.files[i])
        box = random_resized_crop_box(img.width, img.height, self.scale, rng)
        img = img.resize((self.size, self.size), Image.BILINEAR, box=box)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img), self.items.labels[i]  # [3, S, S] uint8, class index


class TorchLoader:
    """Per-rank batches of augmented training images, normalised on the training device.

    With ``labels=True`` (fine-tuning, linear probe) each batch is ``(images, labels)``.
    """

    def __init__(self, items: ImageList, data: DataConfig, size: int, batch: int, seed: int, rank: int, world: int,
                 device: torch.device, labels: bool = False):
        self.dataset = _AugmentedImages(items, size, data.crop_scale, data.hflip, seed)
        self.batch, self.workers = batch, data.workers
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.seed = seed
        self.steps_per_epoch = batches_per_epoch(len(items), world, self.batch)
        self.labels = labels
        self.stats = pixel_stats(self.device)
        self.name = f"torch DataLoader ({self.workers} workers, PIL decode on cpu)"

    def _indices(self, epoch: int) -> list[int]:
        """This rank's sample indices for ``epoch``: micro-batch ``s`` of rank ``r`` is the ``r``-th slice
        of global batch ``s`` of one permutation of the data set, so the order in images does not
        depend on the number of processes (a resume on another number continues it exactly)."""
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        used = self.steps_per_epoch * self.batch * self.world
        perm = torch.randperm(len(self.dataset), generator=g)[:used]  # [steps * W * B]
        return perm.view(self.steps_per_epoch, self.world, self.batch)[:, self.rank].reshape(-1).tolist()

    def epoch(self, epoch: int, start_step: int = 0, stop_step: int | None = None) -> Iterator:
        """Batches ``[B, 3, S, S]`` (float, normalised; with labels ``[B]``) of ``epoch``, ``start_step`` to ``stop_step``."""
        stop = stop_step or self.steps_per_epoch
        keys = [(epoch, i) for i in self._indices(epoch)[start_step * self.batch : stop * self.batch]]
        loader = DataLoader(
            self.dataset, batch_size=self.batch, sampler=keys, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", drop_last=True, persistent_workers=False,
        )
        for images, labels in loader:
            images = normalize(images.to(self.device, non_blocking=True), self.stats)
            yield (images, labels.to(self.device)) if self.labels else images

    def state_dict(self) -> dict:
        return {}  # the trainer's (epoch, step) is the whole position

    def load_state_dict(self, state: dict | None) -> None:
        pass  # the order is a function of (seed, epoch, position in images): nothing to restore


def load_eval_images(root: str | Path, count: int, size: int) -> torch.Tensor:
    """``count`` validation images, one per class in turn, resized and centre-cropped.

    Returns ``[count, 3, size, size]`` float, normalised like the training batches.
    """
    items = scan_imagefolder(root)
    by_class = [[f for f, l in zip(items.files, items.labels) if l == c] for c in range(len(items.classes))]
    paths = [by_class[i % len(by_class)][i // len(by_class)] for i in range(count)]
    return normalize(torch.stack([to_tensor(center_crop(open_rgb(p), size)) for p in paths]))  # [count, 3, S, S]
