"""The EUCORA reference agent and fleet simulator.

Both speak the protocol through the same modules: `protocol` (topics, payloads, epochs,
the own-status rule), `buffer` (telemetry kept while disconnected), `session` (one
agent's MQTT session), `loop` (many paho clients on one thread). `host` reports on
this machine (psutil, dpkg, Python), `simulator` on imaginary ones.
"""
