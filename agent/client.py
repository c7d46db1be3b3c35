"""paho's client as agents (the reference agent and every simulated one) use it."""

from __future__ import annotations

import socket
from typing import Any

import paho.mqtt.client as paho


class AgentClient(paho.Client):
    """paho's client, connecting without binding its socket first.

    paho binds every socket to `(bind_address, bind_port)` before connecting, which is
    `("", 0)` when none is set: an ephemeral port taken before the kernel knows the
    destination, so unique among *all* of the host's bound sockets. One agent does
    not notice; a simulator holding tens of thousands of connections does: each
    bind searched a range filling up (8 ms a call at 20,000 connections, most of the
    simulator's system time), and the range (28,000 ports here) capped the whole
    machine's fleet. Left to connect(), the kernel picks a port per destination.
    """

    def _create_socket_connection(self) -> Any:
        if self._bind_address or self._bind_port or self._get_proxy():
            return super()._create_socket_connection()
        return socket.create_connection((self._host, self._port), timeout=self._connect_timeout)
