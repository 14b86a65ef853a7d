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
from symmim.kernels.triton_helpers import autotune_configs, kernel_op, launch, load_patches, tensor_core_dtype


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


@triton.jit
def _visible_patch(b, v, valid, Ids, Phase, W_GRID, cell, s_ib, s_iv, ARITHMETIC: tl.constexpr):
    """(patch row, patch column) of visible token ``v`` ``[BM]`` of image ``b`` (a scalar or ``[BM]``).

    Arithmetic path: the checkerboard of cell ``cell`` and the image's phase, every patch row half
    visible; otherwise the row of ``ids_keep``.
    """
    if ARITHMETIC:
        half = W_GRID // 2
        i = v // half  # [BM] patch row
        r = v % half  # [BM] rank among the row's visible patches
        phase = tl.load(Phase + tl.broadcast_to(b, v.shape), mask=valid, other=0)  # [BM]
        j = (2 * (r // cell) + (i // cell + phase) % 2) * cell + r % cell  # [BM] patch column
    else:
        n = tl.load(Ids + b * s_ib + v * s_iv, mask=valid, other=0)  # [BM] patch index
        i = n // W_GRID
        j = n % W_GRID
    return i, j


@triton.autotune(configs=autotune_configs([(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3),
                                           (128, 64, 32, 4, 4)], names=("BLOCK_M", "BLOCK_N", "BLOCK_K")),
                 key=["NV", "D", "KDIM"])
@triton.jit
def _patch_embed_fwd(Img, W, Bias, Pos, Out, Ids, Phase, W_GRID, cell, s_ib, s_iv, NV, D, KDIM,
                     s_b, s_c, s_h, s_w, P: tl.constexpr, ARITHMETIC: tl.constexpr, DOT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tokens ``[BLOCK_M, BLOCK_N]`` of image ``b``: visible patches (read from the image) @ W^T + bias + pos."""
    b = tl.program_id(2)
    v = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] visible token index
    d = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] embedding channel
    i, j = _visible_patch(b, v, v < NV, Ids, Phase, W_GRID, cell, s_ib, s_iv, ARITHMETIC)  # [BM] each
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KDIM, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        a = load_patches(Img, b, i, j, v < NV, k, KDIM, s_b, s_c, s_h, s_w, P)  # [BM, BK]
        w_mask = (k < KDIM)[:, None] & (d < D)[None, :]  # [BK, BN]
        w = tl.load(W + d[None, :] * KDIM + k[:, None], mask=w_mask, other=0.0)  # W^T tile [BK, BN]
        acc = tl.dot(a.to(DOT), w.to(DOT), acc, input_precision="ieee")
    out_mask = (v < NV)[:, None] & (d < D)[None, :]  # [BM, BN]
    acc += tl.load(Bias + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
    n = i * W_GRID + j  # [BM] patch index
    acc += tl.load(Pos + n[:, None] * D + d[None, :], mask=out_mask, other=0.0).to(tl.float32)
    tl.store(Out + (b * NV + v)[:, None] * D + d[None, :], acc.to(Out.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=autotune_configs([(64, 128, 128, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
                                           (32, 64, 64, 4, 4), (128, 64, 64, 8, 3)],
                                          names=("BLOCK_M", "BLOCK_N", "BLOCK_K")),
                 key=["M", "D", "KDIM"])
@triton.jit
def _patch_embed_bwd_params(DOut, Img, DW, DBias, Ids, Phase, W_GRID, cell, s_ib, s_iv, NV, M, D, KDIM,
                            s_ob, s_ov, s_od, s_b, s_c, s_h, s_w, P: tl.constexpr, ARITHMETIC: tl.constexpr,
                            WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, DOT: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW tile ``[BLOCK_N, BLOCK_K]`` = dOut^T @ visible patches, summed over all ``M = B * N_vis`` tokens
    of the batch; the programs of the first K block also sum their dOut columns into dbias."""
    d = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] embedding channel
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK] patch-vector element
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)  # [BM] token of the batch
        valid = m < M
        b = m // NV  # [BM] image
        v = m % NV  # [BM] visible token of that image
        g_mask = (d < D)[:, None] & valid[None, :]  # [BN, BM]
        g = tl.load(DOut + b[None, :] * s_ob + v[None, :] * s_ov + d[:, None] * s_od, mask=g_mask,
                    other=0.0)  # dOut^T tile [BN, BM]
        if WEIGHT_GRAD:
            i, j = _visible_patch(b, v, valid, Ids, Phase, W_GRID, cell, s_ib, s_iv, ARITHMETIC)  # [BM] each
            a = load_patches(Img, b, i, j, valid, k, KDIM, s_b, s_c, s_h, s_w, P)  # [BM, BK]
            acc = tl.dot(g.to(DOT), a.to(DOT), acc, input_precision="ieee")
        if BIAS_GRAD and tl.program_id(1) == 0:
            dbias += tl.sum(g.to(tl.float32), axis=1)
    if WEIGHT_GRAD:
        w_mask = (d < D)[:, None] & (k < KDIM)[None, :]  # [BN, BK]
        tl.store(DW + d[:, None] * KDIM + k[None, :], acc.to(DW.dtype.element_ty), mask=w_mask)
    if BIAS_GRAD and tl.program_id(1) == 0:
        tl.store(DBias + d, dbias.to(DBias.dtype.element_ty), mask=d < D)


