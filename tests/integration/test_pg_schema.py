"""An operator's own PostgreSQL: a ledger in a schema other than ``public``.

The URL's ``options=-csearch_path=...`` (or the role's search_path) chooses where every
unqualified name resolves. Two ledgers in two schemas of one database must stay apart.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import psycopg
import pytest
from psycopg.sql import SQL, Identifier

from daybook import BadURL, SkuNotFound, open_ledger
from daybook.infrastructure.streaming import relay
from daybook.infrastructure.streaming.relay import RewindRefused, read_cursor, rewind

pytestmark = pytest.mark.postgres


def _in_schema(pg_url: str, schema: str) -> str:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{pg_url}?options=-csearch_path%3D{schema}"


def test_a_ledger_writes_its_events_in_the_schema_its_url_names(pg_url: str) -> None:
    url = _in_schema(pg_url, "ledger")
    with open_ledger(url) as ledger:
        ledger.open_account("ann", "EUR")
    with psycopg.connect(pg_url) as conn:
        where = dict(
            conn.execute(
                "SELECT table_name, table_schema FROM information_schema.tables"
                " WHERE table_name LIKE 'daybook%'"
            ).fetchall()
        )
    assert where.get("daybook_events") == "ledger", where


def test_two_ledgers_in_two_schemas_of_one_database_stay_apart(pg_url: str) -> None:
    url_a, url_b = _in_schema(pg_url, "ledger_a"), _in_schema(pg_url, "ledger_b")
    with open_ledger(url_a) as a:
        a.open_account("ann", "EUR")
        a.receive_stock("SKU-1", 10)
    with open_ledger(url_b) as b:
        assert b.head() == 0  # ledger B has written nothing
        with pytest.raises(SkuNotFound):
            b.inventory("SKU-1")


def test_a_ledger_in_its_own_schema_notifies_and_listens_on_a_channel_of_its_own(
    pg_url: str,
) -> None:
    """NOTIFY channels are the database's, not a schema's: every ledger's commit notified
    ``daybook_events``, and woke the readers (runners, relays) of every other ledger in the
    database, each then reading its log for nothing."""
    from daybook import open_event_log

    url_a, url_b = _in_schema(pg_url, "ledger_a"), _in_schema(pg_url, "ledger_b")
    with open_ledger(url_a) as a, open_ledger(url_b) as b:
        log_a = open_event_log(url_a)
        try:
            channel = log_a.recorder.channel_name
            log_a.wait(0)  # starts listening
            assert log_a._listen is not None
            listened = log_a._listen.execute("SELECT pg_listening_channels()").fetchall()
            assert listened == [(channel,)]
            with psycopg.connect(pg_url, autocommit=True) as listener:
                listener.execute(SQL("LISTEN {}").format(Identifier(channel)))
                b.open_account("bob", "EUR")  # ledger B commits: A must not hear of it
                listener.execute(SQL("NOTIFY {}, 'sentinel'").format(Identifier(channel)))
                heard = []
                for note in listener.notifies(timeout=30):
                    heard.append(note.payload)
                    if note.payload == "sentinel":
                        break
                assert heard == ["sentinel"], f"ledger A's readers woke for B's commit: {heard}"
                a.open_account("ann", "EUR")  # A's own commits still reach them
                assert next(listener.notifies(timeout=30)).payload == ""
        finally:
            log_a.close()


def test_read_models_of_two_ledgers_in_two_schemas_of_one_database_are_both_built(
    pg_url: str, tmp_path
) -> None:
    """Two ledgers (each its own SQLite file) keep their read models in two schemas of one
    operator database: each runner must build its own, not wait for the other's lock."""
    from daybook import run_projections

    views_a, views_b = _in_schema(pg_url, "views_a"), _in_schema(pg_url, "views_b")
    with (
        open_ledger(f"sqlite:///{tmp_path}/a.db") as a,
        open_ledger(f"sqlite:///{tmp_path}/b.db") as b,
    ):
        ann = a.open_account("ann", "EUR").account_id
        bob = b.open_account("bob", "EUR").account_id
        at_a = a.deposit(ann, 100).position
        at_b = b.deposit(bob, 200).position
        with run_projections(a, views_a) as runner_a, run_projections(b, views_b) as runner_b:
            row_a = runner_a.views.balance(ann, min_position=at_a, timeout=20)
            row_b = runner_b.views.balance(bob, min_position=at_b, timeout=20)
            assert row_a is not None and row_a.balance == 100
            assert row_b is not None and row_b.balance == 200


