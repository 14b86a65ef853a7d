"""Triton LayerNorm against the eager reference, forward and all three gradients."""
import pytest
import torch

from symmim.kernels.layernorm import layer_norm_reference, layer_norm_triton

# fp32: only the summation order differs; fp16: outputs and grads are rounded to fp16 (~5e-4 relative).
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}  # bf16: 8-bit mantissa


def _check(x, weight, bias):
    """Forward and (dx, dweight, dbias) of the Triton LayerNorm match the reference."""
    inputs = (x, weight, bias)
    y = layer_norm_triton(*inputs)
    dy = torch.randn(y.shape, dtype=y.dtype, device=y.device)
    grads = torch.autograd.grad(y, inputs, dy)
    y_ref = layer_norm_reference(*inputs)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    assert y.dtype == x.dtype and y.shape == x.shape
    for got, want in zip((y, *grads), (y_ref, *grads_ref), strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), **TOL[x.dtype])


def _params(n, dtype, device):
    weight = (1 + 0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    return weight, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 24), (3, 5, 72), (2, 7, 192), (33, 48), (3, 1024), (2, 1280), (1, 4100)])
def test_matches_reference(shape, dtype, device):
    torch.manual_seed(0)
    x = (2 * torch.randn(shape, device=device) + 0.5).to(dtype).requires_grad_()
    _check(x, *_params(shape[-1], dtype, device))


def test_strided_rows_and_fp32_params(device):
    """A row-strided fp16 view (a slice of a wider buffer) with fp32 weight and bias."""
    torch.manual_seed(1)
    wide = torch.randn(3, 5, 100, device=device, dtype=torch.float16)
    x = wide[..., :72].detach().requires_grad_()
    _check(x, *_params(72, torch.float32, device))


def test_rejects_bad_shapes(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="shape"):
        layer_norm_triton(x, torch.ones(7, device=device), torch.zeros(8, device=device))
    with pytest.raises(ValueError, match="at most"):
        big = torch.randn(1, 20000, device=device)
        layer_norm_triton(big, torch.ones(20000, device=device), torch.zeros(20000, device=device))


@pytest.mark.gpu
def test_bf16_vit_b(device):
    """ViT-B width, 8 images x 197 tokens, bf16 activations and bf16 parameters."""
    torch.manual_seed(2)
    x = torch.randn(8, 197, 768, device=device, dtype=torch.bfloat16).requires_grad_()
    _check(x, *_params(768, torch.bfloat16, device))
