"""Keeps an :class:`~service.engine.Engine` equal to the state in Redis: a full load at start-up (and on
reload), then a follower thread that applies other writers' events from the stream, catches up after Redis
outages (the stream is durable), and asks for a full rebuild when it cannot catch up (the stream was
trimmed past its position, or Redis came back without the data it had)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

import redis

from service.engine import Engine
from service.request_errors import InputError
from service.state import Event, RedisState, StoredItem

log = logging.getLogger(__name__)


class IncompatibleState(RuntimeError):
    """Items stored online do not fit the modalities of the artifact being loaded."""


def stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def fused_for(engine: Engine, items: list[StoredItem]) -> list[StoredItem]:
    """``items`` with embeddings valid for ``engine``: stored ones computed by the same artifact are used
    as they are, the others are fused again from their stored raw features by this engine's model."""
    stale = [it for it in items if it.artifact_id != engine.artifact_id]
    if stale:
        try:
            matrix = engine.feature_matrix([it.features for it in stale])
            embeddings, states = engine.fuse(matrix)
        except InputError as exc:
            bad = next((it.item_id for it in stale if not _fits(engine, it.features)), stale[0].item_id)
            raise IncompatibleState(
                f"online item {bad!r} stored in Redis cannot be served by artifact {engine.artifact_id} "
                f"(modalities {engine.modalities}): {exc}"
            ) from None
        for it, emb, st in zip(stale, embeddings, states, strict=True):
            it.embedding, it.states, it.artifact_id = emb, st, engine.artifact_id
    return items


def _fits(engine: Engine, features: dict[str, list[float]]) -> bool:
    return set(features) == set(engine.modalities) and all(len(features[m]) == d for m, d in engine.modalities.items())


def incompatible_items(engine: Engine, items: Iterable[StoredItem]) -> list[str]:
    return [it.item_id for it in items if not _fits(engine, it.features)]


def load_state(engine: Engine, state: RedisState, chunk: int = 512) -> str:
    """Apply everything in Redis to ``engine``; returns the stream position to follow from. The position
    is read first, so writes racing with the load are applied again (every apply is idempotent).
    Raises :class:`IncompatibleState` if stored items do not fit the engine's modalities."""
    position = state.last_event_id()
    items = list(state.all_items(engine.dim))
    bad = incompatible_items(engine, items)
    if bad:
        raise IncompatibleState(
            f"{len(bad)} online item(s) stored in Redis namespace {state.ns!r} (e.g. {bad[0]!r}) do not have "
            f"the modalities {engine.modalities} of artifact {engine.artifact_id}"
        )
    for start in range(0, len(items), chunk):
        fused = fused_for(engine, items[start : start + chunk])
        engine.upsert_many([(it.item_id, it.row, it.embedding, it.states, it.updated) for it in fused])
    for item_id in state.deleted_items():
        engine.delete(item_id)
    # Deleted online items too, for their interactions; a training item keeps its training row.
    engine.catalog.remember_online_rows(state.online_rows())
    for user_id, item_ids in state.all_user_items().items():
        for item_id in item_ids:
            engine.record_interaction(user_id, item_id)
    return position


def sync_item(engine: Engine, state: RedisState, item_id: str) -> None:
    """Make ``engine``'s copy of one item equal to what Redis holds now (whatever the event said: an older
    event must not undo a newer write)."""
    item = state.get_item(item_id, engine.dim)
    if item is not None:
        item = fused_for(engine, [item])[0]
        engine.upsert(item.item_id, item.row, item.embedding, item.states, item.updated)
    elif state.r.sismember(state.key("deleted"), item_id):
        engine.delete(item_id)


def apply_event(engine: Engine, state: RedisState, event: Event) -> None:
    if event.type in ("item", "delete"):
        sync_item(engine, state, event.item_id)
    elif event.type == "interaction" and event.user_id is not None:
        engine.record_interaction(event.user_id, event.item_id)


class Follower(threading.Thread):
    """Tails the event stream for one engine; marks itself disconnected while Redis is unreachable.

    Every apply holds ``write_lock`` (shared with the local write path), so a local write and an event
    for the same item cannot interleave between reading Redis and updating the engine. ``resync`` is
    called (once) when the stream cannot bring the engine up to date; it must rebuild the engine."""

    def __init__(
        self,
        engine: Engine,
        state: RedisState,
        position: str,
        block_ms: int = 200,
        write_lock: threading.RLock | None = None,
        resync: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name="redis-follower", daemon=True)
        self.engine, self.state, self.position, self.block_ms = engine, state, position, block_ms
        self.write_lock = write_lock or threading.RLock()
        self.resync = resync
        self.connected = True
        self.applied = 0
        self._stopping = threading.Event()

    def gap(self) -> str | None:
        """Why the stream cannot bring this engine up to date from ``position``, or None."""
        if self.position == "0-0":
            return None
        last = self.state.last_event_id()
        if last == "0-0" or stream_id(last) < stream_id(self.position):
            return f"the event stream is behind this replica (last {last}, seen {self.position}): Redis lost data"
        first = self.state.first_event_id()
        if first is not None and stream_id(first) > stream_id(self.position):
            return f"the event stream was trimmed past this replica's position {self.position}"
        return None

    def run(self) -> None:
        backoff, check_gap = 0.1, True
        while not self._stopping.is_set():
            try:
                if check_gap:
                    reason = self.gap()
                    check_gap = False
                    if reason is not None:
                        log.warning("%s; rebuilding the index from Redis", reason)
                        if self.resync is not None:
                            self.resync(reason)
                        return
                events = self.state.read_events(self.position, self.block_ms)
                if not self.connected:
                    log.info("redis reachable again; catching up from %s", self.position)
                self.connected, backoff = True, 0.1
            except Exception as exc:  # RedisError, or a connection closed under it at shutdown
                if self._stopping.is_set():
                    return
                if self.connected:
                    log.warning("redis unreachable (%s); serving reads from memory", type(exc).__name__)
                    if not isinstance(exc, redis.RedisError):
                        log.exception("unexpected error reading the event stream")
                self.connected, check_gap = False, True
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            for event in events:
                if self._stopping.is_set():
                    return
                if event.origin != self.engine.origin:
                    try:
                        with self.write_lock:
                            apply_event(self.engine, self.state, event)
                    except redis.RedisError:
                        break  # retry this event after reconnecting
                    except Exception:  # a bad entry must not stop replication
                        log.exception("could not apply event %s (%s %s)", event.stream_id, event.type, event.item_id)
                self.position = event.stream_id
                self.applied += 1

    def stop(self) -> None:
        self._stopping.set()
