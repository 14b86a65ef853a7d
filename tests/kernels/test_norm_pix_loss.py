"""Fused masked norm-pix loss against the eager reference, loss and gradient wrt pred."""
import pytest
import torch

from symmim.core.masking import random_mask, symmetric_mask
from symmim.kernels import norm_pix_loss as npl
from symmim.kernels.norm_pix_loss import norm_pix_loss_reference, norm_pix_loss_triton

# The loss is fp32 in both; fp32 inputs: only the summation order differs; fp16 inputs are read
# exactly, but the gradient is rounded to fp16 (~5e-4 relative); bf16 has an 8-bit mantissa.
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float16: {"rtol": 1e-2, "atol": 1e-4},
       torch.bfloat16: {"rtol": 2e-2, "atol": 1e-4}}


def _check(pred, images, mask, patch, norm_pix):
    """Loss (fp32 scalar) and d loss / d pred match the reference, under an upstream gradient of 0.37."""
    loss = norm_pix_loss_triton(pred, images, mask, patch, norm_pix)
    (grad,) = torch.autograd.grad(0.37 * loss, pred)
    loss_ref = norm_pix_loss_reference(pred, images, mask, patch, norm_pix)
    (grad_ref,) = torch.autograd.grad(0.37 * loss_ref, pred)
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
        (3, 1, 15, 9, 3, None),  # one channel, 9-value patches, 5x3 grid (15 patches)
        (2, 3, 9, 21, 3, None),  # 27-value patches, 3x7 grid (21 patches)
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


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("rows", ["all masked", "one row unmasked"])
def test_extreme_masks(rows, norm_pix, device):
    """Every patch masked; one image with no patch masked (it adds nothing, its gradient is 0)."""
    torch.manual_seed(1)
    pred, images = _inputs(3, 3, 9, 15, 3, torch.float32, device)  # 3x5 grid, 27-value patches
    mask = torch.ones(3, 15, dtype=torch.bool, device=device)
    if rows == "one row unmasked":
        mask[1] = False
    _check(pred, images, mask, 3, norm_pix)


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


def test_gradient_stored_only_when_needed(monkeypatch, device):
    """The forward writes d loss / d pred only for a pred that needs it, outside no_grad; a second
    backward through a retained graph gives the same gradient (the stored one is not scaled in place)."""
    torch.manual_seed(2)
    pred, images = _inputs(2, 3, 16, 16, 4, torch.float32, device)
    mask = random_mask(2, (4, 4), 0.75, device).mask
    op, stored = npl._norm_pix_loss, []

    def spy(*args):
        loss, dpred = op(*args)
        stored.append(tuple(dpred.shape))
        return loss, dpred

    monkeypatch.setattr(npl, "_norm_pix_loss", spy)
    with torch.no_grad():
        loss_eval = norm_pix_loss_triton(pred, images, mask, 4)
    loss_frozen = norm_pix_loss_triton(pred.detach(), images, mask, 4)
    loss = norm_pix_loss_triton(pred, images, mask, 4)
    assert stored == [(0,), (0,), tuple(pred.shape)]
    assert loss_eval.grad_fn is None and loss_frozen.grad_fn is None
    torch.testing.assert_close(loss_eval, norm_pix_loss_reference(pred, images, mask, 4), **TOL[torch.float32])
    first = torch.autograd.grad(2 * loss, pred, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(2 * loss, pred)[0], first, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_matches_eager(backend, device):
    """``torch.compile(fullgraph=True)`` traces through the op: same loss and gradient as eager."""
    torch.manual_seed(3)
    pred, images = _inputs(2, 3, 12, 12, 3, torch.float32, device)
    mask = random_mask(2, (4, 4), 0.75, device).mask

    def step(pred, images, mask):
        return 0.37 * norm_pix_loss_triton(pred, images, mask, 3)

    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, backend=backend, fullgraph=True)):
        loss = fn(pred, images, mask)
        results.append((loss, *torch.autograd.grad(loss, pred)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


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
@pytest.mark.parametrize("patch", [16, 14])  # ViT-B/16 and ViT-L/16 decoders: 196 x 768; /14: 256 x 588
def test_bf16_vit_decoder(kind, patch, device):
    """224 px, 8 images, bf16 pred and images, against the fp32 reference on the same values."""
    torch.manual_seed(2)
    grid = (224 // patch, 224 // patch)
    mask = (symmetric_mask(8, grid, 1, "random", device) if kind == "symmetric"
            else random_mask(8, grid, 0.75, device)).mask
    for norm_pix in (True, False):
        _check(*_inputs(8, 3, 224, 224, patch, torch.bfloat16, device), mask, patch, norm_pix)
