"""Broker accounts and roles for Mosquitto's dynamic security plugin.

The initial file is written by us (not `mosquitto_ctrl dynsec init`) so that no
password ever appears on a command line; the hashing matches the plugin's own
(PBKDF2-HMAC-SHA512 over the raw salt, base64-encoded).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any

from schemas.topics import Kind, TopicTree

ADMIN_USER = "eucora-admin"
BRIDGE_USER = "eucora-bridge"
OPERATOR_USER = "eucora-operator"
CONTROL_TOPIC = "$CONTROL/dynamic-security/#"
# The plugin's own default. Every password we issue is 256 random bits, so key
# stretching would add connect-time CPU for a whole fleet without adding security.
ITERATIONS = 101


def new_password() -> str:
    return secrets.token_urlsafe(32)


def hash_password(password: str, *, salt: bytes | None = None) -> dict[str, Any]:
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": ITERATIONS,
    }


def _acl(acltype: str, topic: str, priority: int = 0) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True, "priority": priority}


def admin_role() -> dict[str, Any]:
    return {
        "rolename": "eucora-admin",
        "textDescription": "administers broker accounts ($CONTROL) only",
        "acls": [
            _acl("publishClientSend", CONTROL_TOPIC),
            _acl("publishClientReceive", CONTROL_TOPIC),
            _acl("subscribePattern", CONTROL_TOPIC),
            _acl("unsubscribePattern", CONTROL_TOPIC),
        ],
    }


def bridge_role(tree: TopicTree) -> dict[str, Any]:
    """Reads every agent topic (directly or through a shared subscription), writes tasks."""
    everything = f"{tree.root}/agents/#"
    return {
        "rolename": "eucora-bridge",
        "textDescription": "the bridge: reads all agent topics, publishes tasks",
        "acls": [
            _acl("subscribePattern", everything),
            _acl("subscribePattern", f"$share/+/{everything}"),
            _acl("publishClientReceive", everything),
            _acl("unsubscribePattern", "#"),
            _acl("publishClientSend", tree.wildcard(Kind.TASKS)),
        ],
    }


def operator_role(tree: TopicTree) -> dict[str, Any]:
    """Operators watch the fleet's status; commands go through the database."""
    status = tree.wildcard(Kind.STATUS)
    return {
        "rolename": "eucora-operator",
        "textDescription": "operator tooling: reads agent status",
        "acls": [
            _acl("subscribePattern", status),
            _acl("publishClientReceive", status),
            _acl("unsubscribePattern", "#"),
        ],
    }


def _client(username: str, password: str, role: str, text: str) -> dict[str, Any]:
    return {
        "username": username,
        "textName": text,
        **hash_password(password),
        "roles": [{"rolename": role}],
    }


def initial_config(tree: TopicTree, passwords: dict[str, str]) -> dict[str, Any]:
    """The plugin's JSON file with the admin, bridge and operator accounts."""
    return {
        "clients": [
            _client(ADMIN_USER, passwords[ADMIN_USER], "eucora-admin", "broker administration"),
            _client(BRIDGE_USER, passwords[BRIDGE_USER], "eucora-bridge", "EUCORA bridge"),
            _client(OPERATOR_USER, passwords[OPERATOR_USER], "eucora-operator", "operators"),
        ],
        "groups": [],
        "roles": [admin_role(), bridge_role(tree), operator_role(tree)],
        # Deny by default: a client can only do what a role grants it.
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


# --- runtime administration over $CONTROL ------------------------------------------

# What an agent may publish: every agent kind except the tasks it receives.
AGENT_PUBLISH_KINDS = (
    Kind.STATUS, Kind.REGISTER, Kind.HEARTBEAT, Kind.TELEMETRY, Kind.INVENTORY,
    Kind.TASK_STATUS, Kind.DEPLOYMENT_STATUS,
)  # fmt: skip
# What it may read: its tasks, and its own status (to repair a stale last will).
AGENT_READ_KINDS = (Kind.TASKS, Kind.STATUS)


def agent_role_name(agent_id: str) -> str:
    return f"agent:{agent_id}"


def agent_role(tree: TopicTree, agent_id: str) -> dict[str, Any]:
    """One role per agent: Mosquitto 2.0's dynsec ACLs have no %u/%c patterns."""
    acls = [_acl("publishClientSend", tree.agent(agent_id, k)) for k in AGENT_PUBLISH_KINDS]
    for k in AGENT_READ_KINDS:
        acls += [
            _acl("subscribePattern", tree.agent(agent_id, k)),
            _acl("publishClientReceive", tree.agent(agent_id, k)),
        ]
    # No unsubscribe ACLs: unsubscribing is allowed by default (defaultACLAccess), and
    # every byte of a role is rewritten to disk on each change (docs/broker.md).
    return {"rolename": agent_role_name(agent_id), "acls": acls}


def provision_commands(tree: TopicTree, agent_id: str, password: str) -> list[dict[str, Any]]:
    role = agent_role(tree, agent_id)
    return [
        {"command": "createRole", "rolename": role["rolename"], "acls": role["acls"]},
        {
            "command": "createClient",
            "username": agent_id,
            # The agent must connect with client id == username: nobody else can take
            # its session over, and the broker ties the topic id to the identity.
            "clientid": agent_id,
            "password": password,
            "roles": [{"rolename": role["rolename"]}],
        },
    ]


def add_agents(config: dict[str, Any], tree: TopicTree, passwords: dict[str, str]) -> None:
    """Add agents to the plugin's JSON document itself, for a broker that is stopped.

    The fast path for enrolling a whole fleet: at runtime the plugin rewrites its entire
    file after every command, so N agents cost O(N^2) (docs/broker.md).
    """
    taken = {c["username"] for c in config["clients"]}
    roles = {r["rolename"] for r in config["roles"]}
    for agent_id, password in passwords.items():
        if agent_id in taken:
            raise ValueError(f"account {agent_id!r} already exists")
        role = agent_role(tree, agent_id)
        if role["rolename"] not in roles:
            config["roles"].append(role)
        config["clients"].append({
            "username": agent_id,
            "clientid": agent_id,
            **hash_password(password),
            "roles": [{"rolename": role["rolename"]}],
        })  # fmt: skip
        taken.add(agent_id)


def revoke_commands(agent_id: str) -> list[dict[str, Any]]:
    # deleteClient disconnects a connected client at once (2.0.11: "administrative
    # action", without publishing its will); the role is then of no use to anyone.
    return [
        {"command": "deleteClient", "username": agent_id},
        {"command": "deleteRole", "rolename": agent_role_name(agent_id)},
    ]


class DynsecError(RuntimeError):
    def __init__(self, command: str, error: str):
        super().__init__(f"{command}: {error}")
        self.command = command
        self.error = error
