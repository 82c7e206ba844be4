"""Flower's simulation engine at population scale: one scan of the waiting messages per poll.

Flower 1.42's simulation engine hands messages to its workers from a thread that, every 0.1 s,
asks the link state for each registered node's next message, and each ask scans every stored
message: O(nodes x messages) per poll. With 100,000 virtual devices that loop alone takes the
GIL for seconds each poll, so every round slows down with the population, and the one-off device
check-in (a message to every node) becomes O(N^2). `fast_message_polling()` swaps that thread's
function for one that scans the waiting messages once per poll and delivers at most one message
per node, as Flower's does: the same messages, in the same per-node order, for O(messages).

It only touches Flower's in-memory link state (what `run_simulation` uses) and only the Flower
versions it was written against; anything else keeps Flower's own function.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from queue import Queue
from typing import Any

import flwr
from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now

log = logging.getLogger(__name__)

KNOWN_VERSIONS = ("1.42.",)


def add_messages_to_queue(
    state: Any,
    queue: Queue[Message],
    nodes_mapping: dict[int, int],
    f_stop: threading.Event,
) -> None:
    """Put each node's next undelivered message in the workers' queue, every 0.1 s."""
    if not isinstance(state, InMemoryLinkState):
        return _FLOWER_ADD_MESSAGES(state, queue, nodes_mapping, f_stop)
    while not f_stop.is_set():
        for msg in _take_waiting(state, nodes_mapping):
            queue.put(msg)
        f_stop.wait(0.1)
    return None


def _take_waiting(state: InMemoryLinkState, nodes: dict[int, int]) -> list[Message]:
    """The oldest undelivered message of every node that has one, marked delivered."""
    with state.lock:
        waiting = [
            msg_id
            for msg_id, msg in state.message_ins_store.items()
            if msg.metadata.delivered_at == "" and msg.metadata.dst_node_id in nodes
        ]
        state._check_stored_messages(set(waiting))  # Flower's expiry and federation checks
        taken: dict[int, Message] = {}
        for msg_id in waiting:
            msg = state.message_ins_store.get(msg_id)
            if msg is not None and msg.metadata.dst_node_id not in taken:
                taken[msg.metadata.dst_node_id] = msg
        delivered_at = now().isoformat()
        for msg in taken.values():
            msg.metadata.delivered_at = delivered_at
        return list(taken.values())


_FLOWER_ADD_MESSAGES = vce_api.add_messages_to_queue


@contextmanager
def fast_message_polling():
    """Within the block, Flower's simulation engine polls messages in O(messages)."""
    if not flwr.__version__.startswith(KNOWN_VERSIONS):
        log.warning("flwr %s: keeping Flower's own message polling", flwr.__version__)
        yield
        return
    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = _FLOWER_ADD_MESSAGES
