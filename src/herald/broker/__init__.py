"""Brokers carry change events from the dispatcher to the live streams. In-process for one node;
the Protocol is the seam for a networked one (Redis) that reaches streams on other nodes."""

from herald.broker.base import Broker, Listener
from herald.broker.memory import MemoryBroker

__all__ = ["Broker", "Listener", "MemoryBroker"]
