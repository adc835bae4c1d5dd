"""Reliability and security of the service (issue 5): bad input, faults, concurrency, hot reload, soak.

Real components throughout: the tiny trained artifact of ``service_support``, real Redis (the shared one at
127.0.0.1:6379 on a private namespace, or a private ``redis-server`` where a test kills it), real uvicorn
servers (in threads, so several replicas share one interpreter) or real ``python -m service`` processes
where a test needs to SIGKILL or SIGHUP one. docs/RELIABILITY.md summarises what each test tries.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from models.artifacts import ArtifactError, sha256_file
from models.config import ModelConfig
from models.inference import InferenceEncoder
from service.app import create_app
from service.cli import main as service_main
from service.loading import load_bundle
from service.settings import Settings
from tests.patience import HANG_GUARD_S
from tests.service_support import (
    AUTH,
    KEY,
    PATIENCE_S,
    ROOT,
    Artifact,
    assert_error,
    free_port,
    n_index,
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

PY_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# ------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------


def rehash(path: Path) -> str:
    """Rewrite ``path``'s manifest so that it matches the files as they are now (new checksums, new id)."""
    manifest = json.loads((path / "manifest.json").read_text())
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(path.iterdir())
        if p.name != "manifest.json"
    }
    manifest["files"] = files
    manifest["artifact_id"] = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest["artifact_id"]


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@dataclass
class Version:
    path: Path
    artifact_id: str
    encoder: InferenceEncoder

    def fuse(self, features: dict[str, list[float]], modalities: dict[str, int]) -> np.ndarray:
        x = np.concatenate([np.asarray(features[m], dtype=np.float32) for m in modalities])[None]
        with torch.no_grad():
            return self.encoder.encode_items(torch.from_numpy(x))[0][0].numpy()


def encoder_of(path: Path, in_dim: int) -> InferenceEncoder:
    config = ModelConfig.model_validate(json.loads((path / "config.json").read_text())["model"])
    return InferenceEncoder.from_state_dict(config, in_dim, load_file(path / "encoder.safetensors"))


@pytest.fixture(scope="module")
def v1(artifact: Artifact) -> Version:
    path = artifact.path
    artifact_id = json.loads((path / "manifest.json").read_text())["artifact_id"]
    return Version(path, artifact_id, encoder_of(path, sum(artifact.modalities.values())))


@pytest.fixture(scope="module")
def v2(artifact: Artifact, tmp_path_factory: pytest.TempPathFactory) -> Version:
    """A new version of the artifact: same catalogue and modalities, another fusion network (the weights
    of the meta learner perturbed), so online items must be fused again after a reload."""
    path = copy_artifact(artifact.path, tmp_path_factory.mktemp("v2") / "artifacts")
    weights = load_file(path / "encoder.safetensors")
    gen = torch.Generator().manual_seed(5)
    for name, tensor in weights.items():
        if name.startswith("fusion.") and tensor.is_floating_point():
            weights[name] = tensor * 1.5 + 0.05 * torch.randn(tensor.shape, generator=gen)
    save_file(weights, str(path / "encoder.safetensors"))
    artifact_id = rehash(path)
    return Version(path, artifact_id, encoder_of(path, sum(artifact.modalities.values())))


