"""`store`: write events to a PostgreSQL or SQLite table, as an event log or as rows kept in sync by key.

    with:
      url: postgresql://hookyard@db:5432/app   # also postgres://; sqlite:///relative.db, sqlite:////absolute.db
                                               # several hosts (db1:5432,db2:5432): the first that answers
      table: hookyard_events                   # the default; letters, digits, _; PostgreSQL allows schema.table
      mode: append                             # append (the default) or upsert
      key: data.id                             # upsert only, required: the event path whose value names the row
      delete_on: [user.deleted]                # upsert only: event types (globs allowed) that delete the row
      transaction_pooling: true                # PostgreSQL only: whether the URL leads to a pooler in
                                               # transaction mode (PgBouncer's pool_mode = transaction);
                                               # found out when the pool is made, if not given

Tables and indexes are created when missing, on the first delivery rather than at start-up: a database that
is down only delays this action's deliveries (retried on the route's schedule), never the gateway or the other
actions. PostgreSQL is first asked whether they exist, and only the statements of what is missing are run:
CREATE INDEX IF NOT EXISTS would lock the table, and a role that does not own a table made by a DBA (or may
not create in its schema) is refused any of them, IF NOT EXISTS or not. Such a role needs SELECT, INSERT,
UPDATE and DELETE on the tables. The index is only for queries: one that is missing and that the role may
not create is logged, once per setup, as a warning with the CREATE INDEX statement for the table's owner,
and the store writes without it. Names are quoted, so they keep their case. A PostgreSQL schema must already
exist. `delete_on` matches the canonical event type (event.type, e.g. consignment.deleted), not a
provider's code.

PostgreSQL: a pool of up to 10 connections per action; a lost connection is replaced on a later attempt.
The action's timeout bounds the whole attempt: connecting, the wait for a free connection, the statements
and the commit. An attempt that runs out says which of them it was waiting for, and is rolled back.

Behind a pooler in transaction mode (`transaction_pooling: true`) the store keeps no prepared statement on
a connection: the pooler hands the server's connections from client to client at each transaction's end,
so a statement prepared on one would be run on another, which does not have it. Not given, it is found out
each time the pool is made: a pooler gives its client a process id of its own, not the server session's.
Nothing else the store does outlives a transaction: its advisory locks are pg_advisory_xact_lock, and it
sets nothing on the session (no SET, temporary table or LISTEN). A pooler in statement mode (PgBouncer's
pool_mode = statement) refuses the transactions that create the tables and write upserts: retried, with an
error that names the mode and says what to use instead.

append: one row per event, written with INSERT ... ON CONFLICT DO NOTHING, so replays and duplicate
deliveries never add a second row.

    source       text         NOT NULL   -- the source's name in routes.yaml
    event_id     text         NOT NULL
    type         text         NOT NULL
    occurred_at  timestamptz             -- when the provider says it happened (NULL if it does not say,
                                         -- or says a time beyond the years 1-9999)
    received_at  timestamptz  NOT NULL
    payload      jsonb        NOT NULL   -- the parsed body (integers with all their digits)
    headers      jsonb        NOT NULL   -- the request headers, minus Authorization and cookies
    PRIMARY KEY (source, event_id); index <table>_type_idx on (type, received_at)

upsert: one row per value of `key`, holding the latest `data` ("sync data to your database").

    key          text         PRIMARY KEY  -- the value at `key`, as text (numbers and booleans as in JSON)
    data         jsonb        NOT NULL     -- the payload's `data` (the whole payload when it has none)
    source       text         NOT NULL     -- source, event_id and type of the event that wrote the row
    event_id     text         NOT NULL
    type         text         NOT NULL
    occurred_at  timestamptz  NOT NULL     -- the event's occurred_at (if in the years 1-9999), else its
                                           -- received_at
    updated_at   timestamptz  NOT NULL     -- when the row was written
    received_at  timestamptz               -- when the gateway received the event (NULL in rows written
                                           -- before the column was added, which setup adds)
    index <table>_updated_idx on (updated_at)

    <table>_tombstones: deleted keys
    key text PRIMARY KEY, occurred_at timestamptz NOT NULL, source text NOT NULL, event_id text NOT NULL,
    deleted_at timestamptz NOT NULL

Events are ordered by occurred_at, not by arrival: an event older than the stored row does not overwrite
it. On a tie the event the gateway received later wins, whichever is delivered first (a retry of the
earlier one, delivered last, must not bring back its data); a row without received_at loses the tie. A
`delete_on` event removes the row and leaves a tombstone, so an update older than the delete (or as old)
that arrives after it does not bring the row back; a newer update recreates the row and clears the
tombstone. Writes to one key are serialized (an advisory lock in PostgreSQL, BEGIN IMMEDIATE in SQLite),
so concurrent deliveries cannot interleave. An event whose `key` is missing, null, empty, an object or a
list is skipped, with the reason recorded.

Numbers are written as the sender wrote them: an integer past 64 bits, which the gateway's parser reads as
a float, is read again from the body with all its digits, for `payload`, `data` and `key`.

SQLite: the same tables, with timestamps as ISO 8601 UTC text (2026-11-22T10:00:00.000000Z, which sorts in
time order) and JSON as text (query it with json_extract). The file is opened in WAL mode with
synchronous=FULL, one connection per action.

Failures: a database that cannot be reached (at start-up or later), a connection the server ended, a timeout,
a missing database, schema or privilege, wrong credentials and any other server error are retried: a person,
or time, may fix them while the schedule runs. A table dropped while running is created again on the next
attempt. A write refused by a read-only server (25006: a standby, such as the old primary after a failover
that moved the writer endpoint's name) makes the pool drop all its connections, so that the next attempt
connects again and reaches the new primary. So does an idle connection the server ended (a restart, an idle
timeout) that an attempt took before asyncpg noticed (StaleConnection). A prepared statement of asyncpg's
that is missing, there already or another one (a pooler in transaction mode without transaction_pooling)
is retried, and the error says to set the option. An error in the statement itself (a
column missing or of the wrong type in a table created by hand, a violated constraint, a value the column
rejects, such as \\u0000 in a string for jsonb, or a key, event id or type longer than the 2704 bytes,
compressed, that a PostgreSQL index entry holds) ends the delivery dead: retrying cannot help. For a table
that lacks a column, has one of another type or lacks the primary key ON CONFLICT names, the error says so
and what to do. The error of a
violated constraint names the constraint, never the row: that holds the event's data. A payload nested too
deeply for Python's json to write (the gateway reads up to 1024 levels) ends dead too, with either database.

Duplicates (at-least-once delivery): append keeps one row per event; upsert writes the same row again (a
copy has the event's received_at, so it does not win a tie against an event received after it).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import orjson
from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from gateway import hookimpl
from gateway.actions import Action, Job, Outcome, Resources, dead, delivered, retry, skipped
from gateway.config import SQLITE_URL_FORMS, Strict, is_sqlite_url, sqlite_path
from gateway.events import Event
from gateway.http_client import url_text_problem
from gateway.tasks import DaemonThread

T = TypeVar("T")

log = logging.getLogger("hookyard.store")

DEFAULT_TABLE = "hookyard_events"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names derived from the table's: PostgreSQL cuts identifiers at 63 bytes, which could make two collide.
_SUFFIXES = ("_tombstones", "_type_idx", "_updated_idx")
_MAX_NAME = 63 - max(map(len, _SUFFIXES))
# Event paths a key may name (see Event.lookup): a field of data, payload or headers, or a top-level one.
_KEY_CONTAINERS = ("data", "payload", "headers")
_KEY_FIELDS = ("id", "type", "source")


# -- options ----------------------------------------------------------------------------------------------


def parse_url(url: str) -> tuple[Literal["postgresql", "sqlite"], str]:
    """("postgresql", dsn) or ("sqlite", file path). Messages never repeat the URL: it may hold a password."""
    problem = url_text_problem(url)
    if problem is not None:
        raise ValueError(problem)
    scheme = url.partition(":")[0].lower()
    if scheme == "sqlite":
        return "sqlite", sqlite_path(url)  # read as the gateway's own storage.url
    if scheme in ("postgresql", "postgres"):
        try:
            parts = urlsplit(url)
            _ = postgres_hosts(parts.netloc)
        except ValueError:
            # Not the exception's text: urllib quotes the would-be port, which can be part of the password
            # (an unencoded "/" in it ends the host part early).
            raise ValueError(
                "not a valid PostgreSQL URL: the host and port cannot be read (percent-encode any /, ?, @, "
                ": or # in the user name or password)"
            ) from None
        if "@" not in parts.netloc and "@" in url.partition("://")[2]:
            # An unencoded "/", "?" or "#" in the password ended the host part early, after a first part
            # that reads as a port (digits, or nothing): the user name became the host, and the rest of the
            # password went to the path, query or fragment, which the attempts' errors would show.
            raise ValueError(
                "not a valid PostgreSQL URL: an @ after the host part (percent-encode any /, ?, @, : or # "
                "in the user name or password, and an @ in the database name or a parameter as %40)"
            )
        return "postgresql", url
    raise ValueError(f"unsupported scheme {scheme!r}; use postgresql://user@host:port/db, {SQLITE_URL_FORMS}")


def postgres_hosts(netloc: str) -> list[str]:
    """The host:port of each host of a PostgreSQL URL's netloc: libpq and asyncpg take several, comma
    separated, and connect to the first that answers (a primary and its standbys). ValueError for a port
    that is not a number."""
    hosts = []
    for host in netloc.rpartition("@")[2].split(","):
        parts = urlsplit(f"//{host}")
        name = parts.hostname or "localhost"
        hosts.append(f"[{name}]:{parts.port or 5432}" if ":" in name else f"{name}:{parts.port or 5432}")
    return hosts


def _same_file(path: str, storage_url: str) -> bool:
    """Whether `path` names the file of the SQLite `storage_url`, both read from the working directory."""
    return os.path.realpath(path) == os.path.realpath(sqlite_path(storage_url))


class StoreOptions(Strict):
    # Strict: `transaction_pooling: 1` is refused, as a number where routes.yaml wants a boolean anywhere.
    model_config = ConfigDict(extra="forbid")
    url: str
    table: str = DEFAULT_TABLE
    mode: Literal["append", "upsert"] = "append"
    # Validated even when absent: upsert requires it (validators run in field order, after mode).
    key: str | None = Field(default=None, validate_default=True)
    delete_on: list[str] = Field(default_factory=list)
    transaction_pooling: bool | None = None  # None: found out when the pool is made (Postgres._pooled)

    @field_validator("url")
    @classmethod
    def _url(cls, url: str, info: ValidationInfo) -> str:
        kind, location = parse_url(url)
        # The gateway's own storage.url, given as the options' validation context when its config loads.
        own = (info.context or {}).get("storage_url")
        if kind == "sqlite" and isinstance(own, str) and is_sqlite_url(own) and _same_file(location, own):
            # Its tables, retention and backups are the gateway's: `table: events` indexed its events.
            raise ValueError("the gateway's own database (storage.url); give the store a file of its own")
        return url

    @field_validator("table")
    @classmethod
    def _table(cls, table: str, info: ValidationInfo) -> str:
        parts = table.split(".")
        if len(parts) > 2 or not all(_IDENTIFIER.fullmatch(part) for part in parts):
            raise ValueError(
                f"{table!r} is not a table name: letters, digits and underscores, not starting with a digit, "
                "optionally schema.table"
            )
        if any(len(part) > _MAX_NAME for part in parts):
            raise ValueError(f"{table!r} is too long: at most {_MAX_NAME} characters per name")
        url = info.data.get("url")
        if len(parts) == 2 and isinstance(url, str) and is_sqlite_url(url):
            raise ValueError(f"{table!r}: SQLite has no schemas; use a plain table name")
        return table

    @field_validator("key")
    @classmethod
    def _key(cls, key: str | None, info: ValidationInfo) -> str | None:
        mode = info.data.get("mode")
        if key is None:
            if mode == "upsert":
                raise ValueError(
                    "required with mode: upsert (the event path that names the row, e.g. data.id)"
                )
            return None
        if mode == "append":
            raise ValueError("only used with mode: upsert (append keys its rows by source and event id)")
        head, *rest = key.split(".")
        nested = head in _KEY_CONTAINERS and bool(rest) and all(rest)
        top_level = head in _KEY_FIELDS and not rest
        if not (nested or top_level):
            raise ValueError(
                f"{key!r} is not an event path such as data.id, payload.object.id or headers.x-id"
            )
        return key

    @field_validator("delete_on")
    @classmethod
    def _delete_on(cls, types: list[str], info: ValidationInfo) -> list[str]:
        if types and info.data.get("mode") == "append":
            raise ValueError("only used with mode: upsert (append never deletes)")
        if not all(event_type.strip() for event_type in types):
            raise ValueError("event types must not be empty")
        return types

    @field_validator("transaction_pooling")
    @classmethod
    def _pooled(cls, pooled: bool | None, info: ValidationInfo) -> bool | None:
        url = info.data.get("url")
        if pooled and isinstance(url, str) and is_sqlite_url(url):
            raise ValueError("only for a PostgreSQL url: SQLite has no connection pooler")
        return pooled


# -- SQL ----------------------------------------------------------------------------------------------


def _quote(name: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


@dataclass(frozen=True, slots=True)
class Statements:
    """The SQL of one table in one dialect."""

    setup: str
    append: str
    put: str
    clear_tombstone: str
    tombstone: str
    delete: str
    # What setup creates, each named as PostgreSQL's to_regclass() reads names, with the statement that
    # creates it: the tables (the one the store writes first) and the index. PostgreSQL's setup runs only
    # the statements of what is missing: a role that does not own the table, or may not create in its
    # schema, is refused each of them even when what it would create is there.
    tables: tuple[tuple[str, str], ...]
    # Only queries need it: a role that may not create it still writes (see Postgres.setup).
    indexes: tuple[tuple[str, str], ...]
    # Columns added to the table after its first shape, each with the statement that adds it to a table
    # created before.
    added_columns: tuple[tuple[str, str], ...]


def statements(table: str, mode: str, dialect: Literal["postgresql", "sqlite"]) -> Statements:
    """The SQL for `table` (as validated by StoreOptions). Written once with PostgreSQL's $n placeholders
    and casts; SQLite gets ?n placeholders (numbered alike) and no casts."""
    schema, _, name = table.rpartition(".")
    qualified = _quote(table)
    tombstones = _quote(f"{table}_tombstones")
    # PostgreSQL puts an index in its table's schema and wants the bare name.
    type_index, updated_index = _quote(f"{name}_type_idx"), _quote(f"{name}_updated_idx")
    in_schema = f"{_quote(schema)}." if schema else ""
    ts, json_type = ("timestamptz", "jsonb") if dialect == "postgresql" else ("TEXT", "TEXT")
    tables: tuple[tuple[str, str], ...]
    if mode == "append":
        create_table = f"""
            CREATE TABLE IF NOT EXISTS {qualified} (
                source text NOT NULL,
                event_id text NOT NULL,
                type text NOT NULL,
                occurred_at {ts},
                received_at {ts} NOT NULL,
                payload {json_type} NOT NULL,
                headers {json_type} NOT NULL,
                PRIMARY KEY (source, event_id)
            )"""
        tables = ((qualified, create_table),)
        indexes = (
            (
                in_schema + type_index,
                f"CREATE INDEX IF NOT EXISTS {type_index} ON {qualified} (type, received_at)",
            ),
        )
    else:
        create_table = f"""
            CREATE TABLE IF NOT EXISTS {qualified} (
                "key" text PRIMARY KEY,
                data {json_type} NOT NULL,
                source text NOT NULL,
                event_id text NOT NULL,
                type text NOT NULL,
                occurred_at {ts} NOT NULL,
                updated_at {ts} NOT NULL,
                received_at {ts}
            )"""
        create_tombstones = f"""
            CREATE TABLE IF NOT EXISTS {tombstones} (
                "key" text PRIMARY KEY,
                occurred_at {ts} NOT NULL,
                source text NOT NULL,
                event_id text NOT NULL,
                deleted_at {ts} NOT NULL
            )"""
        tables = ((qualified, create_table), (tombstones, create_tombstones))
        indexes = (
            (
                in_schema + updated_index,
                f"CREATE INDEX IF NOT EXISTS {updated_index} ON {qualified} (updated_at)",
            ),
        )
    setup = "".join(f"{create};\n" for _, create in (*tables, *indexes))
    sql: list[str] = [
        setup,
        f"""
        INSERT INTO {qualified} (source, event_id, type, occurred_at, received_at, payload, headers)
        VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb)
        ON CONFLICT (source, event_id) DO NOTHING
        """,
        # INSERT ... SELECT so that a tombstone at least as new as the event keeps the key deleted. The casts
        # give PostgreSQL the types of parameters that appear only in the select list.
        f"""
        INSERT INTO {qualified} AS stored
            ("key", data, source, event_id, type, occurred_at, updated_at, received_at)
        SELECT $1::text, $2::jsonb, $3::text, $4::text, $5::text, $6::timestamptz, $7::timestamptz,
            $8::timestamptz
        WHERE NOT EXISTS (SELECT 1 FROM {tombstones} WHERE "key" = $1 AND occurred_at >= $6)
        ON CONFLICT ("key") DO UPDATE SET
            data = excluded.data,
            source = excluded.source,
            event_id = excluded.event_id,
            type = excluded.type,
            occurred_at = excluded.occurred_at,
            updated_at = excluded.updated_at,
            received_at = excluded.received_at
        WHERE stored.occurred_at < excluded.occurred_at
            OR (stored.occurred_at = excluded.occurred_at
                AND (stored.received_at IS NULL OR stored.received_at <= excluded.received_at))
        """,
        # Once the row is newer than the tombstone, the row's own occurred_at guards it.
        f'DELETE FROM {tombstones} WHERE "key" = $1 AND occurred_at < $2',
        f"""
        INSERT INTO {tombstones} AS tomb ("key", occurred_at, source, event_id, deleted_at)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT ("key") DO UPDATE SET
            occurred_at = excluded.occurred_at,
            source = excluded.source,
            event_id = excluded.event_id,
            deleted_at = excluded.deleted_at
        WHERE tomb.occurred_at <= excluded.occurred_at
        """,
        # A row newer than the delete stays: it was written by an update that happened after the delete.
        f'DELETE FROM {qualified} WHERE "key" = $1 AND occurred_at <= $2',
    ]
    if dialect == "sqlite":
        sql = [re.sub(r"\$(\d+)", r"?\1", re.sub(r"::[a-z]+", "", text)) for text in sql]
    setup, append, put, clear_tombstone, tombstone, delete = sql
    # SQLite adds a column only after reading that it is missing: it has no IF NOT EXISTS for it.
    if_missing = "IF NOT EXISTS " if dialect == "postgresql" else ""
    add_received_at = f"ALTER TABLE {qualified} ADD COLUMN {if_missing}received_at {ts}"
    added = () if mode == "append" else (("received_at", add_received_at),)
    return Statements(setup, append, put, clear_tombstone, tombstone, delete, tables, indexes, added)


# -- what one event writes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """An append row."""

    source: str
    event_id: str
    type: str
    occurred_at: float | None
    received_at: float
    payload: str
    headers: str


@dataclass(frozen=True, slots=True)
class Change:
    """An upsert: `data` written for `key`, or (delete) the key removed; as of `occurred_at`."""

    key: str
    delete: bool
    data: str
    source: str
    event_id: str
    type: str
    occurred_at: float
    # Breaks a tie on occurred_at: the event received later wins.
    received_at: float


def _json(value: Any) -> str:
    """`value` as compact JSON text. By orjson: a payload of 1 MiB takes json.dumps about 12 ms of the event
    loop, which every other delivery and webhook waits for, and orjson about 1 ms. Its text is json's but for
    how some floats are spelled (0.000015, not 1.5e-05), the same number to both databases' JSON. A payload
    parsed from the body (every built-in provider's) holds nothing else: orjson refused NaN and infinities
    there. One that a provider plugin's parse built may: orjson writes a NaN or an infinity as null, as
    JavaScript's JSON.stringify does, and a date, a UUID, an enum or a dataclass as its JSON form, where json
    refused them and the delivery ended dead. What orjson cannot write (an integer past 64 bits, read again
    from the body with all its digits; nesting past 255 levels; a lone surrogate) is written by json."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return _python_json(value)


def _python_json(value: Any) -> str:
    # allow_nan=False: NaN is not JSON, and the database would refuse it later with a less clear message.
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except RecursionError:
        # The gateway reads JSON nested up to 1024 levels; json.dumps stops near Python's recursion limit.
        # A ValueError, so that the delivery ends dead with the reason: raised, it was retried to no avail.
        raise ValueError("nested too deeply for Python's json to write") from None


def _texts(write: Record | Change) -> tuple[str, ...]:
    """What a write holds of the payload, as JSON text."""
    return (write.payload,) if isinstance(write, Record) else (write.key, write.data)


def key_text(value: Any) -> str | None:
    """A key value as text: strings as they are, numbers and booleans as in JSON; None when unusable."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool | int | float):
        # json's spelling, as ever: the text names the row, and orjson spells some floats otherwise
        # (0.000015 for 1.5e-05), which would name another row.
        return _python_json(value)
    return None


# -- backends -------------------------------------------------------------------------------------------


class Backend(ABC):
    """One database: runs the statements, and says which of its errors retrying cannot fix."""

    where: str

    def __init__(self, sql: Statements) -> None:
        self.sql = sql

    @abstractmethod
    async def connect(self, timeout: float) -> None:
        """Open the pool or connection if it is not open."""

    @abstractmethod
    async def setup(self, timeout: float) -> None: ...

    @abstractmethod
    async def append(self, record: Record, timeout: float) -> None: ...

    @abstractmethod
    async def change(self, change: Change, timeout: float) -> None: ...

    @abstractmethod
    def permanent(self, exc: Exception) -> bool:
        """True for an error in the statement or the data; everything else is worth another attempt."""

    @abstractmethod
    def missing_table(self, exc: Exception) -> bool: ...

    @abstractmethod
    def wrong_shape(self, exc: Exception) -> bool:
        """True for an error that says the table lacks a column the store writes, or its primary key."""

    def describe(self, exc: Exception) -> str:
        """The error as the attempt record and the log show it."""
        return _error(exc)

    @abstractmethod
    async def aclose(self) -> None: ...


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _dated(timestamp: float | None) -> float | None:
    """A provider's time, or None when no date can show it (beyond the years 1-9999, not a number). Not all
    are bounded before they get here: an unverified svix-timestamp (`verify: log-only`) of twelve digits
    reaches the year 33658, and a plugin's provider may set anything. Raised, it failed every attempt."""
    if timestamp is None:
        return None
    try:
        _utc(timestamp)
    except (ValueError, OverflowError, OSError):
        return None
    return timestamp


# SQLSTATE classes of errors in the statement or its data: 22 data exception, 23 integrity constraint,
# 42 syntax error or access rule violation, 54 program limit exceeded (a key, event id or type too long for
# a btree index entry, which SQLite stores). Except those a person or a later attempt can fix: a privilege
# granted, a table dropped while running (created again), a schema created.
_PG_PERMANENT_CLASSES = ("22", "23", "42", "54")
_PG_FIXABLE_STATES = frozenset({"42501", "42P01", "3F000"})
# A table made by hand: no such column, a column of another type, no unique index for ON CONFLICT.
_PG_WRONG_SHAPE = frozenset({"42703", "42804", "42P10"})
# read_only_sql_transaction: a write on a hot standby, or on a session that starts read-only. After a
# failover the pool's connections may still lead to the old primary, now a standby (a writer endpoint's
# name moved to the new one, and connections opened before stay where they were). They stay open, so every
# attempt would be refused on them; a new connection looks the name up again. One that cannot take
# connections yet refuses to connect (57P03).
_PG_READ_ONLY = "25006"
# What ends one idle session of the pool most likely ended them all (a restart, pg_terminate_backend of the
# app's sessions), and each would hand its end (57P01 admin_shutdown, 57P02 crash_shutdown) to the next
# attempt that takes it: they are replaced at once.
_PG_EXPIRES_THE_POOL = frozenset({_PG_READ_ONLY, "57P01", "57P02"})
_READ_ONLY_SERVER = (
    "read-only server (a standby, or the old primary after a failover): the pool's connections are "
    "replaced, the next attempt connects again"
)
# One of asyncpg's named prepared statements missing (26000), there already (42P05), or another than the
# one asyncpg prepared (08P01: bind message supplies 7 parameters, but prepared statement
# "__asyncpg_stmt_4__" requires 3). asyncpg's names never clash on a connection of its own: behind a pooler
# in transaction mode, the statement went to a server connection that another client, or an earlier
# gateway process numbering its statements from 1 too, prepared its own on. Not an error in the statement:
# retried, as another attempt may land on a server connection that suits it.
_PG_STATEMENT_STATES = frozenset({"26000", "42P05", "08P01"})
_ASYNCPG_STATEMENT = "__asyncpg_stmt_"
_TRANSACTION_POOLER = (
    "the URL most likely leads to a pooler in transaction mode (PgBouncer's pool_mode = transaction), "
    "which runs a statement prepared on one server connection on another: set transaction_pooling: true "
    "in the store's with:"
)
# PgBouncer's words, at a BEGIN, in statement mode (pool_mode = statement): it ends the client's connection,
# which asyncpg reports as closed "in the middle of operation", the words following.
_PGBOUNCER_STATEMENT_MODE = "transaction blocks not allowed in statement pooling mode"
_STATEMENT_POOLER = (
    "the URL leads to PgBouncer in statement pooling mode (pool_mode = statement), which refuses "
    "transactions: the store needs them to create its tables and to write upserts; point the URL at a pool "
    "in transaction mode (with transaction_pooling: true) or session mode"
)
POOL_SIZE = 10  # connections per action


class SetupFailed(Exception):
    """What setup was doing when the database refused it (`create table app_events_tombstones`), and the
    database's error: a table that is there is not the one to name when its tombstones or a column are
    what is missing."""

    def __init__(self, doing: str, error: Exception) -> None:
        super().__init__(f"cannot {doing}: {error}")
        self.doing = doing
        self.error = error


def _bare(name: str) -> str:
    # Table and index names are validated identifiers (letters, digits, _), so no quote is part of one.
    return name.replace('"', "")


class StaleConnection(ConnectionError):
    """A connection of the pool that cannot run a statement: its protocol is out of step with the server.
    The usual cause: the server ended the session while the connection sat idle in the pool (a restart, a
    failover, an idle timeout, pg_terminate_backend). asyncpg reads the server's last message, the reason,
    and then refuses any statement ("cannot switch to state 12; another operation (2) is in progress")
    until it notices the connection is gone."""


_STALE_CONNECTION = (
    "the connection taken from the pool was no longer usable, most likely ended by the server while idle "
    "(a restart, a failover, an idle timeout); it is closed and the pool's others are replaced, the next "
    "attempt connects again"
)
# How long the rollback of a transaction cut short may take, once the attempt's own deadline has passed.
# A server that stopped answering would otherwise hold the connection, and a slot of the pool, until TCP
# gives up on it: ten such attempts and every later one times out waiting for a free connection.
ROLLBACK_TIMEOUT = 1.0


class Postgres(Backend):
    """asyncpg with a pool created on first use, and created again after a failed creation."""

    def __init__(
        self, dsn: str, sql: Statements, table: str, *, transaction_pooling: bool | None = None
    ) -> None:
        # Imported here, not with the module: asyncpg costs about 2.6 MB of resident memory that a gateway
        # with no PostgreSQL store would carry for nothing.
        import asyncpg  # type: ignore[import-untyped]

        super().__init__(sql)
        self._asyncpg: Any = asyncpg
        self.dsn = dsn
        parts = urlsplit(dsn)
        # Host, port and database only: the URL may carry a password.
        self.where = f"postgresql {','.join(postgres_hosts(parts.netloc))}{parts.path}"
        self.lock_prefix = f"hookyard.store:{table}:"
        # Behind a pooler in transaction mode, consecutive transactions of one connection run on different
        # server connections: asyncpg's named prepared statements, kept per connection and reused, are not
        # there ("prepared statement __asyncpg_stmt_3__ does not exist"). Without its cache, asyncpg
        # prepares an unnamed statement and parses it again in the same message as its execution, so even a
        # lone statement outside a transaction runs on the server connection that parsed it. It costs a
        # parse per statement: only behind a pooler, as given or found out (None).
        self.transaction_pooling = transaction_pooling
        self._pool: Any = None
        self._pool_lock = asyncio.Lock()
        # Taken before a connection of the pool, so that a wait for one is told from a wait to connect.
        self._slots = asyncio.Semaphore(POOL_SIZE)
        self._working: set[asyncio.Task[Any]] = set()

    async def _get_pool(self) -> Any:
        pool = self._pool
        if pool is not None and not pool.is_closing():
            return pool
        async with self._pool_lock:
            if self._pool is None or self._pool.is_closing():
                self._pool = None
                # min_size=1 connects now, so a failure is reported by this attempt; asyncpg closes a pool
                # whose creation failed, and _pool stays None so that the next attempt creates a new one.
                # An established pool replaces lost connections by itself. No timeouts of the pool's own:
                # each attempt has its deadline.
                pooled = self.transaction_pooling
                if pooled is None:
                    pooled = await self._behind_pooler()
                self._pool = await self._asyncpg.create_pool(
                    self.dsn,
                    min_size=1,
                    max_size=POOL_SIZE,
                    **({"statement_cache_size": 0} if pooled else {}),
                )
            return self._pool

    async def _behind_pooler(self) -> bool:
        """Whether the URL leads to a connection pooler: a forgotten `transaction_pooling` behind one in
        transaction mode would run a statement in place of another of the same name, prepared on the server
        connection by another gateway process (a delete for an update: the same arguments). A pooler gives
        its client a process id of its own (for cancel requests, which it forwards), not the session's.
        Asked without a prepared statement, so that the question leaves none behind either. In session mode
        too, where keeping none only costs a parse per statement."""
        conn = await self._asyncpg.connect(self.dsn, statement_cache_size=0)
        try:
            pooled = conn.get_server_pid() != await conn.fetchval("SELECT pg_backend_pid()")
        finally:
            await conn.close()
        if pooled:
            log.info(
                "the store's database is behind a connection pooler: no prepared statements are kept",
                extra={"database": self.where},
            )
        return bool(pooled)

    async def _run(self, timeout: float, *steps: tuple[str, tuple[Any, ...]]) -> Any:
        """Run the statements, several in one transaction; the value of a lone statement's first row."""
        deadline = asyncio.get_running_loop().time() + timeout
        # In a task of its own, which the engine's cancellation of a late attempt does not reach: it ends by
        # the same deadline by itself. Cancelled in the middle of a rollback, asyncpg would leave the
        # transaction to the pool, which rolls it back and logs an error about it.
        work = asyncio.create_task(self._work(deadline, steps))
        self._working.add(work)
        work.add_done_callback(self._worked)
        return await asyncio.shield(work)

    def _worked(self, work: asyncio.Task[Any]) -> None:
        self._working.discard(work)
        if not work.cancelled():
            work.exception()  # read here: an attempt that was cancelled never reads it

    async def _work(self, deadline: float, steps: tuple[tuple[str, tuple[Any, ...]], ...]) -> Any:
        # One deadline for connecting, the wait for a free connection, every statement and the commit: the
        # attempt ends by its timeout, with an error that says what it waited for. With a timeout each, they
        # added up past it, and the engine cancelled the attempt instead.
        loop = asyncio.get_running_loop()
        waiting_for, written, value = "a connection to the server", False, None
        try:
            async with asyncio.timeout_at(deadline):
                pool = await self._get_pool()
                waiting_for = f"a free connection: all {POOL_SIZE} of the pool are in use"
                async with self._slots:
                    waiting_for = "a connection to the server"  # the pool replaces one it lost
                    # A timeout of the acquire's own too: it also bounds the connection's reset on release.
                    async with pool.acquire(timeout=max(deadline - loop.time(), 0.001)) as conn:
                        waiting_for = "the database (a lock held by another session, or a busy server)"
                        value = await self._execute_or_expire(pool, conn, steps)
                        written = True
        except TimeoutError:
            if written:
                return value  # the time ran out while the connection went back to the pool
            raise TimeoutError(f"timed out waiting for {waiting_for}") from None
        return value

    async def _execute_or_expire(
        self, pool: Any, conn: Any, steps: tuple[tuple[str, tuple[Any, ...]], ...]
    ) -> Any:
        try:
            return await self._execute(conn, steps)
        except self._asyncpg.PostgresError as exc:
            if _sqlstate(exc) in _PG_EXPIRES_THE_POOL:
                # Every connection of the pool: the idle ones lead to the same read-only server, or the
                # server ended their sessions too. This one is closed when it goes back to the pool, the
                # others when next taken from it.
                await pool.expire_connections()
            raise
        except self._asyncpg.exceptions.InternalClientError as exc:
            # Closed, so that the pool opens a new one instead of giving it to attempt after attempt, and
            # the others replaced when next taken: what ended this session most likely ended theirs too.
            with contextlib.suppress(Exception):
                conn.terminate()
            await pool.expire_connections()
            raise StaleConnection(f"{_STALE_CONNECTION} (asyncpg: {exc})") from exc

    @staticmethod
    async def _execute(conn: Any, steps: tuple[tuple[str, tuple[Any, ...]], ...]) -> Any:
        if len(steps) == 1:
            query, args = steps[0]
            return await conn.fetchval(query, *args)
        # BEGIN and COMMIT as statements, not asyncpg's Transaction: one whose BEGIN the deadline cancelled
        # cannot be rolled back, and the pool rolls it back on release with an error in the log.
        try:
            await conn.execute("BEGIN")
            for query, args in steps:
                await conn.execute(query, *args)
            await conn.execute("COMMIT")
        except BaseException:
            # Nothing may stay open on a connection that goes back to the pool. The first error says what
            # happened: on a connection the server closed (which rolled back by itself) the rollback fails
            # too. One whose rollback fails or takes too long is closed, and the pool opens a new one.
            try:
                async with asyncio.timeout(ROLLBACK_TIMEOUT):
                    await conn.execute("ROLLBACK")
            except Exception:
                with contextlib.suppress(Exception):  # one the server closed is the pool's already
                    conn.terminate()
            except asyncio.CancelledError:
                # Cut short by aclose (the engine stops, or a reload replaced the action): closed as well, or
                # the pool would get it with its transaction open, roll it back and log an error about it.
                with contextlib.suppress(Exception):
                    conn.terminate()
                raise
            raise
        return None

    async def connect(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await self._get_pool()

    async def setup(self, timeout: float) -> None:
        # Nothing missing, no DDL: CREATE INDEX IF NOT EXISTS takes a SHARE lock on its table even when the
        # index exists. It waits for every open transaction that wrote to the table, and every writer that
        # comes after waits behind it: a restart would hold up the app's own writes to the table.
        # A table from before a column was added is missing something too.
        missing = """
            SELECT array(SELECT name FROM unnest($1::text[]) AS name WHERE to_regclass(name) IS NULL)
                || array(SELECT name FROM unnest($3::text[]) AS name WHERE NOT EXISTS (
                    SELECT FROM pg_attribute
                    WHERE attrelid = to_regclass($2) AND attname = name AND NOT attisdropped))
        """
        sql = self.sql
        names = [name for name, _ in (*sql.tables, *sql.indexes)]
        columns = [name for name, _ in sql.added_columns]
        deadline = time.monotonic() + timeout
        absent = set(await self._run(timeout, (missing, (names, sql.tables[0][0], columns))))
        # Only what is missing: a table made by a DBA, with the app's role granted no more than it writes,
        # refuses any DDL (must be owner of table, permission denied for schema), IF NOT EXISTS or not.
        tables = [create for name, create in (*sql.tables, *sql.added_columns) if name in absent]
        if tables:
            try:
                await self._ddl(deadline, tables)
            except Exception as exc:
                raise SetupFailed(self._creating(absent), exc) from exc
        for name, create in sql.indexes:
            if name in absent:
                await self._create_index(deadline, name, create)

    def _creating(self, absent: set[str]) -> str:
        """What setup's DDL does, for its error: a DBA who made the table and not its tombstones (or an
        upsert table from before received_at) is told which is missing, not that the table cannot be made."""
        table, *others = (name for name, _ in self.sql.tables)
        if table in absent:
            return f"create table {_bare(table)}"  # the tombstones with it, if they are missing too
        doing = [f"create table {_bare(name)}" for name in others if name in absent]
        doing += [
            f"add column {name} to table {_bare(table)}"
            for name, _ in self.sql.added_columns
            if name in absent
        ]
        return " and ".join(doing)

    async def _ddl(self, deadline: float, statements: list[str]) -> None:
        # Serialized across gateways: concurrent CREATE TABLE IF NOT EXISTS can fail on PostgreSQL's catalog.
        lock = ("SELECT pg_advisory_xact_lock($1)", (_lock_id(self.lock_prefix),))
        steps = [(statement, ()) for statement in statements]
        await self._run(max(0.0, deadline - time.monotonic()), lock, *steps)

    async def _create_index(self, deadline: float, name: str, create: str) -> None:
        """Create an index, or warn when the role may not: only queries need it, the store's writes do not.
        Its own transaction, so that the tables created before it stay."""
        try:
            await self._ddl(deadline, [create])
        except self._asyncpg.PostgresError as exc:
            if _sqlstate(exc) != "42501":
                raise SetupFailed(
                    f"create index {_bare(name)} on table {_bare(self.sql.tables[0][0])}", exc
                ) from exc
            # Once per action's setup (a start, a reload), not per delivery. The statement is the store's
            # own, and `where` is host, port and database: never the URL's password.
            log.warning(
                "store: table %s has no index %s, and this role may not create it: events are written "
                "without it, but queries by its columns read the whole table. Have the table's owner run: %s",
                self.sql.tables[0][0],
                name,
                create,
                extra={"database": self.where, "error": self.describe(exc)},
            )

    async def append(self, record: Record, timeout: float) -> None:
        occurred = None if record.occurred_at is None else _utc(record.occurred_at)
        args = (record.source, record.event_id, record.type, occurred, _utc(record.received_at))
        await self._run(timeout, (self.sql.append, (*args, record.payload, record.headers)))

    async def change(self, change: Change, timeout: float) -> None:
        # Serialized per key across connections and gateways: the tombstone check and the write must not
        # interleave with a concurrent delete of the same key.
        lock = ("SELECT pg_advisory_xact_lock($1)", (_lock_id(self.lock_prefix + change.key),))
        occurred, now = _utc(change.occurred_at), _utc(time.time())
        if change.delete:
            tombstone = (change.key, occurred, change.source, change.event_id, now)
            await self._run(
                timeout,
                lock,
                (self.sql.tombstone, tombstone),
                (self.sql.delete, (change.key, occurred)),
            )
        else:
            fields = (change.key, change.data, change.source, change.event_id, change.type)
            row = (*fields, occurred, now, _utc(change.received_at))
            await self._run(
                timeout,
                lock,
                (self.sql.put, row),
                (self.sql.clear_tombstone, (change.key, occurred)),
            )

    def permanent(self, exc: Exception) -> bool:
        if isinstance(exc, self._asyncpg.exceptions.DataError):
            return True  # asyncpg refused a value for the column's type before sending it
        if self._pooled_statement(exc):
            return False
        if isinstance(exc, self._asyncpg.PostgresError):
            state = _sqlstate(exc)
            return state[:2] in _PG_PERMANENT_CLASSES and state not in _PG_FIXABLE_STATES
        return False

    def _pooled_statement(self, exc: Exception) -> bool:
        """An error of asyncpg's prepared statements that a pooler in transaction mode causes."""
        return (
            isinstance(exc, self._asyncpg.PostgresError)
            and _sqlstate(exc) in _PG_STATEMENT_STATES
            and _ASYNCPG_STATEMENT in str(getattr(exc, "message", "") or "")
        )

    def missing_table(self, exc: Exception) -> bool:
        return isinstance(exc, self._asyncpg.PostgresError) and _sqlstate(exc) == "42P01"

    def wrong_shape(self, exc: Exception) -> bool:
        # asyncpg's DataError: a parameter typed by its column (append's) that is not of the store's type.
        if isinstance(exc, self._asyncpg.exceptions.DataError):
            return True
        return isinstance(exc, self._asyncpg.PostgresError) and _sqlstate(exc) in _PG_WRONG_SHAPE

    def describe(self, exc: Exception) -> str:
        if _PGBOUNCER_STATEMENT_MODE in str(exc):
            # Retried, as a pool_mode changed meanwhile lets a later attempt through; said what to change.
            return f"{_error(exc)}; {_STATEMENT_POOLER}"
        message = getattr(exc, "message", None)
        if not isinstance(exc, self._asyncpg.PostgresError) or not message:
            return _error(exc)  # raised by asyncpg itself, not sent by the server
        if self._pooled_statement(exc):
            # In place of asyncpg's hint, which advises its own statement_cache_size: not an option here.
            return f"{type(exc).__name__}: {message}; {_TRANSACTION_POOLER}"
        # Not str(exc), which adds the server's DETAIL: for a constraint violation (class 23) that is the
        # failing row or key, the start of each value, the event's payload and headers among them. They
        # have no place in the attempt record and the log; the message names the constraint and the table.
        detail, hint = getattr(exc, "detail", None), getattr(exc, "hint", None)
        state = _sqlstate(exc)
        if state.startswith("23"):
            detail = None
        text = "; ".join(str(part).strip() for part in (message, detail, hint) if part)
        described = f"{type(exc).__name__}: {text}"
        if state == _PG_READ_ONLY:
            # The server's message alone ("cannot execute INSERT in a read-only transaction") does not say
            # why the primary would be read-only, nor that the action does something about it.
            return f"{_READ_ONLY_SERVER}: {described}"
        return described

    async def aclose(self) -> None:
        working = list(self._working)
        for work in working:
            work.cancel()  # their attempts are over: the engine stops, or a reload replaced this action
        if working:
            await asyncio.wait(working)
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            async with asyncio.timeout(5):
                await pool.close()
        except Exception:
            pool.terminate()


def _sqlstate(exc: Exception) -> str:
    return str(getattr(exc, "sqlstate", "") or "")


def _lock_id(text: str) -> int:
    """A stable signed 64-bit advisory lock id."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big", signed=True)


def _iso(timestamp: float) -> str:
    # Fixed width, so that text comparison in SQL is time order. Not %Y: it writes the year 999 as "999".
    moment = _utc(timestamp)
    return f"{moment.year:04d}" + moment.strftime("-%m-%dT%H:%M:%S.%fZ")


_SQLITE_WRONG_SHAPE = ("no such column", "has no column named", "ON CONFLICT clause does not match")


class SQLite(Backend):
    """One connection, used on one thread of its own so the event loop never blocks on the file. A daemon:
    asyncio's threads (to_thread) are joined when the interpreter exits, so one stuck on a disk that
    stopped answering, its delivery long given up on, kept the process from ever exiting."""

    def __init__(self, path: Path, sql: Statements) -> None:
        super().__init__(sql)
        self.path = path
        self.where = f"sqlite {path}"
        self._conn: sqlite3.Connection | None = None
        # The asyncio lock queues deliveries, so that one cancelled while it waits leaves no work behind.
        # The one thread is what protects the connection: a delivery cancelled by its timeout leaves its work
        # running there to the end, and the next runs after it.
        self._lock = asyncio.Lock()
        self._thread: DaemonThread | None = None

    def _connect(self, timeout: float) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                # FULL: a delivery is reported delivered only once the row is on disk.
                conn.execute("PRAGMA synchronous = FULL")
                # Wait for another writer's lock as long as the delivery may take, like command_timeout.
                conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _on_connection(self, work: Callable[[sqlite3.Connection], T], timeout: float) -> T:
        conn = self._connect(timeout)
        try:
            return work(conn)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if not self.permanent(exc):
                # Start over with a fresh connection (the file may have been replaced or remounted).
                self._conn = None
                conn.close()
            raise

    async def _run(self, work: Callable[[sqlite3.Connection], T], timeout: float) -> T:
        async with self._lock:
            return await self._on_thread(self._on_connection, work, timeout)

    def _on_thread(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        if self._thread is None:
            self._thread = DaemonThread(f"hookyard-store {self.path.name}")
        return asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    @staticmethod
    def _transaction(*steps: tuple[str, tuple[Any, ...]]) -> Callable[[sqlite3.Connection], None]:
        def work(conn: sqlite3.Connection) -> None:
            # IMMEDIATE takes the write lock first: check-then-write is atomic against other writers.
            conn.execute("BEGIN IMMEDIATE")
            for query, args in steps:
                conn.execute(query, args)
            conn.execute("COMMIT")

        return work

    async def connect(self, timeout: float) -> None:
        await self._run(lambda conn: None, timeout)

    async def setup(self, timeout: float) -> None:
        # Left open by the script, so that the columns are added in the same transaction.
        script = f"BEGIN IMMEDIATE; {self.sql.setup}"
        table = self.sql.tables[0][0]

        def create(conn: sqlite3.Connection) -> None:
            conn.executescript(script)
            present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            for column, add in self.sql.added_columns:
                if column not in present:
                    conn.execute(add)
            conn.execute("COMMIT")

        await self._run(create, timeout)

    async def append(self, record: Record, timeout: float) -> None:
        occurred = None if record.occurred_at is None else _iso(record.occurred_at)
        args = (record.source, record.event_id, record.type, occurred, _iso(record.received_at))
        await self._run(
            self._transaction((self.sql.append, (*args, record.payload, record.headers))), timeout
        )

    async def change(self, change: Change, timeout: float) -> None:
        occurred, now = _iso(change.occurred_at), _iso(time.time())
        if change.delete:
            tombstone = (change.key, occurred, change.source, change.event_id, now)
            work = self._transaction(
                (self.sql.tombstone, tombstone), (self.sql.delete, (change.key, occurred))
            )
        else:
            fields = (change.key, change.data, change.source, change.event_id, change.type)
            row = (*fields, occurred, now, _iso(change.received_at))
            work = self._transaction((self.sql.put, row), (self.sql.clear_tombstone, (change.key, occurred)))
        await self._run(work, timeout)

    def permanent(self, exc: Exception) -> bool:
        if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.ProgrammingError):
            return True
        if isinstance(exc, sqlite3.OperationalError):
            # SQLITE_ERROR is an error in the statement (no such column...); busy, locked, I/O, full,
            # read-only and cannot-open have codes of their own and are worth another attempt.
            return exc.sqlite_errorcode == sqlite3.SQLITE_ERROR and not self.missing_table(exc)
        return False

    def missing_table(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and str(exc).startswith("no such table")

    def wrong_shape(self, exc: Exception) -> bool:
        # SQLite has no codes of its own for these: SQLITE_ERROR, told apart by the message.
        return isinstance(exc, sqlite3.OperationalError) and any(
            words in str(exc) for words in _SQLITE_WRONG_SHAPE
        )

    async def aclose(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        if self._thread is not None:
            thread, self._thread = self._thread, None
            await asyncio.get_running_loop().run_in_executor(thread, close)
            thread.shutdown(wait=False)


# -- the action -----------------------------------------------------------------------------------------


def _error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Store(Action):
    name = "store"
    description = "Write events to a PostgreSQL or SQLite table: an event log, or rows kept in sync by key"
    Options = StoreOptions
    options: StoreOptions

    def __init__(self, options: Any, resources: Resources) -> None:
        super().__init__(options, resources)
        kind, location = parse_url(options.url)
        sql = statements(options.table, options.mode, kind)
        self.backend: Backend = (
            Postgres(location, sql, options.table, transaction_pooling=options.transaction_pooling)
            if kind == "postgresql"
            else SQLite(Path(location), sql)
        )
        # Tables are created on the first delivery, once (again after one was found missing).
        self._ready = False
        self._setup_lock = asyncio.Lock()

    async def deliver(self, job: Job) -> Outcome:
        try:
            write = self._prepare(job.event)
        except (TypeError, ValueError) as exc:
            return dead(f"the event cannot be stored as JSON: {exc}")
        if isinstance(write, Outcome):
            return write
        backend, table = self.backend, self.options.table
        # Connecting, creating the tables and the write share the attempt's timeout.
        deadline = time.monotonic() + job.timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        if not self._ready and (failed := await self._create_tables(left)) is not None:
            return failed
        try:
            if isinstance(write, Record):
                await backend.append(write, left())
            else:
                await backend.change(write, left())
        except Exception as exc:
            if backend.missing_table(exc):
                self._ready = False  # dropped while running: the next attempt creates it again
                return retry(f"{backend.where}: table {table} is missing: {backend.describe(exc)}")
            if backend.permanent(exc):
                return self._dead(f"{backend.where}: cannot write to {table}", exc)
            return retry(f"{backend.where}: {backend.describe(exc)}")
        return delivered()

    def _prepare(self, event: Event) -> Record | Change | Outcome:
        write = self._write(event)
        # orjson reads an integer past 64 bits as a float, which json.dumps writes with an exponent
        # (1.2345678901234568e+29): such a payload is read again, exactly, from its body. Only then, so that
        # the common payload is parsed once; text that merely holds "e+" costs a second parse, nothing else.
        if isinstance(write, Record | Change) and any("e+" in text for text in _texts(write)):
            exact = event.exact_payload()
            if exact is not None:
                write = self._write(replace(event, payload=exact))
        return write

    def _write(self, event: Event) -> Record | Change | Outcome:
        options = self.options
        if options.mode == "append":
            return Record(
                source=event.source,
                event_id=event.id,
                type=event.type,
                occurred_at=_dated(event.occurred_at),
                received_at=event.received_at,
                payload=_json(event.payload),
                headers=_json(event.headers),
            )
        assert options.key is not None  # StoreOptions requires it with upsert
        value = event.lookup(options.key)
        key = key_text(value)
        if key is None:
            found = (
                "no value"
                if value is None or value == ""
                else f"a {type(value).__name__}, not a string or number"
            )
            return skipped(f"{options.key} has {found}: no row to write")
        payload = event.payload
        data = payload["data"] if isinstance(payload, dict) and "data" in payload else payload
        delete = any(fnmatch.fnmatchcase(event.type, pattern) for pattern in options.delete_on)
        occurred_at = _dated(event.occurred_at)
        return Change(
            key=key,
            delete=delete,
            data=_json(data),
            source=event.source,
            event_id=event.id,
            type=event.type,
            occurred_at=occurred_at if occurred_at is not None else event.received_at,
            received_at=event.received_at,
        )

    async def _create_tables(self, left: Callable[[], float]) -> Outcome | None:
        """Connect and create the tables if missing; an outcome when that failed."""
        backend = self.backend
        async with self._setup_lock:
            if self._ready:
                return None
            # Whatever stops this (database down or not created yet, no such schema, no privilege) may be
            # fixed while the retry schedule runs.
            try:
                await backend.connect(left())
            except Exception as exc:
                return retry(f"{backend.where}: cannot connect: {backend.describe(exc)}")
            try:
                await backend.setup(left())
            except Exception as exc:
                doing, error = f"create table {self.options.table}", exc
                if isinstance(exc, SetupFailed):
                    doing, error = exc.doing, exc.error
                # A table made by hand (or for the other mode) without a column an index names: no later
                # attempt can create that index.
                if backend.permanent(error):
                    return self._dead(f"{backend.where}: cannot {doing}", error)
                return retry(f"{backend.where}: cannot {doing}: {backend.describe(error)}")
            self._ready = True
        return None

    def _dead(self, doing: str, exc: Exception) -> Outcome:
        """A dead outcome; for a table made by hand that lacks what the store writes, what to do about it."""
        message = f"{doing}: {self.backend.describe(exc)}"
        if not self.backend.wrong_shape(exc):
            return dead(message)
        table, mode = self.options.table, self.options.mode
        key = "PRIMARY KEY (source, event_id)" if mode == "append" else 'PRIMARY KEY ("key")'
        return dead(
            f"{message}. {table} is not of the shape the store writes: give it the {mode} columns, their "
            f"types and {key} (see the store action in docs/configuration.md), or name a table that does "
            "not exist, which the store creates; then replay the event"
        )

    async def aclose(self) -> None:
        await self.backend.aclose()


@hookimpl
def register_actions() -> list[type[Action]]:
    return [Store]
