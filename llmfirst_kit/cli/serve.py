"""``llmfirst serve``: the WebSocket and Ollama-/OpenAI-compatible HTTP API over the embedded models
(:func:`llmfirst_kit.serve.serve`)."""

from __future__ import annotations

import click

from ..backends import BACKENDS, capabilities
from ..models import DEFAULT_MODEL
from .command import EXIT_OK, POSITIVE, Command

# the backends a WebSocket run may be allowed to use besides the server's own: those that spend the operator's
# server or key, i.e. not in this process
REMOTE_BACKENDS = tuple(name for name in BACKENDS if not capabilities(name).in_process)


@click.command("serve", cls=Command)
@click.option("--host", default="127.0.0.1")
@click.option("--port", type=POSITIVE, default=8765)
@click.option("--token", default=None, help="required off loopback (or set $LLMFIRST_TOKEN)")
@click.option("--model", default=None, help=f"default model (default {DEFAULT_MODEL})")
@click.option("--threads", type=POSITIVE, default=None, help="decoding threads (default: all cores)")
@click.option("--max-queue", type=int, default=None,
              help="calls that may wait per model; more get 503 (default $LLMFIRST_MAX_QUEUE, else 64)")
@click.option("--parallel", type=POSITIVE, default=None,
              help="calls each model decodes at once, in one batch (default $LLMFIRST_PARALLEL, else 4)")
@click.option("--allow-backend", "allow_backend", multiple=True, type=click.Choice(REMOTE_BACKENDS),
              help="let WebSocket runs use this backend (your Ollama server / OpenAI key); repeatable")
@click.option("--ws-idle-timeout", type=float, default=300.0,
              help="close a WebSocket without messages or runs after this many seconds (0: never)")
@click.option("--header-timeout", type=float, default=20.0,
              help="seconds an HTTP client has to send a request's headers; then the connection is closed (default 20)")
@click.option("--keep-alive-timeout", type=float, default=5.0,
              help="seconds an idle keep-alive HTTP connection stays open (default 5)")
@click.option("--max-open-connections", type=POSITIVE, default=256,
              help="open connections, HTTP and WebSocket together; one more gets 503 (default 256)")
@click.option("--max-tokens-cap", type=POSITIVE, default=None,
              help="tokens any one call may generate, also when a client asks for no limit (Ollama's num_predict "
                   "-1, /v1 without max_tokens); default: until the context is full")
def command(host: str, port: int, token: str | None, model: str | None, threads: int | None, max_queue: int | None,
            parallel: int | None, allow_backend: tuple[str, ...], ws_idle_timeout: float, header_timeout: float,
            keep_alive_timeout: float, max_open_connections: int, max_tokens_cap: int | None) -> int:
    """WebSocket + Ollama-compatible HTTP API over the embedded models"""
    from ..serve import ServerConfig, serve

    default = ServerConfig.model_fields["allowed_backends"].default  # the server's own backend
    config = ServerConfig(default_model=model or DEFAULT_MODEL, n_threads=threads, max_queue=max_queue,
                          parallel=parallel,
                          allowed_backends=(*default, *allow_backend), idle_timeout_s=ws_idle_timeout or None,
                          header_timeout_s=header_timeout, keep_alive_timeout_s=keep_alive_timeout,
                          max_open_connections=max_open_connections, max_predict=max_tokens_cap)
    serve(host, port, token, config=config)
    return EXIT_OK
