"""A network path to PostgreSQL that a test can cut without closing anything.

A server behind a network partition (or on a host that died) does not refuse: its kernel no
longer answers at all, so nothing tells the client, whose kernel retransmits for about 15
minutes, or waits for ever for an answer it was promised. Stopping a server, or a forwarder
in user space, cannot show this: a kernel still acknowledges every packet.

So the path crosses a link: a network namespace joined to this one by a veth pair, with a
forwarder in it (``forward.py``) to a second forwarder here, which reaches the server.
``cut()`` takes the link's far end down; packets then vanish with no answer, in both
directions, as in a partition. ``heal()`` brings it up; connections that have not given up carry on.

    test ─▶ 10.x.y.2:5432 (namespace) ─▶ 10.x.y.1:port (here) ─▶ the server

Needs what CI has (root, ``ip``, network namespaces and veth links), as the real PostgreSQL
and broker the other tests use; run by another user, the tests that need it are skipped,
saying why (as root, a kernel without them fails the tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

FORWARD = str(Path(__file__).with_name("forward.py"))


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"ip {' '.join(args)}: {done.stderr.strip()} (a partition needs root, and network"
            " namespaces and veth links, as on CI)"
        )


def _forwarder(stack: ExitStack, argv: list[str]) -> None:
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    stack.callback(process.wait, 10)
    stack.callback(process.kill)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"forwarder {argv} did not start (exit {process.poll()})")


@dataclass
class Partition:
    """The URL of ``url``'s server through a link ``cut`` and ``heal`` control."""

    url: str
    namespace: str
    link: str
    near_end: str

    def cut(self) -> None:
        # The far end goes down: this side keeps its route to the far address (marked
        # linkdown), so packets for it vanish here. (Taking down this side's end instead
        # would remove that route, and the packets would leave by the default route, where
        # something may answer them.)
        _ip("-n", self.namespace, "link", "set", self.link, "down")

    def heal(self) -> None:
        _ip("-n", self.namespace, "link", "set", self.link, "up")
        # Forget that the far address stopped answering (else the first packets after
        # healing are refused as "no route to host" until it is asked again).
        _ip("neigh", "flush", "dev", self.near_end)

    @contextmanager
    def healed(self) -> Iterator[None]:
        """Heal the link when the block ends, however it ends: a test that failed with the
        link cut would otherwise wait out the kernel's retransmissions while it closes."""
        try:
            yield
        finally:
            self.heal()


@contextmanager
def partitionable(url: str) -> Iterator[Partition]:
    """``url`` (postgresql://...) reached through a link a test can cut."""
    if os.geteuid() != 0:
        pytest.skip("a network partition needs root (a network namespace); CI runs as root")
    parts = urlsplit(url)
    target_host, target_port = parts.hostname or "127.0.0.1", parts.port or 5432
    tag = os.getpid() % 100_000
    namespace, here, there = f"dbk{tag}", f"dbh{tag}", f"dbn{tag}"
    subnet = f"10.{100 + tag % 100}.{tag // 100 % 250}"
    near, far = f"{subnet}.1", f"{subnet}.2"
    # Left by a process killed mid-test whose pid this one has now.
    subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
    subprocess.run(["ip", "link", "delete", here], capture_output=True)
    with ExitStack() as stack:
        _ip("netns", "add", namespace)
        stack.callback(_ip, "netns", "delete", namespace)
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        stack.callback(subprocess.run, ["ip", "link", "delete", here], capture_output=True)
        _ip("link", "set", there, "netns", namespace)
        _ip("addr", "add", f"{near}/30", "dev", here)
        _ip("link", "set", here, "up")
        inside = ["ip", "netns", "exec", namespace]
        _ip("-n", namespace, "addr", "add", f"{far}/30", "dev", there)
        _ip("-n", namespace, "link", "set", there, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        relay_port = 20_000 + tag % 20_000
        _forwarder(stack, [sys.executable, FORWARD, near, str(relay_port), target_host,
                           str(target_port)])  # fmt: skip
        _forwarder(stack, [*inside, sys.executable, FORWARD, far, "5432", near, str(relay_port)])
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{far}:5432" if userinfo else f"{far}:5432"
        yield Partition(urlunsplit(parts._replace(netloc=netloc)), namespace, there, here)
