"""Fresh slots: ``GET /recommend?fresh=N`` reserves up to N of the k slots for items added online recently."""

from __future__ import annotations

import time

import numpy as np
import redis

from tests.service_support import AUTH, Artifact, online_embedding, post_item, rec, wait_until


def _weak_features(artifact: Artifact, user: str) -> dict[str, list[float]]:
    """Features of the training item the user likes least: a new item made from them ranks low for the user."""
    scores = artifact.item_emb @ artifact.user_emb[artifact.user_ids.index(user)]
    return artifact.features(int(np.argmin(scores)))


def test_fresh_slots_bring_new_items_in_and_say_where(client, artifact: Artifact) -> None:
    user = "7"
    plain = rec(client, user, 10)
    for n in range(3):
        post_item(client, f"new-{n}", _weak_features(artifact, user) if n else artifact.features(n + 1, 0.5))
    query = artifact.user_emb[artifact.user_ids.index(user)]
    fresh_scores = {f"new-{n}": float(online_embedding(client, f"new-{n}") @ query) for n in range(3)}
    # Without fresh slots the weak new items do not make the top 10.
    top = rec(client, user, 10)
    assert "fresh" not in top and top["strategy"] == "model"
    assert not {"new-1", "new-2"} & {i["item_id"] for i in top["items"]}

    body = rec(client, user, 10, fresh=2)
    ids = [i["item_id"] for i in body["items"]]
    assert body["strategy"] == "model+fresh" and len(ids) == 10
    best_two = sorted(fresh_scores, key=lambda i: -fresh_scores[i])[:2]
    assert [ids[p] for p in body["fresh"]] == sorted(best_two, key=lambda i: -fresh_scores[i])
    # The other slots are the plain list's best, and the whole list stays ordered by score.
    others = [i for i in ids if i not in best_two]
    assert others == [i["item_id"] for i in plain["items"] if i["item_id"] not in best_two][: len(others)]
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    # fresh larger than k: every slot may be fresh, only the three new items compete.
    everything = rec(client, user, 3, fresh=50)
    assert sorted(i["item_id"] for i in everything["items"]) == sorted(fresh_scores)
    assert everything["fresh"] == [0, 1, 2]


def test_fresh_slots_only_take_items_inside_the_window(
    make_client, artifact: Artifact, redis_url: str, ns: str
) -> None:
    with make_client(fresh_slots=1, fresh_window_s=3600) as client:
        post_item(client, "old", _weak_features(artifact, "7"))
        # Backdate it in Redis, as if written two hours ago, and let a new replica load it.
        redis.Redis.from_url(redis_url).hset(f"{ns}:item:old", "updated", repr(time.time() - 7200))
    with make_client(fresh_slots=1, fresh_window_s=3600) as client:
        wait_until(lambda: client.get("/items/old").status_code == 200)
        body = rec(client, "7", 5)  # MMF_FRESH_SLOTS is the default of `fresh`
        assert body["strategy"] == "model" and "fresh" not in body
        post_item(client, "recent", _weak_features(artifact, "7"))
        body = rec(client, "7", 5)
        assert body["strategy"] == "model+fresh"
        assert [body["items"][p]["item_id"] for p in body["fresh"]] == ["recent"]
        assert rec(client, "7", 5, fresh=0)["strategy"] == "model"  # opt out per request
        # A user without history: the fresh slot goes by popularity like the rest of the list.
        anonymous = rec(client, "nobody", 5)
        assert (
            anonymous["strategy"] == "popular+fresh"
            and anonymous["items"][anonymous["fresh"][0]]["item_id"] == "recent"
        )


def test_fresh_is_validated(client) -> None:
    r = client.get("/recommend/7", params={"k": 5, "fresh": -1})
    assert r.status_code == 422 and "fresh" in r.text
    assert client.post("/items", json={}, headers=AUTH).status_code == 422