@pytest.fixture(scope="module")
def incompatible(artifact: Artifact, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid artifact whose modalities differ (one renamed): must never replace the served one."""
    path = copy_artifact(artifact.path, tmp_path_factory.mktemp("incompatible") / "artifacts")
    catalog = json.loads((path / "catalog.json").read_text())
    catalog["modalities"][0]["name"] = "image"
    (path / "catalog.json").write_text(json.dumps(catalog))
    rehash(path)
    return path


def truncated_copy(src: Path, dst: Path, name: str, mode: str = "half", manifest: bool = True) -> Path:
    """A copy of ``src`` with file ``name`` truncated ("half"), emptied ("empty") or overwritten with
    garbage ("garbage"); with ``manifest`` the manifest is edited to match, so that the loader itself has
    to notice."""
    copy_artifact(src, dst)
    file = dst / name
    data = file.read_bytes()
    file.write_bytes({"half": data[: len(data) // 2], "empty": b"", "garbage": b"\x00garbage\xff" * 16}[mode])
    if manifest:
        rehash(dst)
    return dst


class Hammer:
    """Threads that send requests in a loop until stopped and keep every unexpected answer."""

    def __init__(self, calls: list[Callable[[httpx.Client], tuple[str, int, set[int]]]], base_urls: list[str]):
        self.calls, self.base_urls = calls, base_urls
        self.count = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(url, call), daemon=True) for url in base_urls for call in calls
        ]

    def _run(self, base: str, call) -> None:
        with httpx.Client(base_url=base, timeout=30, headers=AUTH) as http:
            while not self._stop.is_set():
                try:
                    what, status, ok = call(http)
                    error = None if status in ok else f"{base} {what}: {status}"
                except httpx.HTTPError as exc:
                    error = f"{base}: {type(exc).__name__}: {exc}"
                with self._lock:
                    self.count += 1
                    if error:
                        self.errors.append(error)

    def __enter__(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(timeout=30)


def reader(path: str, **params) -> Callable[[httpx.Client], tuple[str, int, set[int]]]:
    def call(http: httpx.Client) -> tuple[str, int, set[int]]:
        return path, http.get(path, params=params).status_code, {200}

    return call


class Proxy:
    """A TCP proxy to Redis that can cut one replica off (open connections closed, new ones refused)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                conn.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.sockets += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def disconnect(self) -> None:
        self.cut.set()
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self.sockets = []

    def reconnect(self) -> None:
        self.cut.clear()

    def close(self) -> None:
        self.disconnect()
        self.listener.close()


def service_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMF_")}
    env.update(PY_ENV)
    env.update(extra)
    return env


def rec_list(http: httpx.Client, user: str, k: int = 50) -> list[tuple[str, float]]:
    r = http.get(f"/recommend/{user}", params={"k": k})
    assert r.status_code == 200, r.text
    return [(i["item_id"], i["score"]) for i in r.json()["items"]]


def assert_same_lists(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> None:
    assert [i for i, _ in a] == [i for i, _ in b]
    np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-5, atol=1e-6)


def settle(*apps, timeout: float = PATIENCE_S) -> None:
    """Wait until every replica's follower has passed the last event in the stream (all writes applied)."""

    def done() -> bool:
        runtimes = [app.state.runtime for app in apps]
        return all(rt.follower.position == rt.state.last_event_id() for rt in runtimes)

    wait_until(done, timeout=timeout)


def admin_check(http: httpx.Client) -> dict:
    r = http.get("/admin/check", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_feature_values_are_strict_numbers(client: TestClient, artifact: Artifact, stored) -> None:
    """Non-numbers are refused (no coercion of "1.5", true or null), as are values that overflow float32 or
    the fused embedding; ints are numbers. Nothing is written by any refused request."""
    n, saved = n_index(client), stored()
    good = artifact.features(5)
    (m1, d1), (m2, d2) = list(artifact.modalities.items())
    cases = {
        "numeric string": ({**good, m1: ["1.5"] * d1}, [m1, "valid number"]),
        "one numeric string": ({**good, m1: [*good[m1][:-1], "0.25"]}, [m1, str(d1 - 1)]),
        "boolean": ({**good, m1: [True] * d1}, [m1, "valid number"]),
        "one boolean": ({**good, m2: [False, *good[m2][1:]]}, [m2]),
        "null": ({**good, m1: [None, *good[m1][1:]]}, [m1]),
        "object": ({**good, m1: [{"v": 1.0}] * d1}, [m1]),
        "float32 overflow": ({**good, m1: [1e39] * d1}, ["finite"]),
        "fused overflow 1e38": ({m1: [1e38] * d1, m2: [1e38] * d2}, ["too large"]),
        "fused overflow -1e38": ({m1: [-1e38] * d1, m2: [3e38] * d2}, ["too large"]),
        "int too large for float32": ({**good, m1: [10**40] * d1}, ["finite"]),
        "too many modalities": ({f"m{i}": [1.0] for i in range(65)}, ["features"]),
        "odd modality name": ({**good, "vis\u200bual": good[m1]}, ["unknown"]),
    }
    for name, (features, needles) in cases.items():
        r = client.post("/items", json={"item_id": "strict", "features": features}, headers=AUTH)
        assert r.status_code == 422, (name, r.text)
        assert_error(r, 422, *needles)
        batch = {"items": [{"item_id": "fine", "features": good}, {"item_id": "strict", "features": features}]}
        assert client.post("/items:batch", json=batch, headers=AUTH).status_code == 422, name
    raw_cases = {
        "1e400": "1e400",  # parsed as inf
        "huge integer literal": "1" + "0" * 400,  # an int float() cannot hold
        "5000-digit integer": "9" * 5000,  # over Python's int parsing limit: a 400 from the JSON parser
    }
    other = json.dumps(good[m2])
    for name, token in raw_cases.items():
        vec = ", ".join([token] + ["0.5"] * (d1 - 1))
        raw = f'{{"item_id": "strict", "features": {{"{m1}": [{vec}], "{m2}": {other}}}}}'
        r = client.post("/items", content=raw, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code in (400, 422) and r.json()["detail"], (name, r.text)
        assert len(r.content) < 5000, "the error echoed a huge input back"
    # ints are numbers: an all-integer vector is accepted
    ints = {m: [round(v) for v in vals] for m, vals in good.items()}
    assert n_index(client) == n and stored() == saved and client.get("/items/strict").status_code == 404
    r = client.post("/items", json={"item_id": "ints", "features": ints}, headers=AUTH)
    assert r.status_code == 201, r.text


def test_odd_unicode_and_surrogates_are_4xx(client: TestClient, artifact: Artifact, stored) -> None:
    """Lone surrogates (valid JSON escapes, not valid Unicode) in ids, modality names, values and paths are
    a 422 whose error echo still renders (it made the 422 itself fail with a 500 before), and so are
    invisible and control characters."""
    saved, n = stored(), n_index(client)
    headers = {**AUTH, "Content-Type": "application/json"}
    bodies = {
        "/items": [
            '{"item_id": "\\ud800", "features": {}}',
            '{"item_id": "a", "features": {"\\udfff": [1]}}',
            '{"item_id": "a", "features": {"visual": ["\\ud800"]}}',
            '{"item_id": "a\\u0000b", "features": {}}',
        ],
        "/interactions": ['{"user_id": "\\ud800", "item_id": "3"}', '{"user_id": "u", "item_id": "\\u202e3"}'],
        "/items:batch": ['{"items": [{"item_id": "\\udbff\\udfff\\ud800", "features": {}}]}'],
        "/admin/reload": ['{"artifacts": "\\ud800"}', '{"artifacts": "/no/such\\u0000dir"}'],
    }
    count = 0
    for path, raws in bodies.items():
        for raw in raws:
            r = client.post(path, content=raw.encode(), headers=headers)
            assert r.status_code == 422 and r.json()["detail"], (path, raw, r.text)
            count += 1
    for ident in ("a\u200bb", "\U0001f600", "\u0130", "a\u0301"):
        assert_error(
            client.post("/items", json={"item_id": ident, "features": artifact.features(1)}, headers=AUTH), 422
        )
    for path in ("/items/%ED%A0%80", "/recommend/%FF%FE", "/items/%00/similar", "/recommend/a%0D%0Ab"):
        r = client.get(path)
        assert r.status_code == 422 and r.json()["detail"], path
    assert stored() == saved and n_index(client) == n and count == 9


def test_load_bundle_names_the_broken_file(artifact: Artifact, tmp_path: Path) -> None:
    """Every file the service reads, truncated / emptied / overwritten with garbage *and* the manifest
    edited to match (so checksums pass and the loader itself fails): an ArtifactError naming that file,
    never a SafetensorError, EOFError or FAISS RuntimeError from inside a library."""
    names = ["catalog.json", "config.json", "metrics.json", "embeddings.safetensors", "encoder.safetensors",
             "model.safetensors", "items.faiss", "interactions.npy"]  # fmt: skip
    tried = 0
    for name in names:
        for mode in ("half", "empty", "garbage"):
            broken = truncated_copy(artifact.path, tmp_path / f"{name}-{mode}", name, mode)
            with pytest.raises(ArtifactError) as err:
                load_bundle(broken)
            assert str(broken / name) in str(err.value), (name, mode, str(err.value))
            assert "Traceback" not in str(err.value)
            shutil.rmtree(broken)
            tried += 1
    # checksum mismatch (file changed, manifest not), a listed file missing, no manifest at all
    broken = truncated_copy(artifact.path, tmp_path / "stale", "items.faiss", manifest=False)
    with pytest.raises(ArtifactError, match=r"items\.faiss: checksum mismatch"):
        load_bundle(broken)
    (broken / "items.faiss").unlink()
    with pytest.raises(ArtifactError, match=r"items\.faiss: listed in the manifest but missing"):
        load_bundle(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json: missing"):
        load_bundle(broken)
    # well-formed files with wrong contents
    wrong = copy_artifact(artifact.path, tmp_path / "wrong-types")
    catalog = json.loads((wrong / "catalog.json").read_text())
    (wrong / "catalog.json").write_text(json.dumps({**catalog, "items": 5}))
    rehash(wrong)
    with pytest.raises(ArtifactError, match=r"catalog\.json: 'items' must be a list"):
        load_bundle(wrong)
    wrong = copy_artifact(artifact.path, tmp_path / "wrong-encoder")
    weights = load_file(wrong / "encoder.safetensors")
    weights.pop(next(iter(weights)))
    save_file(weights, str(wrong / "encoder.safetensors"))
    rehash(wrong)
    with pytest.raises(ArtifactError, match=r"encoder\.safetensors: weights do not fit"):
        load_bundle(wrong)
    for name, pairs in (("wrong-pairs", np.zeros((3, 3), dtype=np.int64)), ("out-of-range", np.array([[0, 10**6]]))):
        wrong = copy_artifact(artifact.path, tmp_path / name)
        np.save(wrong / "interactions.npy", pairs)
        rehash(wrong)
        with pytest.raises(ArtifactError, match=r"interactions\.npy: (expected an \(n, 2\)|user or item rows out)"):
            load_bundle(wrong)
    assert tried == 24
    assert load_bundle(artifact.path).artifact_id  # and the intact one loads


BATCH = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys
    results = []
    module, argvs = sys.argv[1], json.loads(sys.argv[2])
    for argv in argvs:
        out, err = io.StringIO(), io.StringIO()
        sys.argv = [f"python -m {module}", *argv]
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException as exc:
                import traceback
                traceback.print_exc()
                code = -1
        results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    print(json.dumps(results))
    """
)


def bad_data_dirs(root: Path) -> dict[str, tuple[Path, str]]:
    """MMRec data directories broken in one way each -> (directory, file the error must name)."""
    inter = "userID\titemID\tx_label\n0\t0\t0\n0\t1\t1\n0\t2\t2\n1\t1\t0\n1\t0\t1\n1\t2\t2\n"
    good = np.ones((3, 4), dtype=np.float32)

    def make(name: str, inter_text: str | bytes = inter, feats: dict | None = None) -> Path:
        d = root / name
        d.mkdir(parents=True)
        (d / "x.inter").write_bytes(inter_text.encode() if isinstance(inter_text, str) else inter_text)
        for modality, value in (feats or {"image": good}).items():
            if isinstance(value, bytes):
                (d / f"{modality}_feat.npy").write_bytes(value)
            else:
                np.save(d / f"{modality}_feat.npy", value)
        return d

    root.mkdir(parents=True)
    npy = root / "good.npy"
    np.save(npy, good)
    full = npy.read_bytes()
    return {
        "inter not utf-8": (make("a", b"\xff\xfe\x00garbage"), "x.inter"),
        "inter without header columns": (make("b", "user item\n0 1\n"), "x.inter"),
        "inter non-integer id": (make("c", inter.replace("1\t2\t2", "1\tabc\t2")), "x.inter"),
        "inter ragged row": (make("d", inter + "1\t2\n"), "x.inter"),
        "npy truncated": (make("e", feats={"image": full[:-5]}), "image_feat.npy"),
        "npy header only": (make("f", feats={"image": full[:60]}), "image_feat.npy"),
        "npy garbage": (make("g", feats={"image": b"garbage bytes"}), "image_feat.npy"),
        "npy empty file": (make("h", feats={"image": b""}), "image_feat.npy"),
        "npy object array": (make("i", feats={"image": np.array([{"a": 1}] * 3, dtype=object)}), "image_feat.npy"),
        "npy 3-d": (make("j", feats={"image": np.ones((3, 4, 1), np.float32)}), "image_feat.npy"),
        "npy NaN": (make("k", feats={"image": np.full((3, 4), np.nan, np.float32)}), "image_feat.npy"),
        "npy float64 overflow": (make("l", feats={"image": np.full((3, 4), 1e300)}), "image_feat.npy"),
        "item counts differ": (make("m", feats={"image": good, "text": np.ones((4, 2), np.float32)}), "text_feat.npy"),
        "fewer items than ids": (make("n", feats={"image": np.ones((2, 4), np.float32)}), "image_feat.npy"),
    }


def test_cli_bad_training_inputs_and_broken_artifacts(artifact: Artifact, redis_url: str, tmp_path: Path) -> None:
    """``python -m training train --data BAD`` and ``python -m service run/check --artifacts BROKEN``: exit
    status 2 and one ``error:`` line naming the file, no traceback. Each command list runs in one
    interpreter (runpy, exactly what ``python -m`` does), the two interpreters side by side."""
    data_cases = bad_data_dirs(tmp_path / "data")
    train_argvs = [["train", "--data", str(d), "--out", str(tmp_path / "never"), "--no-progress"]
                   for d, _ in data_cases.values()]  # fmt: skip
    arts = tmp_path / "arts"
    art_cases = {
        "no manifest": (copy_artifact(artifact.path, arts / "no-manifest"), "manifest.json"),
        "listed file missing": (copy_artifact(artifact.path, arts / "no-faiss"), "items.faiss"),
        "checksum mismatch": (truncated_copy(artifact.path, arts / "stale", "embeddings.safetensors", manifest=False),
                              "embeddings.safetensors"),
    }  # fmt: skip
    (arts / "no-manifest" / "manifest.json").unlink()
    (arts / "no-faiss" / "items.faiss").unlink()
    for name in ("embeddings.safetensors", "encoder.safetensors", "model.safetensors", "items.faiss",
                 "interactions.npy", "catalog.json"):  # fmt: skip
        art_cases[f"{name} truncated, manifest matching"] = (truncated_copy(artifact.path, arts / name, name), name)
    service_argvs = [["run", "--artifacts", str(p), "--port", "1"] for p, _ in art_cases.values()]
    service_argvs.append(["check", "--artifacts", str(arts / "items.faiss"), "--redis-url", redis_url])
    service_argvs.append(["check", "--artifacts", str(arts / "missing"), "--redis-url", redis_url])
    env = service_env(MMF_REDIS_URL=redis_url, MMF_NAMESPACE="never-used")
    procs = [
        subprocess.Popen([sys.executable, "-c", BATCH, module, json.dumps(argvs)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for module, argvs in (("training", train_argvs), ("service", service_argvs))
    ]  # fmt: skip
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    expected = [*data_cases.items(), *art_cases.items(), ("check: faiss truncated", (None, "items.faiss")),
                ("check: no directory", (None, "missing/manifest.json"))]  # fmt: skip
    for (name, (_, file)), result in zip(expected, outputs[0] + outputs[1], strict=True):
        stderr = result["stderr"]
        assert result["code"] == 2, (name, result)
        assert "Traceback" not in stderr and "Traceback" not in result["stdout"], (name, stderr)
        error_lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(error_lines) == 1 and file in error_lines[0], (name, stderr)
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------------------
# Faults: Redis outages, crashes, hot reload
# ------------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------------
# Concurrency and load
# ------------------------------------------------------------------------------------------------------


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
                assert set(engine.item_rows) == set(artifact.item_ids) | live
                assert sorted(engine.item_rows.values()) == sorted(ids.tolist())
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


# ------------------------------------------------------------------------------------------------------
# Security
# ------------------------------------------------------------------------------------------------------


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
