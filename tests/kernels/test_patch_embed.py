"""Fused patch-gather-embed against the eager reference: tokens and grads of weight, bias, pos_embed."""
import pytest
import torch

from symmim.core.masking import random_mask, symmetric_mask
from symmim.kernels.patch_embed import patch_embed_reference, patch_embed_triton

# The reference runs in fp32 on the same (rounded) inputs. fp32: ieee dots, only the summation
# order differs; fp16: the tokens and grads are rounded to fp16 (~5e-4 relative); bf16: same with
# an 8-bit mantissa. (A bf16 reference would itself sum pos_embed's grad in bf16: off by ulps.)
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float16: {"rtol": 1e-2, "atol": 1e-2},
       torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def _inputs(batch, channels, size, patch, dim, dtype, device):
    """Images ``[B, C, H, W]`` and parameters (weight, bias, pos_embed) that need grads."""
    grid = (size[0] // patch, size[1] // patch)
    images = torch.randn(batch, channels, *size, device=device).to(dtype)
    weight = (torch.randn(dim, channels, patch, patch, device=device) / patch).to(dtype).requires_grad_()
    bias = torch.randn(dim, device=device).to(dtype).requires_grad_()
    pos = torch.randn(grid[0] * grid[1], dim, device=device).to(dtype).requires_grad_()
    return images, (weight, bias, pos)


def _mask(spec, batch, grid, device):
    """``(ids_keep, cell, phase)`` from a spec: ``("checker", cell, phase)``, ``("random", ratio)``, or
    ``("perm", n_vis)`` (distinct random positions per image, unsorted)."""
    kind, *args = spec
    if kind == "checker":
        mask = symmetric_mask(batch, grid, *args, device)
        return mask.ids_keep, mask.cell, mask.phase
    if kind == "random":
        return random_mask(batch, grid, *args, device).ids_keep, None, None
    n = grid[0] * grid[1]
    return torch.stack([torch.randperm(n, device=device)[: args[0]] for _ in range(batch)]), None, None


def _check(images, params, ids_keep, cell=None, phase=None, kernel_ids=None):
    """Tokens and the grads of the parameters that need one match the reference (given the true
    ``ids_keep``; the kernel gets ``kernel_ids`` where given); unshown positions get a zero dpos."""
    tokens = patch_embed_triton(images, *params, ids_keep if kernel_ids is None else kernel_ids, cell, phase)
    dtokens = torch.randn(tokens.shape, dtype=tokens.dtype, device=tokens.device)
    trained = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(tokens, trained, dtokens)
    params_ref = [p.detach().float().requires_grad_(p.requires_grad) for p in params]
    tokens_ref = patch_embed_reference(images.float(), *params_ref, ids_keep)
    grads_ref = torch.autograd.grad(tokens_ref, [p for p in params_ref if p.requires_grad], dtokens.float())
    assert tokens.dtype == params[0].dtype and tokens.shape == tokens_ref.shape
    for got, want in zip((tokens, *grads), (tokens_ref, *grads_ref), strict=True):
        assert got.dtype == tokens.dtype
        torch.testing.assert_close(got.float(), want.float(), **TOL[images.dtype])
    if params[2].requires_grad:
        shown = torch.zeros(params[2].shape[0], dtype=torch.bool, device=ids_keep.device)
        shown[ids_keep.flatten()] = True
        assert (grads[-1][~shown] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "batch, channels, size, patch, dim, spec",
    [
        (1, 3, (16, 16), 4, 24, ("checker", 1, 0)),  # 4x4 grid, fine checkerboard: arithmetic path
        (2, 1, (16, 32), 4, 80, ("checker", 2, 1)),  # 4x8 grid, 2x2-patch cells, phase 1: arithmetic
        (3, 3, (12, 24), 3, 24, ("checker", 2, "random")),  # 4x8 grid, per-sample phases: arithmetic
        (2, 3, (4, 8), 4, 24, ("checker", 1, "random")),  # 1x2 grid: one visible token, arithmetic
        (2, 3, (24, 24), 4, 24, ("checker", 2, "random")),  # 6x6 grid: 6 % (2*2) != 0 forces the ids path
        (3, 3, (9, 15), 3, 80, ("random", 0.6)),  # 3x5 grid, random mask: ids path
        (2, 1, (8, 6), 2, 24, ("perm", 5)),  # 4x3 grid, unsorted ids
        (2, 3, (8, 12), 4, 24, ("perm", 1)),  # 2x3 grid: one visible token, ids path
    ],
)
def test_matches_reference(batch, channels, size, patch, dim, spec, dtype, device):
    torch.manual_seed(0)
    images, params = _inputs(batch, channels, size, patch, dim, dtype, device)
    _check(images, params, *_mask(spec, batch, (size[0] // patch, size[1] // patch), device))


@pytest.mark.parametrize("frozen", [0, 1, 2, (0, 1)])  # indices into (weight, bias, pos_embed)
@pytest.mark.parametrize("spec", [("checker", 1, "random"), ("random", 0.75)])
def test_frozen_parameters(frozen, spec, device):
    """Only the gradients asked for are computed, each still right."""
    torch.manual_seed(1)
    images, params = _inputs(2, 3, (16, 16), 4, 24, torch.float32, device)
    for i in frozen if isinstance(frozen, tuple) else (frozen,):
        params[i].requires_grad_(False)
    _check(images, params, *_mask(spec, 2, (4, 4), device))


@pytest.mark.parametrize("grid, cell", [((4, 4), 1), ((4, 8), 2), ((6, 12), 3), ((2, 6), 1)])
def test_arithmetic_path_reads_no_ids(grid, cell, device):
    """With a checkerboard the kernels derive the visible patches from (cell, phase) alone: given
    garbage ids, tokens and grads still match the reference on the mask's true ``ids_keep``."""
    torch.manual_seed(1)
    mask = symmetric_mask(2, grid, cell, "random", device)
    images, params = _inputs(2, 2, (2 * grid[0], 2 * grid[1]), 2, 16, torch.float32, device)
    _check(images, params, mask.ids_keep, cell, mask.phase, kernel_ids=torch.zeros_like(mask.ids_keep))


@pytest.mark.parametrize("spec", [("checker", 1, "random"), ("random", 0.5)])
def test_expanded_output_grad(spec, device):
    """``tokens.sum().backward()`` hands the backward an expanded (stride 0) gradient."""
    torch.manual_seed(2)
    images, params = _inputs(2, 3, (16, 16), 4, 24, torch.float32, device)
    ids_keep, cell, phase = _mask(spec, 2, (4, 4), device)
    patch_embed_triton(images, *params, ids_keep, cell, phase).sum().backward()
    params_ref = [p.detach().clone().requires_grad_() for p in params]
    patch_embed_reference(images, *params_ref, ids_keep).sum().backward()
    for p, p_ref in zip(params, params_ref, strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, **TOL[torch.float32])


def test_inference_without_grad(device):
    """Under no_grad the tokens are unchanged and carry no graph."""
    torch.manual_seed(2)
    images, params = _inputs(2, 3, (16, 16), 4, 24, torch.float32, device)
    mask = random_mask(2, (4, 4), 0.5, device)
    with torch.no_grad():
        tokens = patch_embed_triton(images, *params, mask.ids_keep)
        expected = patch_embed_reference(images, *params, mask.ids_keep)
    assert tokens.grad_fn is None
    torch.testing.assert_close(tokens, expected, **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("spec", [("checker", 2, "random"), ("random", 0.75)])
def test_compiled_matches_eager(backend, spec, device):
    """``torch.compile(fullgraph=True)`` traces through the ops: same tokens and grads as eager."""
    torch.manual_seed(3)
    images, params = _inputs(2, 3, (16, 32), 4, 24, torch.float32, device)
    ids_keep, cell, phase = _mask(spec, 2, (4, 8), device)
    weights = torch.randn(2, ids_keep.shape[1], 24, device=device)  # [B, N_vis, D]: a non-uniform dtokens

    def step(images, weight, bias, pos, ids_keep, phase):
        tokens = patch_embed_triton(images, weight, bias, pos, ids_keep, cell, phase)
        return tokens, (tokens * weights).sum()

    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, backend=backend, fullgraph=True)):
        tokens, loss = fn(images, *params, ids_keep, phase)
        results.append((tokens, *torch.autograd.grad(loss, params)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


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
@pytest.mark.parametrize("dim", [768, 1024])  # ViT-B/16, ViT-L/16
@pytest.mark.parametrize("spec", [("checker", 1, "random"), ("checker", 2, "random"), ("random", 0.75)])
def test_bf16_vit_b_and_l(dim, spec, device):
    """224 px, patch 16 (14x14 grid), 8 images, bf16 images and parameters against an fp32 reference:
    cell 1 takes the arithmetic path (98 visible), cell 2 the ids path (14 % 4 != 0), random 49 visible."""
    torch.manual_seed(3)
    images, params = _inputs(8, 3, (224, 224), 16, dim, torch.bfloat16, device)
    _check(images, params, *_mask(spec, 8, (14, 14), device))
