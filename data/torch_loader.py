"""Plain PyTorch fallback loader (PIL decode in DataLoader workers), same interface as DALI's.

Order and augmentation are functions of ``(seed, epoch, index)`` alone, so an epoch can be
resumed at any step and the output does not depend on the number of workers. The key views
(``data.key_view``, ``data/views.py``) are made with PIL alone (torchvision's C++ ops do not load
beside the CPU torch build), following torchvision's PIL code paths, which MoCo v3 ran.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset

from symmim.data import views as moco
from symmim.data.folder import DataError, ImageList, batches_per_epoch, normalize, pixel_stats, scan_imagefolder
from symmim.data.views import Views

if TYPE_CHECKING:
    from symmim.core.config import DataConfig


Box = tuple[float, float, float, float]  # left, top, right, bottom in source pixels


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


def shifted_box(box: Box, width: int, height: int, size: int, max_shift: int, rng: np.random.Generator) -> Box:
    """``box`` moved by a whole number of output pixels (the box resized to ``size``), uniform in
    ``[-max_shift, max_shift]`` along each axis, then kept inside the ``width`` x ``height`` image."""
    left, top, right, bottom = box
    w, h = right - left, bottom - top
    dx, dy = rng.integers(-max_shift, max_shift + 1, size=2)
    left = min(max(left + dx * w / size, 0.0), width - w)
    top = min(max(top + dy * h / size, 0.0), height - h)
    return left, top, left + w, top + h


def crop_view(img: Image.Image, box: Box, size: int, flip: bool) -> Image.Image:
    """``box`` of ``img`` resized to ``size`` x ``size`` (bilinear), mirrored when ``flip``."""
    view = img.resize((size, size), Image.BILINEAR, box=box)
    return view.transpose(Image.FLIP_LEFT_RIGHT) if flip else view


@dataclass(frozen=True)
class KeyColour:
    """The colour changes drawn for one ``independent`` key view, each in the order applied."""

    jitter: tuple[tuple[str, float], ...]  # (brightness|contrast|saturation|hue, factor or hue shift); () = none
    gray: bool
    blur: float  # Gaussian sigma in pixels; 0 = no blur
    solarize: bool


def draw_colour(rng: np.random.Generator) -> KeyColour:
    """MoCo v3's key-view colour draw; the jitter's four changes in a random order, as torchvision's ColorJitter."""
    jitter = ()
    if rng.random() < moco.JITTER_P:
        factors = {"brightness": rng.uniform(1 - moco.BRIGHTNESS, 1 + moco.BRIGHTNESS),
                   "contrast": rng.uniform(1 - moco.CONTRAST, 1 + moco.CONTRAST),
                   "saturation": rng.uniform(1 - moco.SATURATION, 1 + moco.SATURATION),
                   "hue": rng.uniform(-moco.HUE, moco.HUE)}
        jitter = tuple((str(name), factors[name]) for name in rng.permutation(list(factors)))
    gray = rng.random() < moco.GRAY_P
    blur = rng.uniform(*moco.BLUR_SIGMA) if rng.random() < moco.BLUR_P else 0.0
    return KeyColour(jitter, gray, blur, rng.random() < moco.SOLARIZE_P)


_ENHANCE = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast, "saturation": ImageEnhance.Color}


def _turn_hue(img: Image.Image, turn: float) -> Image.Image:
    """``img`` with its hue moved by ``turn`` of the colour wheel (torchvision's PIL ``adjust_hue``)."""
    h, s, v = img.convert("HSV").split()
    step = round(turn * 255)
    return Image.merge("HSV", (h.point([(i + step) % 256 for i in range(256)]), s, v)).convert("RGB")


