"""Triton short-sequence attention against the eager reference: output and dq, dk, dv, eager and compiled."""
import pytest
import torch

from symmim.kernels.attention import MAX_TOKENS, attention_reference, attention_triton

# fp32: ieee dots, only the summation order differs; fp16: P and dS are rounded to fp16 before
# their matmuls (as flash attention does) and outputs are fp16; bf16: same with an 8-bit mantissa.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _fused(qkv):
    """q, k, v as strided views of one fused ``[B, N, 3, H, d]`` projection, as a ViT block makes them."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, d]


def _check(leaf, split, reference_dtype=None):
    """Output and the gradient wrt ``leaf`` (``split`` makes q, k, v of it) match the reference.

    ``reference_dtype``: run the reference on a copy of ``leaf`` in that dtype (default: the same).
    """
    q, k, v = split(leaf)
    o = attention_triton(q, k, v)
    do = torch.randn(o.shape, dtype=o.dtype, device=o.device)
    (grad,) = torch.autograd.grad(o, leaf, do)
    ref_leaf = leaf.detach().to(reference_dtype or leaf.dtype).requires_grad_()
    o_ref = attention_reference(*split(ref_leaf))
    (grad_ref,) = torch.autograd.grad(o_ref, ref_leaf, do.to(o_ref.dtype))
    assert o.dtype == q.dtype and o.shape == q.shape
    torch.testing.assert_close(o.float(), o_ref.float(), **TOL[q.dtype])
    torch.testing.assert_close(grad.float(), grad_ref.float(), **TOL[q.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "batch, heads, tokens, head_dim",
    [(1, 1, 7, 16), (2, 3, 13, 32), (1, 2, 50, 24), (1, 1, 37, 64), (1, 2, 99, 64), (1, 1, 1, 64), (1, 1, 21, 128),
     (1, 1, 17, 80), (3, 1, 16, 8), (1, 1, 197, 64), (1, 1, 256, 32)],
)
def test_matches_reference(batch, heads, tokens, head_dim, dtype, device):
    torch.manual_seed(0)
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device=device).to(dtype).requires_grad_()
    _check(qkv, _fused)


def test_separate_tensors_with_different_strides(device):
    """q contiguous, k and v transposed views: the kernels fall back to contiguous copies."""
    torch.manual_seed(1)
    leaf = torch.randn(3, 2, 2, 19, 16, device=device, requires_grad=True)  # [q|k|v, B, H, N, d]
    _check(leaf, lambda t: (t[0], *(x.transpose(1, 2).contiguous().transpose(1, 2) for x in t[1:])))


def test_rejects_bad_inputs(device):
    q = torch.randn(1, 2, 5, 16, device=device)
    with pytest.raises(ValueError, match="shape"):
        attention_triton(q, q[:, :1], q)
    with pytest.raises(ValueError, match="dtype"):
        attention_triton(q, q.double(), q)
    wide = torch.randn(1, 1, 4, 256, device=device)
    with pytest.raises(ValueError, match="head dim"):
        attention_triton(wide, wide, wide)
    long = torch.randn(1, 1, MAX_TOKENS + 1, 16, device=device)
    with pytest.raises(ValueError, match="at most 256 tokens"):
        attention_triton(long, long, long)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_graph_runs_the_kernels(backend, device):
    """The op is registered: ``torch.compile(fullgraph=True)`` traces a block's attention without a break
    and gives the eager kernels' output and gradient."""
    torch.manual_seed(3)
    qkv = torch.randn(2, 11, 3, 2, 16, device=device, requires_grad=True)

    def block(t):
        return attention_triton(*_fused(t * 2.0)).sum(dim=1).square().sum()

    (want,) = torch.autograd.grad(block(qkv), qkv)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    (got,) = torch.autograd.grad(compiled(qkv), qkv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("heads, head_dim", [(12, 64), (16, 64), (8, 128)])  # ViT-B, ViT-L, wide heads
@pytest.mark.parametrize("tokens", [50, 99, 197, 256])
def test_bf16_vit_shapes(tokens, heads, head_dim, device):
    """ViT heads at MAE-75%, SymMIM, full and longest token counts; reference in fp32."""
    torch.manual_seed(2)
    qkv = torch.randn(4, tokens, 3, heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    _check(qkv, _fused, reference_dtype=torch.float32)
