"""A TCP proxy in front of a server that a test can cut off: every connection through it is
dropped and new ones are refused until ``restore``. What a network partition or a server
outage looks like to a client, without stopping a server other tests share."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit


class Outage:
    """``Outage(host, port)`` listens on a loopback port of its own (``port``)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._down = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._clients: set[socket.socket] = set()
        #: Set by ``cut_after_next_request``: replies are dropped, the next request is cut.
        self._mute = threading.Event()
        self._cut_delay: float | None = None
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True, name="outage-proxy").start()

    @classmethod
    def of_url(cls, url: str) -> Outage:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None, url
        return cls(parts.hostname, parts.port)

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by this proxy's."""
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)
        where = f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{where}" if len(netloc) == 2
                                         else where))  # fmt: skip

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        self._down.set()
        self.cuts += 1
        with self._lock:
            connections, self._open = self._open, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def cut_after_next_request(self, delay: float = 0.3) -> None:
        """From now on no reply reaches a client; the next data a client sends (say, a
        COMMIT) still reaches the server, and ``delay`` seconds later (time for the server to
        act on it) every connection is cut: the client cannot tell whether it happened."""
        self._cut_delay = delay
        self._mute.set()

    def restore(self) -> None:
        self._mute.clear()
        self._down.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()

    def __enter__(self) -> Outage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._open.update((client, server))
                self._clients.add(client)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self._mute.is_set():
                    sink.sendall(data)
                elif source in self._clients:
                    sink.sendall(data)
                    delay, self._cut_delay = self._cut_delay, None
                    if delay is not None:
                        threading.Timer(delay, self.cut).start()
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
                self._clients.discard(source)
                self._clients.discard(sink)
