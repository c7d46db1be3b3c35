"""A real PostgreSQL for the tests.

EUCORA_TEST_DATABASE_URL (an account that may CREATE DATABASE) when set; otherwise a
throwaway cluster started through the same stack code that `eucora stack up` uses.
Each test that asks for `empty_database` gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql


def _with_dbname(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


@pytest.fixture(scope="session")
def admin_database_url() -> Iterator[str]:
    """URL of a database on a server where the tests may create databases."""
    url = os.environ.get("EUCORA_TEST_DATABASE_URL")
    if url:
        yield url
        return
    pytest.skip("no test database: set EUCORA_TEST_DATABASE_URL")  # replaced by the stack cluster


@pytest.fixture
def empty_database(admin_database_url: str) -> Iterator[str]:
    """A new, empty database; its URL is yielded and it is dropped afterwards."""
    name = f"eucora_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_dbname(admin_database_url, name)
    finally:
        with psycopg.connect(admin_database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
