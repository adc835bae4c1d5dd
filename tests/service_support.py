"""Fixtures and helpers of the service tests (test_service.py and the reliability tests): a real (tiny) trained
artifact, real Redis, real FAISS.

The fixtures are registered once for the whole session through ``tests/conftest.py`` (so the artifact is
trained once); test modules import only the helpers from here, and the autouse ``no_mmf_environment``.

Each test gets its own Redis key namespace (deleted afterwards) on the Redis at 127.0.0.1:6379, or on a
private ``redis-server`` when none answers there. Restart/crash tests run their own ``redis-server``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_tensors

from bench.support import NotReady, free_port
from bench.support import wait_ready as ready
from models.artifacts import CATALOG, CONFIG, EMBEDDINGS, ENCODER, INTERACTIONS
from models.metammf.inference import InferenceEncoder
from service.app import create_app
from service.embedded_redis import find_redis_server
from service.settings import Settings
from tests.patience import HANG_GUARD_S, PATIENCE_S
from training.config import DataConfig, RunConfig, TrainConfig
from training.data import RecData
from training.export import export_artifacts
from training.synthetic import SyntheticConfig, generate_synthetic
from training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
AUTH = {"X-API-Key": KEY}
SYNTHETIC = SyntheticConfig(n_users=300, n_items=200, seed=11)


# ------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------------


@dataclass
class Artifact:
    path: Path
    data: RecData
    user_ids: list[str]
    item_ids: list[str]
    modalities: dict[str, int]
    user_emb: np.ndarray
    item_emb: np.ndarray
    item_states: np.ndarray  # (n_states, n_items, d)
    popularity: np.ndarray
    seen: dict[str, set[str]]  # training user id -> item ids of every known interaction
    encoder: InferenceEncoder

    def features(self, row: int, scale: float = 1.0) -> dict[str, list[float]]:
        """Raw features of training item ``row`` (optionally scaled), as POST /items wants them."""
        return {m: (self.data.features[m][row] * scale).astype(float).tolist() for m in self.modalities}

    def expected_top(self, user_id: str, k: int) -> list[str]:
        """Brute-force top-k of a training user over the training items, seen items excluded."""
        scores = self.item_emb @ self.user_emb[self.user_ids.index(user_id)]
        order = [r for r in np.argsort(-scores, kind="stable") if self.item_ids[r] not in self.seen[user_id]]
        return [self.item_ids[r] for r in order[:k]]

    def inductive_query(self, item_ids: list[str]) -> np.ndarray:
        """Embedding of a user unseen in training who interacted with these training items."""
        rows = [self.item_ids.index(i) for i in item_ids]
        return self.encoder.encode_user(torch.from_numpy(self.item_states[:, rows])).numpy()


@pytest.fixture(scope="session")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    """The default model trained for 3 epochs on 300 users x 200 items, exported as a serving artifact."""
    data = generate_synthetic(SYNTHETIC)
    run = RunConfig(data=DataConfig(synthetic=SYNTHETIC), train=TrainConfig(progress=False, epochs=3))
    result = train(data, run.model, run.train)
    path = export_artifacts(result, data, run, tmp_path_factory.mktemp("service") / "artifacts")
    catalog = json.loads((path / CATALOG).read_text())
    emb = load_file(path / EMBEDDINGS)
    pairs = np.load(path / INTERACTIONS)
    config = RunConfig.model_validate_json((path / CONFIG).read_text())
    encoder = InferenceEncoder.from_state_dict(
        config.model, sum(data.modality_dims.values()), load_tensors(path / ENCODER)
    )
    seen: dict[str, set[str]] = {u: set() for u in catalog["users"]}
    for u, i in pairs.tolist():
        seen[catalog["users"][u]].add(catalog["items"][i])
    return Artifact(
        path=path,
        data=data,
        user_ids=catalog["users"],
        item_ids=catalog["items"],
        modalities={m["name"]: m["dim"] for m in catalog["modalities"]},
        user_emb=emb["user_embeddings"],
        item_emb=emb["item_embeddings"],
        item_states=emb["item_states"],
        popularity=emb["item_popularity"],
        seen=seen,
        encoder=encoder.eval(),
    )


def ping(url: str) -> bool:
    client = redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture(autouse=True)
def no_mmf_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings also read MMF_* variables: keep the caller's environment out of these tests."""
    for name in [n for n in os.environ if n.startswith("MMF_")]:
        monkeypatch.delenv(name)


