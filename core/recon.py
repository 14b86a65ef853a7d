"""Reconstruction pictures: original | masked input | reconstruction, one row per image."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from symmim.core.masking import Mask, MaskGenerator
from symmim.kernels.patches import patchify, unpatchify
from symmim.data.folder import MEAN, STD


def reconstruct(images: Tensor, pred: Tensor, mask: Mask, patch: int, norm_pix: bool) -> Tensor:
    """Images ``[B, 3, H, W]`` with the masked patches replaced by the predictions."""
    target = patchify(images.float(), patch)  # [B, N, 3*p*p]
    pred = pred.float()
    if norm_pix:  # predictions are in per-patch normalised units: undo with the target's stats
        pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    merged = torch.where(mask.mask[..., None], pred, target)
    return unpatchify(merged, patch, mask.grid)


def masked_input(images: Tensor, mask: Mask, patch: int) -> Tensor:
    """Images with the masked patches blanked (to the data mean)."""
    target = patchify(images.float(), patch)
    return unpatchify(target.masked_fill(mask.mask[..., None], 0.0), patch, mask.grid)


def _to_uint8(images: Tensor) -> np.ndarray:
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    pixels = ((images.float() * std + mean).clamp(0, 1) * 255).round().byte()
    return pixels.permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]


def save_recon_grid(images: Tensor, pred: Tensor, mask: Mask, patch: int, norm_pix: bool, path: Path) -> None:
    """Write the PNG: one row per image, columns original | masked | reconstruction."""
    cols = [_to_uint8(images), _to_uint8(masked_input(images, mask, patch)), _to_uint8(reconstruct(images, pred, mask, patch, norm_pix))]
    rows = [np.concatenate([c[i] for c in cols], axis=1) for i in range(images.shape[0])]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    zoom = max(1, 128 // images.shape[-1])  # small training crops are enlarged to stay legible
    grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST).save(path)


class ReconPictures:
    """The epoch-end picture of a fixed set of images (rank 0): ``out_dir/epochNNNN_stepNNNNNNNN.png``.

    ``predict(images, mask)`` is the model's pixel prediction ``[B, N, 3*p*p]``; each picture draws
    its mask from ``masks`` (the online branch's strategy, its own seed).
    """

    def __init__(self, images: Tensor, masks: MaskGenerator, predict: Callable[[Tensor, Mask], Tensor], patch: int,
                 norm_pix: bool, out_dir: Path):
        self.images, self.masks, self.predict = images, masks, predict  # images [n, 3, S, S] on the model's device
        self.patch, self.norm_pix, self.out_dir = patch, norm_pix, out_dir
        out_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, pos) -> None:
        mask = self.masks.online(self.images.shape[0])
        pred = self.predict(self.images, mask)
        save_recon_grid(self.images, pred, mask, self.patch, self.norm_pix,
                        self.out_dir / f"epoch{pos.epoch:04d}_step{pos.step:08d}.png")
