"""`eucora db upgrade` and `eucora status` against a real PostgreSQL."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from typer.testing import CliRunner

from cli.db import app as db_app
from cli.status import app as status_app
from schemas.config import redact_url
from service.db import migrate

LATEST = migrate.latest_version()
BAD_URL = "postgresql://nobody:s3cret@127.0.0.1:1/x"
runner = CliRunner()


def test_upgrade_then_up_to_date(empty_database: str, db_mode: str, mode_label: str) -> None:
    first = runner.invoke(db_app, ["upgrade", "--database-url", empty_database, "--mode", db_mode])
    assert first.exit_code == 0, first.output
    assert f"applied 0001_initial ({db_mode})" in first.stdout
    assert f"database is now at version {LATEST} ({mode_label})" in first.stdout

    # Without --mode (auto), a later upgrade keeps the mode the schema was made in.
    again = runner.invoke(db_app, ["upgrade"], env={"EUCORA_DATABASE_URL": empty_database})
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == f"database is up to date at version {LATEST} ({mode_label})"


def test_upgrade_json(empty_database: str, db_mode: str, mode_label: str) -> None:
    result = runner.invoke(
        db_app, ["upgrade", "--database-url", empty_database, "--json", "--mode", db_mode]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["mode"] == mode_label
    assert doc["schema_version"] == LATEST
    assert doc["applied"][0] == {"version": 1, "name": "initial", "mode": db_mode}

    again = json.loads(
        runner.invoke(db_app, ["upgrade", "--database-url", empty_database, "--json"]).stdout
    )
    assert again["applied"] == []
    assert again["mode"] == mode_label


def test_upgrade_auto_uses_timescaledb_when_the_server_can_load_it(
    empty_database: str, timescaledb_version: str | None
) -> None:
    result = runner.invoke(db_app, ["upgrade", "--database-url", empty_database, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    if timescaledb_version is None:
        assert doc["mode"] == "postgresql"
        assert {m["mode"] for m in doc["applied"]} == {"postgresql"}
    else:
        assert doc["mode"] == f"timescaledb {timescaledb_version}"
        assert {m["mode"] for m in doc["applied"]} == {"timescaledb"}


def test_upgrade_unreachable_database_is_one_line_without_password() -> None:
    # A real process, so stdout and stderr are exactly what an operator sees.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cli.db import app; app()",
            "upgrade",
            "--database-url",
            BAD_URL,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 4  # unreachable (README.md, "Exit codes")
    assert proc.stdout == ""
    assert proc.stderr == (
        "error: cannot connect to database postgresql://nobody:***@127.0.0.1:1/x:"
        " connection refused\n"
    )
    assert "s3cret" not in proc.stderr


def test_upgrade_without_url_says_what_to_set() -> None:
    result = runner.invoke(db_app, ["upgrade"], env={"EUCORA_DATABASE_URL": None})
    assert result.exit_code == 2
    assert result.stderr.startswith("error: EUCORA_DATABASE_URL is not set")
    bad = runner.invoke(db_app, ["upgrade", "--database-url", "mysql://x:pw@h/db"])
    assert bad.exit_code == 2
    assert bad.stderr == (
        "error: EUCORA_DATABASE_URL must start with postgresql://, got 'mysql://x:***@h/db'\n"
    )


def test_status_json_reports_mode_and_version(
    empty_database: str, db_mode: str, mode_label: str
) -> None:
    before = runner.invoke(status_app, ["--database-url", empty_database, "--json"])
    assert before.exit_code == 1  # reachable but not migrated: not healthy
    db = json.loads(before.stdout)["database"]
    assert db["reachable"] is True
    assert db["schema_version"] == 0
    assert db["pending"] == len(migrate.load_migrations())

    upgraded = runner.invoke(
        db_app, ["upgrade", "--database-url", empty_database, "--mode", db_mode]
    )
    assert upgraded.exit_code == 0, upgraded.output
    after = runner.invoke(
        status_app, ["--json"], env={"EUCORA_DATABASE_URL": empty_database, "EUCORA_MQTT_URL": ""}
    )
    assert after.exit_code == 1, after.output  # no broker, no bridge here: not all reachable
    db = json.loads(after.stdout)["database"]
    assert db["url"] == redact_url(empty_database)  # the password never printed
    assert db["mode"] == mode_label
    assert db["schema_version"] == LATEST
    assert db["pending"] == 0
    assert db["error"] is None

    text = runner.invoke(
        status_app, ["--database-url", empty_database], env={"EUCORA_MQTT_URL": ""}
    )
    assert text.exit_code == 1
    assert "database: ok" in text.stdout and "broker: NOT OK" in text.stdout
    assert f"{LATEST} (up to date)" in text.stdout
    assert re.search(rf"^ +mode +{re.escape(mode_label)}$", text.stdout, re.MULTILINE)


def test_status_unreachable_database() -> None:
    result = runner.invoke(status_app, ["--database-url", BAD_URL, "--json"])
    assert result.exit_code == 4  # unreachable, as for every other command
    db = json.loads(result.stdout)["database"]
    assert db["reachable"] is False
    assert db["url"] == "postgresql://nobody:***@127.0.0.1:1/x"
    assert db["error"].endswith(": connection refused")
    assert "s3cret" not in result.stdout


def test_version_is_the_installed_one() -> None:
    from importlib.metadata import version

    from cli.main import app as main_app

    result = runner.invoke(main_app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"eucora {version('eucora-agent-plane')}"
