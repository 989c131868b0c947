"""uvicorn around the app, and `serve`, the one call of `imgcls serve`.

SIGTERM stops the listening socket, lets the requests in flight finish (at most --drain-timeout seconds),
drains the inference queue and returns 0; Ctrl-C does the same, then ends as the CLI ends on Ctrl-C (130).
A port that cannot be bound is uvicorn's startup failure: its error line, exit status 3.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import signal
import sys
from pathlib import Path

from imgcls.errors import UserError
from imgcls.serving.settings import ServeSettings

REQUIRED = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client",
            "python_multipart": "python-multipart"}


def require_packages() -> None:
    """Refuse in one line, naming the extra, when the serving packages are not installed."""
    missing = [name for module, name in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"imgcls serve needs {', '.join(missing)}; pip install 'imgcls[serve]'")


def uvicorn_config(app, settings: ServeSettings, **overrides):
    """How uvicorn runs `app`: h11 with a deadline on headers (serving/protocol.py), idle keep-alive
    connections closed after 5 s, a drain of --drain-timeout on SIGTERM. The app answers a JSON 503 past
    --max-connections requests in flight; uvicorn's own plain-text 503, for connections beyond twice that
    (open but idle ones count there), is the backstop for a flood of connections that send nothing."""
    import uvicorn

    from imgcls.serving.protocol import HeaderDeadline

    protocol = functools.partial(HeaderDeadline, header_timeout=settings.header_timeout_s)
    options = dict(host=settings.host, port=settings.port, log_level=settings.log_level, timeout_keep_alive=5,
                   timeout_graceful_shutdown=settings.drain_timeout_s, limit_concurrency=2 * settings.max_connections,
                   server_header=False, http=protocol)
    return uvicorn.Config(app, **{**options, **overrides})


def uvicorn_server(source: str | Path, settings: ServeSettings):
    """The engine opened, warmed up and wrapped in the app; a uvicorn server for it, not yet running."""
    require_packages()
    import uvicorn

    from imgcls.serving.app import create_app
    from imgcls.serving.service import build_service

    return uvicorn.Server(uvicorn_config(create_app(build_service(source, settings)), settings))


def _log_to_stderr(level: str) -> None:
    """The server's own lines (drift warnings) beside uvicorn's, unless the embedding program routes them."""
    logger = logging.getLogger("imgcls.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))  # uvicorn's layout
        logger.addHandler(handler)
        logger.setLevel(level.upper())
        logger.propagate = False


def serve(source: str | Path, settings: ServeSettings) -> int:
    """Serve `source` until SIGTERM or Ctrl-C; 0 once the requests in flight are answered."""
    _log_to_stderr(settings.log_level)
    server = uvicorn_server(source, settings)
    stopped_by: list[int] = []
    # uvicorn handles the signal (graceful shutdown), then raises it again once done so that a process
    # "dies of SIGTERM" by default; this handler takes that second delivery, so a drained stop exits 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped_by.append(signum))
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
