"""Non-causal multi-head attention over ``[B, H, N, d]`` for the short sequences of a ViT (N <= 256).

A whole sequence's keys fit one tile, so the forward's softmax is exact in one pass (no online
rescaling) and a program may take several heads. The backward is two launches and no atomics:
dK, dV per key block with the query blocks streaming by (the softmax comes exact from the
forward's LSE), and dQ per query block against all keys in one tile, as the forward. Each
recomputes ``rowsum(dO * O)`` for its query rows instead of a third launch. (One program per
head for the whole backward spills registers: compiled for sm_90, 1 to 5 KB of stack per thread.)
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from symmim.kernels.triton_helpers import autotune_configs, kernel_op, launch, tensor_core_dtype


def attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Eager reference: ``softmax(q k^T / sqrt(d)) v``, computed in fp32, cast back."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # [B, H, N, N]
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)  # [B, H, N, d]


MAX_TOKENS = 256  # one key tile; longer sequences belong to SDPA
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


@triton.autotune(configs=autotune_configs([(64, 1, 4, 2), (64, 2, 4, 2), (32, 1, 4, 2), (32, 2, 4, 2), (64, 1, 8, 2),
                                           (16, 4, 4, 2)], names=("BLOCK_M", "HEADS"),
                                          interpret=(16, 2)),
                 key=["N", "HEAD_DIM"])
@triton.jit
def _attn_fwd(Q, K, V, Out, LSE, s_b, s_h, s_n, s_d, so_b, so_h, so_n, so_d, H, BH, N, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
              BLOCK_M: tl.constexpr, HEADS: tl.constexpr):
    """One query block of ``HEADS`` heads against all ``N`` keys; stores the output and the base-2 LSE."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query positions
    cols = tl.arange(0, BLOCK_N)  # [BN] every key position
    for i in tl.static_range(HEADS):
        bh = tl.program_id(1) * HEADS + i
        if bh < BH:
            off = (bh // H) * s_b + (bh % H) * s_h
            q = _load_tile(Q + off, rows, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BM, BD]
            k = _load_tile(K + off, cols, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BN, BD]
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BM, BN], log2 units
            s = tl.where((cols < N)[None, :], s, float("-inf"))
            m = tl.max(s, axis=1)  # [BM]
            p = tl.exp2(s - m[:, None])  # [BM, BN]
            l = tl.sum(p, axis=1)  # [BM]
            v = _load_tile(V + off, cols, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BN, BD]
            o = tl.dot(p.to(DOT), v, input_precision="ieee") / l[:, None]  # [BM, BD]
            _store_tile(Out + (bh // H) * so_b + (bh % H) * so_h, rows, so_n, so_d, o, N, HEAD_DIM, BLOCK_D)
            tl.store(LSE + bh * N + rows, m + tl.log2(l), mask=rows < N)


@triton.jit
def _delta(Out, DO, o_off, do_off, rows, so_n, so_d, sd_n, sd_d, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``rowsum(dO * O)`` ``[len(rows)]`` fp32, the softmax-backward correction of those query rows."""
    do = _load_tile(DO + do_off, rows, sd_n, sd_d, N, HEAD_DIM, BLOCK_D, tl.float32)  # [BM, BD]
    o = _load_tile(Out + o_off, rows, so_n, so_d, N, HEAD_DIM, BLOCK_D, tl.float32)  # [BM, BD]
    return tl.sum(do * o, axis=1)


@triton.autotune(configs=autotune_configs([(64, 32, 4, 2), (64, 16, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2),
                                           (64, 32, 8, 2), (128, 32, 8, 2)], names=("BLOCK_KEYS", "BLOCK_M")),
                 key=["N", "HEAD_DIM"])
@triton.jit
def _attn_bwd_dkdv(Q, K, V, Out, DO, LSE, DK, DV, s_b, s_h, s_n, s_d, so_b, so_h, so_n, so_d,
                   sd_b, sd_h, sd_n, sd_d, sg_b, sg_h, sg_n, sg_d, H, N, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
                   BLOCK_KEYS: tl.constexpr, BLOCK_M: tl.constexpr):
    """dK, dV of one key block of one head, every query block streaming by; the softmax comes
    exact from the forward's LSE, so no other key block is needed."""
    bh = tl.program_id(1)
    off = (bh // H) * s_b + (bh % H) * s_h
    o_off = (bh // H) * so_b + (bh % H) * so_h
    do_off = (bh // H) * sd_b + (bh % H) * sd_h
    keys = tl.program_id(0) * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)  # [BK] key positions
    k = _load_tile(K + off, keys, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BK, BD]
    v = _load_tile(V + off, keys, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BK, BD]
    dk = tl.zeros([BLOCK_KEYS, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_KEYS, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)  # [BM] query positions
        q = _load_tile(Q + off, rows, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BM, BD]
        do = _load_tile(DO + do_off, rows, sd_n, sd_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BM, BD]
        delta = _delta(Out, DO, o_off, do_off, rows, so_n, so_d, sd_n, sd_d, N, HEAD_DIM, BLOCK_D)  # [BM]
        lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=float("inf"))  # [BM]: p = 0 past N
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse[:, None])  # [BM, BK]
        dv += tl.dot(tl.trans(p.to(DOT)), do, input_precision="ieee")  # [BK, BD]
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # [BM, BK]
        ds = p * (dp - delta[:, None])  # [BM, BK]
        dk += tl.dot(tl.trans(ds.to(DOT)), q, input_precision="ieee")  # [BK, BD]
    g_off = (bh // H) * sg_b + (bh % H) * sg_h
    _store_tile(DK + g_off, keys, sg_n, sg_d, dk * sm_scale, N, HEAD_DIM, BLOCK_D)
    _store_tile(DV + g_off, keys, sg_n, sg_d, dv, N, HEAD_DIM, BLOCK_D)


@triton.autotune(configs=autotune_configs([(32, 1, 4, 2), (16, 1, 4, 2), (32, 1, 8, 2), (32, 2, 8, 2),
                                           (16, 2, 4, 2)], names=("BLOCK_M", "HEADS"), interpret=(16, 2)),
                 key=["N", "HEAD_DIM"])
@triton.jit
def _attn_bwd_dq(Q, K, V, Out, DO, LSE, DQ, s_b, s_h, s_n, s_d, so_b, so_h, so_n, so_d,
                 sd_b, sd_h, sd_n, sd_d, sg_b, sg_h, sg_n, sg_d, H, BH, N, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, HEADS: tl.constexpr):
    """dQ of one query block of ``HEADS`` heads against all ``N`` keys, in one tile as the forward."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query positions
    cols = tl.arange(0, BLOCK_N)  # [BN] every key position
    for i in tl.static_range(HEADS):
        bh = tl.program_id(1) * HEADS + i
        if bh < BH:
            off = (bh // H) * s_b + (bh % H) * s_h
            do_off = (bh // H) * sd_b + (bh % H) * sd_h
            q = _load_tile(Q + off, rows, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BM, BD]
            do = _load_tile(DO + do_off, rows, sd_n, sd_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BM, BD]
            delta = _delta(Out, DO, (bh // H) * so_b + (bh % H) * so_h, do_off, rows, so_n, so_d, sd_n, sd_d, N,
                           HEAD_DIM, BLOCK_D)  # [BM]
            lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=float("inf"))  # [BM]
            k = _load_tile(K + off, cols, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BN, BD]
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse[:, None])  # [BM, BN]
            p = tl.where((cols < N)[None, :], p, 0.0)
            v = _load_tile(V + off, cols, s_n, s_d, N, HEAD_DIM, BLOCK_D, DOT)  # [BN, BD]
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # [BM, BN]
            ds = (p * (dp - delta[:, None])).to(DOT)  # [BM, BN]
            dq = tl.dot(ds, k, input_precision="ieee") * sm_scale  # [BM, BD]
            _store_tile(DQ + (bh // H) * sg_b + (bh % H) * sg_h, rows, sg_n, sg_d, dq, N, HEAD_DIM, BLOCK_D)


def _constexprs(q: Tensor) -> dict:
    """Shape constexprs: head dim and its power-of-two tile width, the key tile, the dot dtype."""
    n, d = q.shape[-2:]
    return dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_N=max(16, triton.next_power_of_2(n)),
                DOT=tensor_core_dtype(q.dtype))


@kernel_op("attention_fwd")
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(out [B, H, N, d], lse [B*H, N] base 2)``; q, k, v share one stride set."""
    b, h, n, d = q.shape
    out = torch.empty((b, n, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, H, N, d] view
    lse = torch.empty((b * h, n), dtype=torch.float32, device=q.device)
    launch(_attn_fwd, lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(b * h, meta["HEADS"])),
           q, k, v, out, lse, *q.stride(), *out.stride(), h, b * h, n, _LOG2E / math.sqrt(d), **_constexprs(q))
    return out, lse


@kernel_op("attention_bwd")
def _attention_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``, each ``[B, H, N, d]`` contiguous."""
    b, h, n, d = q.shape
    dq, dk, dv = (torch.empty((b, h, n, d), dtype=q.dtype, device=q.device) for _ in range(3))
    sm_scale = 1.0 / math.sqrt(d)
    strides = (*q.stride(), *out.stride(), *dout.stride(), *dq.stride())
    shape = _constexprs(q)
    launch(_attn_bwd_dkdv, lambda meta: (triton.cdiv(n, meta["BLOCK_KEYS"]), b * h),
           q, k, v, out, dout, lse, dk, dv, *strides, h, n, sm_scale * _LOG2E, sm_scale,
           HEAD_DIM=shape["HEAD_DIM"], BLOCK_D=shape["BLOCK_D"], DOT=shape["DOT"])
    launch(_attn_bwd_dq, lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(b * h, meta["HEADS"])),
           q, k, v, out, dout, lse, dq, *strides, h, b * h, n, sm_scale * _LOG2E, sm_scale, **shape)
    return dq, dk, dv


def _save(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, dout: Tensor, _dlse: Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors
    return _attention_bwd(q, k, v, out, lse, dout)


_attention_fwd.register_autograd(_backward, setup_context=_save)


def attention_triton(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Non-causal attention for up to :data:`MAX_TOKENS` tokens, ``[B, H, N, d]`` -> ``[B, H, N, d]``.

    Forward and backward are one Triton kernel each with fp32 accumulation; q, k, v may be
    strided views (e.g. of a fused qkv projection). The output is a ``[B, H, N, d]`` view of a
    ``[B, N, H, d]`` buffer, so merging heads is free.
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
    if q.shape[-2] > MAX_TOKENS:
        raise ValueError(f"the Triton attention takes at most {MAX_TOKENS} tokens, got {q.shape[-2]}: "
                         "longer sequences run torch SDPA (kernels.attention=auto)")
    if not q.stride() == k.stride() == v.stride():  # the kernels take one stride set for q, k, v
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _attention_fwd(q, k, v)[0]
