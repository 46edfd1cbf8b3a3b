"""Traces leave the process over OTLP when the standard ``OTEL_*`` variables ask for them:
``daybook serve`` sends a request's span and its command's span, in the caller's trace, to a
real OTLP/HTTP receiver; it and a worker send what they still hold when they stop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from daybook.infrastructure.http.tokens import open_tokens
from scripts.serve_process import ServeProcess

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Receiver:
    """An OTLP/HTTP trace receiver: keeps every span it is sent, as (name, trace id)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        spans.extend((s.name, s.trace_id.hex()) for s in scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def open_an_account(pg_url: str, server: ServeProcess, key: str) -> None:
    _, secret = open_tokens(pg_url).create(f"tracer-{key}", ["write"])
    answer = httpx.post(
        server.base_url + "/v1/commands/open_account",
        json={"owner": "ann", "currency": "EUR"},
        headers={
            "Authorization": f"Bearer {secret}",
            "Idempotency-Key": key,
            "traceparent": TRACEPARENT,
        },
    )
    assert answer.status_code == 200, answer.text


def test_a_request_s_spans_reach_the_otlp_endpoint_in_the_caller_s_trace(
    pg_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    server = ServeProcess(pg_url, tmp_path / "serve.log", env=env).start()
    try:
        open_an_account(pg_url, server, "traced")
    finally:
        server.stop()  # a clean stop (SIGTERM) flushes the spans
    ours = {name for name, trace_id in receiver.spans if trace_id == TRACE_ID}
    assert "command open_account" in ours, receiver.spans
    assert "POST /v1/commands/open_account" in ours, receiver.spans  # the request


def test_a_sigterm_stop_exports_the_spans_of_the_last_requests(
    pg_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    """With the SDK's default batch delay (5 s), the spans of the requests answered just
    before and during a drain were still in its batch processor when uvicorn re-raised
    SIGTERM with its default disposition: the process died without running ``atexit``,
    where the SDK's own shutdown would have sent them."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}  # the default schedule delay
    server = ServeProcess(pg_url, tmp_path / "serve.log", env=env).start()
    try:
        open_an_account(pg_url, server, "traced")
    finally:
        server.stop()  # SIGTERM
    ours = {name for name, trace_id in receiver.spans if trace_id == TRACE_ID}
    assert "command open_account" in ours, (receiver.spans, server.output[-2000:])


def test_a_stopped_worker_exports_the_spans_of_its_last_batches(
    pg_url: str,
    kafka_bootstrap: str,
    tmp_path: Path,
    receiver: Receiver,
    spans: InMemorySpanExporter,  # traced commands: their events carry a traceparent
) -> None:
    """A worker ends with ``os._exit`` (faust leaves threads behind that would hold the
    interpreter): no ``atexit`` runs, so the spans still batched for export were lost. A
    schedule delay of a minute keeps every span batched until the worker sends them itself."""
    from daybook import open_ledger
    from scripts.streams import unique, wait_until
    from tests.streaming.test_workers import applied, relay, worker

    ledger = open_ledger(pg_url)
    account = ledger.open_account("ann", "EUR").account_id
    for amount in range(1, 11):  # through the ledger's face: each command traced
        ledger.deposit(account, amount)
    head = ledger.head()
    ledger.close()
    topic, group = unique("traced"), unique("group")
    the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log").start()
    applying = worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "worker.log")
    applying.env.update(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "60000"}
    )
    applying.start()
    try:
        wait_until(lambda: applied(pg_url, group, topic) == head, "the worker to apply the log")
    finally:
        assert applying.stop() == 0, applying.output
        the_relay.stop()
    assert "daybook.worker.apply" in {name for name, _ in receiver.spans}, applying.output[-3000:]
