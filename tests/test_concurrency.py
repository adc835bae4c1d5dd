"""Concurrency and load: replicas writing at once, a soak run, readers during writes.

Real components throughout: the tiny trained artifact of ``service_support``, real Redis (the shared one at
127.0.0.1:6379 on a private namespace, or a private ``redis-server`` where a test kills it), real uvicorn
servers (in threads, so several replicas share one interpreter) or real ``python -m service`` processes
where a test needs to SIGKILL or SIGHUP one. docs/reliability.md summarises what each test tries.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.reliability_support import (
    Hammer,
    admin_check,
    assert_same_lists,
    reader,
    rec_list,
    settle,
)
from tests.service_support import (
    AUTH,
    KEY,
    ROOT,
    Artifact,
    no_mmf_environment,  # noqa: F401 (autouse)
    serve,
    wait_until,
)


@dataclass
class WriterLog:
    present: dict[str, int] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    hot: set[str] = field(default_factory=set)
    requests: int = 0


def test_concurrent_writers_and_readers_on_two_replicas(artifact: Artifact, redis_url: str, ns: str) -> None:
    """4 writer threads (posts, batches, updates of shared hot items by every writer, deletes of their own
    items, interactions), spread over two replicas, and 4 reader threads: no error, no lost item, no
    duplicate index entry (ntotal = distinct live items, rows unique), and once writes settle both replicas
    return identical recommendation lists."""
    common = {"artifacts": artifact.path, "redis_url": redis_url, "api_key": KEY, "namespace": ns,
              "follow_block_ms": 50}  # fmt: skip
    app_a, app_b = create_app(Settings(**common)), create_app(Settings(**common))
    logs = [WriterLog() for _ in range(4)]

    def writer(k: int, urls: list[str]) -> None:
        log = logs[k]
        clients = [httpx.Client(base_url=u, timeout=30, headers=AUTH) for u in urls]
        try:
            for i in range(30):
                http = clients[i % 2]

                def ok(r: httpx.Response, status: int, what: str) -> bool:
                    log.requests += 1
                    if r.status_code != status:
                        log.errors.append(f"{what}: {r.status_code} {r.text[:200]}")
                    return r.status_code == status

                if i % 5 == 4:
                    ids = [f"w{k}-b{i}-{j}" for j in range(3)]
                    body = {
                        "items": [
                            {"item_id": x, "features": artifact.features((k * 31 + i + j) % 200)}
                            for j, x in enumerate(ids)
                        ]
                    }
                    if ok(http.post("/items:batch", json=body), 201, "batch"):
                        log.present.update({x: 1 for x in ids})
                elif i % 4 == 1:
                    hot = f"hot-{i % 3}"
                    body = {"item_id": hot, "features": artifact.features((k + i) % 200)}
                    if ok(http.post("/items", json=body), 201, "hot"):
                        log.hot.add(hot)
                elif i % 6 == 3 and log.present:
                    victim = sorted(log.present)[i % len(log.present)]
                    if ok(http.delete(f"/items/{victim}"), 200, "delete"):
                        log.present.pop(victim)
                        log.deleted.add(victim)
                elif i % 3 == 2:
                    item = sorted(log.present)[0] if log.present else str(i)
                    ok(http.post("/interactions", json={"user_id": f"cu{k}", "item_id": item}), 201, "interaction")
                    ok(
                        http.post("/interactions", json={"user_id": str(k), "item_id": str(100 + i)}),
                        201,
                        "interaction",
                    )
                else:
                    item_id = f"w{k}-{i}"
                    if ok(
                        http.post("/items", json={"item_id": item_id, "features": artifact.features(i)}), 201, "post"
                    ):
                        log.present[item_id] = 1
        finally:
            for c in clients:
                c.close()

    readers = [reader("/recommend/0", k=20), reader("/recommend/cu1", k=20), reader("/items/3/similar", k=10),
               reader("/recommend/nobody", k=10)]  # fmt: skip
    with serve(app_a) as url_a, serve(app_b) as url_b:
        with Hammer(readers, [url_a, url_b]) as hammer:
            threads = [threading.Thread(target=writer, args=(k, [url_a, url_b][:: 1 if k % 2 else -1]))
                       for k in range(4)]  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
        errors = [e for log in logs for e in log.errors]
        assert errors == [] and hammer.errors == [], (errors[:5], hammer.errors[:5])
        live = {i for log in logs for i in log.present} | {h for log in logs for h in log.hot}
        deleted = {i for log in logs for i in log.deleted}
        assert not live & deleted
        expected = len(artifact.item_ids) + len(live)
        with httpx.Client(base_url=url_a, timeout=30, headers=AUTH) as a, \
                httpx.Client(base_url=url_b, timeout=30, headers=AUTH) as b:  # fmt: skip
            wait_until(lambda: a.get("/info").json()["n_items"] == b.get("/info").json()["n_items"] == expected,
                       timeout=15)  # fmt: skip
            settle(app_a, app_b)  # the last interactions too
            for app, http in ((app_a, a), (app_b, b)):
                report = admin_check(http)
                assert report["ok"] and report["index_size"] == expected, report
                engine = app.state.runtime.engine
                ids = engine.index_ids()
                assert len(ids) == len(set(ids.tolist())) == expected
                assert set(engine.catalog.item_rows) == set(artifact.item_ids) | live
                assert sorted(engine.catalog.item_rows.values()) == sorted(ids.tolist())
            for item_id in sorted(live)[:20]:
                assert a.get(f"/items/{item_id}").status_code == b.get(f"/items/{item_id}").status_code == 200
            for item_id in deleted:
                assert a.get(f"/items/{item_id}").status_code == b.get(f"/items/{item_id}").status_code == 404
            for hot in {h for log in logs for h in log.hot}:  # the last update won everywhere
                assert a.get(f"/items/{hot}").json() == b.get(f"/items/{hot}").json()
            for user in ("0", "1", "2", "3", "cu0", "cu1", "cu2", "cu3", "nobody"):
                assert_same_lists(rec_list(a, user, 100), rec_list(b, user, 100))
    print(f"\nconcurrency: {sum(log.requests for log in logs)} writes, {hammer.count} reads, {len(live)} live items")
    assert sum(log.requests for log in logs) >= 4 * 30 and hammer.count > 50


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_soak_short(artifact: Artifact, redis_url: str, ns: str, tmp_path: Path,
                    capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """bench/soak.py for 5 s against a real server: zero errors, the table printed, the index consistent."""
    soak = load_soak()
    app = create_app(Settings(artifacts=artifact.path, redis_url=redis_url, api_key=KEY, namespace=ns))
    with serve(app) as url:
        out_json = tmp_path / "soak.json"
        rc = soak.main(["--url", url, "--api-key", KEY, "--seconds", "5", "--threads", "4", "--json", str(out_json)])
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + out)
    assert rc == 0, out
    assert re.search(r"^GET /recommend/\{user_id\}\s+\d+\s+0\s", out, re.M), out
    assert re.search(r"^total\s+\d+\s+0\s", out, re.M) and "index check: consistent" in out
    result = json.loads(out_json.read_text())
    assert result["check"]["ok"] and sum(e["requests"] for e in result["endpoints"].values()) > 50
    assert all(e["errors"] == 0 for e in result["endpoints"].values())
    with pytest.raises(SystemExit):  # loopback only
        soak.main(["--url", "http://example.com:8000", "--api-key", KEY, "--seconds", "1"])
