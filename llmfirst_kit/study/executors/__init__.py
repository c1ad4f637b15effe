"""Executors run a study's grid cells: ``local`` (one after another here) and ``dask`` (on the workers of a
Dask scheduler). Each implements :class:`~.base.Executor` and is registered by name in :data:`EXECUTORS`;
:func:`get_executor` builds one from its name and options (``scheduler``).
"""

from __future__ import annotations

from typing import Any, Callable

from ...errors import InvalidInput
from .base import CellResult, Executor, record_cell
from .dask import DaskExecutor
from .local import LocalExecutor

EXECUTORS: dict[str, Callable[..., Executor]] = {"local": LocalExecutor, "dask": DaskExecutor}


def register(name: str, factory: Callable[..., Executor]) -> None:
    """Make ``factory(**options)`` available as ``run_study(..., executor=name)``."""
    EXECUTORS[name] = factory


def get_executor(name: str, **options: Any) -> Executor:
    """The executor ``name``, built with ``options`` (each executor checks its own: ``scheduler`` is for
    ``dask`` only). Nothing is connected before it is entered."""
    if name not in EXECUTORS:
        raise InvalidInput(f"executor {name!r} is unknown; accepted: {', '.join(EXECUTORS)}")
    return EXECUTORS[name](**options)


__all__ = ["EXECUTORS", "CellResult", "DaskExecutor", "Executor", "LocalExecutor", "get_executor", "record_cell",
           "register"]