@contextlib.contextmanager
def redis_server(data_dir: Path, port: int, fsync: str = "always") -> Iterator[subprocess.Popen]:
    """A private redis-server with AOF on ``port``, data in ``data_dir``; killed on exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
        "--appendonly", "yes", "--appendfsync", fsync, "--save", "", "--daemonize", "no",
        "--logfile", str(data_dir / "redis.log"),
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not ping(f"redis://127.0.0.1:{port}/0"):
            assert proc.poll() is None, f"redis-server exited: {(data_dir / 'redis.log').read_text()}"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shared Redis at 127.0.0.1:6379, or a private one when nothing answers there."""
    url = "redis://127.0.0.1:6379/0"
    if ping(url):
        yield url
        return
    port = free_port()
    with redis_server(tmp_path_factory.mktemp("redis"), port, fsync="no"):
        yield f"redis://127.0.0.1:{port}/0"


def delete_namespace(url: str, namespace: str) -> None:
    client = redis.from_url(url)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def ns(redis_url: str) -> Iterator[str]:
    """A Redis key namespace of this test alone; its keys are deleted afterwards."""
    namespace = f"t-{uuid.uuid4().hex[:16]}"
    yield namespace
    delete_namespace(redis_url, namespace)


@pytest.fixture
def make_client(artifact: Artifact, redis_url: str, ns: str) -> Callable[..., TestClient]:
    """``with make_client(**settings) as c:`` an app on this test's namespace (lifespan runs in ``with``)."""

    def make(**overrides: object) -> TestClient:
        values = {"artifacts": artifact.path, "redis_url": redis_url, "api_key": KEY, "namespace": ns}
        return TestClient(create_app(Settings(**{**values, **overrides})))

    return make


@pytest.fixture
def client(make_client) -> Iterator[TestClient]:
    with make_client() as c:
        yield c


@pytest.fixture
def stored(redis_url: str, ns: str) -> Callable[[], dict]:
    """Everything this test's namespace holds in Redis (to show that a failed request wrote nothing)."""

    def read() -> dict:
        r = redis.from_url(redis_url)
        readers = {
            "string": r.get,
            "hash": r.hgetall,
            "set": r.smembers,
            "list": lambda k: r.lrange(k, 0, -1),
            "stream": lambda k: r.xrange(k),
        }
        out = {key: readers[r.type(key).decode()](key) for key in r.scan_iter(match=f"{ns}:*")}
        r.close()
        return out

    return read


def n_index(client: TestClient) -> int:
    """Items in the FAISS index, from /info and /metrics (which must agree)."""
    n = client.get("/info").json()["n_items"]
    metric = next(line for line in client.get("/metrics").text.splitlines() if line.startswith("mmf_index_items "))
    assert float(metric.split()[1]) == n
    return n


def rec(client: TestClient, user_id: str, k: int = 20, fresh: int | None = None, **kw) -> dict:
    params = {"k": k} if fresh is None else {"k": k, "fresh": fresh}
    r = client.get(f"/recommend/{user_id}", params=params, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def rec_ids(client: TestClient, user_id: str, k: int = 1000) -> list[str]:
    return [i["item_id"] for i in rec(client, user_id, k)["items"]]


def similar_ids(client: TestClient, item_id: str, k: int = 1000) -> list[str]:
    r = client.get(f"/items/{item_id}/similar", params={"k": k})
    assert r.status_code == 200, r.text
    return [i["item_id"] for i in r.json()["items"]]


def post_item(client: TestClient, item_id: str, features: dict, status: int = 201) -> dict:
    r = client.post("/items", json={"item_id": item_id, "features": features}, headers=AUTH)
    assert r.status_code == status, r.text
    return r.json()


def interact(client: TestClient, user_id: str, item_id: str, status: int = 201) -> dict:
    r = client.post("/interactions", json={"user_id": user_id, "item_id": item_id}, headers=AUTH)
    assert r.status_code == status, r.text
    return r.json()


def assert_error(r: httpx.Response, status: int, *needles: str) -> None:
    """A 4xx answer with a JSON ``detail`` that mentions every one of ``needles``."""
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert detail, r.text
    text = json.dumps(detail)
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text}"


