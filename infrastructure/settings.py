"""Settings: everything the composition root needs, from arguments or ``DAYBOOK_*`` variables.

One object holds the URLs and options; ``bootstrap`` turns it into wired objects. URLs are
kept exactly as given (a PostgreSQL URL with ``?host=/run/postgresql`` stays that way) and
checked only for what daybook can use; every part that needs a URL receives this text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from daybook.infrastructure.ledger.requests import DEFAULT_RETENTION, GENERATED_RETENTION
from daybook.infrastructure.urls import DEFAULT_URL, BadURL, scheme

#: The longest a request record is kept (its expiry is a timestamp every backend stores).
MAX_REQUEST_RETENTION = timedelta(days=36500)
#: The longest wait, interval or timeout daybook takes (between purges, an option in
#: seconds): a wait past what a thread can wait (about 292 years) failed the service that
#: waited, at its first wait.
MAX_WAIT = timedelta(days=30)

DEFAULT_BROKER = "kafka://127.0.0.1:9092"
DEFAULT_TOPIC = "daybook.events"
DEFAULT_PARTITIONS = 8
DEFAULT_GROUP = "daybook-projections"
DEFAULT_RELAY_REQUEST_TIMEOUT = 15.0
#: The least a broker request may be given (less counts a healthy broker as down).
MIN_BROKER_TIMEOUT = 0.1

#: What Kafka takes in a topic name: 1-249 of these, and not "." or "..".
_KAFKA_NAME = re.compile(r"[a-zA-Z0-9._-]+")
_MAX_KAFKA_NAME = 249
#: The worker's dead letters go to a topic named after the events topic with this added.
DEAD_LETTERS_SUFFIX = ".dead-letters"
#: The longest events topic: its dead-letter topic must be a topic name Kafka takes too.
MAX_TOPIC = _MAX_KAFKA_NAME - len(DEAD_LETTERS_SUFFIX)
#: The longest consumer group id. Kafka takes any non-empty group id, but the worker's
#: faust app is named after the group and names a topic after it in turn (its leader
#: election topic, GROUP-__assignor-__leader), so a group id is held to the rule of a topic
#: name, less those 20 characters: anything else fails inside faust or at the broker.
MAX_GROUP = _MAX_KAFKA_NAME - len("-__assignor-__leader")
_NAME_CHARACTERS = "a-z, A-Z, 0-9, '.', '_' and '-'"


def check_topic(value: str) -> str:
    """The events topic, if Kafka takes it as a topic name (with room for the dead-letter
    topic named after it); else ValueError, saying what would do."""
    if not _KAFKA_NAME.fullmatch(value) or len(value) > MAX_TOPIC or value in (".", ".."):
        msg = (
            f"a topic name is 1-{MAX_TOPIC} characters of {_NAME_CHARACTERS}, and not '.' "
            f"or '..', got {value!r}"
        )
        raise ValueError(msg)
    return value


def check_group(value: str) -> str:
    """A consumer group id the worker can run as (see ``MAX_GROUP``); else ValueError,
    saying what would do."""
    if not _KAFKA_NAME.fullmatch(value) or len(value) > MAX_GROUP:
        msg = (
            f"a consumer group id is 1-{MAX_GROUP} characters of {_NAME_CHARACTERS}, got {value!r}"
        )
        raise ValueError(msg)
    return value


#: Environment variable -> setting.
ENVIRONMENT = {
    "DAYBOOK_URL": "url",
    "DAYBOOK_READMODELS_URL": "readmodels_url",
    "DAYBOOK_KAFKA_URL": "broker_url",
    "DAYBOOK_TOPIC": "topic",
    "DAYBOOK_PARTITIONS": "partitions",
    "DAYBOOK_GROUP": "group",
    "DAYBOOK_RELAY_REQUEST_TIMEOUT": "relay_request_timeout",
    "DAYBOOK_GROUP_COMMIT": "group_commit",
    "DAYBOOK_CACHE_SIZE": "cache_size",
    "DAYBOOK_GATEWAY_URL": "gateway_url",
    "DAYBOOK_REQUEST_RETENTION": "request_retention",
    "DAYBOOK_REQUEST_PURGE_INTERVAL": "request_purge_interval",
    "DAYBOOK_SNAPSHOT_INTERVAL": "snapshot_interval",
}


class Settings(BaseModel):
    """What daybook runs on. Build with ``Settings.load(...)`` to read the environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **values: Any) -> None:
        # Refused as ``load`` refuses: ``BadSettings`` (code ``bad_settings``), naming the
        # setting and its variable, not pydantic's ``ValidationError``, which has no code.
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise BadSettings.from_validation(error) from None

    #: The event store: memory://, sqlite:///path.db or postgresql://...
    url: str = DEFAULT_URL
    #: The read-model database (None: the event store's own database).
    readmodels_url: str | None = None
    #: The Kafka broker for the relay and stream workers: kafka://host:port[,host:port]
    broker_url: str = DEFAULT_BROKER
    #: The topic the relay publishes the log to.
    topic: str = DEFAULT_TOPIC
    partitions: int = Field(DEFAULT_PARTITIONS, ge=1, le=10_000)
    #: The stream workers' consumer group (one per set of read models).
    group: str = DEFAULT_GROUP
    #: Seconds the broker may take to acknowledge the relay's batch before the relay counts
    #: it as down (and waits for it with backoff, keeping its cursor).
    relay_request_timeout: float = Field(
        DEFAULT_RELAY_REQUEST_TIMEOUT, ge=MIN_BROKER_TIMEOUT, le=3600
    )
    #: Batch concurrent commands into shared transactions.
    group_commit: bool = True
    #: How many aggregates the write path keeps in memory (0: none, every command loads
    #: its aggregates from the store).
    cache_size: int = Field(100_000, ge=0)
    #: The payment gateway the saga processor calls (http://host:port); None: none.
    gateway_url: str | None = None
    #: How long the record of a caller-chosen request id is kept: within it, a retry is
    #: replayed; after it, the id is new (seconds, or ISO 8601 such as P3D).
    request_retention: timedelta = timedelta(seconds=DEFAULT_RETENTION)
    #: How often the ledger deletes expired request records (0: never; then run
    #: ``daybook requests purge``).
    request_purge_interval: timedelta = timedelta(minutes=1)
    #: Snapshot an account or SKU every this many events (0: never), so loading one reads
    #: its latest snapshot and at most this many events.
    snapshot_interval: int = Field(100, ge=0)

    @field_validator("url", "readmodels_url")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if value is not None:
            scheme(value)  # refuses what no backend serves, with a message that says what does
        return value

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        return check_topic(value)

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        return check_group(value)

    @field_validator("request_retention", "request_purge_interval", mode="before")
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        """A number of seconds as text (as environment variables are) is a duration too."""
        if isinstance(value, str):
            try:
                return timedelta(seconds=float(value))  # rounded to 0: see below
            except ValueError:
                return value  # an ISO 8601 duration, or a mistake pydantic will name
            except OverflowError:  # inf, 1e20: no duration is that long
                msg = f"{value!r} seconds is longer than any duration daybook can keep"
                raise ValueError(msg) from None
        return value

    @field_validator("request_purge_interval", mode="wrap")
    @classmethod
    def _not_rounded_to_nothing(cls, value: Any, handler: Any) -> Any:
        """A positive interval of any form (a number given in Python, ISO 8601 such as
        ``PT0.0000001S``, not only text in seconds) that rounds to 0 is refused: 0 turns
        the purge off."""
        duration = handler(value)
        if not duration and _asks_for_some(value):
            msg = f"{value!r} is shorter than any duration daybook can keep (0 turns it off)"
            raise ValueError(msg)
        return duration

    @field_validator("request_retention")
    @classmethod
    def _long_enough(cls, value: timedelta) -> timedelta:
        if value.total_seconds() < GENERATED_RETENTION:
            msg = (
                f"must be at least {GENERATED_RETENTION / 3600:g} hour, which is how long the "
                "ledger keeps records for its own retries"
            )
            raise ValueError(msg)
        # A record's expiry is stored as a timestamp: PostgreSQL's end at the year 294276,
        # and past them every command with a request id failed.
        if value > MAX_REQUEST_RETENTION:
            msg = f"must be at most {MAX_REQUEST_RETENTION.days} days (100 years)"
            raise ValueError(msg)
        return value

    @field_validator("request_purge_interval")
    @classmethod
    def _not_negative(cls, value: timedelta) -> timedelta:
        if value.total_seconds() < 0:
            raise ValueError("must not be negative (0 turns the purge service off)")
        # The service waits this long between passes: one past ``MAX_WAIT`` failed it
        # after its first pass, and the table grew for good.
        if value > MAX_WAIT:
            msg = f"must be at most {MAX_WAIT.days} days (0 turns the service off)"
            raise ValueError(msg)
        return value

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **given: Any) -> Settings:
        """Settings from ``given`` arguments, then ``DAYBOOK_*`` variables, then defaults.
        Arguments that are None count as not given. Raises ``BadSettings``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            name: env[variable] for variable, name in ENVIRONMENT.items() if env.get(variable)
        }
        values.update({name: value for name, value in given.items() if value is not None})
        return cls(**values)  # refused as ``BadSettings`` (``__init__``)

    @property
    def readmodels(self) -> str:
        """Where read models live: ``readmodels_url``, or the event store's database."""
        return self.readmodels_url or self.url


