"""Real nats-server processes with JetStream: one server, or a 3-node cluster on loopback.

Each test gets its own servers on free ports with their own store folders (never the
system's server), killed and removed afterwards.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator

import pytest

from service.stack.nats import NatsServer
from service.stack.process import free_port, free_port_range
from tests.fix_services import service_dir


@pytest.fixture
def nats_factory() -> Iterator[Callable[[], NatsServer]]:
    """make() -> a started single nats-server with JetStream."""
    with contextlib.ExitStack() as cleanup:

        def make() -> NatsServer:
            root = cleanup.enter_context(service_dir("nats"))
            server = NatsServer(data_dir=root / "nats", port=free_port(), password=uuid.uuid4().hex)
            cleanup.callback(server.kill)  # before the folder goes (last in, first out)
            server.start()
            return server

        yield make


@pytest.fixture
def nats_server(nats_factory: Callable[[], NatsServer]) -> NatsServer:
    return nats_factory()


@pytest.fixture
def nats_cluster() -> Iterator[list[NatsServer]]:
    """Three nats-servers forming one JetStream cluster (a run of six free ports: three
    client ports, then three cluster ports)."""
    password = uuid.uuid4().hex
    first_client = free_port_range(6)
    first_route = first_client + 3
    with contextlib.ExitStack() as cleanup:
        root = cleanup.enter_context(service_dir("nats-cluster"))
        routes = [first_route + i for i in range(3)]
        nodes = [
            NatsServer(
                data_dir=root / f"n{i + 1}",
                port=first_client + i,
                password=password,
                name=f"n{i + 1}",
                cluster_port=routes[i],
                routes=[p for p in routes if p != routes[i]],
            )
            for i in range(3)
        ]
        for node in nodes:
            cleanup.callback(node.kill)
            node.start()
        yield nodes


def cluster_url(nodes: list[NatsServer]) -> str:
    """EUCORA_EVENTS_URL for a cluster: every member, comma-separated."""
    return ",".join(n.url() for n in nodes)
