"""daybook embedded in a service's own process: workers forked after the ledger was opened
(gunicorn --preload, multiprocessing's fork start method), and threads that outlive the main
thread."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def _python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``script`` run by this Python in a process of its own, with ``args``."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _child_and_parent(done: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """The forked child's answer and the parent's, as a forking script prints them."""
    assert done.returncode == 0, done.stdout + done.stderr[-1500:]
    child, parent = done.stdout.splitlines()
    assert "nothing" not in child, f"the forked child got no answer (it hung): {child}"
    return child, parent


_FORKED = textwrap.dedent(
    """
    import os, signal, sys
    from daybook import open_ledger, open_async_ledger
    url, group_commit = sys.argv[1], sys.argv[2] == "1"
    ledger = open_ledger(url, group_commit=group_commit)
    a = ledger.open_account("ann", "EUR").account_id
    ledger.deposit(a, 100, request_id="parent-1")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a gunicorn --preload worker, a multiprocessing "fork" child
        os.close(read)
        signal.alarm(10)
        try:
            ledger.deposit(a, 5, request_id="child-1")
            answer = "applied"
        except BaseException as error:
            answer = f"{type(error).__name__} code={getattr(error, 'code', None)}"
        answer += f" health={ledger.health().state.value}"
        answer += f" purge={ledger.request_purge.health().state.value}"
        os.write(write, answer.encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    answer = os.read(read, 1000).decode() or f"nothing (child status {status})"
    print("child:", answer)
    balance = ledger.account(a).balance
    ledger.deposit(a, 1, request_id="parent-2")
    print("parent:", balance, ledger.account(a).balance)
    ledger.close()
    """
)


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "direct"])
def test_a_ledger_used_in_a_forked_child_answers_and_leaves_the_parent_whole(
    store_url: str, group_commit: bool, tmp_path: Path
) -> None:
    """A service that opens its ledger before forking its workers (gunicorn --preload,
    multiprocessing's fork start method). The child's command waited for ever for a
    writer thread the child does not have; without group commit, on PostgreSQL, it ran on
    the parent's connection and broke the parent's next read. It is refused now, with a
    code and what to do (open the ledger after the fork), and the parent goes on. The
    child's health and its request purge's say failed (they said running: the parent's
    copies)."""
    child, parent = _child_and_parent(_python(_FORKED, store_url, "1" if group_commit else "0"))
    assert child == "child: LedgerForked code=ledger_closed health=failed purge=failed", child
    assert parent == "parent: 100 101", (child, parent)


_FORKED_ASYNC = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from daybook import open_async_ledger
    url = sys.argv[1]

    async def main():
        ledger = open_async_ledger(url)
        a = (await ledger.open_account("ann", "EUR")).account_id
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            signal.alarm(10)
            async def child():
                try:
                    await ledger.deposit(a, 5, request_id="child-1")
                    return "applied"
                except BaseException as error:
                    return f"{type(error).__name__} code={getattr(error, 'code', None)}"
            os.write(write, asyncio.run(child()).encode())
            os._exit(0)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        print("child:", os.read(read, 1000).decode() or f"nothing (child status {status})")
        await ledger.deposit(a, 1, request_id="parent-2")
        print("parent:", (await ledger.account(a)).balance)
        await ledger.close()

    asyncio.run(main())
    """
)


def test_an_asyncio_ledger_used_in_a_forked_child_answers(store_url: str) -> None:
    """The same for ``open_async_ledger`` (uvicorn/gunicorn workers forked after start-up)."""
    child, parent = _child_and_parent(_python(_FORKED_ASYNC, store_url))
    assert child == "child: LedgerForked code=ledger_closed", child
    assert parent == "parent: 1", (child, parent)


_MAIN_RETURNS = textwrap.dedent(
    """
    import sys, threading
    from daybook import open_ledger
    ledger = open_ledger(sys.argv[1])
    a = ledger.open_account("a", "EUR").account_id

    def say(line):
        sys.stdout.write(line + "\\n")  # one write: threads' lines do not interleave
        sys.stdout.flush()

    def work(n):
        try:
            for i in range(50):
                ledger.deposit(a, 1, request_id=f"w{n}-{i}")
        except Exception as error:
            say(f"worker {n}: {type(error).__name__} code={getattr(error, 'code', None)}: {error}")
        else:
            say(f"worker {n}: done")

    workers = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for worker in workers:
        worker.start()

    def close_when_done():  # once every worker is done (it closed the ledger under others)
        for worker in workers:
            worker.join()
        ledger.close()

    threading.Thread(target=close_when_done).start()
    # The main thread ends here; Python waits for the (non-daemon) workers.
    """
)


def test_workers_that_outlive_the_main_thread_keep_a_working_ledger(tmp_path: Path) -> None:
    """A script whose main thread starts workers and returns (Python waits for them): the
    workers' commands must go on committing. Interpreter shutdown begins when the main
    thread ends, and concurrent.futures then refuses new work: the group committer's
    committing thread was such a pool, so the writer failed and every command was answered
    an uncoded RuntimeError."""
    url = f"sqlite:///{tmp_path}/main-returns.db"
    done = _python(_MAIN_RETURNS, url)
    answers = sorted(done.stdout.splitlines())
    assert answers == [f"worker {n}: done" for n in range(3)], [*answers, done.stderr[-800:]]
    from daybook import open_ledger

    with open_ledger(url) as ledger:
        assert ledger.head() == 1 + 3 * 50


_CHILD_EXITS = textwrap.dedent(
    """
    import os, sys
    from daybook import open_ledger
    ledger = open_ledger(sys.argv[1])
    a = ledger.open_account("ann", "EUR").account_id
    pid = os.fork()
    if pid == 0:
        if sys.argv[2] == "close":
            ledger.close()
        sys.exit(0)  # an ordinary exit: the interpreter finalizes the parent's objects
    os.waitpid(pid, 0)
    ledger.deposit(a, 1, request_id="after-child")
    print("parent:", ledger.account(a).balance)
    ledger.close()
    """
)


@pytest.mark.parametrize("child", ["exits", "close"])
def test_a_forked_child_that_exits_or_closes_leaves_the_parents_connections_alone(
    pg_url: str, child: str
) -> None:
    """A forked child's ``close`` must not close the connections it shares with its parent
    (nor may its exit): the parent's next command and read go through."""
    done = _python(_CHILD_EXITS, pg_url, child)
    assert done.stdout.strip() == "parent: 1", done.stdout + done.stderr[-1500:]


_FORKED_DIRECT = textwrap.dedent(
    """
    import os, signal, sys
    from daybook import open_ledger
    from daybook.infrastructure.bootstrap import event_log_of
    ledger = open_ledger(sys.argv[1])
    a = ledger.open_account("ann", "EUR").account_id
    ledger.deposit(a, 100, request_id="parent-1")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        signal.alarm(20)
        answers = []
        for name, call in [
            ("recorded", lambda: [ledger.service.recorded(["parent-1"]) for _ in range(8)][-1]),
            ("event_log.head", lambda: [event_log_of(ledger).head() for _ in range(8)][-1]),
            ("request_purge.purge", lambda: ledger.request_purge.purge()),
            ("account", lambda: ledger.account(a)),
            ("head", lambda: ledger.head()),
        ]:
            if name != sys.argv[2]:
                continue
            try:
                got = call()
                answers.append(f"{name}: ran ({type(got).__name__})")
            except BaseException as error:
                answers.append(f"{name}: {type(error).__name__}")
        os.write(write, "; ".join(answers).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    print("child:", os.read(read, 10000).decode())
    try:
        ledger.deposit(a, 1, request_id="parent-2")
        print("parent:", ledger.account(a).balance, event_log_of(ledger).head())
    except BaseException as error:
        print("parent:", type(error).__name__, str(error)[:200])
    ledger.close()
    """
)


@pytest.mark.parametrize(
    "calls", ["recorded", "event_log.head", "request_purge.purge", "account", "head"]
)
def test_forked_child_service_level_entry_points_are_refused(pg_url: str, calls: str) -> None:
    """What the HTTP app (a batch item's earlier record: ``service.recorded``; its event
    log on the ledger's recorder), the saga processor (``service.recorded``) and
    ``ledger.request_purge.purge()`` call go to the service's connections, past the
    ledger's methods: a forked child is refused there too (it ran on the parent's
    connection, and the parent's next command failed)."""
    done = _python(_FORKED_DIRECT, pg_url, calls)
    lines = done.stdout.splitlines()
    child = next((line for line in lines if line.startswith("child:")), done.stderr[-2000:])
    parent = next((line for line in lines if line.startswith("parent:")), done.stderr[-2000:])
    assert child == f"child: {calls}: LedgerForked", (child, parent)
    assert parent == "parent: 101 3", (child, parent)


_FORKED_READS = textwrap.dedent(
    """
    import os, signal, sys
    from daybook import open_ledger, open_read_models, run_projections
    url = sys.argv[1]
    with open_ledger(url) as ledger, run_projections(ledger) as runner:
        a = ledger.open_account("ann", "EUR").account_id
        b = ledger.open_account("bob", "EUR").account_id
        ledger.deposit(a, 100)
        at = ledger.deposit(b, 200).position
        runner.views.balance(b, min_position=at, timeout=30)
    views = open_read_models(url)
    print("before:", views.balance(a).balance, views.balance(b).balance, flush=True)

    def ask(account, times):
        try:
            answers = {views.balance(account).balance for _ in range(times)}
            return " ".join(str(x) for x in sorted(answers))
        except BaseException as error:
            return f"{type(error).__name__}: {str(error)[:200]}"

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # both processes read at once, each its own account
        os.close(read)
        signal.alarm(60)
        answer = ask(a, 300)
        views.close()
        os.write(write, answer.encode())
        os._exit(0)
    os.close(write)
    parent = ask(b, 300)
    os.waitpid(pid, 0)
    print("child:", os.read(read, 10000).decode())
    print("parent:", parent, ask(b, 5))
    views.close()
    """
)


def test_read_models_opened_before_a_fork_answer_in_the_child_and_the_parent(
    shared_store_url: str,
) -> None:
    """Read models opened before the fork (gunicorn --preload), queried by both processes at
    once: the child's queries ran on the parent's connection, two processes talking on one
    socket, each could read the other's answers or break the session. The child now makes
    its own connection, and leaves the parent's alone, also when it closes the read
    models."""
    done = _python(_FORKED_READS, shared_store_url)
    assert done.returncode == 0, done.stdout + done.stderr[-1500:]
    assert done.stdout.splitlines() == ["before: 100 200", "child: 100", "parent: 200 200"], (
        done.stdout + done.stderr[-1500:]
    )


_FORKED_MID_QUERY = textwrap.dedent(
    """
    import os, signal, sys, threading
    from daybook import open_ledger, open_read_models, run_projections
    url = sys.argv[1]
    with open_ledger(url) as ledger, run_projections(ledger) as runner:
        a = ledger.open_account("ann", "EUR").account_id
        at = ledger.deposit(a, 100).position
        runner.views.balance(a, min_position=at, timeout=30)
    views = open_read_models(url)
    views.balance(a)
    views._lock.acquire()  # as another thread's query holds it at the very moment of a fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        signal.alarm(20)  # a child that hangs dies, with nothing said
        os.write(write, str(views.balance(a).balance).encode())
        os._exit(0)
    os.close(write)
    views._lock.release()
    os.waitpid(pid, 0)
    print("child:", os.read(read, 1000).decode() or "nothing")
    print("parent:", views.balance(a).balance)
    views.close()
    """
)


def test_read_models_queried_by_another_thread_at_a_fork_answer_in_the_child(
    shared_store_url: str,
) -> None:
    """A thread of the parent in the middle of a query when another forks (a web server
    forking its workers while it serves): the child's copy of the read models' lock was
    held for ever, by a thread the child does not have, and its every query hung."""
    done = _python(_FORKED_MID_QUERY, shared_store_url)
    assert done.returncode == 0, done.stdout + done.stderr[-1500:]
    assert done.stdout.splitlines() == ["child: 100", "parent: 100"], (
        done.stdout + done.stderr[-1500:]
    )


_FORKED_RUNNER = textwrap.dedent(
    """
    import os, sys
    from daybook import open_ledger, run_projections
    with open_ledger(sys.argv[1]) as ledger, run_projections(ledger) as runner:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            states = [ledger.health(), ledger.request_purge.health(), runner.health()]
            os.write(write, " ".join(h.state.value for h in states).encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        print("child:", os.read(read, 1000).decode())
        print("parent:", runner.health().state.value)
    """
)


def test_the_services_of_a_forked_child_say_they_do_not_run_there(tmp_path: Path) -> None:
    """A child forked after ``run_projections`` (gunicorn --preload): the runner's thread is
    the parent's, and its health, the parent's copy, said it ran."""
    done = _python(_FORKED_RUNNER, f"sqlite:///{tmp_path}/daybook.db")
    assert done.returncode == 0, done.stdout + done.stderr[-1500:]
    assert done.stdout.splitlines() == ["child: failed failed failed", "parent: running"], (
        done.stdout + done.stderr[-1500:]
    )


_FORKED_AFTER_STOP = textwrap.dedent(
    """
    import os, sys
    from daybook import open_ledger, run_projections
    with open_ledger(sys.argv[1]) as ledger:
        runner = run_projections(ledger)
        runner.stop()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, runner.health().state.value.encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        print("child:", os.read(read, 1000).decode())
    """
)


def test_a_service_stopped_before_the_fork_says_stopped_in_the_child(tmp_path: Path) -> None:
    """Only a service that ran in the parent at the fork says failed in the child: one stopped
    before it says stopped, as it is."""
    done = _python(_FORKED_AFTER_STOP, f"sqlite:///{tmp_path}/daybook.db")
    assert done.returncode == 0, done.stdout + done.stderr[-1500:]
    assert done.stdout.strip() == "child: stopped", done.stdout + done.stderr[-1500:]
