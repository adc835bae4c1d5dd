"""The online state in Redis: items added after training, deletions, online interactions, and the event
stream replicas follow to stay in sync.

Keys (``{ns}`` = settings.namespace):

* ``{ns}:item:{item_id}``     hash: row, features (JSON), embedding + states (float32 bytes), artifact (the
                              artifact whose model fused the embedding), updated
* ``{ns}:item_rows``          hash item_id -> index row for items added online (rows never reused)
* ``{ns}:next_row``           counter for new rows; online rows start at ``ONLINE_ROW_BASE`` (2**32), far
                              above any training row, so a retrained artifact with more items never
                              collides with them
* ``{ns}:deleted``            set of deleted item ids (training items included)
* ``{ns}:user:{user_id}``     set of item ids the user interacted with online
* ``{ns}:interaction_log``    list of "user<TAB>item<TAB>unix time", kept for the next training run
* ``{ns}:events``             stream of {type, origin, ...}: every acknowledged write, in order
* ``{ns}:artifact_id``        the artifact version served most recently (set at start-up and on reload)

Every write is atomic, state and event together (a MULTI/EXEC transaction, or for item writes one Lua
script that also allocates the rows: one round trip), so a write is either fully acknowledged and visible
to every replica, or not at all. Events carry the ``origin`` of the engine that applied the write
already (one per engine instance, so a replica that swapped engines re-applies writes of its old one).
The stored embedding is a cache for engines serving the same artifact; others re-fuse the item from its
stored raw features.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import redis

ONLINE_ROW_BASE = 1 << 32

# next_row := max(next_row, ARGV[1]) atomically (INCR on the same key from other clients interleaves safely)
_RAISE_COUNTER = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return redis.call('GET', KEYS[1])
"""


# Items written with their events in one atomic script (one round trip): KEYS = item_rows (hash item id ->
# online row), next_row (counter), deleted (set), events (stream), then each item's hash; ARGV = the online
# row base, the stream's max length, the origin, the time, then 6 values per item: id, row ('' = its stable
# online row: the one item_rows holds, else the next value of the counter, never below the base, since the
# counter may be gone if Redis lost its data), features, embedding, states, artifact. Rows are read or
# allocated before anything is written. Returns the rows.
_PUT_ITEMS = """
local base = tonumber(ARGV[1])
local rows = {}
for i = 0, (#ARGV - 4) / 6 - 1 do
  local id, row = ARGV[5 + 6 * i], ARGV[6 + 6 * i]
  if row == '' then
    row = redis.call('HGET', KEYS[1], id)
    if not row then
      local next_row = redis.call('INCR', KEYS[2])
      if next_row < base then redis.call('SET', KEYS[2], ARGV[1]); next_row = base end
      row = string.format('%d', next_row)
      redis.call('HSET', KEYS[1], id, row)
    end
  end
  rows[#rows + 1] = row
end
for i = 0, #rows - 1 do
  local a = 5 + 6 * i
  local key = KEYS[5 + i]
  redis.call('DEL', key)  -- no field of an older format survives
  redis.call('HSET', key, 'row', rows[i + 1], 'features', ARGV[a + 2], 'embedding', ARGV[a + 3],
             'states', ARGV[a + 4], 'artifact', ARGV[a + 5], 'updated', ARGV[4])
  redis.call('SREM', KEYS[3], ARGV[a])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'type', 'item', 'origin', ARGV[3], 'item_id', ARGV[a])
end
return rows
"""


class StateError(RuntimeError):
    """Redis holds something this code cannot read (a corrupt or foreign entry)."""


