"""What every request of one server shares: its settings and one backend object per backend name."""

from __future__ import annotations

import contextlib
import threading

from ..backends import Backend, get_backend
from ..backends.embedded import EmbeddedBackend
from .config import ServerConfig


class ServerState:
    """Shared by every request (``app.state.kit``): the config and one backend object per backend name."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.embedded = EmbeddedBackend(model=config.default_model, n_threads=config.n_threads,
                                        max_queue=config.max_queue, parallel=config.parallel)
        self._backends: dict[str, Backend] = {self.embedded.name: self.embedded}
        self._backends_lock = threading.Lock()  # runs are built in worker threads
        self.connections = 0

    def backend(self, name: str) -> Backend:
        with self._backends_lock:
            if name not in self._backends:
                self._backends[name] = get_backend(name)  # unknown name: InvalidInput naming the known ones
            return self._backends[name]

    async def aclose(self) -> None:
        for backend in self._backends.values():
            close = getattr(backend, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