@triton.jit
def _scatter_visible(Ids, Inv, NV, N, s_ib, s_iv, BLOCK: tl.constexpr):
    """``Inv[b, ids_keep[b, v]] = v``: each image's visible token at the position it shows."""
    b = tl.program_id(0)
    v = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    n = tl.load(Ids + b * s_ib + v * s_iv, mask=v < NV, other=0)  # [BLOCK] patch index
    tl.store(Inv + b * N + n, v, mask=v < NV)


@triton.autotune(configs=autotune_configs([(4, 16, 64, 4, 1), (8, 16, 64, 8, 1), (4, 32, 64, 8, 1),
                                           (8, 8, 128, 8, 1), (4, 16, 128, 8, 1), (2, 16, 128, 4, 1)],
                                          names=("BLOCK_B", "BLOCK_T", "BLOCK_N")),
                 key=["B", "N", "D"])
@triton.jit
def _patch_embed_bwd_pos(DOut, Shown, DPos, B, N, D, W_GRID, cell, s_ob, s_ov, s_od,
                         ARITHMETIC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """dpos tile ``[BLOCK_T, BLOCK_N]``: at each position, the dOut rows of the tokens that show it,
    summed over the images (``BLOCK_B`` at a time); 0 where no image shows it.

    ``Shown`` is the checkerboard's phase ``[B]`` on the arithmetic path, else the inverse map
    ``[B, N]`` int32 from position to visible token (-1: hidden).
    """
    n = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] position
    d = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] embedding channel
    i = n // W_GRID  # [BT] patch row
    j = n % W_GRID  # [BT] patch column
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)  # [BB] image
        if ARITHMETIC:  # visible iff the cell column's parity is the cell row's plus the phase
            phase = tl.load(Shown + b, mask=b < B, other=0)  # [BB]
            row_parity = (i[None, :] // cell + phase[:, None]) % 2  # [BB, BT]
            shown = ((j // cell) % 2)[None, :] == row_parity  # [BB, BT]
            v = (i * (W_GRID // 2) + (j // cell // 2) * cell + j % cell)[None, :]  # [1, BT] its token
        else:
            v = tl.load(Shown + b[:, None] * N + n[None, :], mask=(b < B)[:, None] & (n < N)[None, :],
                        other=-1)  # [BB, BT]
            shown = v >= 0
        shown = shown & (b < B)[:, None] & (n < N)[None, :]  # [BB, BT]
        ptrs = DOut + b[:, None, None] * s_ob + v[:, :, None] * s_ov + d[None, None, :] * s_od  # [BB, BT, BN]
        g = tl.load(ptrs, mask=shown[:, :, None] & (d < D)[None, None, :], other=0.0)  # [BB, BT, BN]
        acc += tl.sum(g.to(tl.float32), axis=0)
    out_mask = (n < N)[:, None] & (d < D)[None, :]  # [BT, BN]
    tl.store(DPos + n[:, None] * D + d[None, :], acc.to(DPos.dtype.element_ty), mask=out_mask)


def _arithmetic(grid: tuple[int, int], cell: int | None) -> bool:
    """Whether checkerboard visible positions follow from (cell, phase): every patch row half visible."""
    return cell is not None and grid[0] % cell == 0 and grid[1] % (2 * cell) == 0


def _visible_args(ids_keep: Tensor, cell: int | None, phase: Tensor | None, grid_w: int) -> tuple:
    """The kernels' arguments for :func:`_visible_patch`: ``(Ids, Phase, W_GRID, cell, s_ib, s_iv)``."""
    return ids_keep, ids_keep if phase is None else phase, grid_w, 1 if cell is None else cell, *ids_keep.stride()


@kernel_op("patch_embed")
def _patch_embed(images: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor, ids_keep: Tensor,
                 cell: int | None, phase: Tensor | None) -> Tensor:
    """Tokens ``[B, N_vis, D]`` in ``weight``'s dtype; a ``cell`` (with ``phase``) selects the arithmetic path."""
    b, _, _, ww = images.shape
    d, c, p, _ = weight.shape
    nv = ids_keep.shape[1]
    out = torch.empty((b, nv, d), dtype=weight.dtype, device=images.device)
    launch(_patch_embed_fwd, lambda meta: (triton.cdiv(nv, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_N"]), b),
           images, weight, bias, pos_embed, out, *_visible_args(ids_keep, cell, phase, ww // p),
           nv, d, c * p * p, *images.stride(), P=p, ARITHMETIC=cell is not None, DOT=tensor_core_dtype(weight.dtype))
    return out


def _buffer(shape: tuple[int, ...], dtype: torch.dtype | None, device: torch.device) -> Tensor:
    """Uninitialised gradient of ``shape`` and ``dtype``; an empty placeholder where ``dtype`` is None."""
    return torch.empty(shape if dtype is not None else (0,), dtype=dtype, device=device)


@kernel_op("patch_embed_param_grads")
def _param_grads(dout: Tensor, images: Tensor, ids_keep: Tensor, cell: int | None, phase: Tensor | None,
                 patch: int, weight_dtype: torch.dtype | None, bias_dtype: torch.dtype | None
                 ) -> tuple[Tensor, Tensor]:
    """``(dW [D, C, p, p], dbias [D])`` in the given dtypes; one whose dtype is None comes back empty."""
    b, nv, d = dout.shape
    c, ww = images.shape[1], images.shape[-1]
    kdim = c * patch * patch
    dw = _buffer((d, c, patch, patch), weight_dtype, dout.device)
    db = _buffer((d,), bias_dtype, dout.device)
    want_w = weight_dtype is not None
    launch(_patch_embed_bwd_params,
           lambda meta: (triton.cdiv(d, meta["BLOCK_N"]), triton.cdiv(kdim, meta["BLOCK_K"]) if want_w else 1),
           dout, images, dw, db, *_visible_args(ids_keep, cell, phase, ww // patch), nv, b * nv, d, kdim,
           *dout.stride(), *images.stride(), P=patch, ARITHMETIC=cell is not None, WEIGHT_GRAD=want_w,
           BIAS_GRAD=bias_dtype is not None, DOT=tensor_core_dtype(dout.dtype))
    return dw, db


@kernel_op("patch_embed_pos_grad")
def _pos_grad(dout: Tensor, ids_keep: Tensor, cell: int | None, phase: Tensor | None, grid_h: int, grid_w: int,
              dtype: torch.dtype) -> Tensor:
    """dpos ``[N, D]`` in ``dtype``: at each position the gradient of the tokens showing it, summed."""
    b, nv, d = dout.shape
    n = grid_h * grid_w
    dpos = torch.empty((n, d), dtype=dtype, device=dout.device)
    if cell is None:
        shown = torch.full((b, n), -1, dtype=torch.int32, device=dout.device)  # [B, N] visible token, -1 hidden
        block = min(1024, triton.next_power_of_2(nv))
        launch(_scatter_visible, (b, triton.cdiv(nv, block)), ids_keep, shown, nv, n, *ids_keep.stride(), BLOCK=block)
    else:
        shown = phase  # [B]
    launch(_patch_embed_bwd_pos, lambda meta: (triton.cdiv(n, meta["BLOCK_T"]), triton.cdiv(d, meta["BLOCK_N"])),
           dout, shown, dpos, b, n, d, grid_w, 1 if cell is None else cell, *dout.stride(), ARITHMETIC=cell is not None)
    return dpos


def _save(ctx, inputs: tuple, output: Tensor) -> None:
    images, weight, bias, pos_embed, ids_keep, cell, phase = inputs
    ctx.save_for_backward(images, ids_keep, phase)
    ctx.cell, ctx.patch = cell, weight.shape[-1]
    ctx.dtypes = (weight.dtype, bias.dtype, pos_embed.dtype)


def _backward(ctx, dout: Tensor) -> tuple:
    """Gradients of weight, bias and pos_embed, those that are needed; images get none."""
    images, ids_keep, phase = ctx.saved_tensors
    _, want_w, want_b, want_pos = ctx.needs_input_grad[:4]
    w_dtype, b_dtype, pos_dtype = ctx.dtypes
    dw = db = dpos = None
    if want_w or want_b:
        dw, db = _param_grads(dout, images, ids_keep, ctx.cell, phase, ctx.patch, w_dtype if want_w else None,
                              b_dtype if want_b else None)
    if want_pos:
        grid = (images.shape[2] // ctx.patch, images.shape[3] // ctx.patch)
        dpos = _pos_grad(dout, ids_keep, ctx.cell, phase, *grid, pos_dtype)
    return None, dw if want_w else None, db if want_b else None, dpos, None, None, None


_patch_embed.register_autograd(_backward, setup_context=_save)


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

    Forward and backward are Triton kernels that read only the visible patches from ``images``;
    the tokens have ``weight``'s dtype. With a checkerboard ``cell`` and per-sample ``phase``
    ``[B]`` on a grid where every patch row is half visible (``h % cell == 0``,
    ``w % (2 * cell) == 0``) the visible positions follow from (cell, phase) and ``ids_keep`` is
    not read; otherwise they come from ``ids_keep`` (distinct positions per row, in any order).
    Launches: one forward kernel; backward one for dW and dbias together and one for dpos
    (after a fill and a scatter that invert ``ids_keep`` off the checkerboard path), each only
    for the gradients needed. ``images`` get no gradient.
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
    arithmetic = _arithmetic((hh // p, ww // p), cell)
    if arithmetic and (phase is None or phase.shape != (b,) or phase.device != images.device
                       or ids_keep.shape[1] != n // 2):
        raise ValueError(f"a checkerboard of cell {cell} needs phase [{b}] on the images' device "
                         f"and N_vis = {n // 2}")
    if not (images.is_floating_point() and weight.is_floating_point()):
        raise ValueError("images and weight must be floating point")
    if any(t.device != images.device for t in (weight, bias, pos_embed, ids_keep)):
        raise ValueError("images, weight, bias, pos_embed and ids_keep must be on the same device")
    params = (weight.contiguous(), bias.contiguous(), pos_embed.contiguous())
    return _patch_embed(images, *params, ids_keep, cell if arithmetic else None, phase if arithmetic else None)
