"""End-to-end tests of the recommendation service: a real (tiny) trained artifact, real Redis, real FAISS.

Each test gets its own Redis key namespace (deleted afterwards) on the Redis at 127.0.0.1:6379, or on a
private ``redis-server`` when none answers there. Restart/crash tests run their own ``redis-server``.
Fixtures and helpers live in ``tests/service_support.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.fast_recommend import FastRecommend, render_recommendation
from service.settings import Settings, documented_fields
from tests.service_support import (
    AUTH,
    KEY,
    ROOT,
    Artifact,
    assert_error,
    assert_sorted_scores,
    assert_topk,
    free_port,
    interact,
    n_index,
    no_mmf_environment,  # noqa: F401 (autouse)
    online_embedding,
    ping,
    post_item,
    rec,
    rec_ids,
    redis_server,
    similar_ids,
    start_service,
    stop_process,
    user_scores,
    wait_ready,
    wait_until,
)

# ------------------------------------------------------------------------------------------------------
# Recommendations
# ------------------------------------------------------------------------------------------------------


def test_recommend_training_user(client: TestClient, artifact: Artifact) -> None:
    for user in ("0", "17", "299"):
        body = rec(client, user, 10)
        assert body["strategy"] == "model" and body["user_id"] == user
        assert body["artifact_id"] == client.get("/info").json()["artifact_id"]
        items = body["items"]
        assert len(items) == 10
        assert_sorted_scores(items)
        ids = [i["item_id"] for i in items]
        assert not set(ids) & artifact.seen[user], "recommended an item the user already interacted with"
        assert_topk(items, user_scores(artifact, user), 10)
    assert len(rec(client, "5")["items"]) == 20  # default k


def test_k_bounds(client: TestClient, artifact: Artifact) -> None:
    for bad in ("0", "1001", "abc", "-3", "2.5"):
        assert_error(client.get("/recommend/0", params={"k": bad}), 422, "k")
        assert_error(client.get("/items/0/similar", params={"k": bad}), 422, "k")
    # k above the catalogue: every unseen item once, no FAISS padding
    for user in ("0", "42"):
        items = rec(client, user, 1000)["items"]
        assert_sorted_scores(items)
        ids = [i["item_id"] for i in items]
        assert set(ids) == set(artifact.item_ids) - artifact.seen[user]
        assert len(ids) == len(artifact.item_ids) - len(artifact.seen[user])
    ids = similar_ids(client, "3")
    assert sorted(ids) == sorted(set(artifact.item_ids) - {"3"})
    assert len(rec(client, "0", 1)["items"]) == 1


def test_fast_recommend_path_answers_as_the_route(make_client, artifact: Artifact, monkeypatch) -> None:
    """FastRecommend answers plain GET /recommend requests itself, byte for byte what the FastAPI route
    answers, and leaves everything else (errors, other users, non-canonical queries) to the route."""
    taken: list[str] = []
    answer = FastRecommend._answer

    def spy(self, scope):
        body = answer(self, scope)
        if body is not None:
            taken.append(scope["path"] + "?" + scope["query_string"].decode())
        return body

    monkeypatch.setattr(FastRecommend, "_answer", spy)
    with make_client() as c:
        for user in ("0", "17"):
            fast, route = c.get(f"/recommend/{user}?k=7"), c.get(f"/recommend/{user}?k=07")  # "07": not canonical
            assert fast.status_code == route.status_code == 200
            assert fast.content == route.content and fast.headers["content-type"] == route.headers["content-type"]
            assert c.get(f"/recommend/{user}").content == c.get(f"/recommend/{user}?k=20&k=20").content
        assert taken == ["/recommend/0?k=7", "/recommend/0?", "/recommend/17?k=7", "/recommend/17?"]
        taken.clear()
        assert_error(c.get("/recommend/0?k=0"), 422, "k")
        assert_error(c.get("/recommend/0?k=1001"), 422, "k")
        assert_error(c.get("/recommend/" + "u" * 129), 422, "user_id")
        assert c.get("/recommend/never-seen-user").json()["strategy"] == "popular"  # not a quick search
        assert c.post("/recommend/0").status_code == 405
        assert taken == []
        # Both paths are counted under the route in the latency metrics.
        metrics = c.get("/metrics").text
        assert 'mmf_request_seconds_count{method="GET",route="/recommend/{user_id}",status="200"} 9.0' in metrics
    with make_client(require_key_for_reads=True) as c:  # reads need the key: the route checks it
        assert c.get("/recommend/0").status_code == 401
        assert len(rec(c, "0", 5, headers=AUTH)["items"]) == 5 and taken == []
    with make_client(fast_recommend=False) as c:
        assert len(rec(c, "0", 5)["items"]) == 5 and taken == []


def test_render_recommendation_is_json_dumps() -> None:
    items, scores = ["1", "a.b:c@d-e_f", 'é"\\\n'], [0.1234567, -1e-30, 3.0]
    body = {"user_id": "u", "strategy": "model", "artifact_id": "abc"}
    expected = {**body, "items": [{"item_id": i, "score": s} for i, s in zip(items, scores, strict=True)]}
    assert (
        render_recommendation("u", "abc", "model", items, scores)
        == json.dumps(expected, separators=(",", ":")).encode()
    )
    odd = render_recommendation("u", "abc", "model", ["x", "y"], [math.nan, math.inf])
    assert (
        odd == b'{"user_id":"u","strategy":"model","artifact_id":"abc","items":[{"item_id":"x","score":NaN},'
        b'{"item_id":"y","score":Infinity}]}'
    )


def test_torch_threads_setting(make_client) -> None:
    """MMF_TORCH_THREADS is the torch thread count of every thread the server starts after start-up (a
    thread's count is fixed at its first parallel torch operation)."""

    def in_new_thread() -> int:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(torch.get_num_threads).result()

    before = in_new_thread()
    try:
        with make_client(torch_threads=2) as c:
            assert in_new_thread() == 2 and c.get("/healthz").status_code == 200
        with make_client() as c:
            assert in_new_thread() == 1  # the default: a request carries one item or user
    finally:
        torch.set_num_threads(before)


def test_fusion_keeps_the_configured_torch_threads_when_another_thread_set_more(artifact: Artifact) -> None:
    """A precomputed-list build sets more torch threads in the reload thread; a request thread that starts
    meanwhile takes that count as its own (the process default at its first parallel operation). The engine
    pins its own count before fusing an item or embedding a new user."""
    from models.artifacts import load_bundle
    from service.engine import Engine

    engine = Engine(load_bundle(artifact.path), torch_threads=1)
    features = engine.feature_matrix([artifact.features(0)])

    def in_new_thread(work) -> int:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: (work(), torch.get_num_threads())[1]).result()

    before = torch.get_num_threads()
    try:
        in_new_thread(lambda: torch.set_num_threads(3))  # as a list build does for its duration
        assert in_new_thread(lambda: None) == 3  # what a new thread then gets
        assert in_new_thread(lambda: engine.fuse(features)) == 1
        engine.record_interaction("new-user", artifact.item_ids[0])
        strategies = []
        assert in_new_thread(lambda: strategies.append(engine.recommend("new-user", 5).strategy)) == 1
        assert strategies == ["inductive"]  # embedding a new user: pinned too
    finally:
        torch.set_num_threads(before)


