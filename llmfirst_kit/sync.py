"""Run the kit's coroutines from synchronous code (scripts, the CLI, papermill cells, widget callbacks), and
many at once with a bound (:func:`gather_at_most`).

In a notebook, ``await pipeline.run(...)`` at the top of a cell is the natural way. ``run_sync`` is for
code that cannot await. With no event loop running it is plain ``asyncio.run``. Inside a running loop
(a Jupyter kernel) it applies ``nest_asyncio2`` -- the maintained fork that ipykernel moved to -- to that
loop only, then and there. Importing the kit never patches asyncio.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Iterable, TypeVar

T = TypeVar("T")


async def gather_at_most(limit: int, awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """``asyncio.gather`` with at most ``limit`` of ``awaitables`` running at once; results in their order. For
    many independent model calls: on the embedded engine those in flight are sequences of one batch."""
    gate = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[T]) -> T:
        async with gate:
            return await aw

    return list(await asyncio.gather(*(one(aw) for aw in awaitables)))


def run_sync(awaitable: Awaitable[T]) -> T:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_as_coroutine(awaitable))
    import nest_asyncio2

    nest_asyncio2.apply(loop)
    return loop.run_until_complete(awaitable)


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
