"""`eucora stack up/status/down` exactly as the README's demo runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import psycopg
from cryptography import x509

from service.stack.process import free_port, free_port_range
from tests.fix_services import service_dir


def eucora(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=os.environ | env,
    )


def certificate_names(path: Path) -> tuple[set[str], set[str]]:
    """The DNS names and IP addresses a certificate file is valid for."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        set(san.get_values_for_type(x509.DNSName)),
        {str(ip) for ip in san.get_values_for_type(x509.IPAddress)},
    )


def test_stack_up_status_down() -> None:
    with service_dir("stack") as root:
        d = str(Path(root) / "s")
        ports = ["--mqtt-port", str(free_port_range(1)), "--db-port", str(free_port())]
        up = eucora(
            "stack", "up", "--dir", d, *ports, "--json",
            "--tls-name", "mqtt.example.com", "--tls-name", "2001:db8::1",
            EUCORA_TLS_NAMES="10.20.30.40, agents.corp.lan",
        )  # fmt: skip
        try:
            assert up.returncode == 0, up.stderr
            # The names agents dial are in the broker's certificate, beside the defaults.
            dns, ips = certificate_names(Path(d) / "mosquitto/tls/server.pem")
            assert {"mqtt.example.com", "agents.corp.lan", "localhost"} <= dns
            assert {"10.20.30.40", "2001:db8::1", "127.0.0.1"} <= ips
            urls = json.loads(up.stdout)
            assert set(urls) == {"dir", "mqtt_url", "mqtt_urls", "database_url", "metrics_url"}
            assert urls["mqtt_url"].startswith("mqtt://eucora-operator:")
            assert urls["mqtt_urls"] == [urls["mqtt_url"]]
            # The database is migrated and reachable at the printed URL.
            with psycopg.connect(urls["database_url"]) as conn:
                assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] >= 1
            with urllib.request.urlopen(urls["metrics_url"] + "/readyz", timeout=5) as r:  # noqa: S310
                assert r.status == 200

            st = eucora("stack", "status", "--dir", d, "--json")
            assert st.returncode == 0, st.stderr
            status = json.loads(st.stdout)
            assert all(status[p]["running"] for p in ("broker", "database", "bridge"))

            env = eucora("stack", "env", "--dir", d)
            assert env.returncode == 0, env.stderr
            exports = dict(
                line.removeprefix("export ").split("=", 1) for line in env.stdout.splitlines()
            )
            assert exports["EUCORA_MQTT_URL"] == f"'{urls['mqtt_url']}'"
            assert exports["EUCORA_AUTH_DIR"] == f"'{Path(d).resolve() / 'auth'}'"
            assert exports["EUCORA_CA_FILE"].endswith("/ca/ca.pem'")
            assert "EUCORA_MQTT_ADMIN_URL" not in exports

            again = eucora("stack", "up", "--dir", d, "--json")  # idempotent
            assert again.returncode == 0, again.stderr
            # A new name needs the brokers restarted: said in one line, nothing changed.
            more = eucora("stack", "up", "--dir", d, "--tls-name", "new.example.com")
            assert more.returncode == 2 and "stack down" in more.stderr, more.stderr
            assert json.loads(again.stdout)["mqtt_url"] == urls["mqtt_url"]
        finally:
            down = eucora("stack", "down", "--dir", d)
        assert down.returncode == 0, down.stderr
        st = eucora("stack", "status", "--dir", d, "--json")
        assert st.returncode == 1
        assert not any(
            json.loads(st.stdout)[p]["running"] for p in ("broker", "database", "bridge")
        )
        # No secret reached the logs the stack keeps.
        secrets = json.loads((Path(d) / "secrets.json").read_text())
        logs = (Path(d) / "bridge.log").read_text() + (
            Path(d) / "mosquitto/mosquitto.log"
        ).read_text()
        for value in secrets.values():
            assert value not in logs


def test_stack_refuses_a_bad_tls_name() -> None:
    with service_dir("stack") as root:
        bad = eucora("stack", "up", "--dir", str(root / "s"), EUCORA_TLS_NAMES="ok.lan,bad name")
        assert bad.returncode == 2
        assert bad.stderr.splitlines() == [
            "error: --tls-name / EUCORA_TLS_NAMES: 'bad name' is neither an IP address nor a"
            " DNS name"
        ]
        assert not (root / "s").exists()


def test_stack_status_without_stack_says_so() -> None:
    with service_dir("stack") as root:
        st = eucora("stack", "status", "--dir", str(root / "none"))
        assert st.returncode == 1
        assert st.stderr.startswith("error: no stack in")


def test_stack_in_the_foreground_stops_on_sigterm() -> None:
    """What compose.yaml and service managers run: the stack lives as long as the command."""
    import signal

    with service_dir("stack") as root:
        d = str(root / "fg")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "stack", "up", "--dir", d, "--foreground", "--json",
             "--mqtt-port", str(free_port_range(1)), "--db-port", str(free_port())],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            urls = json.loads(_json_doc(proc))
            with psycopg.connect(urls["database_url"]) as conn:
                conn.execute("SELECT 1")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            proc.stdout.close()  # type: ignore[union-attr]
        status = json.loads(eucora("stack", "status", "--dir", d, "--json").stdout)
        assert not any(status[p]["running"] for p in ("broker", "database", "bridge"))


def _json_doc(proc: subprocess.Popen[str]) -> str:
    """The pretty-printed JSON document the command prints, up to its closing brace."""
    assert proc.stdout is not None
    lines = []
    while True:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("}") or not line:
            return "".join(lines)
