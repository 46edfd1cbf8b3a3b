"""Metrics, trace propagation through stored metadata, and structured logs."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import urllib.request

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from daybook.infrastructure.observability import metrics, tracing
from daybook.infrastructure.observability.logs import (
    LIMITED_AT_SOURCE,
    MAX_EVENT_CHARS,
    SUBJECT,
    ConsoleFormatter,
    JsonFormatter,
    RateLimit,
    bounded,
    configure_logging,
    log_context,
    redact,
)
from daybook.infrastructure.statelog import StateLog


def value(name: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def test_counters_and_histograms_count_what_they_are_given() -> None:
    before = value("daybook_commands_total", command="deposit", outcome="ok") or 0.0
    metrics.COMMANDS.labels("deposit", "ok").inc(3)
    assert value("daybook_commands_total", command="deposit", outcome="ok") == before + 3
    count = value("daybook_commit_duration_seconds_count") or 0.0
    with metrics.timed(metrics.COMMIT_SECONDS):
        pass
    assert value("daybook_commit_duration_seconds_count") == count + 1
    assert b"daybook_commands_total" in metrics.exposition()


def test_a_metrics_port_serves_the_registry_over_http() -> None:
    server = metrics.MetricsServer(0)
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as answer:
            body = answer.read()
    finally:
        server.stop()
    assert b"# TYPE daybook_commit_batch_size histogram" in body


def test_a_stored_traceparent_continues_the_trace_in_another_span(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.span("command") as command:
        stored = tracing.current_traceparent()
    assert stored is not None
    with tracing.span("projection batch", parent=stored):
        pass
    with tracing.span("relay publish", links=tracing.links_to([stored, stored, None, "junk"])):
        pass
    by_name = {s.name: s for s in spans.get_finished_spans()}
    trace_id = command.get_span_context().trace_id
    batch = by_name["projection batch"]
    assert batch.context.trace_id == trace_id
    assert batch.parent is not None and batch.parent.span_id == command.get_span_context().span_id
    (link,) = by_name["relay publish"].links
    assert link.context.span_id == command.get_span_context().span_id


def test_without_an_sdk_nothing_is_traced_and_nothing_breaks() -> None:
    assert tracing.context_of(None) is None
    assert tracing.context_of("not a traceparent") is None


def test_json_lines_carry_the_ids_of_what_caused_them(spans: InMemorySpanExporter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("daybook.test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with log_context(request_id="r-1", saga_id="s-9"), tracing.span("request"):
            logger.warning("refused %s", "deposit", extra={"fields": {"code": "invalid_amount"}})
        logger.info("plain")
    finally:
        logger.removeHandler(handler)
    first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "refused deposit" and first["level"] == "warning"
    assert (first["request_id"], first["saga_id"], first["code"]) == (
        "r-1",
        "s-9",
        "invalid_amount",
    )
    assert len(first["trace_id"]) == 32 and "time" in first
    assert "request_id" not in second


def test_json_lines_redact_and_bound_the_extra_fields_they_copy() -> None:
    """A field can quote what a user sent (a request's path and query, its request id) or
    an error's text (a refusal naming a URL): its secrets are masked and its length bounded,
    as the event's are; numbers stay numbers."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("daybook.test.json_fields")
    logger.addHandler(handler)
    logger.propagate = False
    fields = {
        "path": "/v1/accounts?token=dbk_abcdefgh12345678",
        "reason": "cannot reach postgresql://daybook:hunter2@db.internal/ledger",
        "seconds": 0.25,
        "big": "x" * (MAX_EVENT_CHARS * 2),
    }
    try:
        with log_context(request_id="client-chosen dbk_zyxwvuts87654321"):
            logger.warning("request", extra={"fields": fields})
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue()
    assert "hunter2" not in line and "abcdefgh12345678" not in line, line
    assert "zyxwvuts87654321" not in line, line
    parsed = orjson.loads(line)
    assert parsed["seconds"] == 0.25
    assert parsed["reason"] == "cannot reach postgresql://daybook:***@db.internal/ledger"
    assert len(parsed["big"]) < MAX_EVENT_CHARS + 100


def test_a_repeating_warning_is_let_through_once_then_summarised() -> None:
    limit = RateLimit(interval=3600)
    records = [
        logging.LogRecord("w", logging.WARNING, __file__, 1, "gap at %d", (n,), None)
        for n in range(5)
    ]
    passed = [limit.filter(r) for r in records]
    assert passed == [True, False, False, False, False]
    info = logging.LogRecord("w", logging.INFO, __file__, 1, "gap at %d", (1,), None)
    assert limit.filter(info)
    limit.interval = 0.0
    later = logging.LogRecord("w", logging.WARNING, __file__, 1, "gap at %d", (9,), None)
    assert limit.filter(later) and "and 4 more like it" in later.getMessage()


def test_one_service_s_repeats_never_hide_another_s() -> None:
    limit = RateLimit(interval=3600)
    template = "%s: %s; restarting in %.2fs"

    def restart(service: str, delay: float) -> logging.LogRecord:
        args = (service, "connection refused", delay)
        return logging.LogRecord("s", logging.WARNING, __file__, 1, template, args, None)

    passed = [limit.filter(restart(s, d)) for s, d in [("relay", 0.1), ("relay", 0.3)]]
    passed += [limit.filter(restart(s, d)) for s, d in [("runner", 0.2), ("runner", 0.4)]]
    assert passed == [True, False, True, False]


def test_one_versions_lines_never_hide_another_s_and_a_final_line_always_passes() -> None:
    """A template whose subject is not first (``"reconciler: %s v%s ..."``, ``"projection %s
    v%s ..."``) counts per the record's ``SUBJECT``; a line limited where it is written (a
    version or a service that stopped for good) passes however often its template came."""
    limit = RateLimit(interval=3600)
    template = "reconciler: %s v%s at position %s: %d drifted rows"

    def drift(name: str, position: int) -> logging.LogRecord:
        record = logging.LogRecord("r", logging.WARNING, __file__, 1, template,
                                   (name, 1, position, 3), None)  # fmt: skip
        setattr(record, SUBJECT, (name, 1))
        return record

    passed = [limit.filter(drift(n, p)) for n, p in [("a", 1), ("a", 2), ("b", 1), ("b", 2)]]
    assert passed == [True, False, True, False]

    def stopped(name: str) -> logging.LogRecord:
        args = (name, 1, "event at position 7 failed 3 times")
        record = logging.LogRecord("p", logging.ERROR, __file__, 1, "projection %s v%s stopped: %s",
                                   args, None)  # fmt: skip
        setattr(record, LIMITED_AT_SOURCE, True)
        return record

    assert [limit.filter(stopped(n)) for n in ("a", "b", "c")] == [True, True, True]


def test_state_lines_of_two_partitions_never_hide_each_other() -> None:
    """``StateLog`` limits its lines per key (a partition, a version); counted again by
    their template (``"%s"``), partition 1's gap hid partition 2's parked events, its
    first line and its summaries alike, for as long as partition 1's state lasted."""
    now = [0.0]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RateLimit(interval=3600))
    logger = logging.getLogger("daybook.test.statelog")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        states = StateLog(logger, summary_every=30.0, clock=lambda: now[0])
        states.during(("gap", 1), "worker: partition 1 waits for a gap")
        states.during(("parked", 2), "worker: partition 2 parked an event")
        now[0] = 31.0
        states.during(("gap", 1), "worker: partition 1 waits for a gap")
        states.during(("parked", 2), "worker: partition 2 parked an event")
        states.during(("parked", 2), "worker: partition 2 parked an event")  # within 30 s
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "worker: partition 1 waits for a gap",
        "worker: partition 2 parked an event",
        "('gap', 1) (still, for 31s, 2 times; latest: worker: partition 1 waits for a gap)",
        "('parked', 2) (still, for 31s, 2 times; latest: worker: partition 2 parked an event)",
    ]