def test_a_url_naming_a_libpq_service_is_refused(pg_url: str) -> None:
    """``?service=`` passed the check of libpq's settings, then went unused: the URL's host,
    port and user (localhost, 5432, postgres when it names none) win over the service
    file's, and a service elsewhere was waited for at localhost, with an uncoded error."""
    from urllib.parse import urlsplit

    database = urlsplit(pg_url).path[1:]
    with pytest.raises(BadURL) as refused:
        open_ledger(f"postgresql:///{database}?service=ledger&connect_timeout=2")
    assert refused.value.code == "bad_url"
    assert "service" in str(refused.value), refused.value


def test_a_service_refused_by_a_missing_grant_stops_in_one_line_without_a_traceback(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A role that may not create in the database's schema (PostgreSQL 15's default for a
    role that owns nothing): an operator's mistake, not a bug in daybook. The runner stopped
    with a traceback, and no code."""
    from daybook.infrastructure.cli import main

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE ROLE daybook_no_create LOGIN")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    url = pg_url.replace("postgres@", "daybook_no_create@", 1)
    try:
        status = main(["project", "--url", url, "--startup-wait", "0"])
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        assert status == 1
        assert "refused (permission_denied): permission denied for schema public" in err, err
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("DROP ROLE daybook_no_create")


@pytest.mark.parametrize("opener", ["open_ledger", "open_async_ledger"])
def test_a_ledger_whose_role_may_create_nowhere_is_refused_with_a_code(
    pg_url: str, opener: str
) -> None:
    """The Python API's twin of the service's refusal above: ``open_ledger`` raised
    eventsourcing's uncoded ``ProgrammingError`` (a traceback, nothing to branch on)."""
    import daybook

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE ROLE daybook_no_create LOGIN")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    url = pg_url.replace("postgres@", "daybook_no_create@", 1)
    try:
        with pytest.raises(daybook.PermissionDenied) as refused:
            getattr(daybook, opener)(url)
        assert refused.value.code == "permission_denied"
        assert isinstance(refused.value, daybook.BadURL)  # a URL whose role cannot serve
        message = str(refused.value)
        assert "permission denied for schema public" in message, message
        assert "GRANT CREATE ON SCHEMA public TO daybook_no_create" in message, message
        assert "password" not in message and "\n" not in message, message
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("DROP ROLE daybook_no_create")


def test_a_log_in_public_is_not_hidden_by_a_search_path_naming_another_schema(
    pg_url: str,
) -> None:
    """A ledger written before daybook followed the search_path kept its event store in
    public whatever the search_path said. Opened with that search_path, it must not start a
    new, empty log in the search_path's schema (every account "not found"): refused, saying
    how to go on."""
    with open_ledger(pg_url) as ledger:
        ledger.open_account("ann", "EUR")
    url = _in_schema(pg_url, "elsewhere")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        # As a daybook from before it followed the search_path left it: no marker.
        conn.execute("DROP TABLE public.daybook_search_path_followed")
    with pytest.raises(BadURL) as refused:
        open_ledger(url)
    assert refused.value.code == "bad_url"
    assert "options=-csearch_path%3Dpublic" in str(refused.value), refused.value
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('elsewhere.daybook_events')").fetchone() == (None,)
    with open_ledger(f"{pg_url}?options=-csearch_path%3Dpublic") as ledger:
        assert ledger.head() > 0


def test_a_search_path_naming_no_schema_is_refused(pg_url: str) -> None:
    with pytest.raises(BadURL) as refused:
        open_ledger(f"{pg_url}?options=-csearch_path%3Dnowhere")
    assert refused.value.code == "bad_url"
    assert "no schema that exists" in str(refused.value), refused.value


def test_a_relay_of_a_ledger_in_another_schema_does_not_wait_for_this_ones(pg_url: str) -> None:
    """One relay publishes a topic per event store, by an advisory lock: the database's,
    whatever the schema. A ledger in schema ledger_b found its topic taken by the relay of
    the ledger in ledger_a (here held by a session, as a running relay holds it)."""
    url_a, url_b = _in_schema(pg_url, "ledger_a"), _in_schema(pg_url, "ledger_b")
    for url in (url_a, url_b):
        open_ledger(url).close()
    with psycopg.connect(url_a, autocommit=True) as held:
        taken = held.execute(relay._TAKE_RELAY_LOCK, ("daybook.relay/events",)).fetchone()
        assert taken == (True,)
        with pytest.raises(RewindRefused) as refused:
            rewind(url_a, "events")
        assert "is publishing" in str(refused.value)
        with pytest.raises(RewindRefused) as refused:
            rewind(url_b, "events")
        assert "no relay has published" in str(refused.value), refused.value


