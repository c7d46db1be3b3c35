"""A real PostgreSQL for the tests.

EUCORA_TEST_DATABASE_URL (an account that may CREATE DATABASE) when set; otherwise a
throwaway cluster made with the system's binaries through the same stack code that
`eucora stack up` uses. Each test that asks for `empty_database` gets a database of its
own, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from service.stack.database import Cluster
from service.stack.process import free_port
from tests.fix_services import service_dir


def with_dbname(url: str, dbname: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{dbname}"))


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster | None]:
    """The private test cluster (None when EUCORA_TEST_DATABASE_URL names a server)."""
    if os.environ.get("EUCORA_TEST_DATABASE_URL"):
        yield None
        return
    with service_dir("pg") as root:
        cluster = Cluster(
            root=root / "postgres", port=free_port(), password=uuid.uuid4().hex, durable=False
        )
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop(mode="immediate")


@pytest.fixture(scope="session")
def admin_database_url(pg_cluster: Cluster | None) -> str:
    """URL of a database on a server where the tests may create databases."""
    if pg_cluster is None:
        return os.environ["EUCORA_TEST_DATABASE_URL"]
    return pg_cluster.url_for("postgres")


@pytest.fixture
def empty_database(admin_database_url: str) -> Iterator[str]:
    """A new, empty database; its URL is yielded and it is dropped afterwards."""
    name = f"eucora_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_dbname(admin_database_url, name)
    finally:
        with psycopg.connect(admin_database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def database(empty_database: str) -> str:
    """A new database with every migration applied."""
    from service.db import migrate

    migrate.upgrade(empty_database)
    return empty_database
