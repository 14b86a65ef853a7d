"""Masked (norm-pix) reconstruction loss of MAE on the patches hidden from the encoder."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from symmim.kernels.patches import patchify
from symmim.kernels.triton_helpers import kernel_op, launch, load_patches


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
def _norm_pix_fwd(Pred, Img, Mask, Count, Partial, DPred, N, W_GRID, K, s_pb, s_pn, s_pk, s_b, s_c, s_h, s_w,
                  s_mb, s_mn, eps, P: tl.constexpr, NORM_PIX: tl.constexpr, WITH_GRAD: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """On this program's (image, patch block): the masked patches' squared error summed over
    ``K * count``, and with ``WITH_GRAD`` d loss / d pred ``= 2 (pred - target) / (K * count)`` there,
    0 on the visible patches (whose pred and target are never read)."""
    b = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] patch index
    e = tl.arange(0, BLOCK_K)  # [BK] channel-major (c, ph, pw) element of a patch vector
    masked = tl.load(Mask + b * s_mb + n * s_mn, mask=n < N, other=0) != 0  # [BT]
    valid = masked[:, None] & (e < K)[None, :]  # [BT, BK]
    target = load_patches(Img, b, n // W_GRID, n % W_GRID, masked, e, K, s_b, s_c, s_h, s_w, P)  # [BT, BK]
    target = target.to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(target, axis=1) / K  # [BT]
        centred = tl.where(valid, target - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / (K - 1)  # [BT] unbiased, as the reference
        target = centred / tl.sqrt(var + eps)[:, None]
    pred = tl.load(Pred + b * s_pb + n[:, None] * s_pn + e[None, :] * s_pk, mask=valid, other=0.0)  # [BT, BK]
    diff = tl.where(valid, pred.to(tl.float32) - target, 0.0)  # [BT, BK]
    scale = 1.0 / (K * tl.load(Count))
    tl.store(Partial + b * tl.num_programs(1) + tl.program_id(1), tl.sum(diff * diff) * scale)
    if WITH_GRAD:
        ptrs = DPred + (b * N + n)[:, None] * K + e[None, :]  # dpred is contiguous [B, N, K]
        tl.store(ptrs, (2.0 * scale * diff).to(DPred.dtype.element_ty), mask=(n < N)[:, None] & (e < K)[None, :])


def _blocks(k: int) -> tuple[int, int, int]:
    """(patches per program, padded patch length, warps) for patch vectors of ``k`` values."""
    block_k = triton.next_power_of_2(k)
    return max(1, min(16, 4096 // block_k)), block_k, 8 if block_k >= 2048 else 4


@kernel_op("norm_pix_loss")
def _norm_pix_loss(pred: Tensor, images: Tensor, mask: Tensor, patch: int, norm_pix: bool, eps: float,
                   with_grad: bool) -> tuple[Tensor, Tensor]:
    """``(loss, dpred)``: the fp32 scalar loss and, ``with_grad``, d loss / d pred ``[B, N, K]``
    contiguous in ``pred``'s dtype (else an empty tensor)."""
    b, n, k = pred.shape
    block_t, block_k, warps = _blocks(k)
    grid = (b, triton.cdiv(n, block_t))
    count = mask.sum(dtype=torch.float32)  # stays on the device: no host sync
    partial = torch.empty(grid, dtype=torch.float32, device=pred.device)  # [B, patch blocks]
    dpred = torch.empty(pred.shape if with_grad else (0,), dtype=pred.dtype, device=pred.device)
    launch(_norm_pix_fwd, grid, pred, images, mask, count, partial, dpred, n, images.shape[-1] // patch, k,
           *pred.stride(), *images.stride(), *mask.stride(), eps, P=patch, NORM_PIX=norm_pix, WITH_GRAD=with_grad,
           BLOCK_T=block_t, BLOCK_K=block_k, num_warps=warps)
    return partial.sum(), dpred


def _save(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    _, dpred = output
    ctx.mark_non_differentiable(dpred)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for dpred
    ctx.save_for_backward(dpred)


def _backward(ctx, dloss: Tensor, _ddpred: None) -> tuple:
    """The stored gradient scaled by the upstream scalar: ``dpred * dloss`` (one torch elementwise op)."""
    (dpred,) = ctx.saved_tensors
    return dpred * dloss if ctx.needs_input_grad[0] else None, None, None, None, None, None, None


_norm_pix_loss.register_autograd(_backward, setup_context=_save)


def norm_pix_loss_triton(
    pred: Tensor, images: Tensor, mask: Tensor, patch: int, norm_pix: bool = True, eps: float = 1e-6
) -> Tensor:
    """Fused :func:`norm_pix_loss_reference`: fp32 scalar loss, gradient for ``pred`` only.

    One Triton kernel reads pred and the target patches (straight from ``images``) of the masked
    patches only, once: it sums the loss per block and, when ``pred`` needs a gradient, writes
    d loss / d pred in the same pass; the backward only scales that by the upstream gradient.
    Launches: forward three (the masked count, the kernel, the sum of its partials; no host
    sync), backward one.
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
    loss, _ = _norm_pix_loss(pred, images, mask, patch, norm_pix, eps, torch.is_grad_enabled() and pred.requires_grad)
    return loss
