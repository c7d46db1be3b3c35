"""The EUCORA reference agent and fleet simulator.

Both speak the protocol through the same modules: `protocol` (topics, payloads, epochs,
the own-status rule), `buffer` (telemetry kept while disconnected), `session` (one
agent's MQTT session), `loop` (many paho clients on one thread). `host` reports on
this machine (psutil, dpkg, Python), `simulator` on imaginary ones. `cli` is the
endpoint's command (`eucora-agent run`, `python -m agent run`).

This package stands alone: it imports `schemas` and itself, never `service` or `cli`,
so an endpoint installs it without the server's dependencies
(tests/test_architecture.py, tests/test_layering.py).
"""
