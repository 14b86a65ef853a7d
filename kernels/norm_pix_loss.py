"""Masked (norm-pix) reconstruction loss of MAE on the patches hidden from the encoder."""
from __future__ import annotations

from torch import Tensor


def norm_pix_loss_reference(
    pred: Tensor, images: Tensor, mask: Tensor, patch: int, norm_pix: bool = True, eps: float = 1e-6
) -> Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    pred ``[B, N, C*p*p]`` (channel-major patch vectors), images ``[B, C, H, W]``,
    mask ``[B, N]`` bool (True = masked, the patches the loss covers). With ``norm_pix``
    each target patch is normalised by its own mean and ``sqrt(var + eps)``.
    """
    b, c, hh, ww = images.shape
    h, w, p = hh // patch, ww // patch, patch
    target = images.float().reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, -1)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)  # [B, N, 1]
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [B, N]
    m = mask.float()
    return (per_patch * m).sum() / m.sum()
