"""Fused patch-gather-embed against the eager reference: tokens and grads of weight, bias, pos_embed."""
import pytest
import torch

from symmim.core.masking import random_mask, symmetric_mask
from symmim.kernels.patch_embed import patch_embed_reference, patch_embed_triton

# The reference runs in fp32 on the same (rounded) inputs. fp32: ieee dots, only the summation
# order differs; fp16: the tokens and grads are rounded to fp16 (~5e-4 relative); bf16: same with
# an 8-bit mantissa. (A bf16 reference would itself sum pos_embed's grad in bf16: off by ulps.)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _inputs(batch, channels, size, patch, dim, dtype, device):
    """Images ``[B, C, H, W]`` and parameters (weight, bias, pos_embed) that need grads."""
    grid = (size[0] // patch, size[1] // patch)
    images = torch.randn(batch, channels, *size, device=device).to(dtype)
    weight = (torch.randn(dim, channels, patch, patch, device=device) / patch).to(dtype).requires_grad_()
    bias = torch.randn(dim, device=device).to(dtype).requires_grad_()
    pos = torch.randn(grid[0] * grid[1], dim, device=device).to(dtype).requires_grad_()
    return images, (weight, bias, pos)


def _check(images, params, mask):
    """Tokens and parameter grads match the reference under ``mask``."""
    tokens = patch_embed_triton(images, *params, mask.ids_keep, mask.cell, mask.phase)
    dtokens = torch.randn(tokens.shape, dtype=tokens.dtype, device=tokens.device)
    grads = torch.autograd.grad(tokens, params, dtokens)
    params_ref = [p.detach().float().requires_grad_() for p in params]
    tokens_ref = patch_embed_reference(images.float(), *params_ref, mask.ids_keep)
    grads_ref = torch.autograd.grad(tokens_ref, params_ref, dtokens.float())
    assert tokens.dtype == params[0].dtype and tokens.shape == tokens_ref.shape
    for got, want in zip((tokens, *grads), (tokens_ref, *grads_ref), strict=True):
        torch.testing.assert_close(got.float(), want.float(), **TOL[images.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "batch, size, patch, dim, cell",  # cell None: random mask at ratio 0.75
    [
        (1, (16, 16), 4, 24, 1),  # 4x4 grid, fine checkerboard: arithmetic path
        (2, (16, 32), 4, 72, 2),  # 4x8 grid, 2x2-patch cells: arithmetic path
        (2, (24, 24), 4, 24, 2),  # 6x6 grid: 6 % (2*2) != 0 forces the ids path
        (3, (12, 8), 2, 24, None),  # 6x4 grid, random mask: ids path
    ],
)
def test_matches_reference(batch, size, patch, dim, cell, dtype, device):
    torch.manual_seed(0)
    images, params = _inputs(batch, 3, size, patch, dim, dtype, device)
    grid = (size[0] // patch, size[1] // patch)
    if cell is None:
        mask = random_mask(batch, grid, 0.75, device)
    else:
        mask = symmetric_mask(batch, grid, cell, "random", device)
    _check(images, params, mask)


@pytest.mark.parametrize("grid, cell", [((4, 4), 1), ((4, 8), 2), ((6, 12), 3), ((2, 6), 1)])
def test_arithmetic_path_reads_no_ids(grid, cell, device):
    """With a checkerboard the kernel derives the visible patches from (cell, phase) alone:
    given garbage ids it still matches the reference on the mask's true ``ids_keep``."""
    torch.manual_seed(1)
    mask = symmetric_mask(2, grid, cell, "random", device)
    images, params = _inputs(2, 2, (2 * grid[0], 2 * grid[1]), 2, 16, torch.float32, device)
    tokens = patch_embed_triton(images, *params, torch.zeros_like(mask.ids_keep), cell, mask.phase)
    torch.testing.assert_close(tokens, patch_embed_reference(images, *params, mask.ids_keep), **TOL[torch.float32])


def test_inference_without_grad(device):
    """Under no_grad the kernel skips storing the visible patches; tokens are unchanged."""
    torch.manual_seed(2)
    images, params = _inputs(2, 3, (16, 16), 4, 24, torch.float32, device)
    mask = random_mask(2, (4, 4), 0.5, device)
    with torch.no_grad():
        tokens = patch_embed_triton(images, *params, mask.ids_keep)
        expected = patch_embed_reference(images, *params, mask.ids_keep)
    torch.testing.assert_close(tokens, expected, **TOL[torch.float32])


def test_rejects_bad_inputs(device):
    images, (weight, bias, pos) = _inputs(2, 3, (16, 16), 4, 24, torch.float32, device)
    ids = torch.arange(8, device=device).repeat(2, 1)
    with pytest.raises(ValueError, match="does not patch"):
        patch_embed_triton(images[:, :2], weight, bias, pos, ids)
    with pytest.raises(ValueError, match="pos_embed"):
        patch_embed_triton(images, weight, bias, pos[:-1], ids)
    with pytest.raises(ValueError, match="int64"):
        patch_embed_triton(images, weight, bias, pos, ids.int())
    with pytest.raises(ValueError, match="phase"):
        patch_embed_triton(images, weight, bias, pos, ids, cell=1)


@pytest.mark.gpu
@pytest.mark.parametrize("cell", [1, 2, None])  # 14x14 grid: cell 1 arithmetic, cell 2 ids path; random
def test_bf16_vit_b(cell, device):
    """ViT-B/16 at 224 px (D = 768), 8 images, bf16 images and parameters."""
    torch.manual_seed(3)
    images, params = _inputs(8, 3, (224, 224), 16, 768, torch.bfloat16, device)
    if cell is None:
        mask = random_mask(8, (14, 14), 0.75, device)
    else:
        mask = symmetric_mask(8, (14, 14), cell, "random", device)
    _check(images, params, mask)
