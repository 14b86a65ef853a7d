from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. Triton reads this when a kernel
# is defined (at import), so it is set before any test module imports ``kernels``.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from symmim.data.embedded import ensure_embedded  # noqa: E402


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """A cache folder holding the default embedded data set (generated once per session)."""
    cache = tmp_path_factory.mktemp("symmim-cache")
    ensure_embedded(cache, seed=0)
    return cache
