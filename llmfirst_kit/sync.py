"""Run the kit's coroutines from synchronous code: scripts, the CLI, papermill cells, widget callbacks.

In a notebook, ``await pipeline.run(...)`` at the top of a cell is the natural way. ``run_sync`` is for
code that cannot await. With no event loop running it is plain ``asyncio.run``. Inside a running loop
(a Jupyter kernel) it applies ``nest_asyncio2`` -- the maintained fork that ipykernel moved to -- to that
loop only, then and there. Importing the kit never patches asyncio.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, TypeVar

T = TypeVar("T")


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
