"""Faults: Redis outages, crashes (SIGKILL mid-write), hot reloads and incompatible artifacts: the service
keeps serving and loses nothing it acknowledged.

Real components throughout: the tiny trained artifact of ``service_support``, real Redis (the shared one at
127.0.0.1:6379 on a private namespace, or a private ``redis-server`` where a test kills it), real uvicorn
servers (in threads, so several replicas share one interpreter) or real ``python -m service`` processes
where a test needs to SIGKILL or SIGHUP one. docs/reliability.md summarises what each test tries.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli import main as service_main
from service.settings import Settings
from tests.patience import HANG_GUARD_S
from tests.reliability_support import (
    Hammer,
    Proxy,
    Version,
    admin_check,
    assert_same_lists,
    reader,
    rec_list,
    service_env,
    settle,
    truncated_copy,
)
from tests.service_support import (
    AUTH,
    KEY,
    ROOT,
    Artifact,
    assert_error,
    free_port,
    no_mmf_environment,  # noqa: F401 (autouse)
    post_item,
    redis_server,
    serve,
    start_service,
    stop_process,
    wait_ready,
    wait_until,
)
from training.versions import switch_current


def test_redis_outage_and_catch_up(artifact: Artifact, tmp_path: Path) -> None:
    """Two replicas under read load. Redis is killed (-9): reads keep being served from memory (zero
    non-200s), writes answer 503 with Retry-After and write nothing, /readyz is 503. Redis restarts (AOF):
    both reconnect on their own. Then replica B alone loses Redis (a proxy cuts it off) while A writes
    (items, a batch, an update, deletes of an online and a training item, interactions); when B's link returns it
    catches up on all of it, and both give identical recommendations and pass the consistency check."""
    port, data_dir = free_port(), tmp_path / "redis"
    direct = f"redis://127.0.0.1:{port}/0"
    with redis_server(data_dir, port) as server:
        proxy = Proxy(port)
        common = {"artifacts": artifact.path, "api_key": KEY, "namespace": "outage", "follow_block_ms": 100}
        app_a = create_app(Settings(redis_url=direct, **common))
        app_b = create_app(Settings(redis_url=f"redis://127.0.0.1:{proxy.port}/0", **common))
        with serve(app_a) as url_a, serve(app_b) as url_b, httpx.Client(base_url=url_a, timeout=30) as a, \
                httpx.Client(base_url=url_b, timeout=30) as b:  # fmt: skip
            assert a.post("/items", json={"item_id": "early", "features": artifact.features(10)},
                          headers=AUTH).status_code == 201  # fmt: skip
            assert a.post("/items", json={"item_id": "stable", "features": artifact.features(9)},
                          headers=AUTH).status_code == 201  # fmt: skip
            wait_until(lambda: b.get("/items/early").status_code == 200 and b.get("/items/stable").status_code == 200,
                       timeout=5)  # fmt: skip
            n = a.get("/info").json()["n_items"]
            readers = [reader("/recommend/0", k=20), reader("/recommend/nobody", k=10), reader("/items/stable/similar"),
                       reader("/items/stable"), reader("/info")]  # fmt: skip
            with Hammer(readers, [url_a, url_b]) as hammer:
                server.kill()
                server.wait()
                for http in (a, b):
                    wait_until(lambda http=http: http.get("/readyz").status_code == 503)
                    assert http.get("/readyz").json() == {"status": "not ready", "detail": "redis unreachable"}
                    writes = [
                        ("POST", "/items", {"item_id": "lost", "features": artifact.features(11)}),
                        ("POST", "/items:batch", {"items": [{"item_id": "lost2", "features": artifact.features(12)}]}),
                        ("POST", "/interactions", {"user_id": "0", "item_id": "early"}),
                        ("DELETE", "/items/early", None),
                        ("DELETE", "/items/3", None),
                    ]
                    for method, path, body in writes:
                        r = http.request(method, path, json=body, headers=AUTH)
                        assert_error(r, 503, "nothing was written")
                        assert r.headers["retry-after"] == "1"
                    item = http.get("/items/early")
                    assert item.status_code == 200 and item.json()["features"] is None  # served from memory
                    assert "state store unavailable" in item.headers["warning"]
                    info = http.get("/info").json()
                    assert info["stored_artifact_id"] is None and info["n_items"] == n
                    assert http.get("/items/lost").status_code == 404
                outage_start = hammer.count
                wait_until(lambda: hammer.count > outage_start + 20)  # more reads during the outage
                during_outage = hammer.count
                with redis_server(data_dir, port) as server:
                    for http in (a, b):
                        wait_until(lambda http=http: http.get("/readyz").status_code == 200)
                    assert a.post("/items", json={"item_id": "after", "features": artifact.features(13)},
                                  headers=AUTH).status_code == 201  # fmt: skip
                    wait_until(lambda: b.get("/items/after").status_code == 200)
                    # B alone is cut off; A keeps writing
                    proxy.disconnect()
                    wait_until(lambda: b.get("/readyz").status_code == 503)
                    r = b.post("/items", json={"item_id": "b-lost", "features": artifact.features(14)}, headers=AUTH)
                    assert_error(r, 503)
                    top = rec_list(b, "1", 1)[0][0]
                    a_writes = [
                        ("POST", "/items", {"item_id": "while-away", "features": artifact.features(15)}, 201),
                        ("POST", "/items:batch", {"items": [
                            {"item_id": f"away-{i}", "features": artifact.features(20 + i)} for i in range(3)]}, 201),
                        ("POST", "/items", {"item_id": "after", "features": artifact.features(16)}, 201),  # update
                        ("DELETE", "/items/early", None, 200),
                        ("DELETE", "/items/7", None, 200),
                        ("POST", "/interactions", {"user_id": "1", "item_id": top}, 201),
                        ("POST", "/interactions", {"user_id": "newcomer", "item_id": "while-away"}, 201),
                        ("POST", "/interactions", {"user_id": "newcomer", "item_id": "30"}, 201),
                    ]  # fmt: skip
                    for method, path, body, status in a_writes:
                        assert a.request(method, path, json=body, headers=AUTH).status_code == status, path
                    time.sleep(0.3)
                    assert b.get("/items/while-away").status_code == 404  # B has not seen it yet
                    proxy.reconnect()
                    wait_until(lambda: b.get("/readyz").status_code == 200)
                    wait_until(lambda: b.get("/items/while-away").status_code == 200)
                    settle(app_a, app_b)
                    assert [b.get(f"/items/{i}").status_code for i in ("early", "7", "away-0", "away-2")] == [
                        404, 404, 200, 200]  # fmt: skip
                    np.testing.assert_allclose(
                        b.get("/items/after").json()["features"]["visual"], artifact.features(16)["visual"]
                    )
                    assert top not in [i for i, _ in rec_list(b, "1", 1000)]
                    assert rec_list(b, "newcomer", 5) and b.get("/recommend/newcomer").json()["strategy"] == "inductive"
                    for user in ("0", "1", "newcomer", "nobody"):
                        assert_same_lists(rec_list(a, user), rec_list(b, user))
                    for http in (a, b):
                        report = admin_check(http)
                        assert report["ok"], report
                        assert (
                            report["index_size"] == len(artifact.item_ids) - 1 + 6
                        )  # -7; stable, after, while-away, 3x away
    proxy.close()
    print(
        f"\noutage: {hammer.count} reads ({during_outage} by the end of the Redis outage), {len(hammer.errors)} failed"
    )
    assert hammer.errors == [], hammer.errors[:5]
    assert during_outage > 20 and hammer.count > during_outage


def test_redis_data_loss_triggers_rebuild(artifact: Artifact, tmp_path: Path) -> None:
    """Redis comes back *without* its data (no persistence): the event stream is behind the replica's
    position, so it cannot catch up by following; the replica notices, rebuilds its index from what Redis
    holds now (Redis is the source of truth) and goes on replicating."""
    port = free_port()
    settings = Settings(artifacts=artifact.path, redis_url=f"redis://127.0.0.1:{port}/0", api_key=KEY,
                        namespace="loss", follow_block_ms=100)  # fmt: skip
    with redis_server(tmp_path / "before", port) as server, serve(create_app(settings)) as url, \
            httpx.Client(base_url=url, timeout=30, headers=AUTH) as http:  # fmt: skip
        for i in range(3):
            assert (
                http.post("/items", json={"item_id": f"gone-{i}", "features": artifact.features(i)}).status_code == 201
            )
        assert http.delete("/items/4").status_code == 200
        server.kill()
        server.wait()
        wait_until(lambda: http.get("/readyz").status_code == 503)
        with redis_server(tmp_path / "after", port):  # an empty data directory
            wait_until(lambda: http.get("/items/gone-0").status_code == 404)
            assert http.get("/items/4").status_code == 200 and http.get("/readyz").status_code == 200
            report = admin_check(http)
            assert report["ok"] and report["index_size"] == len(artifact.item_ids), report
            assert http.post("/items", json={"item_id": "first", "features": artifact.features(6)}).status_code == 201
            other = create_app(settings)  # another replica writes; the rebuilt one follows again
            with TestClient(other) as c:
                assert c.post("/items", json={"item_id": "new", "features": artifact.features(5)},
                              headers=AUTH).status_code == 201  # fmt: skip
            wait_until(lambda: http.get("/items/new").status_code == 200)
            assert admin_check(http)["ok"]


def test_sigkill_mid_write_loses_nothing_acknowledged(artifact: Artifact, v2: Version, redis_url: str, ns: str,
                                                      tmp_path: Path) -> None:  # fmt: skip
    """A real ``python -m service run`` is SIGKILLed while a client thread streams writes (posts, batches,
    deletes, interactions). ``python -m service check`` (run meanwhile) finds Redis and a freshly built
    index consistent; a restarted server serves every acknowledged write (and none of the acknowledged
    deletes), once each. Then SIGHUP makes it reload the artifact the ``current`` symlink points to."""
    current = tmp_path / "current"
    current.symlink_to(artifact.path)
    env = service_env(MMF_API_KEY=KEY, MMF_REDIS_URL=redis_url, MMF_NAMESPACE=ns)
    log_path, port = tmp_path / "server.log", free_port()
    proc = start_service(current, port, env, log_path)
    present: dict[str, int] = {}  # acknowledged items -> source row of their features
    deleted: set[str] = set()
    interactions: list[tuple[str, str]] = []
    in_flight: list[str] = []
    stop_writing = threading.Event()

    def writer() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, headers=AUTH) as http:
            i = 0
            while not stop_writing.is_set():
                i += 1
                try:
                    if i % 7 == 0 and present:
                        victim = sorted(present)[i % len(present)]
                        in_flight[:] = [victim]
                        if http.delete(f"/items/{victim}").status_code == 200:
                            present.pop(victim)
                            deleted.add(victim)
                    elif i % 5 == 0:
                        ids = [f"kb{i}-{j}" for j in range(3)]
                        in_flight[:] = ids
                        body = {"items": [{"item_id": x, "features": artifact.features((i + j) % 200)}
                                          for j, x in enumerate(ids)]}  # fmt: skip
                        if http.post("/items:batch", json=body).status_code == 201:
                            present.update({x: (i + j) % 200 for j, x in enumerate(ids)})
                    elif i % 3 == 0 and present:
                        pair = (f"ku{i % 4}", sorted(present)[i % len(present)])
                        in_flight[:] = [pair[1]]
                        if http.post("/interactions", json={"user_id": pair[0], "item_id": pair[1]}).status_code == 201:
                            interactions.append(pair)
                    else:
                        item_id = f"k{i}"
                        in_flight[:] = [item_id]
                        r = http.post("/items", json={"item_id": item_id, "features": artifact.features(i % 200)})
                        if r.status_code == 201:
                            present[item_id] = i % 200
                            deleted.discard(item_id)
                    in_flight.clear()
                except httpx.HTTPError:
                    return  # the server is gone: whatever was in flight has an unknown outcome

    try:
        wait_ready(proc, f"http://127.0.0.1:{port}", log_path)
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        wait_until(lambda: len(present) + len(deleted) >= 40)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        thread.join(timeout=15)
        stop_writing.set()
        assert proc.returncode == -signal.SIGKILL
        unknown = set(in_flight)
        # the consistency check and the restart, side by side
        check = subprocess.Popen(
            [sys.executable, "-m", "service", "check", "--artifacts", str(artifact.path), "--json"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        port2 = free_port()
        proc = start_service(current, port2, env, log_path)
        out, err = check.communicate(timeout=HANG_GUARD_S)
        assert check.returncode == 0, out + err
        report = json.loads(out)
        assert report["ok"] and report["problems"] == []
        surely = len(artifact.item_ids) + len(set(present) - unknown)  # an in-flight write may or may not count
        assert surely <= report["index_size"] <= surely + len(unknown), (report, unknown)
        wait_ready(proc, f"http://127.0.0.1:{port2}", log_path)
        with httpx.Client(base_url=f"http://127.0.0.1:{port2}", timeout=10, headers=AUTH) as http:
            for item_id, row in present.items():
                if item_id in unknown:
                    continue
                got = http.get(f"/items/{item_id}")
                assert got.status_code == 200 and got.json()["source"] == "online", item_id
                np.testing.assert_allclose(got.json()["features"]["visual"], artifact.features(row)["visual"])
            for item_id in deleted - unknown:
                assert http.get(f"/items/{item_id}").status_code == 404, item_id
            for user, item_id in interactions:
                if item_id in present:
                    assert item_id not in [i for i, _ in rec_list(http, user, 1000)], (user, item_id)
            live = admin_check(http)
            assert live["ok"] and live["index_size"] == report["index_size"], live
            ids = [i for i, _ in rec_list(http, "0", 1000)]
            assert len(ids) == len(set(ids))
            # SIGHUP: reload what `current` points to now
            tmp_link = tmp_path / "next"
            tmp_link.symlink_to(v2.path)
            os.replace(tmp_link, current)
            proc.send_signal(signal.SIGHUP)
            # Redis records the new artifact id right after the swap: both, once the reload has finished
            wait_until(lambda: http.get("/admin/reload").json()["state"] == "succeeded")
            info = http.get("/info").json()
            assert info["artifact_id"] == info["stored_artifact_id"] == v2.artifact_id and proc.poll() is None
            assert admin_check(http)["ok"]
            assert http.get(f"/items/{next(iter(set(present) - unknown))}").status_code == 200
    finally:
        stop_writing.set()
        stop_process(proc)
    print(f"\nsigkill: {len(present)} items and {len(deleted)} deletes and {len(interactions)} interactions "
          f"acknowledged, {len(unknown)} in flight at the kill; check: {report['index_size']} items")  # fmt: skip
    assert len(present) + len(deleted) >= 40 and interactions and deleted
    assert "reloaded: serving artifact" in log_path.read_text()


def test_check_command_finds_inconsistencies(artifact: Artifact, redis_url: str, ns: str, make_client,
                                             capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """``python -m service check`` exits 0 on a consistent namespace and 1 with the problem named when
    Redis holds contradictory state (two online items on one row; an item both stored and deleted)."""
    with make_client() as c:
        for i in range(3):
            assert c.post("/items", json={"item_id": f"c{i}", "features": artifact.features(i)},
                          headers=AUTH).status_code == 201  # fmt: skip
        assert c.delete("/items/5", headers=AUTH).status_code == 200
    argv = ["check", "--artifacts", str(artifact.path), "--redis-url", redis_url, "--namespace", ns]
    assert service_main(argv) == 0
    out = capsys.readouterr().out
    assert "consistent" in out and "online_items: 3" in out and "deleted_training_items: 1" in out
    r = redis.from_url(redis_url)
    row = int(r.hget(f"{ns}:item_rows", "c0"))
    r.hset(f"{ns}:item_rows", "c1", row)  # two ids on one row
    r.hset(f"{ns}:item:c1", "row", row)
    r.sadd(f"{ns}:deleted", "c2")  # stored and deleted at once
    r.close()
    assert service_main(argv) == 1
    out = capsys.readouterr().out
    assert "INCONSISTENT" in out and f"row {row} is allocated to 2 online ids" in out
    assert "'c2' is both stored and marked deleted" in out
    assert service_main([*argv[:-2], "--namespace", ns, "--redis-url", "redis://127.0.0.1:1/0"]) == 2


def test_hot_reload_under_load(artifact: Artifact, v1: Version, v2: Version, incompatible: Path, redis_url: str,
                               ns: str, tmp_path: Path) -> None:  # fmt: skip
    """POST /admin/reload swaps in a new artifact version while readers and a writer hammer the replica:
    zero failed requests. Online items are re-fused by the new model from their stored features (and a
    replica still on the old version re-fuses what the new one writes). An artifact with other modalities
    is refused (409), a corrupt one too (422 naming the file); the served model stays. Needs the key."""
    common = {"redis_url": redis_url, "api_key": KEY, "namespace": ns, "follow_block_ms": 100}
    app_a = create_app(Settings(artifacts=artifact.path, **common))
    app_b = create_app(Settings(artifacts=artifact.path, **common))
    broken = truncated_copy(artifact.path, tmp_path / "broken", "items.faiss")
    counter = iter(range(10**6))

    def write(http: httpx.Client) -> tuple[str, int, set[int]]:
        n = next(counter)
        body = {"item_id": f"during-{n}", "features": artifact.features(n % 200)}
        return "POST /items", http.post("/items", json=body).status_code, {201}

    with serve(app_a) as url_a, serve(app_b) as url_b, httpx.Client(base_url=url_a, timeout=60) as a, \
            httpx.Client(base_url=url_b, timeout=30) as b:  # fmt: skip
        for i in range(3):
            assert a.post("/items", json={"item_id": f"r{i}", "features": artifact.features(40 + i)},
                          headers=AUTH).status_code == 201  # fmt: skip
        old = app_a.state.runtime.engine
        old_emb = old.item_embedding(old.item_row("r0")).copy()
        readers = [reader("/recommend/0", k=20), reader("/recommend/nobody", k=20), reader("/items/r0/similar"),
                   reader("/items/3"), reader("/info"), write]  # fmt: skip
        with Hammer(readers, [url_a]) as hammer:
            wait_until(lambda: hammer.count > 10)  # the load is on
            before = hammer.count
            assert_error(a.post("/admin/reload", json={"artifacts": str(v2.path)}), 401)
            r = a.post("/admin/reload", json={"artifacts": str(v2.path)}, headers=AUTH)
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "succeeded" and r.json()["artifact_id"] == v2.artifact_id
            assert r.json()["previous_artifact_id"] == v1.artifact_id
            wait_until(lambda: hammer.count > before + 10)
            swapped_at = hammer.count
            for path, status, needle in ((incompatible, 409, "modalities"), (broken, 422, "items.faiss"),
                                         (tmp_path / "nowhere", 422, "manifest.json")):  # fmt: skip
                assert_error(a.post("/admin/reload", json={"artifacts": str(path)}, headers=AUTH), status, needle)
                assert a.get("/info").json()["artifact_id"] == v2.artifact_id
            assert a.get("/admin/reload", headers=AUTH).json()["state"] == "failed"
            r = a.post("/admin/reload", json={"wait": False}, headers=AUTH)  # the served one, re-read
            assert r.status_code == 202
            wait_until(lambda: a.get("/admin/reload", headers=AUTH).json()["state"] == "succeeded")
            wait_until(lambda: hammer.count > swapped_at + 10)
        print(f"\nreload: {hammer.count} requests through 2 reloads and 3 refused ones, {len(hammer.errors)} failed")
        assert hammer.errors == [], hammer.errors[:5]
        assert before > 5 and swapped_at > before and hammer.count > swapped_at
        info = a.get("/info", headers=AUTH).json()  # the artifact directory is shown to key holders
        assert info["artifact_id"] == v2.artifact_id and info["stored_artifact_id"] == v2.artifact_id
        assert info["artifacts"] == str(v2.path) and a.get("/admin/reload", headers=AUTH).json()["reloads"] == 2
        new = app_a.state.runtime.engine
        assert new is not old and new.artifact_id == v2.artifact_id
        for i in range(3):  # re-fused by the new model from the stored raw features
            emb = new.item_embedding(new.item_row(f"r{i}"))
            np.testing.assert_allclose(
                emb, v2.fuse(artifact.features(40 + i), artifact.modalities), rtol=1e-4, atol=1e-5
            )
        assert not np.allclose(new.item_embedding(new.item_row("r0")), old_emb)
        # every write acknowledged during the reloads is served by both replicas; B (still v1) re-fuses them
        written = [f"during-{n}" for n in range(next(counter))]
        settle(app_a, app_b)
        assert b.get("/info").json()["n_items"] == a.get("/info").json()["n_items"]
        engine_b = app_b.state.runtime.engine
        assert engine_b.artifact_id == v1.artifact_id
        for item_id in written:  # A: fused by v2 whenever it was written; B: by v1
            features = artifact.features(int(item_id.split("-")[1]) % 200)
            assert a.get(f"/items/{item_id}").status_code == 200
            np.testing.assert_allclose(new.item_embedding(new.item_row(item_id)),
                                       v2.fuse(features, artifact.modalities), rtol=1e-4, atol=1e-5)  # fmt: skip
            np.testing.assert_allclose(engine_b.item_embedding(engine_b.item_row(item_id)),
                                       v1.fuse(features, artifact.modalities), rtol=1e-4, atol=1e-5)  # fmt: skip
        for http in (a, b):
            report = admin_check(http)
            assert report["ok"] and report["online_items"] == 3 + len(written), report


def test_a_switched_version_link_is_hot_reloaded(artifact: Artifact, v1: Version, v2: Version, incompatible: Path,
                                                 make_client, tmp_path: Path) -> None:  # fmt: skip
    """MMF_ARTIFACTS_WATCH_S: the served path is a link (ROOT/current of `train --versioned`); when the trainer
    switches it, every replica reloads by itself and re-fuses the online items; a switch to an incompatible
    artifact is refused once (not retried in a loop) and the served one stays."""
    root = tmp_path / "root"
    (root / "versions").mkdir(parents=True)
    for name, path in (("a", v1.path), ("b", v2.path), ("c", incompatible)):
        (root / "versions" / name).symlink_to(path)
    switch_current(root, "a")
    with make_client(artifacts=root / "current", artifacts_watch_s=0.05) as c:
        post_item(c, "watched", artifact.features(7))
        assert c.get("/info").json()["artifact_id"] == v1.artifact_id
        switch_current(root, "b")
        wait_until(lambda: c.get("/info").json()["artifact_id"] == v2.artifact_id)
        engine = c.app.state.runtime.engine
        expected = v2.fuse(artifact.features(7), artifact.modalities)  # re-fused by the new model
        np.testing.assert_allclose(engine.item_embedding(engine.item_row("watched")), expected, rtol=1e-4, atol=1e-5)
        switch_current(root, "c")
        wait_until(lambda: c.get("/admin/reload", headers=AUTH).json()["state"] == "failed")
        time.sleep(0.5)  # ten more looks at the link: none may start another reload
        status = c.app.state.runtime.status
        assert status.reloads == 1 and [h["state"] for h in status.history] == ["succeeded", "failed"], status
        assert c.get("/info").json()["artifact_id"] == v2.artifact_id
        assert c.get("/items/watched").status_code == 200


def test_incompatible_artifact_refused_at_start(artifact: Artifact, incompatible: Path, make_client, redis_url: str,
                                                ns: str, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """With online items stored, a replica started on an artifact of other modalities refuses to start
    with a clear error (instead of serving items it cannot fuse); ``python -m service run`` says so in one
    line and exits 2 before starting uvicorn."""
    with make_client() as c:
        assert c.post("/items", json={"item_id": "keeps", "features": artifact.features(1)},
                      headers=AUTH).status_code == 201  # fmt: skip
    with pytest.raises(RuntimeError, match="modalities"), make_client(artifacts=incompatible):
        pass
    for name, value in (("MMF_ARTIFACTS", "unused"), ("MMF_REDIS_URL", redis_url), ("MMF_NAMESPACE", ns)):
        monkeypatch.setenv(name, value)  # restored afterwards (the run command sets MMF_ARTIFACTS)
    assert service_main(["run", "--artifacts", str(incompatible), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: 1 online item(s)" in err and "modalities" in err and "Traceback" not in err
