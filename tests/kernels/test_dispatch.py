"""The backend switch: what ``auto`` resolves to, and clear errors for what cannot run here."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from symmim.core.config import KernelsConfig
from symmim.kernels import measured
from symmim.kernels.attention import MAX_TOKENS, attention_reference
from symmim.kernels.dispatch import ATTENTION, NORM_PIX_LOSS, PATCH_EMBED, BackendError, Backends, resolve_backends
from symmim.kernels.measured import ByShape, nearest
from symmim.kernels.norm_pix_loss import norm_pix_loss_reference
from symmim.kernels.patch_embed import patch_embed_reference

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("device", [CUDA, CPU])
def test_auto_resolves_to_ops_that_exist(device, monkeypatch):
    """``auto`` names one implementation of each op's table, and on CPU without the interpreter
    never a Triton kernel (which could not run there); the log line names what runs."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backends = resolve_backends(KernelsConfig(), device)
    if backends.ops != "measured":
        assert backends.patch_embed_op is PATCH_EMBED[backends.ops] and backends.norm_pix_loss_op is NORM_PIX_LOSS[backends.ops]
    if backends.attention != "measured":
        assert backends.attention_op is ATTENTION[backends.attention]
    if device == CPU:
        assert (backends.ops, backends.attention) == ("torch", "sdpa")
    assert backends.describe().startswith(f"kernels: ops={backends.ops} attention={backends.attention}")


def test_the_torch_backend_is_the_reference():
    torch_ops = Backends()
    assert torch_ops.attention_op is attention_reference
    assert torch_ops.patch_embed_op is patch_embed_reference and torch_ops.norm_pix_loss_op is norm_pix_loss_reference


def test_explicit_choices_are_kept():
    backends = resolve_backends(KernelsConfig(backend="torch", attention="triton"), CUDA)
    assert (backends.ops, backends.attention) == ("torch", "triton")


def test_the_committed_table_names_real_implementations():
    """Every GPU entry of ``kernels/measured.json`` says where it was measured and names only
    implementations the op tables hold, so ``measured`` can build each op."""
    table = json.loads((Path(measured.__file__).parent / measured.TABLE).read_text())
    assert table
    for gpu, entry in table.items():
        assert entry["source"], gpu
        backends = Backends("measured", "measured", measured.measured_table(gpu))
        assert isinstance(backends.attention_op, ByShape) and isinstance(backends.patch_embed_op, ByShape)
        assert backends.describe().endswith(f"(measured: {entry['source']})")


def test_nearest_measured_shape_decides():
    choices = {"64": {"50": "a", "197": "b"}, "128": {"99": "c"}}
    assert nearest(choices, 64, 50) == "a" and nearest(choices, 64, 120) == "a" and nearest(choices, 64, 150) == "b"
    assert nearest(choices, 80, 20) == "a" and nearest(choices, 120, 197) == "c"  # nearest width first


def test_measured_attention_runs_per_call_shape_and_sdpa_past_the_kernel_limit():
    """Each call runs the winner at its own shape; sequences the Triton kernel cannot take run SDPA."""
    calls = []
    impls = {name: (lambda name: lambda q, k, v: calls.append(name) or q)(name) for name in ATTENTION}
    table = {"source": "test", "attention": {"64": {"50": "triton", "197": "sdpa"}}}
    op = Backends(attention="measured", table=table).attention_op
    op.impls = impls
    for n in (50, 60, 197, MAX_TOKENS + 1, 50):
        x = torch.zeros(1, 1, n, 64)
        op(x, x, x)
    assert calls == ["triton", "triton", "sdpa", "sdpa", "triton"]


def test_a_table_naming_an_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match=r"measured.json: attention names \['flash3'\]"):
        ByShape("attention", {"64": {"99": "flash3"}}, ATTENTION, lambda q, k, v: (64, 99))


@pytest.mark.parametrize("field", ["backend", "attention"])
def test_triton_on_cpu_needs_the_interpreter(field, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        resolve_backends(KernelsConfig(**{field: "triton"}), CPU)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_missing_xformers_is_named():
    with pytest.raises(BackendError, match=r"xformers is not importable.*symmim\[xformers\]"):
        resolve_backends(KernelsConfig(attention="xformers"), CPU)
