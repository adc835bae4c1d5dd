"""Consistency of an engine's index with the state in Redis (``python -m service check``, ``GET /admin/check``).

Checked: every online item stored in Redis is in the index exactly once, at its row (a training item's own
row, else the row Redis allocated for it); no deleted item is in the index; index ids are unique, and rows
allocated in Redis too; the index size is training items - deleted training items + live online items; the
indexed vector of an online item is the one stored (when fused by the same artifact) and finite; the FAISS
index agrees with its own row bookkeeping (vectors held, live and deleted slots); with precomputed lists, the
online items' own index holds exactly the online items.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from service.engine import Engine
from service.state import RedisState, StateError


def check_consistency(engine: Engine, state: RedisState, max_listed: int = 20) -> dict:
    problems: list[str] = []
    catalog = engine.catalog
    training = engine.bundle.item_ids
    training_set = set(training)
    deleted = state.deleted_items()
    rows_in_redis = state.online_rows()
    stored = {}
    for item_id in state.stored_item_ids():
        try:
            item = state.get_item(item_id, engine.dim)
        except StateError as exc:
            problems.append(str(exc))
            continue
        if item is not None:
            stored[item_id] = item

    problems += engine.index_problems() + engine.online_index_problems()
    ids = engine.index_ids()
    counts = Counter(ids.tolist())
    problems += [f"row {r} is in the index {n} times" for r, n in counts.items() if n > 1]
    rows_reused = {r: n for r, n in Counter(rows_in_redis.values()).items() if n > 1}
    problems += [f"row {r} is allocated to {n} online ids in Redis" for r, n in rows_reused.items()]

    expected: dict[str, int] = {i: r for r, i in enumerate(training) if i not in deleted}
    for item_id, item in stored.items():
        if item_id in deleted:
            problems.append(f"item {item_id!r} is both stored and marked deleted in Redis")
        own = engine.training_row(item_id)
        if own is None and rows_in_redis.get(item_id) != item.row:
            problems.append(
                f"item {item_id!r}: row {item.row} in its hash, {rows_in_redis.get(item_id)} in the row map"
            )
        expected[item_id] = own if own is not None else item.row

    for item_id, row in expected.items():
        if counts.get(row, 0) != 1:
            problems.append(f"item {item_id!r} (row {row}) is in the index {counts.get(row, 0)} times")
        elif catalog.item_rows.get(item_id) != row or catalog.row_items.get(row) != item_id:
            problems.append(f"item {item_id!r}: engine maps it to row {catalog.item_rows.get(item_id)}, expected {row}")
    for item_id in deleted:
        row = catalog.item_rows.get(item_id)
        if item_id not in stored and row is not None:
            problems.append(f"deleted item {item_id!r} is served (row {row})")
    unexpected = set(counts) - set(expected.values())
    problems += [
        f"row {r} ({catalog.row_items.get(r)!r}) is in the index but not a live item" for r in sorted(unexpected)
    ]
    if len(ids) != len(expected):
        problems.append(f"index holds {len(ids)} vectors, expected {len(expected)}")

    for item_id, item in stored.items():
        row = expected[item_id]
        if counts.get(row) != 1:
            continue
        vector = engine.index_vector(row)
        if not np.isfinite(vector).all():
            problems.append(f"item {item_id!r}: indexed vector is not finite")
        elif item.artifact_id == engine.artifact_id and not np.allclose(vector, item.embedding, rtol=1e-5, atol=1e-6):
            problems.append(f"item {item_id!r}: indexed vector differs from the embedding stored in Redis")

    deleted_training = len([i for i in deleted if i in training_set and i not in stored])
    listed = problems[:max_listed] + (
        [f"... and {len(problems) - max_listed} more"] if len(problems) > max_listed else []
    )
    return {
        "ok": not problems,
        "problems": listed,
        "artifact_id": engine.artifact_id,
        "index_size": len(ids),
        "expected_size": len(expected),
        "training_items": len(training),
        "deleted_training_items": deleted_training,
        "online_items": len([i for i in stored if i not in training_set]),
        "deleted_online_items": len([i for i in deleted if i not in training_set and i not in stored]),
        "index_kind": engine.index.kind,
    }
