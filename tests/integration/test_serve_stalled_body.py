"""A real ``daybook serve``: a client whose body stops arriving (its network died mid-upload,
a phone went into a tunnel) must not hold the server for ever, nor keep SIGTERM from ending
it: nothing was taken from that request, so nothing is lost by ending it."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest

from daybook.infrastructure.http.tokens import open_tokens
from scripts.serve_process import ServeProcess

pytestmark = [pytest.mark.slow]


def test_sigterm_is_not_held_for_ever_by_a_client_whose_body_stalled(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    _, secret = open_tokens(url).create("stalled", ["write"])
    server = ServeProcess(url, tmp_path / "serve.log", args=["--body-timeout", "1"]).start()
    try:
        stalled = socket.create_connection(("127.0.0.1", server.port))
        # The headers and the start of a body that never goes on (nor does the connection
        # close: a peer gone without a FIN).
        stalled.sendall(
            (
                "POST /v1/commands/deposit HTTP/1.1\r\nHost: daybook\r\n"
                f"Authorization: Bearer {secret}\r\nIdempotency-Key: stall-1\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                '{"account_id": '
            ).encode()
        )
        server.terminate()
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        assert code == -signal.SIGTERM, (
            "daybook serve was still running 60 s after SIGTERM, held by one client whose "
            "body stalled (it no longer accepts connections meanwhile)"
        )
        stalled.close()
    finally:
        server.kill()
