"""Image <-> patch-vector conversions shared by the model, the losses and the kernels.

Patch vectors are channel-major, ``(c, ph, pw)``: the order of a ``Conv2d`` patch-embedding
weight ``[D, C, p, p]`` viewed as ``[D, C*p*p]``.
"""
from __future__ import annotations

from torch import Tensor


def patchify(images: Tensor, patch: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, N, C*p*p]`` with ``N = (H/p) * (W/p)`` in raster order."""
    b, c, hh, ww = images.shape
    h, w = hh // patch, ww // patch
    x = images.reshape(b, c, h, patch, w, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * patch * patch)


def unpatchify(patches: Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> Tensor:
    """``[B, N, C*p*p]`` -> ``[B, C, H, W]``, the inverse of :func:`patchify`."""
    b = patches.shape[0]
    h, w = grid
    x = patches.reshape(b, h, w, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, h * patch, w * patch)