def test_a_batch_is_fused_on_the_batch_threads(artifact: Artifact) -> None:
    """MMF_BATCH_TORCH_THREADS: a batch of at least Fusion.BATCH_MIN_ITEMS items is fused on its count of threads,
    a smaller one on MMF_TORCH_THREADS'; 0 means the CPUs the process may use."""
    from models.artifacts import load_bundle
    from models.hardware import usable_cpus
    from service.engine import Engine
    from service.fusion import Fusion
    from service.settings import load_settings

    engine = Engine(load_bundle(artifact.path), torch_threads=1, batch_torch_threads=3)
    one = engine.feature_matrix([artifact.features(0)])
    batch = engine.feature_matrix(
        [artifact.features(r % len(artifact.item_ids)) for r in range(Fusion.BATCH_MIN_ITEMS)]
    )

    def threads_after(work) -> int:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: (work(), torch.get_num_threads())[1]).result()

    before = torch.get_num_threads()
    try:
        assert threads_after(lambda: engine.fuse(batch)) == 3
        assert threads_after(lambda: engine.fuse(one)) == 1
        np.testing.assert_allclose(engine.fuse(batch)[0][:1], engine.fuse(one)[0], rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(before)
    assert load_settings(batch_torch_threads=0).batch_thread_count == usable_cpus()
    assert load_settings(batch_torch_threads=2).batch_thread_count == 2


def test_unknown_user_gets_popular_items(client: TestClient, artifact: Artifact) -> None:
    body = rec(client, "never-seen-user", 15)
    assert body["strategy"] == "popular"
    order = sorted(range(len(artifact.item_ids)), key=lambda r: (-artifact.popularity[r], r))
    assert [i["item_id"] for i in body["items"]] == [artifact.item_ids[r] for r in order[:15]]
    assert [i["score"] for i in body["items"]] == [float(artifact.popularity[r]) for r in order[:15]]
    assert len(rec(client, "never-seen-user", 1000)["items"]) == len(artifact.item_ids)


def test_inductive_user(client: TestClient, artifact: Artifact) -> None:
    user = "brand-new:user@1"
    history = ["4", "8", "15"]
    for item in history:
        assert interact(client, user, item) == {"user_id": user, "item_id": item}
    body = rec(client, user, 30)
    assert body["strategy"] == "inductive"
    assert len(body["items"]) == 30
    assert_sorted_scores(body["items"])
    assert not {i["item_id"] for i in body["items"]} & set(history)
    # the user embedding is aggregated from the items' layer states through the trained graph layers
    query = artifact.inductive_query(history)
    true = {i: float(e @ query) for i, e in zip(artifact.item_ids, artifact.item_emb, strict=True)}
    for item in history:
        del true[item]
    assert_topk(body["items"], true, 30)
    ids = rec_ids(client, user)
    assert set(ids) == set(artifact.item_ids) - set(history)
    # another history gives another ranking
    other = ["100", "120", "140"]
    for item in other:
        interact(client, "brand-new:user@2", item)
    assert rec_ids(client, "brand-new:user@2", 30) != [i["item_id"] for i in body["items"]]
    # popularity counts the online interactions: GET /items and the popular ranking
    assert client.get("/items/4").json()["interactions"] == int(artifact.popularity[4]) + 1
    counts = artifact.popularity.copy()
    counts[[artifact.item_ids.index(i) for i in history + other]] += 1
    order = sorted(range(len(counts)), key=lambda r: (-counts[r], r))
    popular = rec(client, "no-history", 1000)
    assert popular["strategy"] == "popular"
    assert [i["item_id"] for i in popular["items"]] == [artifact.item_ids[r] for r in order]


# ------------------------------------------------------------------------------------------------------
# Items: add, update, batch, similar, delete
# ------------------------------------------------------------------------------------------------------


def test_add_item_is_served_and_recommended(client: TestClient, artifact: Artifact) -> None:
    info = client.get("/info").json()
    assert info["modalities"] == artifact.modalities
    assert info["n_users"] == len(artifact.user_ids) and info["embedding_dim"] == artifact.item_emb.shape[1]
    n_before = n_index(client)
    user = "7"
    source = artifact.item_ids.index(artifact.expected_top(user, 1)[0])
    features = artifact.features(source)

    assert post_item(client, "new-item", features) == {"item_id": "new-item", "created": True}
    assert n_index(client) == n_before + 1
    got = client.get("/items/new-item").json()
    assert got["item_id"] == "new-item" and got["source"] == "online" and got["interactions"] == 0
    for m, values in features.items():
        np.testing.assert_allclose(got["features"][m], values, rtol=1e-6)
    assert client.get("/items/3").json()["source"] == "training"
    assert client.get("/items/3").json()["features"] is None

    # its fused embedding is what the service scores with; check the ranking against brute force
    emb = online_embedding(client, "new-item")
    assert emb.shape == (artifact.item_emb.shape[1],) and np.isfinite(emb).all()
    all_emb = np.vstack([artifact.item_emb, emb])
    all_ids = [*artifact.item_ids, "new-item"]

    # similar: itself excluded, everything else ranked by inner product
    sims = client.get("/items/new-item/similar", params={"k": 1000}).json()["items"]
    assert_sorted_scores(sims)
    assert "new-item" not in [s["item_id"] for s in sims] and len(sims) == len(artifact.item_ids)
    assert_topk(sims, dict(zip(artifact.item_ids, (artifact.item_emb @ emb).tolist(), strict=True)), 1000)
    # ... and it shows up in the similar list of its closest training item, at its place
    nearest = int(np.argmax(artifact.item_emb @ emb))
    true = {i: float(s) for i, s in zip(all_ids, all_emb @ artifact.item_emb[nearest], strict=True)}
    del true[artifact.item_ids[nearest]]
    got = client.get(f"/items/{artifact.item_ids[nearest]}/similar", params={"k": 1000}).json()["items"]
    assert "new-item" in [g["item_id"] for g in got]
    assert_topk(got, true, 1000)
    assert_topk(rec(client, user, 1000)["items"], user_scores(artifact, user, {"new-item": emb}), 1000)

    # recommend: for every training user it is in the top 50 exactly when its score beats the 50th
    appeared = 0
    for u in artifact.user_ids:
        items = rec(client, u, 50)["items"]
        ids = [i["item_id"] for i in items]
        score = float(artifact.user_emb[int(u)] @ emb)
        if "new-item" in ids:
            appeared += 1
            assert items[ids.index("new-item")]["score"] == pytest.approx(score, rel=1e-4, abs=1e-4)
        if score > items[-1]["score"] + 1e-4:
            assert "new-item" in ids, f"user {u}: new item scores {score} > 50th {items[-1]['score']}"
        elif score < items[-1]["score"] - 1e-4:
            assert "new-item" not in ids
    assert appeared >= 1


def test_update_item_keeps_its_row(client: TestClient, artifact: Artifact) -> None:
    n_before = n_index(client)
    assert post_item(client, "upd", artifact.features(10))["created"] is True
    first = online_embedding(client, "upd").copy()
    assert post_item(client, "upd", artifact.features(20)) == {"item_id": "upd", "created": False}
    assert n_index(client) == n_before + 1
    assert not np.allclose(first, online_embedding(client, "upd"))
    np.testing.assert_allclose(client.get("/items/upd").json()["features"]["visual"], artifact.features(20)["visual"])
    assert rec_ids(client, "0").count("upd") == 1
    # a training item can be replaced from new features too: same row, now served as online
    assert post_item(client, "12", artifact.features(30)) == {"item_id": "12", "created": False}
    assert n_index(client) == n_before + 1
    assert client.get("/items/12").json()["source"] == "online"
    assert similar_ids(client, "3").count("12") == 1


def test_batch_items(client: TestClient, artifact: Artifact, stored) -> None:
    n_before = n_index(client)
    batch = {"items": [{"item_id": f"b{n}", "features": artifact.features(n, 1.5)} for n in range(3)]}
    r = client.post("/items:batch", json=batch, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json() == {"items": [{"item_id": f"b{n}", "created": True} for n in range(3)]}
    assert n_index(client) == n_before + 3
    ids = rec_ids(client, "0")
    for n in range(3):
        assert ids.count(f"b{n}") == 1
        assert client.get(f"/items/b{n}").json()["source"] == "online"
        assert f"b{n}" in similar_ids(client, "b0" if n else "b1")
    # duplicate ids in one batch: nothing written
    saved = stored()
    dup = {"items": [{"item_id": "d1", "features": artifact.features(n)} for n in (5, 6)]}
    assert_error(client.post("/items:batch", json=dup, headers=AUTH), 422, "duplicate")
    assert_error(client.post("/items:batch", json={"items": []}, headers=AUTH), 422, "items")
    # one bad item fails the whole batch
    bad = {"items": [{"item_id": "ok1", "features": artifact.features(5)}, {"item_id": "bad", "features": {}}]}
    assert_error(client.post("/items:batch", json=bad, headers=AUTH), 422, "item 1", "visual")
    assert n_index(client) == n_before + 3 and stored() == saved
    for item in ("d1", "ok1", "bad"):
        assert client.get(f"/items/{item}").status_code == 404


def test_batch_limit(make_client, artifact: Artifact, stored) -> None:
    with make_client(max_batch=2) as c:
        n, saved = n_index(c), stored()
        batch = {"items": [{"item_id": f"x{i}", "features": artifact.features(i)} for i in range(3)]}
        assert_error(c.post("/items:batch", json=batch, headers=AUTH), 422, "at most 2")
        assert n_index(c) == n and stored() == saved


def test_interactions_exclude_items(client: TestClient, artifact: Artifact) -> None:
    user = "3"
    top = rec_ids(client, user, 5)
    before = client.get(f"/items/{top[0]}").json()["interactions"]
    assert interact(client, user, top[0]) == {"user_id": user, "item_id": top[0]}
    assert top[0] not in rec_ids(client, user, 1000)
    assert rec_ids(client, user, 4) == top[1:]
    assert client.get(f"/items/{top[0]}").json()["interactions"] == before + 1
    interact(client, user, top[0])  # repeated: still excluded, counted once
    assert client.get(f"/items/{top[0]}").json()["interactions"] == before + 1
    # other users are unaffected
    assert top[0] in rec_ids(client, "4") or top[0] in artifact.seen["4"]
    # an online item too
    post_item(client, "online-1", artifact.features(50))
    assert "online-1" in rec_ids(client, user)
    interact(client, user, "online-1")
    assert "online-1" not in rec_ids(client, user)
    assert_error(
        client.post("/interactions", json={"user_id": user, "item_id": "no-such-item"}, headers=AUTH),
        404,
        "no-such-item",
    )
    assert len(rec_ids(client, user)) == len(artifact.item_ids) + 1 - len(artifact.seen[user]) - 2


def test_delete_item(client: TestClient, artifact: Artifact) -> None:
    n_before = n_index(client)
    post_item(client, "gone", artifact.features(60))
    assert n_index(client) == n_before + 1
    for item in ("gone", "9"):
        r = client.delete(f"/items/{item}", headers=AUTH)
        assert r.status_code == 200 and r.json() == {"item_id": item, "deleted": True}
    assert n_index(client) == n_before - 1
    for item in ("gone", "9"):
        assert_error(client.get(f"/items/{item}"), 404, item)
        assert_error(client.get(f"/items/{item}/similar"), 404, item)
        assert_error(client.delete(f"/items/{item}", headers=AUTH), 404, item)
        assert_error(client.post("/interactions", json={"user_id": "0", "item_id": item}, headers=AUTH), 404, item)
        for user in ("0", "1", "unknown-user"):
            assert item not in rec_ids(client, user)
        assert item not in similar_ids(client, "3")
    assert n_index(client) == n_before - 1
    # a deleted id can be added again, and keeps its interaction count
    assert post_item(client, "9", artifact.features(9))["created"] is True
    assert client.get("/items/9").json()["interactions"] == int(artifact.popularity[9])
    assert "9" in similar_ids(client, "3")
    assert n_index(client) == n_before


# ------------------------------------------------------------------------------------------------------
# Durability and replication
# ------------------------------------------------------------------------------------------------------


def write_scenario(c: TestClient, artifact: Artifact) -> None:
    """Adds, updates, deletes, a re-add and interactions of a training user and of a new user."""
    post_item(c, "keep-a", artifact.features(70))
    r = c.post(
        "/items:batch",
        json={"items": [{"item_id": i, "features": artifact.features(n)} for n, i in ((71, "keep-b"), (72, "drop-c"))]},
        headers=AUTH,
    )
    assert r.status_code == 201
    post_item(c, "13", artifact.features(73))  # update a training item
    assert c.delete("/items/drop-c", headers=AUTH).status_code == 200
    assert c.delete("/items/21", headers=AUTH).status_code == 200
    assert c.delete("/items/22", headers=AUTH).status_code == 200
    assert post_item(c, "22", artifact.features(75))["created"] is True  # a deleted training item comes back
    interact(c, "5", "keep-a")
    interact(c, "5", "keep-b")
    interact(c, "fresh-user", "keep-b")
    interact(c, "fresh-user", "30")


def snapshot(c: TestClient) -> dict:
    return {
        "n": n_index(c),
        "rec5": rec(c, "5", 1000)["items"],
        "fresh": rec(c, "fresh-user", 1000),
        "popular": rec(c, "nobody", 50)["items"],
        "similar": similar_ids(c, "keep-a"),
        "items": {i: c.get(f"/items/{i}").json() for i in ("keep-a", "keep-b", "13", "22", "30")},
        "gone": [c.get(f"/items/{i}").status_code for i in ("drop-c", "21")],
    }


def assert_same_state(after: object, before: object) -> None:
    """Equal responses, scores up to float rounding (an inductive user's mean may sum in another order)."""

    def split(value, approx: bool):
        if isinstance(value, dict) and "score" in value:
            return value["item_id"], pytest.approx(value["score"], rel=1e-5, abs=1e-6) if approx else value["score"]
        if isinstance(value, dict):
            return {k: split(v, approx) for k, v in value.items()}
        if isinstance(value, list):
            return [split(v, approx) for v in value]
        return value

    assert split(after, False) == split(before, True)


def check_scenario(snap: dict, artifact: Artifact) -> None:
    assert snap["n"] == len(artifact.item_ids) + 2 - 1
    ids5 = [i["item_id"] for i in snap["rec5"]]
    assert not {"keep-a", "keep-b", "drop-c", "21"} & set(ids5)
    assert "13" in ids5 or "13" in artifact.seen["5"]
    assert snap["fresh"]["strategy"] == "inductive"
    assert not {"keep-b", "30", "drop-c", "21"} & {i["item_id"] for i in snap["fresh"]["items"]}
    assert {snap["items"][i]["source"] for i in ("keep-a", "keep-b", "13", "22")} == {"online"}
    assert snap["items"]["keep-b"]["interactions"] == 2
    assert snap["gone"] == [404, 404]


def test_restart_keeps_everything(make_client, artifact: Artifact) -> None:
    with make_client() as c:
        write_scenario(c, artifact)
        before = snapshot(c)
    check_scenario(before, artifact)
    with make_client() as c:
        after = snapshot(c)
        post_item(c, "keep-c", artifact.features(74))  # row allocation continues after a restart
        assert n_index(c) == before["n"] + 1
        assert "keep-a" in similar_ids(c, "keep-c") and "keep-c" in rec_ids(c, "0")
        assert c.get("/items/keep-c").json()["source"] == "online"
    assert_same_state(after, before)


def test_interactions_survive_delete_and_readd(make_client, artifact: Artifact) -> None:
    """An interaction with an item that is deleted, and added again after a restart, still excludes it:
    on a replica that ran throughout and on one started while the item was deleted."""
    user = "6"
    with make_client() as running:
        post_item(running, "comeback", artifact.features(77))
        training_item = next(i for i in rec_ids(running, user) if i in artifact.item_ids)
        for item in ("comeback", training_item):
            interact(running, user, item)
            interact(running, "newcomer", item)
        counts = {i: running.get(f"/items/{i}").json()["interactions"] for i in ("comeback", training_item)}
        for item in ("comeback", training_item):
            assert running.delete(f"/items/{item}", headers=AUTH).status_code == 200
        with make_client() as restarted:  # loads the state while both items are deleted
            post_item(restarted, "comeback", artifact.features(77))
            post_item(restarted, training_item, artifact.features(78))
            wait_until(lambda: running.get("/items/comeback").status_code == 200)
            wait_until(lambda: running.get(f"/items/{training_item}").status_code == 200)
            for c in (running, restarted):
                assert not {"comeback", training_item} & set(rec_ids(c, user))
                assert not {"comeback", training_item} & set(rec_ids(c, "newcomer"))
                assert {i: c.get(f"/items/{i}").json()["interactions"] for i in counts} == counts
    with make_client() as fresh:
        assert not {"comeback", training_item} & set(rec_ids(fresh, user))
        assert {i: fresh.get(f"/items/{i}").json()["interactions"] for i in counts} == counts


def test_redis_crash_loses_no_acknowledged_write(artifact: Artifact, tmp_path: Path) -> None:
    """kill -9 of a Redis with AOF (appendfsync always): writes fail with 503 while it is down, reads go on
    from memory; after a restart of Redis every acknowledged write is there, for a new replica and for
    the one that ran through the outage (which follows writes again)."""
    port, data_dir = free_port(), tmp_path / "redis"
    url = f"redis://127.0.0.1:{port}/0"
    settings = Settings(artifacts=artifact.path, redis_url=url, api_key=KEY, namespace="crash")
    with redis_server(data_dir, port) as server, TestClient(create_app(settings)) as c:
        write_scenario(c, artifact)
        before = snapshot(c)
        check_scenario(before, artifact)
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert c.get("/readyz").json()["detail"] == "redis unreachable"
        assert c.get("/readyz").status_code == 503
        n = n_index(c)
        r = c.post("/items", json={"item_id": "during-outage", "features": artifact.features(1)}, headers=AUTH)
        assert_error(r, 503, "nothing was written")
        assert r.headers["retry-after"] == "1"
        assert_error(c.post("/interactions", json={"user_id": "5", "item_id": "30"}, headers=AUTH), 503)
        assert_error(c.delete("/items/30", headers=AUTH), 503)
        assert n_index(c) == n and "30" in rec_ids(c, "5")  # reads still served, nothing half-applied
        with redis_server(data_dir, port):
            wait_until(lambda: c.get("/readyz").status_code == 200)
            with TestClient(create_app(settings)) as fresh:
                assert_same_state(snapshot(fresh), before)
                assert fresh.get("/items/during-outage").status_code == 404
                post_item(fresh, "after-outage", artifact.features(2))
                wait_until(lambda: c.get("/items/after-outage").status_code == 200)
                post_item(c, "from-survivor", artifact.features(3))
                wait_until(lambda: fresh.get("/items/from-survivor").status_code == 200)


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivf"])
def test_two_replicas_stay_in_sync(make_client, artifact: Artifact, index: str) -> None:
    with make_client(index=index) as a, make_client(index=index) as b:
        post_item(a, "repl", artifact.features(80))
        wait_until(lambda: b.get("/items/repl").status_code == 200)
        assert "repl" in rec_ids(b, "0") and "repl" in similar_ids(b, "3")
        np.testing.assert_allclose(online_embedding(b, "repl"), online_embedding(a, "repl"))
        assert n_index(b) == n_index(a) == len(artifact.item_ids) + 1

        post_item(a, "repl", artifact.features(81))  # update
        wait_until(lambda: np.allclose(online_embedding(b, "repl"), online_embedding(a, "repl")))

        assert b.delete("/items/repl", headers=AUTH).status_code == 200
        assert b.delete("/items/0", headers=AUTH).status_code == 200
        wait_until(lambda: a.get("/items/repl").status_code == 404 and a.get("/items/0").status_code == 404)
        assert not {"repl", "0"} & set(rec_ids(a, "1")) and "repl" not in similar_ids(a, "3")
        assert n_index(b) == n_index(a) == len(artifact.item_ids) - 1

        target = rec_ids(b, "2", 1)[0]
        interact(a, "2", target)
        wait_until(lambda: target not in rec_ids(b, "2"))
        interact(a, "newbie", target)
        wait_until(lambda: rec(b, "newbie", 5)["strategy"] == "inductive")
        assert target not in rec_ids(b, "newbie")
        assert_same_state(rec(b, "newbie", 1000), rec(a, "newbie", 1000))


def test_embedded_redis(artifact: Artifact, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    settings = Settings(artifacts=artifact.path, redis_url=None, state_dir=state_dir, api_key=KEY, namespace="emb")
    with TestClient(create_app(settings)) as c:
        sock = state_dir / "redis.sock"
        assert sock.exists()
        with redis.Redis(unix_socket_path=str(sock)) as r:
            pid = r.info("server")["process_id"]
        post_item(c, "embedded-item", artifact.features(90))
        interact(c, "0", "embedded-item")
        interact(c, "0", "55")
        assert list(state_dir.glob("appendonly*")), "no AOF file in the state dir"
        assert c.get("/readyz").json() == {"status": "ready"}
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with TestClient(create_app(settings)) as c:
        assert c.get("/items/embedded-item").json()["source"] == "online"
        ids = rec_ids(c, "0")
        assert "embedded-item" not in ids and "55" not in ids and len(ids) > 100
        assert "embedded-item" in rec_ids(c, "1")
    assert not ping(f"unix://{sock}")


# ------------------------------------------------------------------------------------------------------
# Errors: every one a 4xx with a JSON detail, and nothing written
# ------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_feature_validation(client: TestClient, artifact: Artifact, stored) -> None:
    n, saved = n_index(client), stored()
    good = artifact.features(1)
    dims = artifact.modalities
    (m1, d1), (m2, _) = list(dims.items())
    cases = {
        "renamed": ({"image": good[m1], m2: good[m2]}, ["image", m1]),
        "missing": ({m1: good[m1]}, ["missing", m2]),
        "extra": ({**good, "text": [1.0]}, ["unknown", "text"]),
        "short": ({**good, m1: good[m1][:-1]}, [m1, str(d1)]),
        "long": ({**good, m1: [*good[m1], 0.5]}, [m1, str(d1)]),
        "empty": ({**good, m1: []}, [m1]),
        "string": ({**good, m1: ["abc"] * d1}, [m1]),
        "null": ({**good, m1: [None] * d1}, [m1]),
        "nested": ({**good, m1: [[1.0]] * d1}, [m1]),
        "not-a-list": ({**good, m1: 1.0}, [m1]),
        "float32 overflow": ({**good, m1: [1e39] * d1}, ["finite"]),
        "no modalities": ({}, ["missing"]),
    }
    for name, (features, needles) in cases.items():
        r = client.post("/items", json={"item_id": "v", "features": features}, headers=AUTH)
        assert r.status_code == 422, name
        assert_error(r, 422, *needles)
    for token in ("NaN", "Infinity", "-Infinity"):
        vec = ", ".join([token] + ["0.5"] * (d1 - 1))
        other = json.dumps(good[m2])
        raw = f'{{"item_id": "v", "features": {{"{m1}": [{vec}], "{m2}": {other}}}}}'
        r = client.post("/items", content=raw, headers={**AUTH, "Content-Type": "application/json"})
        assert_error(r, 422, m1)
    for body in ('{"item_id": "v"}', '{"features": {}}', "not json", "[]", ""):
        r = client.post("/items", content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"], body
    r = client.post("/items", json={"item_id": "v", "features": good, "extra": 1}, headers=AUTH)
    assert_error(r, 422, "extra")
    assert n_index(client) == n and stored() == saved
    assert client.get("/items/v").status_code == 404


def test_id_validation(client: TestClient, artifact: Artifact, stored) -> None:
    n, saved = n_index(client), stored()
    features = artifact.features(2)
    for bad in ("x" * 129, "a b", "caf\u00e9", "a/b", "", "tab\t", "line\n", "\u4e2d"):
        assert_error(client.post("/items", json={"item_id": bad, "features": features}, headers=AUTH), 422, "item_id")
        r = client.post("/interactions", json={"user_id": bad, "item_id": "3"}, headers=AUTH)
        assert_error(r, 422, "user_id")
        r = client.post("/interactions", json={"user_id": "3", "item_id": bad}, headers=AUTH)
        assert_error(r, 422, "item_id")
    assert_error(client.post("/interactions", json={"user_id": "3"}, headers=AUTH), 422, "item_id")
    assert n_index(client) == n and stored() == saved
    assert post_item(client, "x" * 128, features)["created"] is True  # the longest allowed id
    assert post_item(client, "A-z_0.9:@", features)["created"] is True
    n, saved = n_index(client), stored()
    for bad in ("x" * 129, "a%20b", "caf%C3%A9", "line%0A"):
        for path in (f"/items/{bad}", f"/items/{bad}/similar", f"/recommend/{bad}"):
            assert_error(client.get(path), 422, "pattern" if len(bad) < 129 else "128")
        assert_error(client.delete(f"/items/{bad}", headers=AUTH), 422)
    for path in ("/items/a/b", "/items/a%2Fb", "/recommend/a/b"):
        r = client.get(path)
        assert 400 <= r.status_code < 500 and r.json()["detail"], path
        assert 400 <= client.delete(path, headers=AUTH).status_code < 500
    assert n_index(client) == n and stored() == saved


def test_unknown_items_are_404(client: TestClient, stored) -> None:
    saved = stored()
    assert_error(client.get("/items/nope"), 404, "nope")
    assert_error(client.get("/items/nope/similar"), 404, "nope")
    assert_error(client.delete("/items/nope", headers=AUTH), 404, "nope")
    assert_error(client.post("/interactions", json={"user_id": "0", "item_id": "nope"}, headers=AUTH), 404, "nope")
    assert client.get("/recommend/nope").json()["strategy"] == "popular"  # an unknown user is not an error
    assert stored() == saved


def test_auth(make_client, artifact: Artifact, stored) -> None:
    item = {"item_id": "secret", "features": artifact.features(3)}
    writes = [
        ("post", "/items", item),
        ("post", "/items:batch", {"items": [item]}),
        ("post", "/interactions", {"user_id": "0", "item_id": "3"}),
        ("delete", "/items/3", None),
    ]

    def call(c: TestClient, method: str, path: str, body, headers=None) -> httpx.Response:
        return c.request(method, path, json=body, headers=headers or {})

    with make_client() as c:
        n, saved = n_index(c), stored()
        for method, path, body in writes:
            assert_error(call(c, method, path, body), 401, "missing")
            assert_error(call(c, method, path, body, {"X-API-Key": "wrong"}), 401, "invalid")
            assert_error(call(c, method, path, body, {"X-API-Key": ""}), 401)
        assert n_index(c) == n and stored() == saved
        assert c.get("/items/secret").status_code == 404 and c.get("/items/3").status_code == 200
        assert "3" in rec_ids(c, "nobody")
        assert c.get("/recommend/0").status_code == 200  # reads are open by default
    with make_client(api_key=None) as c:
        for method, path, body in writes:
            assert_error(call(c, method, path, body, AUTH), 403, "MMF_API_KEY")
            assert_error(call(c, method, path, body), 403)
        assert n_index(c) == n and stored() == saved and c.get("/items/3").status_code == 200
    with make_client(require_key_for_reads=True) as c:
        for path in ("/recommend/0", "/items/3", "/items/3/similar", "/info", "/metrics", "/openapi.json"):
            assert_error(c.get(path), 401, "missing")
            assert_error(c.get(path, headers={"X-API-Key": "wrong"}), 401, "invalid")
            assert c.get(path, headers=AUTH).status_code == 200
        for path in ("/healthz", "/readyz"):  # probes stay open
            assert c.get(path).status_code == 200
        for path in ("/docs", "/redoc", "/docs/assets/swagger-ui-bundle.js"):  # a browser cannot send the key
            assert c.get(path).status_code == 404


def test_body_size_limit(make_client, artifact: Artifact, stored) -> None:
    with make_client(max_body_bytes=2048) as c:
        n, saved = n_index(c), stored()
        body = json.dumps({"item_id": "big", "features": artifact.features(4)}).encode()
        assert len(body) > 2048
        headers = {**AUTH, "Content-Type": "application/json"}
        assert_error(c.post("/items", content=body, headers=headers), 413, "2048")

        def chunks():  # no Content-Length: the limit must hold for a streamed body too
            for start in range(0, len(body), 512):
                yield body[start : start + 512]

        assert_error(c.post("/items", content=chunks(), headers=headers), 413, "2048")
        batch = json.dumps({"items": [{"item_id": "big", "features": artifact.features(4)}]}).encode()
        assert_error(c.post("/items:batch", content=batch, headers=headers), 413)
        assert n_index(c) == n and stored() == saved and c.get("/items/big").status_code == 404
        # small bodies, streamed or not, still work
        small = json.dumps({"user_id": "0", "item_id": "3"}).encode()
        assert c.post("/interactions", content=small, headers=headers).status_code == 201
        assert c.post("/interactions", content=iter([small[:5], small[5:]]), headers=headers).status_code == 201


# ------------------------------------------------------------------------------------------------------
# Operations: health, metrics, OpenAPI, CLI, a real HTTP server
# ------------------------------------------------------------------------------------------------------


def test_configuration_page_documents_every_setting() -> None:
    """docs/configuration.md's settings table names every MMF_ variable with its default."""
    readme = (ROOT / "docs" / "configuration.md").read_text()
    section = readme.split("## Settings (environment variables)", 1)[1].split("\n\n", 2)[1]
    documented: dict[str, str] = {}
    for row in section.splitlines()[2:]:
        names_cell, defaults_cell = row.split(" | ")[:2]
        names = re.findall(r"`(MMF_\w+)`", names_cell)
        defaults = re.findall(r"`([^`]*)`", defaults_cell) or [defaults_cell.strip()]
        assert len(names) == len(defaults), row
        documented.update(zip(names, defaults, strict=True))

    def shown(value: object) -> str:
        if value is None:
            return "unset"
        if isinstance(value, bool):
            return str(value).lower()
        return json.dumps(value) if isinstance(value, list) else str(value)

    expected = {
        f"MMF_{name.upper()}": shown(field.get_default(call_default_factory=True))
        for name, field in documented_fields()  # the nested index settings by their own variables
    }
    assert documented == expected


def test_health_metrics_openapi(client: TestClient, artifact: Artifact) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").status_code == 200 and client.get("/readyz").json()["status"] == "ready"
    rec(client, "0", 5)
    client.get("/recommend/0", params={"k": 0})
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'mmf_request_seconds_count{method="GET",route="/recommend/{user_id}",status="200"}' in text
    assert 'route="/recommend/{user_id}",status="422"' in text
    assert f"mmf_index_items {float(len(artifact.item_ids))}" in text
    artifact_id = client.get("/info").json()["artifact_id"]
    assert f'mmf_model_info{{artifact_id="{artifact_id}",model="metammf_lightgcn"}} 1.0' in text
    spec = client.get("/openapi.json").json()
    for path in (
        "/recommend/{user_id}", "/items", "/items:batch", "/items/{item_id}", "/items/{item_id}/similar",
        "/interactions", "/healthz", "/readyz", "/metrics", "/info",
    ):  # fmt: skip
        assert path in spec["paths"], path
    assert set(spec["paths"]["/items/{item_id}"]) == {"get", "delete"}


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_help() -> None:
    for args in ((), ("run",), ("export-interactions",)):
        done = run_cli(*args, "--help")
        assert done.returncode == 0, done.stderr
        assert "usage: python -m service" in done.stdout
    assert "--artifacts" in run_cli("run", "--help").stdout
    assert run_cli().returncode != 0  # a command is required


def test_cli_export_interactions(client: TestClient, redis_url: str, ns: str, tmp_path: Path) -> None:
    pairs = [("0", "3"), ("u-new", "4"), ("0", "5")]
    for user, item in pairs:
        interact(client, user, item)
    out = tmp_path / "online.tsv"
    done = run_cli("export-interactions", "--out", str(out), env={"MMF_REDIS_URL": redis_url, "MMF_NAMESPACE": ns})
    assert done.returncode == 0, done.stderr
    assert "wrote 3 online interactions" in done.stdout
    lines = out.read_text().splitlines()
    assert lines[0] == "userID\titemID\ttimestamp"
    assert [tuple(line.split("\t")[:2]) for line in lines[1:]] == pairs
    stamps = [float(line.split("\t")[2]) for line in lines[1:]]
    assert all(math.isfinite(s) and abs(s - time.time()) < 600 for s in stamps)


@pytest.mark.parametrize("redis_mode", ["shared", "embedded"])
def test_real_http_server(artifact: Artifact, redis_url: str, ns: str, tmp_path: Path, redis_mode: str) -> None:
    """``python -m service run`` as a real process; SIGTERM stops it, and its embedded Redis with it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMF_")}
    env.update(MMF_NAMESPACE=ns, MMF_API_KEY=KEY, MMF_MAX_BODY_BYTES="65536")
    if redis_mode == "shared":
        env["MMF_REDIS_URL"] = redis_url
    else:
        env["MMF_STATE_DIR"] = str(tmp_path / "state")
    log_path = tmp_path / "server.log"
    server = start_service(artifact.path, port, env, log_path, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    redis_pid = None
    try:
        wait_ready(server, base, log_path)
        if redis_mode == "embedded":
            redis_pid = redis.Redis(unix_socket_path=str(tmp_path / "state" / "redis.sock")).info()["process_id"]
        with httpx.Client(base_url=base, timeout=10) as http:
            r = http.post("/items", json={"item_id": "over-http", "features": artifact.features(99)}, headers=AUTH)
            assert r.status_code == 201 and r.json() == {"item_id": "over-http", "created": True}
            assert_error(http.post("/items", json={"item_id": "x", "features": {}}), 401, "missing")
            body = http.get("/recommend/0", params={"k": 1000}).json()
            assert body["strategy"] == "model"
            assert "over-http" in [i["item_id"] for i in body["items"]]
            assert http.get("/items/over-http").json()["source"] == "online"
            big = json.dumps({"items": [{"item_id": f"c{n}", "features": artifact.features(n)} for n in range(15)]})
            chunks = (big[i : i + 4096].encode() for i in range(0, len(big), 4096))
            headers = {**AUTH, "Content-Type": "application/json"}
            assert_error(http.post("/items:batch", content=chunks, headers=headers), 413, "65536")
            raw = '{"item_id": "nan", "features": {"acoustic": [NaN], "visual": [1]}}'
            assert_error(http.post("/items", content=raw, headers=headers), 422, "acoustic")
            assert http.get("/info").json()["n_items"] == len(artifact.item_ids) + 1
    finally:
        stop_process(server, timeout=15)
        if redis_pid is not None:
            try:
                os.kill(redis_pid, 0)
                leaked = True
                os.kill(redis_pid, signal.SIGKILL)
            except ProcessLookupError:
                leaked = False
    out = log_path.read_text()
    assert server.returncode == 0, out  # a stop asked for by SIGTERM and completed is a clean exit
    assert "Application shutdown complete" in out
    if redis_mode == "embedded":
        assert not leaked, "the embedded redis-server outlived the service"
