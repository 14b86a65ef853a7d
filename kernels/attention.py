"""Non-causal multi-head attention over ``[B, H, N, d]`` queries, keys and values."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from symmim.kernels.triton_helpers import INTERPRET, autotune_configs, tensor_core_dtype


def attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Eager reference: ``softmax(q k^T / sqrt(d)) v``, computed in fp32, cast back."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # [B, H, N, N]
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)  # [B, H, N, d]


MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(Base, rows, stride_n, stride_d, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               DTYPE: tl.constexpr):
    """Rows ``rows`` of one head as ``[len(rows), BLOCK_D]`` ``DTYPE``, zero past ``N`` and ``HEAD_DIM``."""
    cols = tl.arange(0, BLOCK_D)
    ptrs = Base + rows[:, None] * stride_n + cols[None, :] * stride_d
    return tl.load(ptrs, mask=(rows < N)[:, None] & (cols < HEAD_DIM)[None, :], other=0.0).to(DTYPE)


@triton.jit
def _store_tile(Base, rows, stride_n, stride_d, value, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    ptrs = Base + rows[:, None] * stride_n + cols[None, :] * stride_d
    tl.store(ptrs, value.to(Base.dtype.element_ty), mask=(rows < N)[:, None] & (cols < HEAD_DIM)[None, :])


@triton.autotune(configs=autotune_configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                                           (64, 32, 4, 2), (128, 32, 4, 3)]), key=["N", "HEAD_DIM"])
@triton.jit
def _attn_fwd(Q, K, V, Out, LSE, s_b, s_h, s_n, s_d, so_b, so_h, so_n, so_d, H, N, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query block of one head: online-softmax over all key blocks; stores the output and base-2 LSE."""
    bh = tl.program_id(1)
    off = (bh // H) * s_b + (bh % H) * s_h
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query positions
    q = _load_tile(Q + off, rows, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BM, BD]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [BN] key positions
        k = _load_tile(K + off, cols, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BN, BD]
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BM, BN]
        s = tl.where((cols < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])  # [BM, BN]
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_tile(V + off, cols, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BN, BD]
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision="ieee")
        m_i = m_new
    o_off = (bh // H) * so_b + (bh % H) * so_h
    _store_tile(Out + o_off, rows, so_n, so_d, acc / l_i[:, None], N, HEAD_DIM, BLOCK_D)
    tl.store(LSE + bh * N + rows, m_i + tl.log2(l_i), mask=rows < N)


@triton.jit
def _attn_bwd_delta(Out, DO, Delta, so_b, so_h, so_n, so_d, sd_b, sd_h, sd_n, sd_d, H, N,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """``Delta = rowsum(dO * O)`` ``[B*H, N]``, the softmax-backward correction."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    o = _load_tile(Out + (bh // H) * so_b + (bh % H) * so_h, rows, so_n, so_d, N, HEAD_DIM, BLOCK_D, tl.float32)
    do = _load_tile(DO + (bh // H) * sd_b + (bh % H) * sd_h, rows, sd_n, sd_d, N, HEAD_DIM, BLOCK_D, tl.float32)
    tl.store(Delta + bh * N + rows, tl.sum(o * do, axis=1), mask=rows < N)


@triton.autotune(configs=autotune_configs([(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 2),
                                           (64, 64, 8, 3)]), key=["N", "HEAD_DIM"])
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, s_b, s_h, s_n, s_d, sd_b, sd_h, sd_n, sd_d,
                   sg_b, sg_h, sg_n, sg_d, H, N, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK and dV of one key block of one head, looping over all query blocks."""
    bh = tl.program_id(1)
    off = (bh // H) * s_b + (bh % H) * s_h
    do_off = (bh // H) * sd_b + (bh % H) * sd_h
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] key positions
    k = _load_tile(K + off, cols, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BN, BD]
    v = _load_tile(V + off, cols, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BN, BD]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)  # [BM] query positions
        q = _load_tile(Q + off, rows, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BM, BD]
        do = _load_tile(DO + do_off, rows, sd_n, sd_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BM, BD]
        lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=float("inf"))  # [BM]: p = 0 past N
        delta = tl.load(Delta + bh * N + rows, mask=rows < N, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse[:, None])  # [BM, BN]
        dv += tl.dot(tl.trans(p.to(DOT)), do, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # [BM, BN]
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(DOT)), q, input_precision="ieee")
    g_off = (bh // H) * sg_b + (bh % H) * sg_h
    _store_tile(DK + g_off, cols, sg_n, sg_d, dk * sm_scale, N, HEAD_DIM, BLOCK_D)
    _store_tile(DV + g_off, cols, sg_n, sg_d, dv, N, HEAD_DIM, BLOCK_D)


@triton.autotune(configs=autotune_configs([(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 4, 2),
                                           (128, 128, 8, 2)]), key=["N", "HEAD_DIM"])
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, Delta, DQ, s_b, s_h, s_n, s_d, sd_b, sd_h, sd_n, sd_d,
                 sg_b, sg_h, sg_n, sg_d, H, N, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block of one head, looping over all key blocks."""
    bh = tl.program_id(1)
    off = (bh // H) * s_b + (bh % H) * s_h
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query positions
    q = _load_tile(Q + off, rows, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BM, BD]
    do = _load_tile(DO + (bh // H) * sd_b + (bh % H) * sd_h, rows, sd_n, sd_d, N, HEAD_DIM, BLOCK_D, DOT)
    lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=float("inf"))  # [BM]
    delta = tl.load(Delta + bh * N + rows, mask=rows < N, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [BN] key positions
        k = _load_tile(K + off, cols, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BN, BD]
        v = _load_tile(V + off, cols, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse[:, None])  # [BM, BN]
        p = tl.where((cols < N)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DOT), k, input_precision="ieee")
    g_off = (bh // H) * sg_b + (bh % H) * sg_h
    _store_tile(DQ + g_off, rows, sg_n, sg_d, dq * sm_scale, N, HEAD_DIM, BLOCK_D)


def _head(d: int) -> dict:
    """Head-dim constexprs: the true dim and its power-of-two tile width (``tl.dot`` needs >= 16)."""
    return dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)))


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, h, n, d = q.shape
        o = torch.empty((b, n, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, H, N, d] view
        lse = torch.empty((b * h, n), dtype=torch.float32, device=q.device)  # base 2
        _attn_fwd[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)](
            q, k, v, o, lse, *q.stride(), *o.stride(), h, n, _LOG2E / math.sqrt(d),
            **_head(d), DOT=tensor_core_dtype(q.dtype),
        )
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        b, h, n, d = q.shape
        sm_scale = 1.0 / math.sqrt(d)
        delta = torch.empty_like(lse)  # [B*H, N]
        block = 16 if INTERPRET else 64
        _attn_bwd_delta[(triton.cdiv(n, block), b * h)](
            o, do, delta, *o.stride(), *do.stride(), h, n, **_head(d), BLOCK_M=block,
        )
        dq, dk, dv = (torch.empty((b, h, n, d), dtype=q.dtype, device=q.device) for _ in range(3))
        args = (*q.stride(), *do.stride(), *dq.stride(), h, n, sm_scale * _LOG2E, sm_scale)
        dot = tensor_core_dtype(q.dtype)
        _attn_bwd_dkdv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * h)](
            q, k, v, do, lse, delta, dk, dv, *args, **_head(d), DOT=dot,
        )
        _attn_bwd_dq[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)](
            q, k, v, do, lse, delta, dq, *args, **_head(d), DOT=dot,
        )
        return dq, dk, dv


def attention_triton(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Non-causal flash attention (FlashAttention-2 style), ``[B, H, N, d]`` -> ``[B, H, N, d]``.

    Forward and backward (delta preprocess, dK/dV, dQ) are Triton kernels with fp32
    accumulation; q, k, v may be strided views (e.g. of a fused qkv projection). The output
    is a ``[B, H, N, d]`` view of a ``[B, N, H, d]`` buffer, so merging heads is free.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must share one [B, H, N, d] shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one float16, bfloat16 or float32 dtype, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError("q, k and v must be on the same device")
    if not 0 < q.shape[-1] <= MAX_HEAD_DIM or q.numel() == 0:
        raise ValueError(f"head dim must be in 1..{MAX_HEAD_DIM} and tensors non-empty, got {tuple(q.shape)}")
    if not q.stride() == k.stride() == v.stride():  # the kernels take one stride set for q, k, v
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _Attention.apply(q, k, v)
