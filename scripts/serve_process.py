"""A real ``daybook serve`` process on a loopback port, for tests and the HTTP benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from scripts import services

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServeProcess:
    """``daybook serve --url URL --port P [args]`` with its output in ``log_path``."""

    url: str
    log_path: Path
    args: list[str] = field(default_factory=list)
    port: int = field(default_factory=services.free_port)
    proc: subprocess.Popen[bytes] | None = None
    #: How clients check the server's certificate (with --tls-cert: an ``ssl.SSLContext``).
    verify: Any = True
    #: Environment variables for the server, on top of this process's.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        scheme = "https" if "--tls-cert" in self.args else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServeProcess:
        """Start the server and wait until it answers ``/health``. A port found free can be
        taken before the server binds it (by any process's next outgoing connection, whose
        local port comes from the same range): then the server exits saying so, and it is
        started again on another port."""
        for _ in range(5):
            written = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                return self._start(timeout)
            except RuntimeError:
                if b"address already in use" not in self.log_path.read_bytes()[written:].lower():
                    raise
                self.port = services.free_port()
        raise RuntimeError(f"daybook serve found no free port in 5 tries:\n{self.output}")

    def _start(self, timeout: float) -> ServeProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        command = [sys.executable, "-m", "daybook.infrastructure.cli", "serve", "--url", self.url]
        self.proc = subprocess.Popen(
            [*command, "--port", str(self.port), *self.args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **self.env},
            preexec_fn=services.sigint_as_default,  # Ctrl-C is how tests stop it, too
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daybook serve exited {self.proc.returncode}:\n{self.output}")
            try:
                health = httpx.get(f"{self.base_url}/health", timeout=1.0, verify=self.verify)
                if health.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"daybook serve did not answer within {timeout}s")
            time.sleep(0.1)

    def terminate(self) -> None:
        """SIGTERM: the server drains and exits by itself."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate()
            try:
                return self.wait()
            except subprocess.TimeoutExpired:
                self.kill()
        return -1 if self.proc is None else self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")
