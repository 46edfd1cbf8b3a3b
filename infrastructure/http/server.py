"""Running the application under uvicorn, and stopping it without losing a caller.

On SIGTERM or SIGINT uvicorn stops listening (new connections are refused, which a caller
sees before it has sent anything), closes idle keep-alive connections, lets every request in
progress finish and be answered (no graceful-shutdown timeout is set: a request in progress
is a command the committer has, and cutting it off would leave its caller not knowing), and
only then runs the application's shutdown, which closes the ledger: the committer commits
what it was given before it stops. TLS is uvicorn's (``ssl_certfile``/``ssl_keyfile``).
"""

from __future__ import annotations

import logging

import uvicorn

from daybook.infrastructure.http.app import HttpParts, create_app

log = logging.getLogger("daybook.http")


def run(
    parts: HttpParts,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    access_log: bool = True,
    log_level: str = "info",
) -> int:
    """Serve until a signal; 0 after a clean stop, 1 if the server could not start."""
    config = uvicorn.Config(
        create_app(parts),
        host=host,
        port=port,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        access_log=access_log,
        log_level=log_level,
        # The command's own logging (setup_logging: JSON or console) formats uvicorn's lines.
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=None,
        server_header=False,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind (it has logged why)
        return 1
    if not server.started:
        return 1
    log.info("daybook serve: stopped; every request in progress was answered")
    return 0
