"""LayerNorm over the last dimension."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

MAX_FEATURES = 16384  # a row lives in registers


def layer_norm_reference(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
    """Eager reference, statistics in fp32, output in the input's dtype."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


@triton.jit
def _ln_fwd(X, W, B, Y, Mean, Rstd, M, N, stride_x, stride_y, eps,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Normalise ``BLOCK_M`` rows; keep their mean and 1/std for the backward."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.arange(0, BLOCK_N)  # [BN]
    valid = (rows < M)[:, None] & (cols < N)[None, :]  # [BM, BN]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N  # [BM]
    xc = tl.where(valid, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)  # [BM]
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=valid)
    tl.store(Mean + rows, mean, mask=rows < M)
    tl.store(Rstd + rows, rstd, mask=rows < M)


@triton.jit
def _ln_bwd(X, W, DY, DX, Mean, Rstd, Partial, M, N, stride_x, stride_dy, stride_dx,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx for every row tile this program strides over; its dweight/dbias sums into ``Partial[pid]``."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)  # [BN]
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)  # [BM]
        valid = (rows < M)[:, None] & (cols < N)[None, :]  # [BM, BN]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=rows < M, other=0.0)
        rstd = tl.load(Rstd + rows, mask=rows < M, other=0.0)
        xhat = tl.where(valid, (x - mean[:, None]) * rstd[:, None], 0.0)  # [BM, BN]
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / N  # [BM]
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=valid)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(Partial + pid * 2 * N + cols, dw, mask=cols < N)
    tl.store(Partial + pid * 2 * N + N + cols, db, mask=cols < N)


@triton.jit
def _column_sum(Partial, Out, G, C, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """``Out[c] = sum_g Partial[g, c]`` over a ``[G, C]`` fp32 buffer."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, G, BLOCK_G):
        rows = start + tl.arange(0, BLOCK_G)  # [BG]
        valid = (rows < G)[:, None] & (cols < C)[None, :]
        acc += tl.sum(tl.load(Partial + rows[:, None] * C + cols[None, :], mask=valid, other=0.0), axis=0)
    tl.store(Out + cols, acc.to(Out.dtype.element_ty), mask=cols < C)


def _blocks(n: int) -> tuple[int, int, int]:
    """(rows per tile, padded row length, warps) for rows of ``n`` features."""
    block_n = triton.next_power_of_2(n)
    return max(1, min(16, 4096 // block_n)), block_n, 8 if block_n >= 2048 else 4


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        n = x.shape[-1]
        x2 = x.reshape(-1, n)  # [M, N]
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        m = x2.shape[0]
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block_m, block_n, warps = _blocks(n)
        _ln_fwd[(triton.cdiv(m, block_m),)](
            x2, weight, bias, y, mean, rstd, m, n, x2.stride(0), y.stride(0), eps,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
        ctx.save_for_backward(x2, weight, mean, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, weight, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = dy.reshape(-1, n)  # [M, N]
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        block_m, block_n, warps = _blocks(n)
        programs = min(triton.cdiv(m, block_m), 256)
        partial = torch.empty((programs, 2, n), dtype=torch.float32, device=x2.device)  # [G, dw|db, N]
        _ln_bwd[(programs,)](
            x2, weight, dy2, dx, mean, rstd, partial, m, n, x2.stride(0), dy2.stride(0), dx.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
        dwdb = torch.empty((2, n), dtype=weight.dtype, device=x2.device)
        _column_sum[(triton.cdiv(2 * n, 256),)](partial, dwdb, programs, 2 * n, BLOCK_G=16, BLOCK_C=256)
        return dx.view(dy.shape), dwdb[0], dwdb[1], None


def layer_norm_triton(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dimension of ``x`` (any leading shape), in Triton.

    Forward and backward (dx, dweight, dbias) are Triton kernels with fp32 statistics;
    the output has ``x``'s dtype, the parameter grads the parameters' dtype.
    """
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"layer_norm_triton needs a non-empty tensor, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if weight.shape != (n,) or bias.shape != (n,):
        raise ValueError(
            f"weight and bias must have shape ({n},), got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if n > MAX_FEATURES:
        raise ValueError(f"layer_norm_triton supports at most {MAX_FEATURES} features, got {n}")
    if not (x.is_floating_point() and weight.is_floating_point() and bias.is_floating_point()):
        raise ValueError("layer_norm_triton needs floating-point x, weight and bias")
    if weight.device != x.device or bias.device != x.device:
        raise ValueError("x, weight and bias must be on the same device")
    return _LayerNorm.apply(x, weight.contiguous(), bias.contiguous(), eps)