@pytest.mark.parametrize("schema", ['"Ledger"', '"led-ger"', '"order"', '"user"'])
def test_a_schema_whose_name_needs_quoting_is_refused(pg_url: str, schema: str) -> None:
    """eventsourcing names its row types by the schema unquoted: such a search_path failed
    at open with an uncoded syntax error. Refused, saying how to name the schema."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{pg_url}?options=" + quote(f"-csearch_path={schema}", safe="")
    with pytest.raises(BadURL) as refused:
        open_ledger(url)
    assert refused.value.code == "bad_url"
    assert "needs quoting" in str(refused.value), refused.value


def test_a_second_ledger_in_its_own_schema_beside_one_in_public(pg_url: str) -> None:
    """The usual case of two ledgers in one database: the first in public (the default),
    the second in a schema of its own, new. It was refused as if public held a log left
    from before daybook followed the search_path."""
    with open_ledger(pg_url) as first:
        first.open_account("ann", "EUR")
    with open_ledger(_in_schema(pg_url, "second")) as second:
        assert second.head() == 0
        second.open_account("bob", "EUR")
    with open_ledger(pg_url) as first:
        assert first.head() == 1


def test_a_second_ledger_whose_tokens_were_created_first_opens(pg_url: str) -> None:
    """``daybook tokens create`` before ``daybook serve``: the schema holds the tokens' table
    and no log yet, and the ledger in public is one this daybook opened."""
    from daybook.infrastructure.http.tokens import open_tokens

    with open_ledger(pg_url) as first:
        first.open_account("ann", "EUR")
    url = _in_schema(pg_url, "second")
    open_tokens(url).create("me", ["read"])
    with open_ledger(url) as second:
        assert second.head() == 0


def _publish_cursor(url: str, topic: str, position: int) -> None:
    """Leave a relay cursor for ``topic`` at ``position``, as a relay that published does."""

    async def go() -> None:
        conn = await psycopg.AsyncConnection.connect(
            relay.postgres_params(url).conninfo(), autocommit=True
        )
        try:
            await relay._create_cursor_table(conn)
            cursor = await relay._load_cursor(conn, topic, 3)
            await relay._save_cursor(
                conn, relay.RelayCursor(topic, position, 3, (position,) * 3, (1,) * 3)
            )
            assert cursor.topic == topic
        finally:
            await conn.close()

    asyncio.run(go())


def test_a_ledger_in_its_schema_does_not_read_or_rewind_the_public_ledgers_relay_cursor(
    pg_url: str,
) -> None:
    """A search_path listing the ledger's schema, then public (a URL's ``ledger_b,public``,
    or a role's default ``"$user", public``): a table the ledger's schema does not have yet
    was found in public, and the other ledger's relay cursor read, and rewound to 0."""
    with open_ledger(pg_url) as first:  # ledger A, in public, its relay has published
        first.open_account("ann", "EUR")
    _publish_cursor(pg_url, "events", 5)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA ledger_b")
    url_b = f"{pg_url}?options=-csearch_path%3Dledger_b%2Cpublic"
    with open_ledger(url_b) as second:  # ledger B, a schema of its own, new
        assert second.head() == 0
    # No relay of B's has published anything: B has nothing to rewind.
    with pytest.raises(RewindRefused):
        rewind(url_b, "events")
    with psycopg.connect(pg_url) as conn:
        (position,) = conn.execute(
            "SELECT position FROM public.daybook_relay_cursors WHERE topic = 'events'"
        ).fetchone()
    assert position == 5, "B's rewind moved A's relay cursor"


def test_a_ledger_in_its_schema_has_no_relay_cursor_of_the_public_ledgers(pg_url: str) -> None:
    with open_ledger(pg_url) as first:
        first.open_account("ann", "EUR")
    _publish_cursor(pg_url, "events", 5)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA ledger_b")
    url_b = f"{pg_url}?options=-csearch_path%3Dledger_b%2Cpublic"
    open_ledger(url_b).close()
    assert read_cursor(url_b, "events") is None
