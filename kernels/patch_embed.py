"""Patch-gather-embed: visible patches of an image, projected and position-embedded.

Patch vectors are flattened channel-major, ``(c, ph, pw)``, matching a ``Conv2d`` weight
``[D, C, p, p]`` viewed as ``[D, C*p*p]`` (see ``kernels/patches.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from symmim.kernels.patches import patchify
from symmim.kernels.triton_helpers import autotune_configs, tensor_core_dtype


def patch_embed_reference(
    images: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor, ids_keep: Tensor,
    cell: int | None = None, phase: Tensor | None = None,
) -> Tensor:
    """Eager reference: ``[B, C, H, W]`` images -> ``[B, N_vis, D]`` visible tokens.

    Gathers through ``ids_keep`` always; ``cell`` and ``phase`` (the checkerboard's, which the
    Triton kernel may use instead) are accepted so both backends share one signature.
    """
    d, c, p, _ = weight.shape
    patches = patchify(images, p)  # [B, N, C*p*p]
    idx = ids_keep[..., None].expand(-1, -1, c * p * p)  # [B, N_vis, C*p*p]
    visible = torch.gather(patches, 1, idx)  # [B, N_vis, C*p*p]
    tokens = visible @ weight.reshape(d, -1).t() + bias  # [B, N_vis, D]
    return tokens + pos_embed[ids_keep]  # pos_embed [N, D] -> [B, N_vis, D]


@triton.autotune(configs=autotune_configs([(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3),
                                           (128, 64, 32, 4, 4)], names=("BLOCK_M", "BLOCK_N", "BLOCK_K")),
                 key=["NV", "D", "KDIM"])
@triton.jit
def _patch_embed_fwd(Img, W, Bias, Pos, Ids, Phase, Out, Patches, NV, D, KDIM, W_GRID, P, cell,
                     s_b, s_c, s_h, s_w, s_ib, s_iv, ARITHMETIC: tl.constexpr, STORE_PATCHES: tl.constexpr,
                     DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tokens ``[BLOCK_M, BLOCK_N]`` of image ``b``: visible patches (read from the image) @ W^T + bias + pos."""
    b = tl.program_id(2)
    v = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] visible token index
    d = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] embedding channel
    if ARITHMETIC:  # checkerboard: each patch row holds W_GRID / 2 visible patches
        half = W_GRID // 2
        i = v // half  # [BM] patch row
        r = v % half
        phase = tl.load(Phase + b)
        j = (2 * (r // cell) + (i // cell + phase) % 2) * cell + r % cell  # [BM] patch column
        n = i * W_GRID + j  # [BM] patch index
    else:
        n = tl.load(Ids + b * s_ib + v * s_iv, mask=v < NV, other=0)  # [BM]
        i = n // W_GRID
        j = n % W_GRID
    patch_off = b * s_b + i * P * s_h + j * P * s_w  # [BM]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KDIM, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BK] channel-major (c, ph, pw) element of a patch vector
        elem_off = (k // (P * P)) * s_c + ((k // P) % P) * s_h + (k % P) * s_w  # [BK]
        a_mask = (v < NV)[:, None] & (k < KDIM)[None, :]  # [BM, BK]
        a = tl.load(Img + patch_off[:, None] + elem_off[None, :], mask=a_mask, other=0.0)  # [BM, BK]
        if STORE_PATCHES:  # for the backward's dW = dOut^T @ patches; only the first column block writes
            if tl.program_id(1) == 0:
                tl.store(Patches + (b * NV + v)[:, None] * KDIM + k[None, :], a.to(Patches.dtype.element_ty),
                         mask=a_mask)
        w_mask = (k < KDIM)[:, None] & (d < D)[None, :]  # [BK, BN]
        w = tl.load(W + d[None, :] * KDIM + k[:, None], mask=w_mask, other=0.0)  # W^T tile [BK, BN]
        acc = tl.dot(a.to(DOT), w.to(DOT), acc, input_precision="ieee")
    out_mask = (v < NV)[:, None] & (d < D)[None, :]  # [BM, BN]
    acc += tl.load(Bias + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(Pos + n[:, None] * D + d[None, :], mask=out_mask, other=0.0).to(tl.float32)
    tl.store(Out + (b * NV + v)[:, None] * D + d[None, :], acc.to(Out.dtype.element_ty), mask=out_mask)


def _arithmetic(grid: tuple[int, int], cell: int | None) -> bool:
    """Whether checkerboard visible positions follow from (cell, phase): every patch row half visible."""
    return cell is not None and grid[0] % cell == 0 and grid[1] % (2 * cell) == 0


class _PatchEmbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, weight, bias, pos_embed, ids_keep, cell, phase, store_patches):
        b, _, hh, ww = images.shape
        d, c, p, _ = weight.shape
        nv, kdim, grid = ids_keep.shape[1], c * p * p, (hh // p, ww // p)
        arithmetic = _arithmetic(grid, cell)
        out = torch.empty((b, nv, d), dtype=weight.dtype, device=images.device)
        patches = torch.empty((b * nv, kdim) if store_patches else (0,), dtype=weight.dtype,
                              device=images.device)  # [B*N_vis, C*p*p] visible patches, for dW
        _patch_embed_fwd[lambda meta: (triton.cdiv(nv, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_N"]), b)](
            images, weight, bias, pos_embed, ids_keep,
            phase if arithmetic else ids_keep,  # read only on the arithmetic path
            out, patches,
            nv, d, kdim, grid[1], p, cell if arithmetic else 1, *images.stride(), *ids_keep.stride(),
            ARITHMETIC=arithmetic, STORE_PATCHES=store_patches, DOT=tensor_core_dtype(weight.dtype),
        )
        ctx.save_for_backward(patches, ids_keep)
        ctx.param_meta = (weight.shape, bias.dtype, pos_embed.shape, pos_embed.dtype)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        patches, ids_keep = ctx.saved_tensors
        w_shape, bias_dtype, pos_shape, pos_dtype = ctx.param_meta
        g = dout.reshape(-1, w_shape[0])  # [B*N_vis, D]
        dw = db = dpos = None
        if ctx.needs_input_grad[1]:
            dw = (g.t().to(patches.dtype) @ patches).view(w_shape)  # [D, C*p*p] -> [D, C, p, p]
        if ctx.needs_input_grad[2]:
            db = g.sum(0, dtype=torch.float32).to(bias_dtype)
        if ctx.needs_input_grad[3]:
            dpos = torch.zeros(pos_shape, dtype=torch.float32, device=g.device)
            dpos = dpos.index_add_(0, ids_keep.flatten(), g.float()).to(pos_dtype)  # [N, D]
        return None, dw, db, dpos, None, None, None, None


def patch_embed_triton(
    images: Tensor,
    weight: Tensor,
    bias: Tensor,
    pos_embed: Tensor,
    ids_keep: Tensor,
    cell: int | None = None,
    phase: Tensor | None = None,
) -> Tensor:
    """Fused :func:`patch_embed_reference`: ``[B, C, H, W]`` images -> ``[B, N_vis, D]`` tokens.

    The forward is one Triton kernel that reads only the visible patches from ``images``,
    projects them and adds bias and position embeddings; the output has ``weight``'s dtype.
    With a checkerboard ``cell`` and per-sample ``phase`` ``[B]`` on a grid where every patch
    row is half visible (``h % cell == 0``, ``w % (2 * cell) == 0``), the kernel computes the
    visible positions and reads no index tensor; otherwise it gathers through ``ids_keep``.
    The backward is torch: dW is one matmul against the visible patches the forward kernel
    stored (only when ``weight`` needs a gradient), dbias a sum, dpos an ``index_add_``.
    ``images`` get no gradient.
    """
    if images.dim() != 4 or weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"expected images [B, C, H, W] and weight [D, C, p, p], "
                         f"got {tuple(images.shape)}, {tuple(weight.shape)}")
    b, c, hh, ww = images.shape
    d, wc, p, _ = weight.shape
    if wc != c or hh % p or ww % p:
        raise ValueError(f"weight {tuple(weight.shape)} does not patch images {tuple(images.shape)}")
    n = (hh // p) * (ww // p)
    if bias.shape != (d,) or pos_embed.shape != (n, d):
        raise ValueError(f"expected bias ({d},) and pos_embed ({n}, {d}), "
                         f"got {tuple(bias.shape)}, {tuple(pos_embed.shape)}")
    if (ids_keep.dim() != 2 or ids_keep.shape[0] != b or ids_keep.dtype != torch.int64
            or not 0 < ids_keep.shape[1] <= n):
        raise ValueError(f"ids_keep must be int64 [{b}, N_vis] with 0 < N_vis <= {n}, "
                         f"got {ids_keep.dtype} {tuple(ids_keep.shape)}")
    if cell is not None and _arithmetic((hh // p, ww // p), cell):
        if phase is None or phase.shape != (b,) or phase.device != images.device or ids_keep.shape[1] != n // 2:
            raise ValueError(f"a checkerboard of cell {cell} needs phase [{b}] on the images' device "
                             f"and N_vis = {n // 2}")
    if not (images.is_floating_point() and weight.is_floating_point()):
        raise ValueError("images and weight must be floating point")
    if any(t.device != images.device for t in (weight, bias, pos_embed, ids_keep)):
        raise ValueError("images, weight, bias, pos_embed and ids_keep must be on the same device")
    store_patches = torch.is_grad_enabled() and weight.requires_grad
    params = (weight.contiguous(), bias.contiguous(), pos_embed.contiguous())
    return _PatchEmbed.apply(images, *params, ids_keep, cell, phase, store_patches)