def _asks_for_some(value: Any) -> bool:
    """Whether a duration as given is more than nothing, whatever it rounds to."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value > 0
    if isinstance(value, str):
        try:
            return float(value) > 0
        except ValueError:
            return re.search(r"[1-9]", value) is not None  # ISO 8601: a digit not 0
    return False


class BadSettings(BadURL):
    """A setting daybook cannot use; the message names it and says what would work."""

    code = "bad_settings"

    @classmethod
    def from_validation(cls, error: ValidationError) -> BadSettings:
        problems = []
        urls = 0
        for item in error.errors():
            cause = item.get("ctx", {}).get("error")
            if isinstance(cause, BadURL):  # says which URL and what would work already
                problems.append(str(cause))
                urls += 1
                continue
            name = ".".join(str(part) for part in item["loc"]) or "settings"
            variable = next((v for v, n in ENVIRONMENT.items() if n == name), None)
            where = f"{name} (or ${variable})" if variable else name
            # A validator's own message, without pydantic's "Value error, " in front.
            said = str(cause) if item["type"] == "value_error" and cause else item["msg"]
            problems.append(f"{where}: {said}")
        refused = cls("; ".join(problems))
        if urls == len(problems):
            # Only URLs: the code a URL refused anywhere else has (``open_read_models``,
            # a URL with no database), whichever entry point checked it.
            refused.code = BadURL.code
        return refused
