"""Kernel tests: the Triton interpreter on machines without a CUDA GPU (set up in
``tests/conftest.py``), ``gpu`` tests skipped there."""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: bf16 test at ViT-B shapes, runs only on a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
