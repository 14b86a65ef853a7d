"""The whole SymMIM loss and its gradients: Triton kernels against the torch backend.

Runs the micro model under the interpreter on CPU (fp32). The losses agree to 1e-4
relative: the kernels only sum in another order than the eager ops. Gradients are compared
as whole tensors (error norm <= 1e-3 of the gradient norm): the contrastive heads'
BatchNorm over a small batch amplifies those last-bit differences elementwise.
"""
from __future__ import annotations

import pytest
import torch

from symmim.core.config import load_config
from symmim.core.masking import MaskGenerator
from symmim.core.symmim import MomentumBranch, SymMIM
from symmim.kernels.dispatch import Backends

TINY = ["model.size=micro", "model.img_size=32", "model.patch_size=8", "model.decoder_dim=48",
        "model.decoder_depth=1", "model.decoder_heads=2", "model.proj_hidden=64", "model.proj_dim=16"]


@pytest.mark.parametrize("strategy", ["symmetric", "random"])
def test_symmim_loss_and_grads_match_between_backends(strategy, device):
    cfg = load_config(None, TINY + [f"mask.strategy={strategy}", "mask.ratio=0.6"])
    torch.manual_seed(0)
    ref = SymMIM(cfg.model, cfg.loss, Backends("torch", "torch")).to(device)
    fused = SymMIM(cfg.model, cfg.loss, Backends("triton", "triton")).to(device)
    fused.load_state_dict(ref.state_dict())
    images = torch.randn(3, 3, 32, 32, device=device)
    masks = MaskGenerator(cfg.mask, ref.encoder.grid, device, seed=1)
    online, momentum_mask = masks.online(3), masks.momentum(3)
    keys = MomentumBranch(ref).to(device)(images, momentum_mask, torch.float32)
    out_ref = ref(images, online, keys)
    out_fused = fused(images, online, keys)
    for name in ("loss", "loss_mim", "loss_con"):
        torch.testing.assert_close(out_fused[name], out_ref[name], rtol=1e-4, atol=1e-5)
    out_ref["loss"].backward()
    out_fused["loss"].backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        expected = grads_ref[name].grad
        assert p.grad is not None and expected.norm() > 0, name
        assert (p.grad - expected).norm() <= 1e-3 * expected.norm(), name


def test_compiled_model_runs_the_kernel_ops(device):
    """``torch.compile`` traces the Triton model with the kernels as ``symmim::`` ops in its graphs
    (no graph break around them) and gives the eager model's loss and gradients."""
    from torch._dynamo.backends.registry import lookup_backend

    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = SymMIM(cfg.model, cfg.loss, Backends("triton", "triton")).to(device)
    images = torch.randn(2, 3, 32, 32, device=device)
    masks = MaskGenerator(cfg.mask, model.encoder.grid, device, seed=1)
    online, momentum_mask = masks.online(2), masks.momentum(2)
    keys = MomentumBranch(model).to(device)(images, momentum_mask, torch.float32)
    want = model(images, online, keys)["loss"]
    (want_grad,) = torch.autograd.grad(want, model.encoder.patch_embed.proj.weight)
    ops: set[str] = set()

    def recording_aot_eager(gm, example_inputs):
        ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recording_aot_eager)
    got = compiled(images, online, keys)["loss"]
    (got_grad,) = torch.autograd.grad(got, model.encoder.patch_embed.proj.weight)
    for op in ("symmim.attention", "symmim.patch_embed", "symmim.norm_pix_loss"):
        assert any(name.startswith(op) for name in ops), (op, ops)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def _loss_and_grads(model: SymMIM, images, online, momentum_mask, dtype) -> tuple[torch.Tensor, dict]:
    """Loss and per-parameter fp32 gradients of one forward/backward; keys from the model's own EMA copy."""
    keys = MomentumBranch(model)(images, momentum_mask, dtype) if model.contrastive else None
    out = model(images, online, keys)
    out["loss"].backward()
    return out["loss"].float(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["symmetric", "random"])
def test_bf16_vit_b_model_is_as_close_to_fp32_as_torch_bf16(strategy, device):
    """The training configuration (ViT-B/16, 224 px, bf16; momentum branch under autocast): the
    Triton model is no further from an fp32 torch reference than the torch bf16 model is
    (2x on the loss, 3x per gradient tensor, plus a relative slack of bf16's size)."""
    sets = ["mask.ratio=0.75"] + (["mask.strategy=random", "loss.con_weight=0"] if strategy == "random" else [])
    cfg = load_config("configs/vit_b16_symmim.yaml", sets)
    torch.manual_seed(0)
    ref = SymMIM(cfg.model, cfg.loss, Backends("torch", "torch")).to(device)
    images = torch.randn(4, 3, 224, 224, device=device)
    masks = MaskGenerator(cfg.mask, ref.encoder.grid, device, seed=1)
    online, momentum_mask = masks.online(4), (masks.momentum(4) if ref.contrastive else None)
    loss_ref, grads_ref = _loss_and_grads(ref, images, online, momentum_mask, torch.float32)
    results = {}
    for name, backends in (("torch", Backends("torch", "torch")), ("triton", Backends("triton", "triton"))):
        model = SymMIM(cfg.model, cfg.loss, backends).to(device)
        model.load_state_dict(ref.state_dict())
        results[name] = _loss_and_grads(model.to(torch.bfloat16), images, online, momentum_mask, torch.bfloat16)
    (loss_torch, grads_torch), (loss_triton, grads_triton) = results["torch"], results["triton"]
    assert torch.isfinite(loss_triton)
    assert (loss_triton - loss_ref).abs() <= 2 * (loss_torch - loss_ref).abs() + 5e-3 * loss_ref.abs(), \
        (loss_ref.item(), loss_torch.item(), loss_triton.item())
    worse = []
    for name, g in grads_ref.items():
        err_torch, err_triton = (grads_torch[name] - g).norm(), (grads_triton[name] - g).norm()
        if not err_triton <= 3 * err_torch + 2e-2 * g.norm():
            worse.append(f"{name}: triton {err_triton:.3g}, torch {err_torch:.3g}, |g| {g.norm():.3g}")
    assert not worse, "\n".join(worse)