def apply_colour(img: Image.Image, colour: KeyColour) -> Image.Image:
    """``img`` after the changes ``colour`` drew (torchvision's and MoCo v3's PIL operations)."""
    for name, factor in colour.jitter:
        img = _turn_hue(img, factor) if name == "hue" else _ENHANCE[name](img).enhance(factor)
    if colour.gray:
        img = img.convert("L").convert("RGB")
    if colour.blur:
        img = img.filter(ImageFilter.GaussianBlur(colour.blur))  # PIL's radius is the standard deviation
    return ImageOps.solarize(img, moco.SOLARIZE_AT) if colour.solarize else img


@dataclass(frozen=True)
class KeyDraw:
    """Where the key view of one image lies and what is done to it."""

    box: Box
    flip: bool
    colour: KeyColour | None  # independent only


@dataclass(frozen=True)
class Augmentation:
    """The training views of one image, drawn from a random generator: the online random-resized crop
    and flip and, unless ``key_view`` is ``same``, the key view (``data/views.py``)."""

    size: int
    scale: tuple[float, float]
    hflip: bool
    key_view: str = "same"
    key_shift: int = 0

    def online(self, width: int, height: int, rng: np.random.Generator) -> tuple[Box, bool]:
        """Crop box and flip of the online view of a ``width`` x ``height`` image."""
        box = random_resized_crop_box(width, height, self.scale, rng)
        return box, self.hflip and rng.random() < 0.5

    def key(self, width: int, height: int, box: Box, flip: bool, rng: np.random.Generator) -> KeyDraw:
        """The key view of an image whose online view is ``box``, ``flip``."""
        if self.key_view == "shifted":
            return KeyDraw(shifted_box(box, width, height, self.size, self.key_shift, rng), flip, None)
        key_box = random_resized_crop_box(width, height, self.scale, rng)
        return KeyDraw(key_box, self.hflip and rng.random() < 0.5, draw_colour(rng))

    def views(self, img: Image.Image, rng: np.random.Generator) -> list[torch.Tensor]:
        """uint8 ``[3, S, S]``: the online view, then the key view unless ``key_view`` is ``same``."""
        box, flip = self.online(img.width, img.height, rng)
        views = [crop_view(img, box, self.size, flip)]
        if self.key_view != "same":
            key = self.key(img.width, img.height, box, flip, rng)
            view = crop_view(img, key.box, self.size, key.flip)
            views.append(apply_colour(view, key.colour) if key.colour else view)
        return [to_tensor(v) for v in views]


class _AugmentedImages(Dataset):
    """Index ``(epoch, i)`` -> (uint8 ``[3, S, S]`` online view, the key view unless ``same``, label) of image ``i``."""

    def __init__(self, items: ImageList, augment: Augmentation, seed: int):
        self.items, self.augment, self.seed = items, augment, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        return (*self.augment.views(open_rgb(self.items.files[i]), rng), self.items.labels[i])


class TorchLoader:
    """Per-rank batches of augmented training images, normalised on the training device.

    With ``labels=True`` (fine-tuning, linear probe) each batch is ``(images, labels)`` and
    ``data.key_view`` does not apply.
    """

    def __init__(self, items: ImageList, data: DataConfig, size: int, batch: int, seed: int, rank: int, world: int,
                 device: torch.device, labels: bool = False):
        key_view = "same" if labels else data.key_view
        augment = Augmentation(size, data.crop_scale, data.hflip, key_view, data.key_shift)
        self.dataset = _AugmentedImages(items, augment, seed)
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
        """Batches ``[B, 3, S, S]`` (float, normalised; :class:`Views` of two unless ``data.key_view`` is
        ``same``; with labels ``[B]``) of ``epoch``, ``start_step`` to ``stop_step``."""
        stop = stop_step or self.steps_per_epoch
        keys = [(epoch, i) for i in self._indices(epoch)[start_step * self.batch : stop * self.batch]]
        loader = DataLoader(
            self.dataset, batch_size=self.batch, sampler=keys, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", drop_last=True, persistent_workers=False,
        )
        for *views, labels in loader:
            views = [normalize(v.to(self.device, non_blocking=True), self.stats) for v in views]  # [B, 3, S, S] each
            images = Views(*views) if len(views) == 2 else views[0]
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
