"""The write paths of the service, out of the routes: items written (validated, fused, stored in Redis, then
applied to this replica's engine), deleted, and interactions recorded; and the lookup every item route uses.

Redis is written first and the engine after it, under the runtime's write lock, so a replica never serves
what Redis has not acknowledged; a write that raced with a reload is fused again with the new model."""

from __future__ import annotations

import time

import redis

from service import schemas
from service.engine import Engine
from service.request_errors import InputError, NotFound
from service.runtime import Runtime
from service.state import StoredItem
from service.sync import sync_item


def item_row(runtime: Runtime, engine: Engine, item_id: str) -> int:
    """The item's row; an item this replica has not seen yet but Redis holds (written through another replica a
    moment ago, its event not applied yet) is applied now, so that a client can use an item right after creating
    it, whichever replica it reaches. NotFound otherwise."""
    try:
        return engine.item_row(item_id)
    except NotFound:
        try:
            exists = runtime.state.r.exists(runtime.state.key("item", item_id))
        except redis.RedisError:
            exists = False
        if not exists:
            raise
        with runtime.write_lock:
            sync_item(engine, runtime.state, item_id)
        return engine.item_row(item_id)


def write_items(items: list[schemas.ItemIn], runtime: Runtime) -> list[schemas.ItemWritten]:
    """Fuse and store ``items`` (one transaction); an id already known is updated (``created`` False)."""
    ids = [item.item_id for item in items]
    if len(set(ids)) != len(ids):
        raise InputError("duplicate item_id in one batch")
    state = runtime.state
    while True:
        engine = runtime.engine
        matrix = engine.feature_matrix([item.features for item in items])
        embeddings, states = engine.fuse(matrix)
        with runtime.write_lock:
            if runtime.engine is not engine:
                continue  # swapped by a reload meanwhile: validate and fuse with the new model
            stored = [
                StoredItem(item.item_id, engine.training_row(item.item_id), item.features, emb, st, engine.artifact_id)
                for item, emb, st in zip(items, embeddings, states, strict=True)
            ]
            created = [not engine.has_item(i) for i in ids]
            # One round trip: online rows allocated (or read) and the items stored, acknowledged once the script
            # has run.
            now = time.time()
            rows = state.put_items(stored, origin=engine.origin, now=now)
            engine.upsert_many(
                [(s.item_id, row, s.embedding, s.states, now) for s, row in zip(stored, rows, strict=True)]
            )
        return [schemas.ItemWritten(item_id=i, created=c) for i, c in zip(ids, created, strict=True)]


def delete_item(item_id: str, runtime: Runtime) -> None:
    with runtime.write_lock:
        engine = runtime.engine
        item_row(runtime, engine, item_id)  # 404 if unknown
        runtime.state.delete_item(item_id, origin=engine.origin)
        engine.delete(item_id)


def add_interaction(user_id: str, item_id: str, runtime: Runtime) -> None:
    with runtime.write_lock:
        engine = runtime.engine
        item_row(runtime, engine, item_id)  # 404 if unknown
        runtime.state.add_interaction(user_id, item_id, origin=engine.origin)
        engine.record_interaction(user_id, item_id)
