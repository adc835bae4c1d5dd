"""Security: the API key, what logs and errors reveal, the container's user.

Real components throughout: the tiny trained artifact of ``service_support``, real Redis (the shared one at
127.0.0.1:6379 on a private namespace, or a private ``redis-server`` where a test kills it), real uvicorn
servers (in threads, so several replicas share one interpreter) or real ``python -m service`` processes
where a test needs to SIGKILL or SIGHUP one. docs/reliability.md summarises what each test tries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re

import httpx
import numpy as np
import pytest
import redis

from service.app import create_app
from service.settings import Settings
from tests.service_support import (
    AUTH,
    ROOT,
    Artifact,
    assert_error,
    no_mmf_environment,  # noqa: F401 (autouse)
    serve,
)


def test_api_key_is_never_logged(artifact: Artifact, redis_url: str, ns: str, caplog: pytest.LogCaptureFixture,
                                 capfd: pytest.CaptureFixture) -> None:  # fmt: skip
    """Requests with the right key, a wrong key and the key in odd places (query string, as an item id),
    over real HTTP with uvicorn's access log and every logger at DEBUG: neither key appears in any log line
    or in anything written to stdout/stderr."""
    secret = "s3cr3t-" + hashlib.sha256(os.urandom(8)).hexdigest()
    wrong = "wr0ng-" + hashlib.sha256(os.urandom(8)).hexdigest()
    caplog.set_level(logging.DEBUG)
    app = create_app(Settings(artifacts=artifact.path, redis_url=redis_url, api_key=secret, namespace=ns))
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        good, bad = {"X-API-Key": secret}, {"X-API-Key": wrong}
        assert (
            http.post("/items", json={"item_id": "k1", "features": artifact.features(1)}, headers=good).status_code
            == 201
        )
        assert (
            http.post("/items", json={"item_id": "k2", "features": artifact.features(1)}, headers=bad).status_code
            == 401
        )
        assert http.post("/items", json={"item_id": "k3", "features": {}}, headers=good).status_code == 422
        assert http.post("/interactions", json={"user_id": "0", "item_id": "k1"}, headers=good).status_code == 201
        assert http.delete("/items/k1", headers=bad).status_code == 401
        assert http.get("/admin/check", headers=good).status_code == 200
        assert http.post("/admin/reload", json={"artifacts": "/nope"}, headers=good).status_code == 422
        assert http.get("/recommend/0", params={"api_key": wrong}, headers=good).status_code == 200
        assert http.get(f"/items/{secret}", headers=good).status_code == 404  # a key pasted as an id
        assert http.get("/recommend/x%0D%0AFORGED-LINE").status_code == 422  # CR/LF in a decoded path
    # everything the service side logged (the test's own HTTP client, httpx/httpcore, logs its URLs)
    server = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.args}" for r in server)
    captured = capfd.readouterr()
    assert "POST /items" in logged or "/items" in logged  # the access log was captured
    assert "api_key=***" in logged and "/items/*** " in logged
    assert "FORGED-LINE" in logged and not any("\nFORGED" in r.getMessage() for r in server)  # one line
    for key in (secret, wrong[:20]):
        assert key not in logged and key not in captured.out and key not in captured.err
    assert "**********" in repr(Settings(api_key=secret)) and secret not in repr(Settings(api_key=secret))


def test_cors(make_client) -> None:
    """Allowed origins get the CORS headers (simple and preflight requests, errors included); others and
    a service without MMF_CORS_ORIGINS get none."""
    allowed, other = "https://app.example.com", "https://evil.example.net"
    with make_client(cors_origins=[allowed]) as c:
        r = c.get("/recommend/0", headers={"Origin": allowed})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == allowed
        assert c.get("/items/nope", headers={"Origin": allowed}).headers["access-control-allow-origin"] == allowed
        r = c.options("/items", headers={"Origin": allowed, "Access-Control-Request-Method": "POST",
                                         "Access-Control-Request-Headers": "x-api-key, content-type"})  # fmt: skip
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == allowed
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
        r = c.get("/recommend/0", headers={"Origin": other})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = c.options("/items", headers={"Origin": other, "Access-Control-Request-Method": "POST"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = c.options("/items", headers={"Origin": allowed, "Access-Control-Request-Method": "PUT"})
        assert r.status_code == 400
    with make_client() as c:
        assert "access-control-allow-origin" not in c.get("/recommend/0", headers={"Origin": allowed}).headers


LOAD_PATH_DIRS = ("models", "training", "service", "bench")


def test_no_pickle_on_any_load_path() -> None:
    """The source tree never unpickles: no pickle import, no allow_pickle=True, every np.load passes
    allow_pickle=False, no torch.load without weights_only=True (there is none at all today), no
    pickle-based formats (joblib, dill, shelve, marshal)."""
    offenders = []
    files = [p for d in LOAD_PATH_DIRS for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20
    for path in files:
        text = path.read_text()
        rel = path.relative_to(ROOT)
        for n, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(
                r"\bimport\s+(pickle|cPickle|dill|joblib|shelve|marshal)\b|\bfrom\s+(pickle|dill|joblib)\b", code
            ):
                offenders.append(f"{rel}:{n}: {line.strip()}")
            if re.search(r"allow_pickle\s*=\s*True", code) or re.search(r"\bpickle\.loads?\(", code):
                offenders.append(f"{rel}:{n}: {line.strip()}")
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if not re.search(r"weights_only\s*=\s*True", call.group(1)):
                offenders.append(f"{rel}: torch.load without weights_only=True: {call.group(0)}")
        for call in re.finditer(r"\bnp\.load\(([^)]*)\)", text):
            if not re.search(r"allow_pickle\s*=\s*False", call.group(1)):
                offenders.append(f"{rel}: np.load without allow_pickle=False: {call.group(0)}")
    assert offenders == []


def test_bounds_are_enforced_and_documented(make_client, artifact: Artifact) -> None:
    """k, batch size, body size, id length, vector length and modality count are bounded, in the OpenAPI
    schema and in behaviour (k and batch bounds follow the settings)."""
    with make_client(max_k=50, max_batch=3) as c:
        spec = c.get("/openapi.json").json()
        k = next(p for p in spec["paths"]["/recommend/{user_id}"]["get"]["parameters"] if p["name"] == "k")
        assert k["schema"]["maximum"] == 50 and k["schema"]["minimum"] == 1
        assert_error(c.get("/recommend/0", params={"k": 51}), 422, "k")
        assert len(c.get("/recommend/0", params={"k": 50}).json()["items"]) == 50
        batch = {"items": [{"item_id": f"x{i}", "features": artifact.features(i)} for i in range(4)]}
        assert_error(c.post("/items:batch", json=batch, headers=AUTH), 422, "at most 3")
        item = spec["components"]["schemas"]["ItemIn"]["properties"]
        assert item["item_id"]["maxLength"] == 128 and item["features"]["maxProperties"] == 64
        assert item["features"]["additionalProperties"]["maxItems"] == 100_000
        for path, method in (("/items", "post"), ("/recommend/{user_id}", "get"), ("/admin/reload", "post")):
            documented = set(spec["paths"][path][method]["responses"])
            assert {"401", "422"} <= documented, (path, documented)


def test_container_runs_as_non_root() -> None:
    """The API image (docker/Dockerfile, its last stage `api`, built on `runtime`) switches to an unprivileged
    user (a named one with a uid, not root or 0) before the command runs, and does not switch back."""
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert text.rstrip().splitlines()[-1].startswith("CMD") and text.count("FROM runtime AS api") == 1
    runtime_and_api = text[text.index(" AS runtime") :]
    lines = [line.strip() for line in runtime_and_api.splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    users = [
        (n, line.split(None, 1)[1].strip()) for n, line in enumerate(instructions) if line.upper().startswith("USER ")
    ]
    assert users, "no USER instruction"
    last_at, last_user = users[-1]
    assert last_user.split(":")[0] not in {"root", "0"}
    cmd_at = max(n for n, line in enumerate(instructions) if line.upper().startswith(("CMD", "ENTRYPOINT")))
    assert last_at < cmd_at
    created = " ".join(instructions)
    assert re.search(rf"useradd[^&]*--uid\s+(\d+)[^&]*\b{re.escape(last_user)}\b", created)
    assert int(re.search(r"--uid\s+(\d+)", created).group(1)) >= 1000


def test_put_items_allocates_and_writes_in_one_atomic_script(redis_url: str, ns: str) -> None:
    """``RedisState.put_items``: a new id gets the next online row (never below ONLINE_ROW_BASE, even after
    the counter is lost) and keeps it when written again; an item with a training row keeps that row and
    takes no online one; the item hash is replaced whole, the id leaves the deleted set and one event per
    item names the writer. Concurrent writers of the same new id (two replicas) all get one row."""
    from concurrent.futures import ThreadPoolExecutor

    from service.state import ONLINE_ROW_BASE, RedisState, StoredItem

    r = redis.from_url(redis_url)
    state = RedisState(r, ns, origin="replica-a")
    state.init("artifact-1")

    def item(item_id: str, row: int | None = None) -> StoredItem:
        return StoredItem(item_id, row, {"visual": [1.0, 2.0]}, np.ones(4, np.float32), np.ones((2, 4)), "artifact-1")

    r.hset(f"{ns}:item:n1", "stale", "field of an older format")
    r.sadd(f"{ns}:deleted", "n1", "7")
    assert state.put_items([item("n1"), item("7", row=7), item("n2")]) == [ONLINE_ROW_BASE, 7, ONLINE_ROW_BASE + 1]
    assert state.put_items([item("n2"), item("n3")], origin="engine-x") == [ONLINE_ROW_BASE + 1, ONLINE_ROW_BASE + 2]
    assert state.online_rows() == {"n1": ONLINE_ROW_BASE, "n2": ONLINE_ROW_BASE + 1, "n3": ONLINE_ROW_BASE + 2}
    assert b"stale" not in r.hgetall(f"{ns}:item:n1") and state.deleted_items() == set()
    stored = state.get_item("7", 4)
    assert stored.row == 7 and stored.features == {"visual": [1.0, 2.0]} and stored.artifact_id == "artifact-1"
    assert stored.states.shape == (2, 4)
    events = state.read_events("0-0", block_ms=0)
    assert [(e.type, e.item_id, e.origin) for e in events] == [
        ("item", "n1", "replica-a"), ("item", "7", "replica-a"), ("item", "n2", "replica-a"),
        ("item", "n2", "engine-x"), ("item", "n3", "engine-x"),
    ]  # fmt: skip

    r.delete(f"{ns}:next_row")  # Redis lost the counter (not the rows): new rows still start at the base
    r.hdel(f"{ns}:item_rows", "n1", "n2", "n3")
    assert state.put_items([item("n4")]) == [ONLINE_ROW_BASE]

    replicas = [RedisState(redis.from_url(redis_url), ns, origin=f"replica-{i}") for i in range(4)]
    with ThreadPoolExecutor(len(replicas)) as pool:
        rows = list(pool.map(lambda s: s.put_items([item("shared"), item(f"own-{s.origin}")]), replicas * 5))
    assert len({row[0] for row in rows}) == 1  # one row for the shared id, whoever wrote it
    assert len({row[1] for row in rows}) == len(replicas)  # each replica's own id: one row, kept on every write
    for replica in replicas:
        replica.r.close()
    r.close()


def test_features_are_stored_exactly_and_read_in_both_encodings(redis_url: str, ns: str) -> None:
    """Stored raw features come back exactly (the values a request carried, ints included), in any modality order,
    equal features as equal bytes (the content version's test); features stored as JSON text are read too, and a
    truncated value is an error naming the key."""
    from service.state import RedisState, StateError, StoredItem, decode_features, encode_features

    features = {"visual": [0.1, -0.0, 5e-324, 1.7976931348623157e308, 3, -2], "acoustic": [], "text": [1 / 3]}
    assert decode_features(encode_features(features)) == features
    assert [str(v) for v in decode_features(encode_features(features))["visual"]] == [
        "0.1", "-0.0", "5e-324", "1.7976931348623157e+308", "3.0", "-2.0",
    ]  # fmt: skip
    assert encode_features(dict(reversed(features.items()))) == encode_features(features)
    assert encode_features({"visual": [0.1, 0.2]}) != encode_features({"visual": [0.1, 0.20000000000000004]})
    assert decode_features(b'{"visual": [1, 2.5]}') == {"visual": [1, 2.5]}

    r = redis.from_url(redis_url)
    state = RedisState(r, ns, origin="replica-a")
    state.init("artifact-1")
    state.put_items([StoredItem("x", None, features, np.ones(4, np.float32), np.ones((1, 4)), "artifact-1")])
    assert state.get_item("x", 4).features == features
    version = int(r.hget(f"{ns}:item:x", "version"))
    state.put_items([StoredItem("x", None, dict(features), np.ones(4, np.float32), np.ones((1, 4)), "artifact-1")])
    assert int(r.hget(f"{ns}:item:x", "version")) == version  # the same features: the same content
    r.hset(f"{ns}:item:x", "features", '{"visual": [1.5, 2]}')  # JSON text
    assert state.get_item("x", 4).features == {"visual": [1.5, 2]}
    r.hset(f"{ns}:item:x", "features", encode_features(features)[:-3])
    with pytest.raises(StateError, match=f"{ns}:item:x"):
        state.get_item("x", 4)
    r.close()
