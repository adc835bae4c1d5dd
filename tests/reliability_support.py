"""Helpers and fixtures of the reliability tests (test_bad_input, test_faults, test_concurrency,
test_security): artifact copies and versions, broken artifacts, Redis servers to kill, replicas in threads."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.artifacts import CATALOG, CONFIG, ENCODER, MANIFEST, sha256_file
from models.metammf.inference import InferenceEncoder
from models.registry import parse_model_config
from tests.service_support import (
    AUTH,
    PATIENCE_S,
    Artifact,
    no_mmf_environment,  # noqa: F401 (autouse)
    wait_until,
)

PY_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def rehash(path: Path) -> str:
    """Rewrite ``path``'s manifest so that it matches the files as they are now (new checksums, new id)."""
    manifest = json.loads((path / MANIFEST).read_text())
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(path.iterdir())
        if p.name != MANIFEST
    }
    manifest["files"] = files
    manifest["artifact_id"] = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
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
    config = parse_model_config(json.loads((path / CONFIG).read_text())["model"])
    return InferenceEncoder.from_state_dict(config, in_dim, load_file(path / ENCODER))


@pytest.fixture(scope="module")
def v1(artifact: Artifact) -> Version:
    path = artifact.path
    artifact_id = json.loads((path / MANIFEST).read_text())["artifact_id"]
    return Version(path, artifact_id, encoder_of(path, sum(artifact.modalities.values())))


@pytest.fixture(scope="module")
def v2(artifact: Artifact, tmp_path_factory: pytest.TempPathFactory) -> Version:
    """A new version of the artifact: same catalogue and modalities, another fusion network (the weights
    of the meta learner perturbed), so online items must be fused again after a reload."""
    path = copy_artifact(artifact.path, tmp_path_factory.mktemp("v2") / "artifacts")
    weights = load_file(path / ENCODER)
    gen = torch.Generator().manual_seed(5)
    for name, tensor in weights.items():
        if name.startswith("fusion.") and tensor.is_floating_point():
            weights[name] = tensor * 1.5 + 0.05 * torch.randn(tensor.shape, generator=gen)
    save_file(weights, str(path / ENCODER))
    artifact_id = rehash(path)
    return Version(path, artifact_id, encoder_of(path, sum(artifact.modalities.values())))


@pytest.fixture(scope="module")
def incompatible(artifact: Artifact, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid artifact whose modalities differ (one renamed): must never replace the served one."""
    path = copy_artifact(artifact.path, tmp_path_factory.mktemp("incompatible") / "artifacts")
    catalog = json.loads((path / CATALOG).read_text())
    catalog["modalities"][0]["name"] = "image"
    (path / CATALOG).write_text(json.dumps(catalog))
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
