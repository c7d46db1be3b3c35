"""Per-kind handlers for the low-rate message kinds.

Each module registers its handlers with `service.bridge.store.handles(kind)`; they run
inside the batch's transaction, so their writes commit (and the message is
acknowledged) together with the rest of the batch. Importing this package registers
them all.
"""

from service.bridge.handlers import agents, inventory, tasks

__all__ = ["agents", "inventory", "tasks"]