def wait_until(check: Callable[[], bool], timeout: float = PATIENCE_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"condition not reached within {timeout:g} s"
        time.sleep(0.01)


def online_embedding(client: TestClient, item_id: str) -> np.ndarray:
    engine = client.app.state.engine
    return engine.item_embedding(engine.item_row(item_id))


def assert_topk(items: list[dict], true_scores: dict[str, float], k: int, tol: float = 1e-4) -> None:
    """``items`` is a correct top-k of ``true_scores`` (item id -> exact inner product), up to ties: every
    returned score is the item's true score, and the returned scores are the k largest."""
    ids = [i["item_id"] for i in items]
    got = np.array([i["score"] for i in items])
    assert len(ids) == min(k, len(true_scores)) and len(set(ids)) == len(ids)
    assert set(ids) <= set(true_scores), set(ids) - set(true_scores)
    np.testing.assert_allclose(got, [true_scores[i] for i in ids], rtol=tol, atol=tol)
    best = np.sort(np.fromiter(true_scores.values(), dtype=np.float64))[::-1][: len(ids)]
    np.testing.assert_allclose(got, best, rtol=tol, atol=tol)


def user_scores(artifact: Artifact, user_id: str, extra: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """True scores of a training user for every item not seen in training (plus ``extra`` items)."""
    user = artifact.user_emb[artifact.user_ids.index(user_id)]
    scores = {i: float(e @ user) for i, e in zip(artifact.item_ids, artifact.item_emb, strict=True)}
    scores.update({i: float(e @ user) for i, e in (extra or {}).items()})
    return {i: s for i, s in scores.items() if i not in artifact.seen[user_id]}


def assert_sorted_scores(items: list[dict]) -> None:
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    ids = [i["item_id"] for i in items]
    assert len(ids) == len(set(ids)) and "-1" not in ids


@contextlib.contextmanager
def serve(app, port: int | None = None, **options) -> Iterator[str]:
    """A real uvicorn server for ``app`` on 127.0.0.1 in a background thread (lifespan included); yields its
    base URL. Several can run at once: replicas of one service sharing a Redis namespace. ``options``: more
    ``uvicorn.Config`` arguments."""
    import threading

    import uvicorn

    port = port or free_port()
    options = {"log_config": None, "lifespan": "on", "timeout_keep_alive": 30, **options}
    config = uvicorn.Config(app, host="127.0.0.1", port=port, **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive(), "uvicorn thread died during start-up"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def start_service(
    artifacts: Path, port: int, env: dict, log_path: Path, *extra: str, cwd: Path = ROOT
) -> subprocess.Popen:
    """``python -m service run`` as a real process, its output appended to ``log_path``."""
    import sys

    with log_path.open("a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "service", "run", "--artifacts", str(artifacts), "--port", str(port), *extra],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def wait_ready(proc: subprocess.Popen, base: str, log_path: Path, timeout: float = HANG_GUARD_S) -> None:
    """Until ``/readyz`` answers 200; fails at once if the server exits (a 2-worker start took 72 s on a
    2-core machine running two other jobs: only a hung start-up is cut short)."""
    try:
        ready(proc, base, timeout, log_path, poll_s=0.1)
    except NotReady as exc:
        pytest.fail(str(exc))


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate a server process, killing it if it does not exit within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
