"""A fake payment gateway: a real HTTP server on a loopback port, for tests and the demo.

It keeps charges by idempotency key and answers a repeated key with the original result. Its
knobs make it misbehave the ways real gateways do, decided per (key, try) from a seed so a
run can be repeated: declines, latency, requests dropped before processing (a timeout with
no charge), charges made but their reply lost (a timeout with a charge), 503s, and replies
that hang past the client's timeout. It counts how often each key was really charged (at
most once, if idempotency holds) and answers lookups and refunds by key. A refund for a key
with no successful charge closes the key: a charge arriving later under it is declined, so a
request that was still in flight when its saga gave up cannot charge afterwards.

    python -m daybook.infrastructure.gateway.fake --port 8099 --decline-rate 0.2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Knobs:
    #: Share of new charges declined (``card_declined``).
    decline_rate: float = 0.0
    #: Share of new charges made whose reply is lost (the connection drops).
    lost_reply_rate: float = 0.0
    #: Share of charge requests dropped before anything happens (a timeout, no charge).
    drop_rate: float = 0.0
    #: Share of charge requests answered 503 before anything happens.
    unavailable_rate: float = 0.0
    #: Share of refund requests answered 503 before anything happens.
    refund_unavailable_rate: float = 0.0
    #: Share of charge requests that hang ``hang_seconds`` before being processed.
    hang_rate: float = 0.0
    hang_seconds: float = 3.0
    #: Seconds every request waits before it is handled.
    latency: float = 0.0
    seed: int = 0


class FakeGateway:
    """The gateway's records and rules (the HTTP handler below serves them)."""

    def __init__(self, knobs: Knobs | None = None) -> None:
        self.knobs = knobs or Knobs()
        self._lock = threading.Lock()
        self.charges: dict[str, dict[str, Any]] = {}
        #: How often each key was really charged (money moved): at most once.
        self.charged: Counter[str] = Counter()
        #: How many charge requests arrived per key (retries and duplicates included).
        self.requests: Counter[str] = Counter()
        self.refunds: Counter[str] = Counter()
        self.refund_requests: Counter[str] = Counter()
        self.closed: set[str] = set()

    def _roll(self, key: str, what: str) -> float:
        return random.Random(f"{self.knobs.seed}:{key}:{self.requests[key]}:{what}").random()

    def decide(self, key: str) -> str:
        """What happens to this charge request: ``drop``, ``unavailable``, ``hang`` or
        ``process`` (counted first, so each try of a key rolls anew)."""
        with self._lock:
            self.requests[key] += 1
            knobs = self.knobs
            if self._roll(key, "unavailable") < knobs.unavailable_rate:
                return "unavailable"
            if self._roll(key, "drop") < knobs.drop_rate:
                return "drop"
            if self._roll(key, "hang") < knobs.hang_rate:
                return "hang"
            return "process"

    def charge(self, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the charge record, whether to lose the reply)."""
        key = str(request["key"])
        with self._lock:
            known = self.charges.get(key)
            if known is not None:
                return known, False
            knobs = self.knobs
            record: dict[str, Any] = {
                "key": key,
                "amount": int(request["amount"]),
                "currency": str(request["currency"]),
                "customer": str(request.get("customer", "")),
                "reference": str(request.get("reference", "")),
                "refunded": False,
            }
            if key in self.closed:
                record.update(status="declined", decline_code="key_closed", charge_id=None)
            elif self._roll(key, "decline") < knobs.decline_rate:
                record.update(status="declined", decline_code="card_declined", charge_id=None)
            else:
                record.update(status="succeeded", charge_id=f"ch_{len(self.charges) + 1}")
                self.charged[key] += 1
            self.charges[key] = record
            lose = record["status"] == "succeeded" and (
                self._roll(key, "lost") < knobs.lost_reply_rate
            )
            return record, lose

    def lookup(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self.charges.get(key)

    def page(self, after: str, limit: int) -> list[dict[str, Any]]:
        """Charges whose key sorts after ``after``, in key order, at most ``limit``."""
        with self._lock:
            keys = sorted(k for k in self.charges if k > after)[: max(0, limit)]
            return [dict(self.charges[k]) for k in keys]

    def refund_unavailable(self, key: str) -> bool:
        with self._lock:
            self.refund_requests[key] += 1
            roll = random.Random(f"{self.knobs.seed}:{key}:{self.refund_requests[key]}:refund")
            return roll.random() < self.knobs.refund_unavailable_rate

    def refund(self, key: str) -> dict[str, Any]:
        with self._lock:
            record = self.charges.get(key)
            if record is None or record["status"] != "succeeded":
                self.closed.add(key)
                return {"key": key, "status": "nothing_to_refund", "amount": 0}
            if not record["refunded"]:
                record["refunded"] = True
                self.refunds[key] += 1
            return {"key": key, "status": "refunded", "amount": record["amount"]}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "charged": dict(self.charged),
                "requests": dict(self.requests),
                "refunds": dict(self.refunds),
                "charges": {k: dict(v) for k, v in self.charges.items()},
            }


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes: without TCP_NODELAY the second waits for the
    # client's delayed acknowledgement of the first.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests and the demo print what matters."""

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        data = json.loads(self.rfile.read(length) or b"{}")
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return data

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _drop(self) -> None:
        """Close the connection without an answer (the client cannot know what happened)."""
        self.close_connection = True
        with contextlib.suppress(OSError):  # the client went away first
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_GET(self) -> None:
        gateway = self.server.gateway
        self._wait()
        url = urlsplit(self.path)
        if url.path == "/charges":
            query = parse_qs(url.query)
            try:
                limit = int(query.get("limit", ["1000"])[0])
            except ValueError:
                self._reply(400, {"error": "limit must be a whole number"})
                return
            after = query.get("after", [""])[0]
            self._reply(200, {"charges": gateway.page(after, limit)})
        elif self.path.startswith("/charges/"):
            record = gateway.lookup(unquote(self.path[len("/charges/") :]))
            if record is None:
                self._reply(404, {"error": "no charge under that key"})
            else:
                self._reply(200, record)
        elif self.path == "/stats":
            self._reply(200, gateway.stats())
        elif self.path == "/knobs":
            self._reply(200, asdict(gateway.knobs))
        else:
            self._reply(404, {"error": f"no such resource {self.path}"})

    def do_POST(self) -> None:
        gateway = self.server.gateway
        try:
            body = self._body()
        except ValueError as error:
            self._reply(400, {"error": str(error)})
            return
        self._wait()
        if self.path == "/charges":
            decision = gateway.decide(str(body.get("key")))
            if decision == "unavailable":
                self._reply(503, {"error": "try again later"})
                return
            if decision == "drop":
                self._drop()
                return
            if decision == "hang":
                time.sleep(gateway.knobs.hang_seconds)
            record, lose = gateway.charge(body)
            if lose:
                self._drop()
                return
            self._reply(200 if record["status"] == "succeeded" else 402, record)
        elif self.path == "/refunds":
            if gateway.refund_unavailable(str(body.get("key"))):
                self._reply(503, {"error": "try again later"})
                return
            self._reply(200, gateway.refund(str(body.get("key"))))
        elif self.path == "/knobs":
            names = {f.name for f in fields(Knobs)}
            for name, value in body.items():
                if name in names:
                    setattr(gateway.knobs, name, value)
            self._reply(200, asdict(gateway.knobs))
        else:
            self._reply(404, {"error": f"no such resource {self.path}"})

    def _wait(self) -> None:
        latency = self.server.gateway.knobs.latency
        if latency > 0:
            time.sleep(latency)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    gateway: FakeGateway

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A dropped connection is this server's purpose, not an error worth a traceback."""


class FakeGatewayServer:
    """The fake gateway on a loopback port, served by a thread of its own."""

    def __init__(self, knobs: Knobs | None = None, *, port: int = 0) -> None:
        self.gateway = FakeGateway(knobs)
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.gateway = self.gateway
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake gateway", daemon=True
        )

    @property
    def url(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def start(self) -> FakeGatewayServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeGatewayServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="a fake payment gateway on a loopback port")
    parser.add_argument("--port", type=int, default=0)
    for knob in fields(Knobs):
        parser.add_argument(f"--{knob.name.replace('_', '-')}", type=type(knob.default))
    args = parser.parse_args()
    knobs = Knobs(
        **{
            k.name: getattr(args, k.name)
            for k in fields(Knobs)
            if getattr(args, k.name) is not None
        }
    )
    server = FakeGatewayServer(knobs, port=args.port).start()
    print(server.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
