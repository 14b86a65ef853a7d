"""Fused masked norm-pix loss against the eager reference, loss and gradient wrt pred."""
import pytest
import torch

from symmim.core.masking import random_mask, symmetric_mask
from symmim.kernels.norm_pix_loss import norm_pix_loss_reference, norm_pix_loss_triton

# The loss is fp32 in both; fp32 inputs: only the summation order differs; fp16 inputs are read
# exactly, but the gradient is rounded to fp16 (~5e-4 relative); bf16 has an 8-bit mantissa.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-4),
       torch.bfloat16: dict(rtol=2e-2, atol=1e-4)}


def _check(pred, images, mask, patch, norm_pix):
    """Loss (fp32 scalar) and d loss / d pred match the reference."""
    loss = norm_pix_loss_triton(pred, images, mask, patch, norm_pix)
    (grad,) = torch.autograd.grad(3 * loss, pred)  # a non-unit upstream gradient
    loss_ref = norm_pix_loss_reference(pred, images, mask, patch, norm_pix)
    (grad_ref,) = torch.autograd.grad(3 * loss_ref, pred)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == pred.dtype
    torch.testing.assert_close(loss, loss_ref, **TOL[pred.dtype])
    torch.testing.assert_close(grad.float(), grad_ref.float(), **TOL[pred.dtype])
    assert (grad[~mask] == 0).all()  # visible patches get no gradient


def _inputs(batch, channels, height, width, patch, dtype, device):
    n = (height // patch) * (width // patch)
    images = (torch.randn(batch, channels, height, width, device=device) + 0.3).to(dtype)
    pred = torch.randn(batch, n, channels * patch * patch, device=device).to(dtype).requires_grad_()
    return pred, images


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "batch, channels, height, width, patch, cell",  # cell None: random mask
    [
        (1, 3, 8, 8, 2, 1),  # batch 1, 4x4 grid, 12-value patches
        (2, 3, 12, 8, 4, None),  # 3x2 grid, 48-value patches
        (3, 1, 15, 12, 3, None),  # one channel, 9-value patches, 5x4 grid
        (2, 3, 24, 24, 4, 2),  # 6x6 grid, 2x2-patch cells
    ],
)
def test_matches_reference(batch, channels, height, width, patch, cell, dtype, norm_pix, device):
    torch.manual_seed(0)
    grid = (height // patch, width // patch)
    if cell is None:
        mask = random_mask(batch, grid, 0.6, device).mask
    else:
        mask = symmetric_mask(batch, grid, cell, "random", device).mask
    _check(*_inputs(batch, channels, height, width, patch, dtype, device), mask, patch, norm_pix)


def test_strided_pred(device):
    """Decoder output with the CLS token sliced off: a non-contiguous pred."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 16, 16, device=device)
    full = torch.randn(2, 17, 48, device=device, requires_grad=True)
    mask = random_mask(2, (4, 4), 0.75, device).mask
    loss = norm_pix_loss_triton(full[:, 1:], images, mask, 4)
    (grad,) = torch.autograd.grad(loss, full)
    loss_ref = norm_pix_loss_reference(full[:, 1:], images, mask, 4)
    (grad_ref,) = torch.autograd.grad(loss_ref, full)
    torch.testing.assert_close(loss, loss_ref, **TOL[torch.float32])
    torch.testing.assert_close(grad, grad_ref, **TOL[torch.float32])


def test_rejects_bad_inputs(device):
    pred = torch.randn(2, 4, 12, device=device)
    images = torch.randn(2, 3, 4, 4, device=device)
    mask = torch.ones(2, 4, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="multiple"):
        norm_pix_loss_triton(pred, images[..., :3], mask, 2)
    with pytest.raises(ValueError, match="expected"):
        norm_pix_loss_triton(pred[..., :10], images, mask, 2)
    with pytest.raises(ValueError, match="bool"):
        norm_pix_loss_triton(pred, images, mask.float(), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["symmetric", "random"])
def test_bf16_vit_b(kind, device):
    """224 px, patch 16 (14x14 grid, 768-value patches), 8 images, bf16 pred and images."""
    torch.manual_seed(2)
    mask = (symmetric_mask(8, (14, 14), 1, "random", device) if kind == "symmetric"
            else random_mask(8, (14, 14), 0.75, device)).mask
    for norm_pix in (True, False):
        _check(*_inputs(8, 3, 224, 224, 16, torch.bfloat16, device), mask, 16, norm_pix)
