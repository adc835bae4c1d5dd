"""The online state in Redis: items added after training, deletions, online interactions, and the event
stream replicas follow to stay in sync.

Keys (``{ns}`` = settings.namespace):

* ``{ns}:item:{item_id}``     hash: row, features (JSON), embedding + states (float32 bytes), updated
* ``{ns}:item_rows``          hash item_id -> index row for items added online (rows never reused)
* ``{ns}:next_row``           counter for new rows, starts after the training items
* ``{ns}:deleted``            set of deleted item ids (training items included)
* ``{ns}:user:{user_id}``     set of item ids the user interacted with online
* ``{ns}:interaction_log``    list of "user<TAB>item<TAB>unix time", kept for the next training run
* ``{ns}:events``             stream of {type, origin, ...}: every acknowledged write, in order
* ``{ns}:artifact_id``        the artifact version this state was written against

Every write is one MULTI/EXEC transaction (state + event), so a write is either fully acknowledged and
visible to every replica, or not at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import redis


@dataclass
class StoredItem:
    item_id: str
    row: int
    features: dict[str, list[float]]
    embedding: np.ndarray  # (d,)
    states: np.ndarray  # (n_states, d)


@dataclass
class Event:
    stream_id: str
    type: str  # "item", "delete" or "interaction"
    origin: str
    item_id: str
    user_id: str | None = None


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisState:
    """Reads and writes the online state; ``origin`` tags this replica's events."""

    def __init__(self, client: redis.Redis, namespace: str, origin: str, stream_max_len: int = 1_000_000):
        self.r = client
        self.ns = namespace
        self.origin = origin
        self.stream_max_len = stream_max_len

    def key(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

    def init(self, n_training_items: int, artifact_id: str) -> None:
        self.r.setnx(self.key("next_row"), n_training_items - 1)  # INCR returns n_training_items first
        self.r.set(self.key("artifact_id"), artifact_id)

    # -- writes -----------------------------------------------------------------------------------
    def allocate_rows(self, item_ids: list[str]) -> list[int]:
        """Stable index rows for online items: an id keeps its row forever, even across replicas."""
        known = self.r.hmget(self.key("item_rows"), item_ids)
        rows = []
        for item_id, row in zip(item_ids, known, strict=True):
            if row is None:
                candidate = self.r.incr(self.key("next_row"))
                self.r.hsetnx(self.key("item_rows"), item_id, candidate)  # loser of a race adopts the winner's
                row = self.r.hget(self.key("item_rows"), item_id)
            rows.append(int(row))
        return rows

    def put_items(self, items: list[StoredItem]) -> None:
        pipe = self.r.pipeline(transaction=True)
        now = str(time.time())
        for item in items:
            pipe.hset(
                self.key("item", item.item_id),
                mapping={
                    "row": item.row,
                    "features": json.dumps(item.features),
                    "embedding": item.embedding.astype(np.float32).tobytes(),
                    "states": item.states.astype(np.float32).tobytes(),
                    "updated": now,
                },
            )
            pipe.srem(self.key("deleted"), item.item_id)
            self._event(pipe, "item", item.item_id)
        pipe.execute()

    def delete_item(self, item_id: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.key("item", item_id))
        pipe.sadd(self.key("deleted"), item_id)
        self._event(pipe, "delete", item_id)
        pipe.execute()

    def add_interaction(self, user_id: str, item_id: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(self.key("user", user_id), item_id)
        pipe.rpush(self.key("interaction_log"), f"{user_id}\t{item_id}\t{time.time():.3f}")
        self._event(pipe, "interaction", item_id, user_id=user_id)
        pipe.execute()

    def _event(self, pipe: redis.client.Pipeline, kind: str, item_id: str, user_id: str | None = None) -> None:
        fields = {"type": kind, "origin": self.origin, "item_id": item_id}
        if user_id is not None:
            fields["user_id"] = user_id
        pipe.xadd(self.key("events"), fields, maxlen=self.stream_max_len, approximate=True)

    # -- reads ------------------------------------------------------------------------------------
    def last_event_id(self) -> str:
        last = self.r.xrevrange(self.key("events"), count=1)
        return _decode(last[0][0]) if last else "0-0"

    def get_item(self, item_id: str, dim: int) -> StoredItem | None:
        raw = self.r.hgetall(self.key("item", item_id))
        if not raw:
            return None
        embedding = np.frombuffer(raw[b"embedding"], dtype=np.float32)
        return StoredItem(
            item_id=item_id,
            row=int(raw[b"row"]),
            features=json.loads(raw[b"features"]),
            embedding=embedding,
            states=np.frombuffer(raw[b"states"], dtype=np.float32).reshape(-1, dim),
        )

    def all_items(self, dim: int) -> Iterator[StoredItem]:
        for key in self.r.scan_iter(match=self.key("item", "*"), count=1000):
            item = self.get_item(_decode(key)[len(self.key("item", "")) :], dim)
            if item is not None:
                yield item

    def online_rows(self) -> dict[str, int]:
        """Index row of every item added online, deleted ones included."""
        return {_decode(k): int(v) for k, v in self.r.hgetall(self.key("item_rows")).items()}

    def deleted_items(self) -> set[str]:
        return {_decode(v) for v in self.r.smembers(self.key("deleted"))}

    def user_items(self, user_id: str) -> set[str]:
        return {_decode(v) for v in self.r.smembers(self.key("user", user_id))}

    def all_user_items(self) -> dict[str, set[str]]:
        prefix = self.key("user", "")
        return {
            _decode(key)[len(prefix) :]: self.user_items(_decode(key)[len(prefix) :])
            for key in self.r.scan_iter(match=prefix + "*", count=1000)
        }

    def interaction_log(self) -> Iterator[tuple[str, str, float]]:
        for raw in self.r.lrange(self.key("interaction_log"), 0, -1):
            user_id, item_id, ts = _decode(raw).split("\t")
            yield user_id, item_id, float(ts)

    def read_events(self, after: str, block_ms: int, count: int = 1000) -> list[Event]:
        reply = self.r.xread({self.key("events"): after}, block=block_ms, count=count)
        events = []
        for _stream, entries in reply or []:
            for stream_id, fields in entries:
                f = {_decode(k): _decode(v) for k, v in fields.items()}
                events.append(Event(_decode(stream_id), f["type"], f["origin"], f["item_id"], f.get("user_id")))
        return events
