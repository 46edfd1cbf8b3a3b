"""``daybook serve --log-format json``: every line it writes is one JSON object, and the lines
about a request carry that request's id and trace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from daybook.infrastructure.http.tokens import open_tokens
from scripts.serve_process import ServeProcess

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def server(pg_url: str, tmp_path: Path) -> Iterator[ServeProcess]:
    process = ServeProcess(pg_url, tmp_path / "serve.log", ["--log-format", "json"]).start()
    yield process
    process.stop()


def test_every_line_is_json_and_a_request_s_lines_carry_its_ids(
    pg_url: str, server: ServeProcess
) -> None:
    _, secret = open_tokens(pg_url).create("logger", ["write"])
    answer = httpx.post(
        server.base_url + "/v1/commands/open_account",
        json={"owner": "ann", "currency": "EUR"},
        headers={
            "Authorization": f"Bearer {secret}",
            "Idempotency-Key": "open-ann",
            "X-Request-Id": "req-42",
            "traceparent": TRACEPARENT,
        },
    )
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "req-42"
    server.stop()
    lines = [line for line in server.output.splitlines() if line.strip()]
    assert lines, "the server wrote nothing"
    records = []
    for line in lines:
        if line.startswith("daybook serve:"):  # the one startup line for a person, on stderr
            continue
        records.append(orjson.loads(line))  # raises for a line that is not JSON
    ours = [r for r in records if r.get("request_id") == "req-42"]
    assert ours and all(r["trace_id"] == TRACEPARENT.split("-")[1] for r in ours)
    (access,) = [r for r in ours if r["logger"] == "daybook.http.access"]
    assert (access["status"], access["route"]) == (200, "/v1/commands/open_account")
    assert secret not in server.output
