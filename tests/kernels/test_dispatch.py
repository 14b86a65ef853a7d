"""The backend switch: what ``auto`` resolves to, and clear errors for what cannot run here."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from symmim.core.config import KernelsConfig
from symmim.kernels.dispatch import BackendError, resolve_backends

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("device,expected", [(CUDA, ("triton", "sdpa", "torch")), (CPU, ("torch", "sdpa", "torch"))])
def test_auto_is_what_measured_fastest(device, expected):
    backends = resolve_backends(KernelsConfig(), device)
    assert (backends.ops, backends.attention, backends.layernorm) == expected
    assert backends.describe() == "kernels: ops={} attention={} layernorm={}".format(*expected)


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
