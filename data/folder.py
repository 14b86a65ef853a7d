"""Listing an ImageFolder tree (``root/<class>/<image>``) and sharding it across ranks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EXCLUDE_FILE = "symmim_exclude.txt"  # written by symmim-verify-data
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, RGB, images in [0, 1]
STD = (0.229, 0.224, 0.225)


def pixel_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std in 0-255 units, ``[1, 3, 1, 1]`` on ``device``: a loader makes them once."""
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (MEAN, STD))
    return mean, std


def normalize(pixels: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 (or 0-255 float) ``[B, 3, H, W]`` -> float normalised with ImageNet MEAN / STD, same device.
    ``stats``: :func:`pixel_stats` of that device, made once (else made here, a copy to the device)."""
    mean, std = stats or pixel_stats(pixels.device)
    return (pixels.float() - mean) / std


class DataError(RuntimeError):
    """The data set on disk is missing, empty or unusable for this run."""


@dataclass(frozen=True)
class ImageList:
    files: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.files)


def read_exclusions(data_root: Path, exclude: str | None) -> frozenset[str]:
    """Absolute paths to skip: the list ``exclude``, else ``data_root/symmim_exclude.txt`` if present.

    Entries are paths relative to ``data_root``, one per line, ``#`` starts a comment.
    """
    path = Path(exclude).expanduser() if exclude else data_root / EXCLUDE_FILE
    if not path.is_file():
        if exclude:
            raise DataError(f"data.exclude {path} does not exist")
        return frozenset()
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return frozenset(str(data_root / line) for line in lines if line)


def scan_imagefolder(root: str | Path, exclude: frozenset[str] = frozenset()) -> ImageList:
    """Files and class indices (sorted class names, as torchvision) under ``root``, less ``exclude``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"data folder {root} has no class sub-folders")
    files, labels = [], []
    for idx, name in enumerate(classes):
        found = sorted(s for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and (s := str(p)) not in exclude)
        if not found:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [idx] * len(found)
    return ImageList(files, labels, classes)


def batches_per_epoch(num_samples: int, world: int, batch: int) -> int:
    """Full batches each rank gets in one epoch (the tail is dropped on every rank)."""
    steps = num_samples // world // batch
    if steps == 0:
        raise DataError(
            f"{num_samples} samples cannot fill one global batch of {world} x {batch}; "
            "use a smaller train.batch_size or more data"
        )
    return steps
