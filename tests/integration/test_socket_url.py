"""A PostgreSQL URL that names a Unix socket (``?host=/dir``) reaches every part intact.

Before one composition root, ``run_projections`` rebuilt the read-model URL from the
ledger's environment and turned ``postgresql://u@/db?host=/run/pg`` into a TCP address
(``u@/run/pg:5432``): the runner then retried 127.0.0.1:5432 forever.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daybook import open_event_log, open_ledger, open_read_models, run_projections
from scripts import services


@pytest.fixture
def socket_url(pg_server: services.PostgresHandle, pg_admin_url: str) -> Iterator[str]:
    server = pg_server
    own = None
    if server.socket_dir is None:  # an external server: start one whose socket we know
        own = server = services.start_postgres()
    name = "daybook_socket_url"
    services.create_database(server.url, name)
    yield server.socket_url(name)
    services.drop_database(server.url, name)
    if own is not None:
        own.stop()


def test_a_socket_url_is_used_as_given_by_the_ledger_the_runner_and_the_queries(
    socket_url: str,
) -> None:
    assert "?host=/" in socket_url and "127.0.0.1" not in socket_url
    with open_ledger(socket_url) as ledger:
        account = ledger.open_account("ann", "EUR").account_id
        receipt = ledger.deposit(account, 700)
        with run_projections(ledger, poll_interval=0.01) as runner:
            assert runner.url == socket_url
            row = runner.views.balance(account, min_position=receipt.position, timeout=10)
            assert row is not None and row.balance == 700
            assert runner.error is None
    log = open_event_log(socket_url)
    try:
        views = open_read_models(socket_url, log=log)
        row = views.balance(account)
        assert row is not None and row.lag_events == 0
        views.close()
    finally:
        log.close()
