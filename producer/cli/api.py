"""``vlq api``: serve the HTTP API (OpenAI chat completions, Files, Batches, jobs) with uvicorn."""

from __future__ import annotations

import socket
from typing import Annotated

import typer

from producer.cli.app import app, fail
from producer.config import Settings
from producer.errors import ConfigError, VlqError


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="address to bind (default: api.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: api.port)")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Serve the HTTP API until stopped (Ctrl-C). Settings come from conf/api.yaml and VLQ_API_*.

    Try: curl http://HOST:PORT/healthz, then the openai SDK with base_url http://HOST:PORT/v1.
    """
    import logging

    import uvicorn

    from producer.api import create_app

    try:
        settings = Settings.load()
        host = host or settings.api.host
        port = port if port is not None else settings.api.port
        check_port_free(host, port)
        application = create_app(settings)
    except VlqError as e:
        fail(e)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        application,
        host=host,
        port=port,
        log_level=log_level.lower(),
        proxy_headers=True,
        timeout_graceful_shutdown=5,
    )


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on, with the flag to change, before serving."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}; stop what holds it or pick"
                              " another port (vlq api --port N, or api.port)") from None
