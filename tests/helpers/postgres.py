"""A fresh PostgreSQL database for a test, made on a real server and dropped after.

Use the `postgres` fixture (registered in tests/conftest.py) in any test under
tests/ (not tests/client):

    async def test_something(postgres: PostgresDatabase) -> None:
        store = PostgresStatusStore(postgres.dsn)              # in-process
        status_process(..., "--store", postgres.dsn)           # or a subprocess

Each test gets its own database, uniquely named `stepstream_test_<hex>`,
created empty on the server of STEPSTREAM_TEST_POSTGRES (default
postgresql://postgres@127.0.0.1:5432/postgres, an administrative DSN: it
needs CREATEDB) and dropped after the test, its connections terminated first
(WITH FORCE), so a test that leaves a connection or a subprocess behind does
not leak the database. For one database shared by several tests (a module
fixture) or by a bench, use `async with fresh_database() as db:` directly.

No server reachable: if env CI is true/1 the test fails, naming the DSN (CI
machines have PostgreSQL, so a skip there would hide a broken setup);
elsewhere it is skipped with one line saying how to enable it. Reachability is
probed once per session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

POSTGRES_ENV = "STEPSTREAM_TEST_POSTGRES"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
CONNECT_TIMEOUT = 5.0
HOW_TO_ENABLE = (
    f"set {POSTGRES_ENV}=postgresql://user@host:port/db, or start one: "
    "`docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:15` or `apt install postgresql`"
)

_unreachable: list[str] = []  # why the server could not be reached, once known (at most one entry)


def admin_dsn() -> str:
    return os.environ.get(POSTGRES_ENV) or DEFAULT_DSN


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true")


def with_database(dsn: str, database: str) -> str:
    """`dsn` with its database (the URL's path) replaced."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@dataclass(frozen=True)
class PostgresDatabase:
    """A database of the test's own: `dsn` reaches it (the server's user and host, no password)."""

    name: str
    dsn: str

    async def connect(self) -> asyncpg.Connection:
        """A plain connection to this database (close it)."""
        return await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT)

    async def terminate_connections(self, application_name: str | None = None) -> int:
        """pg_terminate_backend every other connection to this database (only those
        with this application_name, if given); how many were terminated."""
        admin = await asyncpg.connect(admin_dsn(), timeout=CONNECT_TIMEOUT)
        try:
            count = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid() AND ($2::text IS NULL OR application_name = $2)",
                self.name, application_name,
            )
        finally:
            await admin.close()
        return int(count)


def _give_up() -> NoReturn:
    if in_ci():
        pytest.fail(f"CI is set but {_unreachable[0]}: the PostgreSQL tests must run in CI", pytrace=False)
    pytest.skip(f"{_unreachable[0]}; to run these tests, {HOW_TO_ENABLE}")


@asynccontextmanager
async def fresh_database(prefix: str = "stepstream_test") -> AsyncIterator[PostgresDatabase]:
    """A new empty database on the test server, dropped on exit (skips or fails the test if unreachable)."""
    if _unreachable:
        _give_up()
    try:
        admin = await asyncpg.connect(admin_dsn(), timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        _unreachable.append(f"no PostgreSQL at {admin_dsn()} ({type(error).__name__}: {error})".replace("\n", " "))
    if _unreachable:
        _give_up()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield PostgresDatabase(name, with_database(admin_dsn(), name))
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def postgres() -> AsyncIterator[PostgresDatabase]:
    """A fresh database for this test (see the module docstring)."""
    async with fresh_database() as database:
        yield database
