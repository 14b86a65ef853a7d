"""The backend switch: what ``auto`` resolves to, and clear errors for what cannot run here."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from symmim.core.config import KernelsConfig
from symmim.kernels.attention import attention_reference
from symmim.kernels.dispatch import (ATTENTION, LAYER_NORM, NORM_PIX_LOSS, PATCH_EMBED, BackendError, Backends,
                                     resolve_backends)
from symmim.kernels.layernorm import layer_norm_reference
from symmim.kernels.norm_pix_loss import norm_pix_loss_reference
from symmim.kernels.patch_embed import patch_embed_reference

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("device", [CUDA, CPU])
def test_auto_resolves_to_ops_that_exist(device, monkeypatch):
    """``auto`` names one implementation of each op's table, and on CPU without the interpreter
    never a Triton kernel (which could not run there); the log line names what runs."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backends = resolve_backends(KernelsConfig(), device)
    assert backends.patch_embed_op is PATCH_EMBED[backends.ops] and backends.norm_pix_loss_op is NORM_PIX_LOSS[backends.ops]
    assert backends.attention_op is ATTENTION[backends.attention] and backends.layer_norm_op is LAYER_NORM[backends.layernorm]
    if device == CPU:
        assert "triton" not in (backends.ops, backends.attention, backends.layernorm)
    assert backends.describe() == f"kernels: ops={backends.ops} attention={backends.attention} layernorm={backends.layernorm}"


def test_the_torch_backend_is_the_reference():
    torch_ops = Backends()
    assert torch_ops.attention_op is attention_reference
    assert torch_ops.patch_embed_op is patch_embed_reference and torch_ops.norm_pix_loss_op is norm_pix_loss_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_layer_norm_matches_the_fp32_reference(dtype):
    """The torch backend runs torch's fused LayerNorm (no casts around it); it computes what the
    fp32 reference computes: bitwise in fp32, to bf16 rounding in bf16."""
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 72) * 2 + 0.5).to(dtype)
    w, b = (1 + 0.1 * torch.randn(72)).to(dtype), (0.1 * torch.randn(72)).to(dtype)
    got, want = Backends().layer_norm_op(x, w, b, 1e-6), layer_norm_reference(x, w, b, 1e-6)
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)


def test_explicit_choices_are_kept():
    backends = resolve_backends(KernelsConfig(backend="torch", attention="triton", layernorm="triton"), CUDA)
    assert (backends.ops, backends.attention, backends.layernorm) == ("torch", "triton", "triton")


@pytest.mark.parametrize("field", ["backend", "attention", "layernorm"])
def test_triton_on_cpu_needs_the_interpreter(field, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        resolve_backends(KernelsConfig(**{field: "triton"}), CPU)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_missing_xformers_is_named():
    with pytest.raises(BackendError, match=r"xformers is not importable.*symmim\[xformers\]"):
        resolve_backends(KernelsConfig(attention="xformers"), CPU)
