"""The whole SymMIM loss and its gradients: Triton kernels against the torch backend.

Runs the micro model under the interpreter on CPU (fp32). The losses agree to 1e-4
relative: the kernels only sum in another order than the eager ops. Gradients are compared
as whole tensors (error norm <= 1e-3 of the gradient norm): the contrastive heads'
BatchNorm over a small batch amplifies those last-bit differences elementwise.
"""
from __future__ import annotations

import pytest
import torch

from core.config import load_config
from core.masking import MaskGenerator
from core.symmim import MomentumBranch, SymMIM
from kernels.dispatch import Backends

TINY = ["model.size=micro", "model.img_size=32", "model.patch_size=8", "model.decoder_dim=48",
        "model.decoder_depth=1", "model.decoder_heads=2", "model.proj_hidden=64", "model.proj_dim=16"]


@pytest.mark.parametrize("strategy", ["symmetric", "random"])
def test_symmim_loss_and_grads_match_between_backends(strategy, device):
    cfg = load_config(None, TINY + [f"mask.strategy={strategy}", "mask.ratio=0.6"])
    torch.manual_seed(0)
    ref = SymMIM(cfg, Backends("torch", "torch")).to(device)
    fused = SymMIM(cfg, Backends("triton", "triton")).to(device)
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
