"""The momentum (key) branch's view of each training image (``data.key_view``), as both loaders make it.

- ``same``: the key is the online view (only the masks differ); a loader yields one tensor.
- ``independent``: MoCo v3's second view (its ``augmentation2``): a random-resized crop of its own
  (same ``data.crop_scale``), a flip of its own, colour jitter with probability 0.8 (brightness
  0.4, contrast 0.4, saturation 0.2, hue 0.1), grayscale 0.2, Gaussian blur (sigma uniform in
  [0.1, 2]) 0.1, solarize (at 128) 0.2.
- ``shifted``: CMAE's pixel shift: the online crop box moved by a whole number of output pixels,
  uniform in ``[-data.key_shift, data.key_shift]`` along each axis (in source pixels: that times
  the box's extent over the output size), kept inside the image; the online view's flip (a flip
  of its own would mirror the key about its centre, no longer a small move of the same crop);
  no colour change.

For the last two a loader yields :class:`Views`. The online view is the same random-resized
crop and flip as with ``same``: it stays the reconstruction input.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

# MoCo v3's key-view colour augmentation (torchvision ColorJitter(0.4, 0.4, 0.2, 0.1) and friends)
JITTER_P = 0.8
BRIGHTNESS, CONTRAST, SATURATION = 0.4, 0.4, 0.2  # factor uniform in [1 - x, 1 + x]
HUE = 0.1  # shift uniform in [-x, x] turns of the colour wheel
GRAY_P = 0.2
BLUR_P, BLUR_SIGMA = 0.1, (0.1, 2.0)  # sigma in output pixels
SOLARIZE_P, SOLARIZE_AT = 0.2, 128  # pixel values >= SOLARIZE_AT become 255 - value


class Views(NamedTuple):
    """A pre-training batch whose momentum branch has its own view; both normalised like a plain batch."""

    online: Tensor  # [B, 3, S, S]: the online branch's (reconstruction) input
    key: Tensor  # [B, 3, S, S]: the momentum branch's input
