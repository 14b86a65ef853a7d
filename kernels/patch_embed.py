"""Patch-gather-embed: visible patches of an image, projected and position-embedded.

Patch vectors are flattened channel-major, ``(c, ph, pw)``, matching a ``Conv2d`` weight
``[D, C, p, p]`` viewed as ``[D, C*p*p]``; ``core.vit.patchify`` uses the same order.
"""
from __future__ import annotations

import torch
from torch import Tensor


def patch_embed_reference(
    images: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor, ids_keep: Tensor
) -> Tensor:
    """Eager reference: ``[B, C, H, W]`` images -> ``[B, N_vis, D]`` visible tokens."""
    b, c, hh, ww = images.shape
    d, _, p, _ = weight.shape
    h, w = hh // p, ww // p
    patches = images.reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)
    idx = ids_keep[..., None]  # [B, N_vis, 1]
    visible = torch.gather(patches, 1, idx.expand(-1, -1, c * p * p))  # [B, N_vis, C*p*p]
    tokens = visible @ weight.reshape(d, -1).t() + bias  # [B, N_vis, D]
    return tokens + pos_embed[ids_keep]  # pos_embed [N, D] -> [B, N_vis, D]
