"""The read-only role Grafana connects as (migration 0012 creates it without a login).

`grant_login` gives it a login with a password: `eucora stack up` does so with the
stack's own secret (`secrets.json` "grafana", or EUCORA_GRAFANA_DB_PASSWORD when set,
as compose.yaml does), so the password is never in the repository.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

ROLE = "eucora_grafana"
PASSWORD_ENV = "EUCORA_GRAFANA_DB_PASSWORD"  # noqa: S105 (a variable name)


def grant_login(conn: psycopg.Connection[Any], password: str) -> bool:
    """Let the role log in with `password`; False when the role does not exist or this
    account may not change it (the dashboards then need an administrator's help)."""
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone() is None:
        return False
    try:
        with conn.transaction():
            # ALTER ROLE takes no parameters: the password goes in as a quoted literal.
            conn.execute(
                sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(ROLE), sql.Literal(password)
                )
            )
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True
