"""The server's settings: the kit's :class:`~llmfirst_kit.settings.Settings` (``parallel``, ``max_queue``, ...)
and what only a server has, read from keyword arguments and ``LLMFIRST_*`` environment variables (a keyword
argument wins over the environment).

Every field has an environment variable, ``LLMFIRST_`` + the field name in capitals: ``LLMFIRST_TOKEN``,
``LLMFIRST_MAX_QUEUE``, ``LLMFIRST_N_THREADS``, ``LLMFIRST_IDLE_TIMEOUT_S`` (``none``: never)... Lists take
commas: ``LLMFIRST_ALLOWED_BACKENDS=embedded,ollama``.
A value that does not fit is refused with :class:`~llmfirst_kit.errors.InvalidInput` naming the variable (or
argument) and what the field accepts.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from ..backends.registry import DEFAULT_BACKEND
from ..settings import ENV_PREFIX, Settings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_ENV = ENV_PREFIX + "TOKEN"

Names = Annotated[tuple[str, ...], NoDecode]  # from the environment: comma-separated (or a JSON list)


class ServerConfig(Settings):
    """What an operator can set. The defaults suit one researcher's machine."""

    model_config = SettingsConfigDict(frozen=True)

    token: str | None = Field(None, repr=False,
                              description="required off loopback; checked on every request when set")
    default_model: str | None = Field(
        None, description="embedded model for a run that names none, a registry name (unset: the kit's default)")
    allowed_origins: Names = Field((), description='browser origins besides loopback pages, e.g. "https://lab.example"')
    check_host: bool = Field(True, description="answer only loopback Host names, true or false (set off when "
                                               "listening elsewhere with a token)")
    max_message_bytes: int = Field(64 * 1024, description="bytes of one WebSocket message, an integer")
    max_query_chars: int = Field(8000, description="characters of a WebSocket query, an integer")
    max_tokens_limit: int = Field(4096, description="largest max_tokens a WebSocket run may ask for, an integer")
    max_predict: int | None = Field(
        None, description="cap on the tokens of any one model call (HTTP and WebSocket), an integer (unset: none)")
    max_pending_runs: int = Field(8, description="runs waiting or running on one connection, an integer")
    max_connections: int = Field(64, description="WebSocket connections at once, an integer")
    send_buffer_bytes: int = Field(1 << 20, description="per client, an integer; past it the client is dropped "
                                                        "(close code 1008)")
    max_body_bytes: int = Field(4 << 20, description="bytes of one HTTP request body, an integer")
    max_num_ctx: int = Field(8192, description="largest context an Ollama client may ask for (num_ctx), an integer")
    preload: Names = Field((), description="embedded models to load at start-up, registry names (comma-separated)")
    n_threads: int | None = Field(None, description="decoding threads of the embedded models, an integer "
                                                    "(unset: all cores)")
    # backends a WebSocket run may pick: ollama and openai spend the operator's server or key (OPENAI_API_KEY)
    allowed_backends: Names = Field((DEFAULT_BACKEND,), description="backends a WebSocket run may pick "
                                                               "(comma-separated, e.g. embedded,ollama)")
    header_timeout_s: float = Field(20.0, gt=0, description="seconds an HTTP client has to send a request's headers "
                                    "(from connecting, or from the request's first byte), a number")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="seconds an idle keep-alive HTTP connection stays open, "
                                        "a number")
    max_open_connections: int = Field(256, ge=1, description="open connections, HTTP and WebSocket together, an "
                                      "integer; one more is answered 503 and closed")
    idle_timeout_s: float | None = Field(300.0, description="seconds before a WebSocket with no message and no run "
                                                            "is closed, a number (none: never)")

    @field_validator("allowed_origins", "preload", "allowed_backends", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return value

