"""The local stack: broker + database + bridge in one folder (`eucora stack up/down/status`).

The README's demo and the test fixtures both go through this module, so what the
tests start is what a user starts. State lives in the folder: `stack.json` (ports,
pids) and `secrets.json` (generated passwords, mode 0600, never printed in logs).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.config import DEFAULT_TOPIC_ROOT
from schemas.topics import TopicTree
from service import dynsec
from service.config import ADMIN_URL_ENV
from service.stack.broker import Broker
from service.stack.database import Cluster
from service.stack.process import StackError, alive, free_port, spawn, stop_pid, wait_for

DEFAULT_DIR = Path(".stack")
DEFAULT_MQTT_PORT = 11883
DEFAULT_MQTTS_PORT = 18883
DEFAULT_DB_PORT = 15432


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except FileNotFoundError:
        return {}


def _write_private(path: Path, data: dict[str, Any]) -> None:
    path.touch(mode=0o600, exist_ok=True)
    os.chmod(path, 0o600)
    path.write_text(json.dumps(data, indent=2) + "\n")


@dataclass
class Stack:
    dir: Path

    def __post_init__(self) -> None:
        self.dir = self.dir.resolve()

    # --- persistent state ---------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.dir / "stack.json"

    def state(self) -> dict[str, Any]:
        return _load_json(self.state_file)

    def _save_state(self, **changes: Any) -> None:
        state = self.state() | changes
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")

    def secrets(self) -> dict[str, str]:
        """Generated once per stack folder, then reused so accounts keep working."""
        path = self.dir / "secrets.json"
        data = _load_json(path)
        wanted = [dynsec.ADMIN_USER, dynsec.BRIDGE_USER, dynsec.OPERATOR_USER, "database"]
        if not all(k in data for k in wanted):
            data = {k: data.get(k) or dynsec.new_password() for k in wanted}
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_private(path, data)
        return data

    # --- parts --------------------------------------------------------------
    def broker(self, port: int | None = None, extra: str = "") -> Broker:
        st = self.state()
        return Broker(
            data_dir=self.dir / "mosquitto",
            port=port or st.get("mqtt_port") or DEFAULT_MQTT_PORT,
            passwords=self.secrets(),
            tree=TopicTree(st.get("topic_root", DEFAULT_TOPIC_ROOT)),
            extra=extra or st.get("broker_extra", ""),
            tls_port=st.get("mqtts_port"),
            ca_dir=self.dir / "ca",
            bind=st.get("mqtt_bind", "127.0.0.1"),
        )

    def cluster(self, port: int | None = None, durable: bool | None = None) -> Cluster:
        st = self.state()
        return Cluster(
            root=self.dir / "postgres",
            port=port or st.get("db_port") or DEFAULT_DB_PORT,
            password=self.secrets()["database"],
            durable=st.get("durable", True) if durable is None else durable,
        )

    @property
    def bridge_log(self) -> Path:
        return self.dir / "bridge.log"

    def mqtt_url(self, user: str = dynsec.OPERATOR_USER) -> str:
        return self.broker().url(user)

    def database_url(self) -> str:
        external: str | None = self.state().get("external_database_url")
        return external or self.cluster().url

    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.state().get('metrics_port')}"

    # --- lifecycle ----------------------------------------------------------
    def up(
        self,
        *,
        mqtt_port: int | None = None,
        mqtts_port: int | None = None,
        bind: str | None = None,
        db_port: int | None = None,
        metrics_port: int | None = None,
        database_url: str | None = None,
        topic_root: str = DEFAULT_TOPIC_ROOT,
        bridge: bool = True,
        durable: bool = True,
        broker_extra: str = "",
    ) -> dict[str, Any]:
        """Start whatever is not running yet; return the URLs to use."""
        from service.db import migrate  # the database layer is only needed here

        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)  # noqa: S103 (the broker and database accounts walk through it)
        st = self.state()
        mqtt_port = mqtt_port or st.get("mqtt_port") or DEFAULT_MQTT_PORT
        self._save_state(
            dir=str(self.dir),
            mqtt_port=mqtt_port,
            mqtt_bind=bind or st.get("mqtt_bind", "127.0.0.1"),
            # TLS listener: 18883 beside the default 11883; a stack moved to another
            # plain port (a second stack, a test) gets a free TLS port instead of
            # colliding on 18883. `stack env` tells which.
            mqtts_port=mqtts_port
            or st.get("mqtts_port")
            or (DEFAULT_MQTTS_PORT if mqtt_port == DEFAULT_MQTT_PORT else free_port()),
            db_port=db_port or st.get("db_port") or DEFAULT_DB_PORT,
            metrics_port=metrics_port or st.get("metrics_port") or free_port(),
            external_database_url=database_url or st.get("external_database_url"),
            topic_root=topic_root,
            durable=durable,
            broker_extra=broker_extra,
        )
        self.broker().start()
        if not self.state().get("external_database_url"):
            self.cluster().start()
        migrate.upgrade(self.database_url())
        if bridge:
            self.start_bridge()
        return self.urls()

    def urls(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir),
            "mqtt_url": self.mqtt_url(),
            "database_url": self.database_url(),
            "metrics_url": self.metrics_url(),
        }

    def env(self) -> dict[str, str]:
        """What an operator's shell needs (`eucora stack env`): the operator's broker URL,
        the admin URL for `agents provision/revoke`, and the TLS endpoint and CA that
        provisioned agents are given."""
        st = self.state()
        broker = self.broker()
        env = {
            "EUCORA_MQTT_URL": broker.url(dynsec.OPERATOR_USER),
            ADMIN_URL_ENV: broker.url(dynsec.ADMIN_USER),
            "EUCORA_DATABASE_URL": self.database_url(),
            "EUCORA_TOPIC_ROOT": st.get("topic_root", DEFAULT_TOPIC_ROOT),
        }
        if broker.tls_port is not None:
            env["EUCORA_AGENT_MQTT_URL"] = broker.tls_url()
            env["EUCORA_CA_FILE"] = str(broker.ca.cert_file)
        return env

    def bridge_env(self) -> dict[str, str]:
        st = self.state()
        return {
            "EUCORA_MQTT_URL": self.broker().url(dynsec.BRIDGE_USER),
            "EUCORA_DATABASE_URL": self.database_url(),
            "EUCORA_TOPIC_ROOT": st.get("topic_root", DEFAULT_TOPIC_ROOT),
            "EUCORA_METRICS_PORT": str(st["metrics_port"]),
        }

    def start_bridge(self, timeout: float = 30.0) -> int:
        pid: int | None = self.state().get("bridge_pid")
        if alive(pid):
            assert pid is not None
            return pid
        env = os.environ | self.bridge_env()
        proc = spawn([sys.executable, "-m", "cli", "bridge", "run"], self.bridge_log, env)
        self._save_state(bridge_pid=proc.pid)
        try:
            wait_for(
                lambda: self.bridge_ready() or proc.poll() is not None,
                timeout,
                "the bridge to become ready",
            )
        except StackError:
            proc.kill()
            raise
        if proc.poll() is not None:
            raise StackError(
                f"the bridge exited with code {proc.returncode}; see {self.bridge_log}"
            )
        return proc.pid

    def bridge_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.metrics_url() + "/readyz", timeout=1) as resp:  # noqa: S310 (our own loopback URL)
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop_bridge(self) -> None:
        stop_pid(self.state().get("bridge_pid"))

    def down(self) -> None:
        self.stop_bridge()
        self.broker().stop()
        if not self.state().get("external_database_url"):
            self.cluster().stop()

    def status(self) -> dict[str, Any]:
        st = self.state()
        broker = self.broker()
        bridge_pid = st.get("bridge_pid")
        external = bool(st.get("external_database_url"))
        cluster = self.cluster()
        return {
            "broker": {"pid": broker.pid, "running": broker.running, "port": broker.port},
            "database": {
                "pid": None if external else cluster.pid,
                "running": None if external else cluster.running,
                "port": None if external else cluster.port,
                "external": external,
            },
            "bridge": {
                "pid": bridge_pid,
                "running": alive(bridge_pid),
                "ready": self.bridge_ready() if alive(bridge_pid) else False,
                "metrics_url": self.metrics_url(),
            },
        }