@dataclass
class StoredItem:
    item_id: str
    row: int | None  # None: not allocated yet (put_items allocates it)
    features: dict[str, list[float]]
    embedding: np.ndarray  # (d,)
    states: np.ndarray  # (n_states, d)
    artifact_id: str | None = None  # artifact whose model computed embedding/states
    updated: float | None = None  # unix time of the write that stored it (set by put_items)


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
        self._put_items = client.register_script(_PUT_ITEMS)  # EVALSHA, loaded again after a Redis restart

    def key(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

    def init(self, artifact_id: str) -> None:
        self.r.eval(_RAISE_COUNTER, 1, self.key("next_row"), ONLINE_ROW_BASE - 1)  # first INCR: the base
        self.set_artifact(artifact_id)

    def set_artifact(self, artifact_id: str) -> None:
        self.r.set(self.key("artifact_id"), artifact_id)

    def stored_artifact(self) -> str | None:
        value = self.r.get(self.key("artifact_id"))
        return _decode(value) if value is not None else None

    # -- writes -----------------------------------------------------------------------------------
    def put_items(self, items: list[StoredItem], origin: str | None = None, now: float | None = None) -> list[int]:
        """Store items and their "item" events atomically, in one round trip, and return their rows. An item
        whose ``row`` is None gets its stable online row: an id keeps its row forever, even across replicas
        (two replicas writing the same new id get the same row). ``now`` (default: the current time) is
        stored as the items' ``updated`` time."""
        keys = [self.key("item_rows"), self.key("next_row"), self.key("deleted"), self.key("events")]
        now = time.time() if now is None else now
        args: list[str | bytes | int] = [ONLINE_ROW_BASE, self.stream_max_len, origin or self.origin, repr(now)]
        for item in items:
            keys.append(self.key("item", item.item_id))
            args += [
                item.item_id,
                "" if item.row is None else item.row,
                json.dumps(item.features),
                item.embedding.astype(np.float32).tobytes(),
                item.states.astype(np.float32).tobytes(),
                item.artifact_id or "",
            ]
        return [int(row) for row in self._put_items(keys=keys, args=args)]

    def delete_item(self, item_id: str, origin: str | None = None) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.key("item", item_id))
        pipe.sadd(self.key("deleted"), item_id)
        self._event(pipe, "delete", item_id, origin=origin)
        pipe.execute()

    def add_interaction(self, user_id: str, item_id: str, origin: str | None = None) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(self.key("user", user_id), item_id)
        pipe.rpush(self.key("interaction_log"), f"{user_id}\t{item_id}\t{time.time():.3f}")
        self._event(pipe, "interaction", item_id, user_id=user_id, origin=origin)
        pipe.execute()

    def _event(
        self,
        pipe: redis.client.Pipeline,
        kind: str,
        item_id: str,
        user_id: str | None = None,
        origin: str | None = None,
    ) -> None:
        # _PUT_ITEMS appends the "item" events itself, with these fields: keep the two alike (read_events).
        fields = {"type": kind, "origin": origin or self.origin, "item_id": item_id}
        if user_id is not None:
            fields["user_id"] = user_id
        pipe.xadd(self.key("events"), fields, maxlen=self.stream_max_len, approximate=True)

    # -- reads ------------------------------------------------------------------------------------
    def last_event_id(self) -> str:
        last = self.r.xrevrange(self.key("events"), count=1)
        return _decode(last[0][0]) if last else "0-0"

    def first_event_id(self) -> str | None:
        first = self.r.xrange(self.key("events"), count=1)
        return _decode(first[0][0]) if first else None

    def get_item(self, item_id: str, dim: int) -> StoredItem | None:
        raw = self.r.hgetall(self.key("item", item_id))
        if not raw:
            return None
        try:
            embedding = np.frombuffer(raw[b"embedding"], dtype=np.float32)
            states = np.frombuffer(raw[b"states"], dtype=np.float32)
            artifact = _decode(raw.get(b"artifact", b"")) or None
            if embedding.shape != (dim,) or states.size % dim:
                artifact = None  # another embedding size: only the raw features are usable
                states = states[: states.size - states.size % dim]
            return StoredItem(
                item_id=item_id,
                row=int(raw[b"row"]),
                features=json.loads(raw[b"features"]),
                embedding=embedding,
                states=states.reshape(-1, dim),
                artifact_id=artifact,
                updated=float(raw[b"updated"]) if b"updated" in raw else None,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise StateError(f"{self.key('item', item_id)}: unreadable ({type(exc).__name__}: {exc})") from None

    def all_items(self, dim: int) -> Iterator[StoredItem]:
        for item_id in self.stored_item_ids():
            item = self.get_item(item_id, dim)
            if item is not None:
                yield item

    def stored_item_ids(self) -> list[str]:
        prefix = self.key("item", "")
        return [_decode(key)[len(prefix) :] for key in self.r.scan_iter(match=prefix + "*", count=1000)]

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
                # A malformed entry (written by something else) keeps its place, typed "unknown".
                events.append(
                    Event(_decode(stream_id), f.get("type", "unknown"), f.get("origin", ""), f.get("item_id", ""),
                          f.get("user_id"))
                )  # fmt: skip
        return events
