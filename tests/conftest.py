"""Shared fixtures: the real embedded backend on the small test model, loaded once per test run.

The embedded backend caches each ``Llama`` process-wide, so every test that asks for ``backend`` or
``loaded`` shares one SmolLM2-135M instance (about 0.2 s to load, ~125 tok/s on 2 cores).
"""

from __future__ import annotations

import pytest

from llmfirst_kit.backends import get_backend

TEST_MODEL = "smollm2-135m"


@pytest.fixture(scope="session")
def backend():
    """The embedded backend, SmolLM2-135M by default, default context (4096)."""
    return get_backend("embedded", model=TEST_MODEL)


@pytest.fixture(scope="session")
def loaded(backend):
    """The backend's shared ``LoadedModel`` (counters ``calls`` and ``tokens_decoded``, the ``Llama``)."""
    return backend.load(TEST_MODEL)