def test_secrets_never_reach_a_line() -> None:
    line = redact(
        "connecting to postgresql://app:s3cret@db/ledger with Bearer dbk_abcdefghijklmnop"
        " password=hunter2"
    )
    assert "s3cret" not in line and "abcdefghijklmnop" not in line and "hunter2" not in line
    assert "postgresql://app:***@db/ledger" in line


def test_configure_logging_writes_json_to_the_stream() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("json", stream=stream)
        logging.getLogger("daybook.test").info("started")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert orjson.loads(stream.getvalue())["event"] == "started"


def test_a_console_worker_keeps_the_rate_limit_and_redaction(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``daybook worker`` with console logs (the default) built faust's worker without
    daybook's handlers: its start (mode's ``setup_logging``) cleared the root logger's and
    installed faust's own, so the rate limit and the redaction were gone: every retry of an
    outage was a line of its own, and a password in a URL reached the log."""
    import faust

    from daybook.infrastructure.lifecycle import Supervisor
    from daybook.infrastructure.streaming.app import faust_worker

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("console", logging.INFO)  # as ``daybook worker`` does
        app = faust.App("test-console-worker", broker="kafka://127.0.0.1:1")
        worker = faust_worker(app)
        worker._setup_logging()  # what the worker's start does (mode's on_first_start)
        capsys.readouterr()
        supervisor = Supervisor("stream worker g")
        for _ in range(20):  # twenty attempts through one outage of the read models
            supervisor.judge(ConnectionRefusedError(111, "Connection refused"))
        logging.getLogger("daybook.worker").warning(
            "worker: cannot reach postgresql://app:s3cret@db/ledger"
        )
        out = capsys.readouterr()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    text = out.out + out.err
    retries = [line for line in text.splitlines() if "restarting in" in line]
    assert len(retries) == 1, text
    assert "s3cret" not in text and "postgresql://app:***@db/ledger" in text, text


def test_observing_many_at_once_counts_as_observing_each() -> None:
    amounts = [0.0, 0.0001, 0.00011, 0.003, 0.003, 1.0, 7.5, 59.9, 60.0, 61.0, 3600.0, 0.5]
    one_by_one = metrics.CONVERGENCE_SECONDS.labels("test-one-by-one")
    for amount in amounts:
        one_by_one.observe(amount)
    metrics.observe_many(metrics.CONVERGENCE_SECONDS.labels("test-at-once"), amounts)
    samples = {
        (s.name, s.labels["projection"], s.labels.get("le")): s.value
        for family in metrics.CONVERGENCE_SECONDS.collect()
        for s in family.samples
        if s.labels["projection"].startswith("test-") and not s.name.endswith("_created")
    }
    each = {(n, le): v for (n, p, le), v in samples.items() if p == "test-one-by-one"}
    many = {(n, le): v for (n, p, le), v in samples.items() if p == "test-at-once"}
    assert many == each
    assert many[("daybook_convergence_seconds_count", None)] == len(amounts)
    assert many[("daybook_convergence_seconds_bucket", "60.0")] == 10


def test_command_latencies_waiting_to_be_added_are_in_every_read() -> None:
    def count(name: str) -> float:
        value = metrics.REGISTRY.get_sample_value(
            "daybook_command_duration_seconds_count", {"command": name}
        )
        return value or 0.0

    few = metrics._PENDING_LIMIT // 4
    for _ in range(few):
        metrics.observe_command_seconds("test-waiting", 0.001)
    assert count("test-waiting") == few  # read at once: the waiting ones are added first
    for _ in range(metrics._PENDING_LIMIT):
        metrics.observe_command_seconds("test-many", 0.5)
    assert not metrics._PENDING_COMMAND_SECONDS  # enough waited: added without a read
    assert count("test-many") == metrics._PENDING_LIMIT
    assert (
        metrics.REGISTRY.get_sample_value(
            "daybook_command_duration_seconds_bucket", {"command": "test-many", "le": "0.5"}
        )
        == metrics._PENDING_LIMIT
    )


@pytest.mark.parametrize(("level", "lines"), [(logging.INFO, 0), (logging.DEBUG, 1)])
def test_a_gateway_call_writes_no_line_of_its_own_unless_debugging(level: int, lines: int) -> None:
    """httpx logs every request at INFO: a saga processor calling the gateway thousands of
    times a minute would write as many lines, each saying only that it called."""
    stream = io.StringIO()
    root, quiet = logging.getLogger(), logging.getLogger("httpx")
    saved = (list(root.handlers), root.level, quiet.level)
    try:
        configure_logging("console", level, stream=stream)
        with httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(200))) as client:
            client.post("http://gateway.example/payments")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        quiet.setLevel(saved[2])
    assert stream.getvalue().count("HTTP Request: POST") == lines, stream.getvalue()


def test_a_line_quoting_a_large_input_is_redacted_and_cut_without_hanging() -> None:
    """A worker parking a 1 MB message logged an error quoting it, and redacting it took
    hours (a URL scheme tried from every letter of the run), the logging lock held all the
    while. The run is redacted at once (a hang, not a speed, is what the join catches),
    and the line carries at most ``MAX_EVENT_CHARS`` of the message."""
    quoted = "unsupported envelope version " + repr("x" * 1_000_000)
    message = quoted + " from postgresql://app:s3cret@db/ledger"
    # In a process of its own: a regular expression holds the interpreter's lock for as
    # long as it runs, so no thread of this one could give up waiting for it.
    redacting = "import sys; from daybook.infrastructure.observability.logs import redact;"
    redacting += " sys.stdout.write(redact(sys.stdin.read()))"
    try:
        done = subprocess.run([sys.executable, "-c", redacting], input=message,
                              capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("redacting a 1 MB line did not finish")
    redacted = done.stdout
    assert "s3cret" not in redacted and "postgresql://app:***@db/ledger" in redacted
    for formatter in (JsonFormatter(), ConsoleFormatter()):
        record = logging.LogRecord("daybook.worker", logging.ERROR, __file__, 1, message, (), None)
        line = formatter.format(record)
        assert len(line) < MAX_EVENT_CHARS + 200, type(formatter).__name__
        assert f"({len(message) - MAX_EVENT_CHARS} characters cut)" in line
        assert "s3cret" not in line


def test_a_password_up_to_1024_characters_is_redacted() -> None:
    secret = "p" * 1024
    assert secret not in redact(f"postgresql://app:{secret}@db/ledger")


#: Redaction's pattern for URL passwords before it was made linear, as the reference.
_QUADRATIC_URL_PASSWORD = re.compile(r"(?P<keep>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@", re.I)


@given(st.text(alphabet="aZ1+.-:/@ x_(=\"'", max_size=60))
def test_redaction_masks_what_it_masked_before_it_was_made_linear(text: str) -> None:
    """Whatever precedes a URL (a digit, punctuation, another URL), the password goes as it
    went with the pattern that took quadratic time."""
    assert redact(text) == redact(_QUADRATIC_URL_PASSWORD.sub(r"\g<keep>***@", text))
    for before in ("", "1", "2fa.", "(", "'", "=", "x-", "DSN:"):
        line = f"{before}postgresql://app:{text.replace('@', '').replace(' ', '')}x@db/ledger"
        expected = _QUADRATIC_URL_PASSWORD.sub(r"\g<keep>***@", line)
        assert redact(line) == redact(expected)


def test_a_password_the_cut_goes_through_is_masked() -> None:
    secret = "s3cret" * 100
    for offset in (5, 20, 40):
        line = "x" * (MAX_EVENT_CHARS - offset) + f" postgresql://app:{secret}@db/ledger"
        record = logging.LogRecord("daybook.test", logging.ERROR, __file__, 1, line, (), None)
        event = orjson.loads(JsonFormatter().format(record))["event"]
        assert "s3cret" not in event and "characters cut" in event


@pytest.mark.parametrize("value", ["abc", "-5", "0", "1.5", "²", "99999"])
def test_a_bad_test_idle_limit_leaves_a_workers_batch_limit_as_it_is(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daybook.infrastructure.streaming import worker

    monkeypatch.setenv(worker.BATCH_IDLE_LIMIT_VARIABLE, value)
    assert worker._batch_idle_limit() == worker.BATCH_IDLE_LIMIT_SECONDS
    monkeypatch.setenv(worker.BATCH_IDLE_LIMIT_VARIABLE, "3")
    assert worker._batch_idle_limit() == 3


def test_a_password_a_masked_token_before_the_cut_brings_into_view_is_masked() -> None:
    """A long bearer token masked before the cut shortens the line: text from past the
    redacted span came into view, a URL's password with it, unmasked."""
    password = "S3cr3t" * 100
    text = "bearer " + "t" * 4_000 + " postgresql://ledger:" + password + "@db/daybook "
    assert "S3cr3t" not in bounded(text + "x" * 10_000, 100)


def test_a_password_after_an_empty_user_name_is_redacted() -> None:
    """``postgresql://:PASSWORD@host/db`` is a URL daybook takes (the user is then
    ``postgres``) and ``urls.redacted`` masks; a log line quoting it kept the password."""
    from daybook.infrastructure.urls import postgres_params, redacted

    url = "postgresql://:s3cret@db/ledger"
    assert postgres_params(url).password == "s3cret"  # taken, as libpq takes it
    assert "s3cret" not in redacted(url)
    line = redact(f"cannot reach {url}")
    assert "s3cret" not in line, line
