"""Masked (norm-pix) reconstruction loss of MAE on the patches hidden from the encoder."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from symmim.kernels.patches import patchify


def norm_pix_loss_reference(
    pred: Tensor, images: Tensor, mask: Tensor, patch: int, norm_pix: bool = True, eps: float = 1e-6
) -> Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    pred ``[B, N, C*p*p]`` (channel-major patch vectors), images ``[B, C, H, W]``,
    mask ``[B, N]`` bool (True = masked, the patches the loss covers). With ``norm_pix``
    each target patch is normalised by its own mean and ``sqrt(var + eps)``.
    """
    target = patchify(images.float(), patch)  # [B, N, C*p*p]
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)  # [B, N, 1]
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [B, N]
    m = mask.float()
    return (per_patch * m).sum() / m.sum()


@triton.jit
def _masked_diff(Pred, Img, Mask, N, W_GRID, P, K, s_pb, s_pn, s_pk, s_b, s_c, s_h, s_w, s_mb, s_mn, eps,
                 NORM_PIX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """``pred - target`` ``[BLOCK_T, BLOCK_K]`` fp32 on this program's (image, patch block), 0 on visible
    patches; the target patches are read from the image (visible ones never are) and normalised."""
    b = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] patch index
    e = tl.arange(0, BLOCK_K)  # [BK] channel-major (c, ph, pw) element of a patch vector
    masked = tl.load(Mask + b * s_mb + n * s_mn, mask=n < N, other=0) != 0  # [BT]
    valid = masked[:, None] & (e < K)[None, :]  # [BT, BK]
    patch_off = b * s_b + (n // W_GRID) * P * s_h + (n % W_GRID) * P * s_w  # [BT] top-left pixel
    elem_off = (e // (P * P)) * s_c + ((e // P) % P) * s_h + (e % P) * s_w  # [BK]
    target = tl.load(Img + patch_off[:, None] + elem_off[None, :], mask=valid, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(target, axis=1) / K  # [BT]
        centred = tl.where(valid, target - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / (K - 1)  # unbiased, as the reference
        target = centred / tl.sqrt(var + eps)[:, None]
    pred = tl.load(Pred + b * s_pb + n[:, None] * s_pn + e[None, :] * s_pk, mask=valid, other=0.0)
    return tl.where(valid, pred.to(tl.float32) - target, 0.0)


@triton.jit
def _norm_pix_fwd(Pred, Img, Mask, Partial, N, W_GRID, P, K, s_pb, s_pn, s_pk, s_b, s_c, s_h, s_w,
                  s_mb, s_mn, eps, NORM_PIX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sum over the masked patches of this (image, patch block) of their mean squared error."""
    diff = _masked_diff(Pred, Img, Mask, N, W_GRID, P, K, s_pb, s_pn, s_pk, s_b, s_c, s_h, s_w, s_mb, s_mn,
                        eps, NORM_PIX, BLOCK_T, BLOCK_K)  # [BT, BK]
    tl.store(Partial + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(diff * diff) / K)


@triton.jit
def _norm_pix_bwd(Pred, Img, Mask, DLoss, Count, DPred, N, W_GRID, P, K, s_pb, s_pn, s_pk, s_b, s_c, s_h,
                  s_w, s_mb, s_mn, eps, NORM_PIX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dpred = dloss * 2 (pred - target) / (K * count)`` on masked patches, 0 elsewhere."""
    diff = _masked_diff(Pred, Img, Mask, N, W_GRID, P, K, s_pb, s_pn, s_pk, s_b, s_c, s_h, s_w, s_mb, s_mn,
                        eps, NORM_PIX, BLOCK_T, BLOCK_K)  # [BT, BK]
    scale = 2.0 * tl.load(DLoss).to(tl.float32) / (K * tl.load(Count))
    n = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    e = tl.arange(0, BLOCK_K)  # [BK]
    ptrs = DPred + tl.program_id(0) * N * K + n[:, None] * K + e[None, :]  # dpred is contiguous [B, N, K]
    tl.store(ptrs, (diff * scale).to(DPred.dtype.element_ty), mask=(n < N)[:, None] & (e < K)[None, :])


def _blocks(k: int) -> tuple[int, int, int]:
    """(patches per program, padded patch length, warps) for patch vectors of ``k`` values."""
    block_k = triton.next_power_of_2(k)
    return max(1, min(16, 4096 // block_k)), block_k, 8 if block_k >= 2048 else 4


def _launch(kernel, pred: Tensor, images: Tensor, mask: Tensor, patch: int, norm_pix: bool, eps: float, *buffers):
    """Run ``kernel`` on a ``(batch, patch block)`` grid; ``buffers`` go between the mask and the sizes."""
    b, n, k = pred.shape
    block_t, block_k, warps = _blocks(k)
    grid = (b, triton.cdiv(n, block_t))
    kernel[grid](
        pred, images, mask, *buffers, n, images.shape[-1] // patch, patch, k, *pred.stride(),
        *images.stride(), *mask.stride(), eps, NORM_PIX=norm_pix, BLOCK_T=block_t, BLOCK_K=block_k,
        num_warps=warps,
    )


class _NormPixLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred: Tensor, images: Tensor, mask: Tensor, patch: int, norm_pix: bool, eps: float):
        b, n, _ = pred.shape
        partial = torch.empty((b, triton.cdiv(n, _blocks(pred.shape[-1])[0])), dtype=torch.float32,
                              device=pred.device)  # [B, patch blocks]
        _launch(_norm_pix_fwd, pred, images, mask, patch, norm_pix, eps, partial)
        count = mask.sum(dtype=torch.float32)  # stays on the device: no host sync
        ctx.save_for_backward(pred, images, mask, count)
        ctx.config = (patch, norm_pix, eps)
        return partial.sum() / count

    @staticmethod
    def backward(ctx, dloss: Tensor):
        pred, images, mask, count = ctx.saved_tensors
        dpred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)  # [B, N, K] contiguous
        _launch(_norm_pix_bwd, pred, images, mask, *ctx.config, dloss.float().contiguous(), count, dpred)
        return dpred, None, None, None, None, None


def norm_pix_loss_triton(
    pred: Tensor, images: Tensor, mask: Tensor, patch: int, norm_pix: bool = True, eps: float = 1e-6
) -> Tensor:
    """Fused :func:`norm_pix_loss_reference`: fp32 scalar loss, gradient for ``pred`` only.

    Forward and backward are Triton kernels that read the target patches straight from
    ``images`` (only the masked ones) and never materialise the patchified target.
    """
    if pred.dim() != 3 or images.dim() != 4 or mask.dim() != 2:
        raise ValueError(
            "norm_pix_loss_triton expects pred [B, N, C*p*p], images [B, C, H, W], mask [B, N]; got "
            f"{tuple(pred.shape)}, {tuple(images.shape)}, {tuple(mask.shape)}"
        )
    b, c, hh, ww = images.shape
    if hh % patch or ww % patch:
        raise ValueError(f"image size {hh}x{ww} is not a multiple of the patch size {patch}")
    n, k = (hh // patch) * (ww // patch), c * patch * patch
    if pred.shape != (b, n, k) or mask.shape != (b, n):
        raise ValueError(f"expected pred {(b, n, k)} and mask {(b, n)}, "
                         f"got {tuple(pred.shape)}, {tuple(mask.shape)}")
    if norm_pix and k < 2:
        raise ValueError("norm_pix needs patch vectors of at least 2 values (unbiased variance)")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = masked), got {mask.dtype}")
    if not (pred.is_floating_point() and images.is_floating_point()):
        raise ValueError("pred and images must be floating point")
    if images.device != pred.device or mask.device != pred.device:
        raise ValueError("pred, images and mask must be on the same device")
    return _NormPixLoss.apply(pred, images, mask, patch, norm_pix, eps)
