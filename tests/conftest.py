"""Shared fixtures: the real embedded backend on the small test model, loaded once per test run.

The embedded backend caches each ``Llama`` process-wide, so every test that asks for ``backend`` or
``loaded`` shares one SmolLM2-135M instance (about 0.2 s to load).

Threads: tests decode on ONE thread (``LLMFIRST_TEST_THREADS`` to change it). llama.cpp's worker threads
busy-wait for each other at every step, so with as many threads as cores, any other busy process on the
machine (a second test run, a notebook) slows decoding 20-25x (measured on 2 cores: 100 tokens in 51 s
with 2 threads, 2.1 s with 1). One thread has nobody to wait for and just shares the CPU.
"""

from __future__ import annotations

import asyncio

import os

import pytest

from llmfirst_kit.backends import get_backend

TEST_MODEL = "smollm2-135m"
TEST_THREADS = int(os.environ.get("LLMFIRST_TEST_THREADS", "1"))


@pytest.fixture(scope="session")
def backend():
    """The embedded backend, SmolLM2-135M by default, default context (4096)."""
    return get_backend("embedded", model=TEST_MODEL, n_threads=TEST_THREADS)


@pytest.fixture(scope="session")
def serial_backend():
    """The same model decoding one call at a time (``parallel=1``: a second copy, sharing the first one's step
    lock), for tests of what waits in the queue."""
    return get_backend("embedded", model=TEST_MODEL, n_threads=TEST_THREADS, parallel=1)


@pytest.fixture(scope="session")
def serial_loaded(serial_backend):
    return serial_backend.load(TEST_MODEL)


@pytest.fixture(scope="session")
def loaded(backend):
    """The backend's shared ``LoadedModel`` (counters ``calls`` and ``tokens_decoded``, the ``Llama``)."""
    return backend.load(TEST_MODEL)


async def wait_until_idle(loaded, settle_s: float = 0.3) -> int:
    """Wait until the model's decode counter stops moving; returns it."""
    before = loaded.tokens_decoded
    while True:
        await asyncio.sleep(settle_s)
        if loaded.tokens_decoded == before:
            return before
        before = loaded.tokens_decoded


async def stream(backend, request):
    """Stream one call to the end; returns its record and the chunks as they arrived."""
    call = backend.call(request)
    chunks = []
    async for chunk in call:
        chunks.append(chunk)
    return call.record, chunks
