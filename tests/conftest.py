from __future__ import annotations

import pytest

from data.embedded import ensure_embedded


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """A cache folder holding the default embedded data set (generated once per session)."""
    cache = tmp_path_factory.mktemp("symmim-cache")
    ensure_embedded(cache, seed=0)
    return cache
