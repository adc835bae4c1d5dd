"""Keeps an :class:`~service.engine.Engine` equal to the state in Redis: a full load at start-up, then a
follower thread that applies other replicas' writes from the event stream (and catches up after Redis
outages, since the stream is durable)."""

from __future__ import annotations

import logging
import threading

import redis

from service.engine import Engine
from service.state import Event, RedisState

log = logging.getLogger(__name__)


def load_state(engine: Engine, state: RedisState) -> str:
    """Apply everything in Redis to ``engine``; returns the stream position to follow from. The position
    is read first, so writes racing with the load are applied again (every apply is idempotent)."""
    position = state.last_event_id()
    for item in state.all_items(engine.dim):
        engine.upsert(item.item_id, item.row, item.embedding, item.states)
    for item_id in state.deleted_items():
        engine.delete(item_id)
    engine.known_rows.update(state.online_rows())  # deleted online items too, for their interactions
    for user_id, item_ids in state.all_user_items().items():
        for item_id in item_ids:
            engine.record_interaction(user_id, item_id)
    return position


def apply_event(engine: Engine, state: RedisState, event: Event) -> None:
    if event.type == "item":
        item = state.get_item(event.item_id, engine.dim)
        if item is not None:  # None: deleted again since; its delete event follows
            engine.upsert(item.item_id, item.row, item.embedding, item.states)
    elif event.type == "delete":
        engine.delete(event.item_id)
    elif event.type == "interaction" and event.user_id is not None:
        engine.record_interaction(event.user_id, event.item_id)


class Follower(threading.Thread):
    """Tails the event stream; marks itself disconnected while Redis is unreachable."""

    def __init__(self, engine: Engine, state: RedisState, position: str, block_ms: int = 200) -> None:
        super().__init__(name="redis-follower", daemon=True)
        self.engine, self.state, self.position, self.block_ms = engine, state, position, block_ms
        self.connected = True
        self._stopping = threading.Event()

    def run(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                events = self.state.read_events(self.position, self.block_ms)
                if not self.connected:
                    log.info("redis reachable again; caught up from %s", self.position)
                self.connected, backoff = True, 0.1
            except redis.RedisError as exc:
                if self.connected:
                    log.warning("redis unreachable (%s); serving reads from memory", type(exc).__name__)
                self.connected = False
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            for event in events:
                if event.origin != self.state.origin:
                    try:
                        apply_event(self.engine, self.state, event)
                    except redis.RedisError:
                        break  # retry this event after reconnecting
                self.position = event.stream_id

    def stop(self) -> None:
        self._stopping.set()
