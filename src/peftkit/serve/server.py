"""Run ``peftkit serve``: the model and its adapters loaded once, the engine thread, uvicorn.

Shutdown (SIGTERM or Ctrl-C) is uvicorn's graceful one: it stops accepting connections, lets
every open request finish (streams included), then runs the app's shutdown, which stops the engine
once nothing is queued or running, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.serve.adapters import AdapterRegistry
from peftkit.serve.engine import Engine

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = 16
    max_queue: int = 64
    default_max_tokens: int = 512
    adapter_root: Path | None = None  # set: runtime adapter loading allowed under it
    served_model_name: str | None = None


def build_app(
    model: Any,
    tokenizer: Any,
    adapters: dict[str, str],
    base_model: str,
    autocast_dtype: Any,
    options: ServeOptions,
    trust_remote_code: bool = False,
) -> Any:
    """The FastAPI app for a loaded model; the engine starts and stops with the app's lifespan."""
    from peftkit.serve.app import ServeState, create_app

    engine = Engine(
        model,
        tokenizer,
        max_batch_size=options.max_batch_size,
        max_queue=options.max_queue,
        autocast_dtype=autocast_dtype,
        on_error=lambda message: logging.getLogger("peftkit.serve").error("%s", message),
    )
    registry = AdapterRegistry(
        base_id=options.served_model_name or base_model,
        base_model=base_model,
        adapters=dict(adapters),
        adapter_root=options.adapter_root,
        trust_remote_code=trust_remote_code,
    )
    config = engine.inner.config
    context = int(
        getattr(config, "max_position_embeddings", 0) or getattr(tokenizer, "model_max_length", 2048)
    )
    state = ServeState(engine, registry, tokenizer, context, options.default_max_tokens, options.api_key)
    app = create_app(state)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app.router.lifespan_context = lifespan
    return app


def run(app: Any, options: ServeOptions, describe: str) -> None:
    """Serve ``app`` until SIGTERM / Ctrl-C; one log line per request on stderr."""
    import uvicorn

    _log_to_stderr()
    if options.host not in LOCAL_HOSTS and not options.api_key:
        logging.getLogger("peftkit.serve").warning(
            "listening on %s without an API key: anyone who can reach this port can use the model "
            "(set --api-key or PEFTKIT_API_KEY)",
            options.host,
        )
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    host = f"[{options.host}]" if ":" in options.host else options.host
    logging.getLogger("peftkit.serve").info("%s; http://%s:%d (chat page at /)", describe, host, options.port)
    # uvicorn re-raises the signal that stopped it once shutdown is done, so that a default handler
    # kills the process; a SIGTERM that was answered by a graceful shutdown is a clean exit (0).
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind; it has logged why
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise PeftkitError(f"cannot listen on {options.host}:{options.port} (see the message above)")


def _log_to_stderr() -> None:
    logger = logging.getLogger("peftkit.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
