"""Serving benchmark: latency, throughput and recall of the real HTTP service, per catalogue size and index.

For each ``--items`` size and each ``--index`` kind, starts ``python -m service run`` (``MMF_INDEX=<kind>``;
other ``MMF_*`` variables of the caller pass through, e.g. ``MMF_HNSW_EF_SEARCH=256``) on a free loopback
port against Redis (``--redis-url``, a fresh namespace, deleted afterwards) and measures, in this order:

1. **build time** of the index (the service reports it in ``GET /info``) and **recall@20** against exact
   search: ``GET /recommend/{user}?k=20`` for ``--recall-users`` training users (1000) compared with the
   exact top 20 computed here with numpy (inner product over every item, the user's known interactions
   excluded, as the service does); recall = mean |answer ∩ exact| / 20.
2. **peak throughput** with ``wrk`` (closed loop: ``--connections`` connections, each sending the next
   request when the answer arrives; p50/p99 as wrk reports them; each run after an unmeasured 2 s one, so
   that one-off costs of a fresh process are not counted): a no-op endpoint (``GET /healthz``),
   ``GET /recommend/{random user}?k=20`` and ``POST /items`` (new ids, so the index grows), in the same run,
   so the ratios are side by side.
3. **/recommend and POST /items at half of their peak**: wrk cannot fix a request rate (and wrk2 is not
   available), so an open loop generator here sends request *i* at ``start + i / rate`` with ``rate`` = half
   the peak wrk measured, over up to ``--open-connections`` keep-alive connections, and measures each latency
   from the request's *due* time (a late answer delays nobody else's schedule and its lateness counts; no
   coordinated omission). It speaks minimal HTTP/1.1 over asyncio streams (uvloop when installed) instead of
   using httpx, so that the client costs little CPU next to the server on a small machine. (wrk's p99 at peak
   is mostly queueing: --connections requests wait behind each other.)
4. **/recommend again after the writes**, with wrk: the items the POST runs added are now online; with
   precomputed lists (``MMF_PRECOMPUTED_K``, on by default) each answer merges its list with the best of them
   (filed with each training user at write time, ``MMF_ONLINE_CANDIDATES_MAX_USERS``; or, with that set to 0,
   an exact scan while they are few and their own index past that), so this row shows what they cost. The
   summary gives both throughput ratios.

5. **Churn** (``--churn N``, repeatable, e.g. ``--churn 10000 --churn 100000``): items streaming in. New items
   (features from the synthetic generator, like the catalogue's) are posted through ``POST /items:batch``
   (``--batch`` per request, two connections, bodies encoded beforehand) until N are online; the throughput
   counts items per second. Then 1% of them change, half replaced with new features and half deleted, and the
   no-op, ``/recommend`` at peak and at half peak, and recall@20 against exact search over the artifact's and
   the online items (their embeddings computed here with the artifact's encoder, as the service fuses them)
   are measured again. The third table gives one row per N.

Artifacts are built once and cached under ``bench/.cache``. Up to ``--train-items`` (100k) items the
artifact is trained (one epoch: latency does not depend on model quality; recall does, see docs/performance.md); a
larger catalogue extends the trained one: ``--items - --train-items`` more synthetic items (the training
data's generator, its projections and group signatures replayed from its seed, with other draws) are fused
by the trained model's meta learner exactly as ``POST /items`` fuses a new item (ID part: the mean item ID
embedding), and written as a new artifact with the same users and interactions. So the
1M-item catalogue is 100k trained items plus 900k "new" ones, which is what a large online catalogue looks
like to this service. Prints two Markdown tables.

    python bench/serve.py --items 100000 --duration 10
    python bench/serve.py --items 100000 --items 1000000 --index flat --index hnsw --index ivf
    python bench/serve.py --items 10000 --index flat --appendfsync everysec --appendfsync always
    python bench/serve.py --items 1000000 --index ivf --churn 10000 --churn 100000

With ``--appendfsync`` the service runs with its embedded Redis (``MMF_REDIS_APPENDFSYNC``) instead of
``--redis-url``: the write rows then show what each durability policy costs, side by side.

Needs `wrk` (Debian/Ubuntu: apt-get install wrk). Loopback only; every run is bounded by --duration (the
index build at start-up is not: hnsw over 1M items takes minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.support import free_port, wait_ready  # noqa: E402
from models.artifacts import (  # noqa: E402
    CATALOG,
    CONFIG,
    EMBEDDINGS,
    ENCODER,
    INDEX,
    INTERACTIONS,
    MANIFEST,
    METRICS,
    MODEL_WEIGHTS,
    PER_USER_TEST,
    PER_USER_VALID,
)

CACHE = ROOT / "bench" / ".cache"
KINDS = ("flat", "hnsw", "ivf")


# ---------------------------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------------------------


def synthetic_config(n_items: int, n_users: int, seed: int = 0):
    from training.synthetic import SyntheticConfig

    return SyntheticConfig(n_users=n_users, n_items=n_items, interactions_per_user=5.0, seed=seed)


def build_artifact(n_items: int, n_users: int, train_items: int = 100_000) -> Path:
    """The artifact for ``n_items`` items: trained if ``n_items <= train_items``, else the trained
    ``train_items`` artifact extended with fused synthetic items (module docstring)."""
    if n_items > train_items:
        return extend_artifact(build_artifact(train_items, n_users, train_items), n_items, n_users)
    out = CACHE / f"serve-{n_items}-{n_users}"
    if (out / MANIFEST).is_file():
        return out
    from models.config import MetaMMFGraphConfig
    from training.config import DataConfig, RunConfig, TrainConfig
    from training.export import export_artifacts
    from training.synthetic import generate_synthetic
    from training.trainer import train

    synth = synthetic_config(n_items, n_users)
    run = RunConfig(
        data=DataConfig(synthetic=synth),
        model=MetaMMFGraphConfig(),
        train=TrainConfig(epochs=1, progress=False, eval_batch_size=max(8, 2_000_000_000 // (4 * n_items * 64))),
    )
    print(f"building a {n_items}-item artifact in {out} ...", file=sys.stderr)
    data = generate_synthetic(synth)
    result = train(data, run.model, run.train)
    return export_artifacts(result, data, run, out)


def synthetic_item_features(cfg, n_new: int, seed: int, chunk: int) -> Iterator[np.ndarray]:
    """Features of ``n_new`` more items from the generator of ``cfg`` (its projections and group signatures,
    reproduced by replaying its random stream), with other draws; yields (chunk, sum of dims) float32."""
    from training.synthetic import _item_content

    rng = np.random.default_rng(cfg.seed)  # replays generate_synthetic_with_truth up to the features
    group = rng.permutation(np.arange(cfg.n_items) % cfg.n_groups).astype(np.int64)
    _item_content(cfg, rng, group)
    k, maps = cfg.latent_dim, []
    for name, dim in cfg.modality_dims.items():
        maps.append((name, rng.standard_normal((k, dim)) / np.sqrt(k), rng.standard_normal((cfg.n_groups, dim))))
        rng.standard_normal((cfg.n_items, dim))  # the training items' noise
    order = sorted(range(len(maps)), key=lambda m: maps[m][0])  # RecData keeps modalities sorted by name
    new_rng = np.random.default_rng(seed)
    for start in range(0, n_new, chunk):
        part = cfg.model_copy(update={"n_items": min(chunk, n_new - start)})
        new_group = new_rng.integers(0, cfg.n_groups, part.n_items)
        _, content = _item_content(part, new_rng, new_group)
        blocks = []
        for m in order:
            _, proj, signature = maps[m]
            x = content[m] @ proj + cfg.signature_strength * signature[new_group]
            blocks.append(x + cfg.noise_std * new_rng.standard_normal(x.shape))
        yield np.concatenate(blocks, axis=1).astype(np.float32)


def extend_artifact(base: Path, n_items: int, n_users: int, chunk: int = 20_000) -> Path:
    """``base`` plus ``n_items - len(base items)`` synthetic items fused by ``base``'s model."""
    import torch
    from safetensors.torch import save_file

    from models.artifacts import Bundle, write_artifacts
    from training.export import build_item_index

    out = CACHE / f"{base.name}-extended-{n_items}"
    if (out / MANIFEST).is_file():
        return out
    bundle = Bundle(base)
    n_base = len(bundle.item_ids)
    extra = n_items - n_base
    print(f"extending {base.name} with {extra} fused synthetic items into {out} ...", file=sys.stderr)
    finals, states = [bundle.item_embeddings], [bundle.item_states]
    with torch.no_grad():
        for features in synthetic_item_features(synthetic_config(n_base, n_users), extra, seed=1, chunk=chunk):
            final, state = bundle.encoder.encode_items(torch.from_numpy(features))
            finals.append(final.numpy())
            states.append(state.numpy())
    item_embeddings = np.ascontiguousarray(np.concatenate(finals))
    del finals
    item_states = np.ascontiguousarray(np.concatenate(states, axis=1))
    del states
    popularity = np.concatenate([bundle.item_popularity, np.zeros(extra, np.float32)])
    catalog = json.loads((base / CATALOG).read_text())
    catalog["items"] = [str(i) for i in range(n_items)]

    def write(tmp: Path) -> None:
        import faiss

        for name in (CONFIG, METRICS, MODEL_WEIGHTS, ENCODER,
                     INTERACTIONS, PER_USER_VALID, PER_USER_TEST):  # fmt: skip
            if (base / name).is_file():
                shutil.copyfile(base / name, tmp / name)
        save_file(
            {
                "user_embeddings": torch.from_numpy(np.ascontiguousarray(bundle.user_embeddings)),
                "item_embeddings": torch.from_numpy(item_embeddings),
                "item_states": torch.from_numpy(item_states),
                "item_popularity": torch.from_numpy(popularity),
            },
            tmp / EMBEDDINGS,
        )
        faiss.write_index(build_item_index(item_embeddings), str(tmp / INDEX))
        (tmp / CATALOG).write_text(json.dumps(catalog))

    return write_artifacts(out, write, {"model": bundle.model_config.name, "extended_from": bundle.artifact_id})


def seen_rows(artifact: Path) -> dict[int, list[int]]:
    """Training item rows per user row: what the service excludes from a user's recommendations."""
    seen: dict[int, list[int]] = {}
    for u, i in np.load(artifact / INTERACTIONS, allow_pickle=False).tolist():
        seen.setdefault(u, []).append(i)
    return seen


def exact_top_rows(
    items: np.ndarray, user_emb: np.ndarray, seen: dict[int, list[int]], users: list[int], k: int
) -> list[set[int]]:
    """Exact top-k item rows of user rows ``users`` by inner product, their ``seen`` rows excluded."""
    out = []
    for start in range(0, len(users), 100):
        batch = users[start : start + 100]
        scores = user_emb[batch] @ items.T
        for j, u in enumerate(batch):
            scores[j, seen.get(u, [])] = -np.inf
        out += [set(row) for row in np.argpartition(-scores, k, axis=1)[:, :k].tolist()]
    return out


def exact_top(artifact: Path, users: list[int], k: int) -> list[set[str]]:
    """Exact top-k item ids of training users by inner product, their known interactions excluded."""
    from safetensors.numpy import load_file

    emb = load_file(artifact / EMBEDDINGS)
    catalog = json.loads((artifact / CATALOG).read_text())
    top = exact_top_rows(emb["item_embeddings"], emb["user_embeddings"], seen_rows(artifact), users, k)
    return [{catalog["items"][i] for i in rows} for rows in top]


# ---------------------------------------------------------------------------------------------------------
# Load generators
# ---------------------------------------------------------------------------------------------------------


def feature_parts(modalities: dict[str, int], seed: int) -> tuple[str, str]:
    """A ``features`` JSON object split around its first value: ``head + value + tail``, so that every posted
    item gets features of its own (equal features would give equal embeddings, whose ties a search must widen
    past: not what items streaming in look like)."""
    rng = np.random.default_rng(seed)
    features = {m: np.round(rng.normal(size=d), 4).tolist() for m, d in modalities.items()}
    first = next(iter(features))
    features[first][0] = "FIRST"
    head, tail = json.dumps(features).split('"FIRST"')
    return head, tail


def lua_scripts(tmp: Path, n_users: int, modalities: dict[str, int], api_key: str) -> dict[str, Path]:
    head, tail = feature_parts(modalities, 0)
    recommend = tmp / "recommend.lua"
    recommend.write_text(
        f"math.randomseed(os.time())\n"
        "request = function()\n"
        f'  return wrk.format("GET", "/recommend/" .. math.random(0, {n_users - 1}) .. "?k=20")\n'
        "end\n"
    )
    post = tmp / "post.lua"
    head, tail = (part.replace('"', '\\"') for part in (head, tail))  # the inside of Lua string literals
    post.write_text(
        "local counter = 0\n"
        "-- unique per wrk thread and run (the warm-up run must not post the same ids)\n"
        'local prefix = (tostring({}):gsub("table: ", "")) .. "-" .. os.time()\n'
        'wrk.method = "POST"\n'
        f'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["X-API-Key"] = "{api_key}"\n'
        "request = function()\n"
        "  counter = counter + 1\n"
        f'  local body = "{{\\"item_id\\": \\"bench-" .. prefix .. "-" .. counter .. "\\", '
        f'\\"features\\": {head}" .. string.format("%.4f", 4 * math.random() - 2) .. "{tail}}}"\n'
        '  return wrk.format(nil, "/items", nil, body)\n'
        "end\n"
    )
    return {"recommend": recommend, "post": post}


def parse_wrk(output: str) -> dict[str, float]:
    def to_ms(value: str, unit: str) -> float:
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    result = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
        result[f"p{pct}_ms"] = to_ms(*m.groups()) if m else float("nan")
    m = re.search(r"Requests/sec:\s+([\d.]+)", output)
    result["rps"] = float(m.group(1)) if m else float("nan")
    m = re.search(r"(\d+) requests in", output)
    result["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["errors"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    result["errors"] += sum(int(g) for g in m.groups()) if m else 0
    return result


def run_wrk(url: str, script: Path | None, duration: int, connections: int, threads: int) -> dict[str, float]:
    """A 2 s warm-up run (not measured: first calls, and the first online add growing FAISS's storage),
    then the measured one."""
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", "--latency", "--timeout", "5s"]
    if script is not None:
        cmd += ["-s", str(script)]
    subprocess.run([*cmd, "-d2s", url], capture_output=True, text=True, check=True)
    out = subprocess.run([*cmd, f"-d{duration}s", url], capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


async def _open_loop(host: str, port: int, request, rate: float, duration: float, connections: int) -> dict:
    loop = asyncio.get_running_loop()
    n = max(1, int(rate * duration))
    queue: asyncio.Queue = asyncio.Queue()
    latencies: list[float] = []
    errors = 0

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (job := await queue.get()) is not None:
                due, raw = job
                writer.write(raw)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
                await reader.readexactly(length)
                latencies.append(loop.time() - due)
                errors += head[9:10] != b"2"  # "HTTP/1.1 2xx"
        finally:
            writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    start = loop.time() + 0.1
    for i in range(n):
        due = start + i / rate
        if (delay := due - loop.time()) > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((due, request(i)))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = loop.time() - start
    lat = np.array(latencies) * 1e3
    return {
        "rps": len(lat) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "requests": len(lat),
        "errors": errors + (n - len(lat)),
    }


def open_loop(base: str, request, rate: float, duration: float, connections: int) -> dict:
    """Requests at a fixed rate (open loop), latency from each request's due time (module docstring).
    ``request(i)`` gives the raw HTTP/1.1 bytes of request i."""
    host, port = base.removeprefix("http://").split(":")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(_open_loop(host, int(port), request, rate, duration, connections))


def http_get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()


def http_post(path: str, body: bytes, api_key: str) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nX-API-Key: {api_key}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


# ---------------------------------------------------------------------------------------------------------
# Churn: items streaming in
# ---------------------------------------------------------------------------------------------------------


class OnlineMirror:
    """What the service should hold online, computed here: each posted item's features and embedding (the
    artifact's encoder, as the service fuses them), so that recall is measured against exact search over the
    artifact's and the online items."""

    def __init__(self, artifact: Path, n_users: int, train_items: int, batch: int) -> None:
        from models.artifacts import Bundle

        self.bundle = Bundle(artifact)
        self.modalities = self.bundle.modalities
        base = min(len(self.bundle.item_ids), train_items)
        self._features = synthetic_item_features(synthetic_config(base, n_users), 10**9, seed=2, chunk=batch)
        self.embeddings: dict[str, np.ndarray] = {}
        self._serial = 0

    def next_batch(self, ids: list[str] | None = None, size: int = 0) -> tuple[list[str], bytes]:
        """A ``POST /items:batch`` body: new items (``size`` of them) or new features for ``ids``."""
        import torch

        features = next(self._features)
        if ids is None:
            ids = [f"churn-{self._serial + i}" for i in range(size)]
            self._serial += size
        features = np.round(features[: len(ids)], 4)  # what the JSON carries, as float32 in the service
        with torch.no_grad():
            final, _ = self.bundle.encoder.encode_items(torch.from_numpy(features.astype(np.float32)))
        items = []
        for item_id, row, emb in zip(ids, features, final.numpy(), strict=True):
            self.embeddings[item_id] = emb
            parts, start = {}, 0
            for name, dim in self.modalities.items():
                parts[name] = row[start : start + dim].tolist()
                start += dim
            items.append({"item_id": item_id, "features": parts})
        return ids, json.dumps({"items": items}).encode()

    def exact_top(self, artifact: Path, users: list[int], k: int) -> list[set[str]]:
        """Exact top-k item ids of training users over the artifact's and the online items."""
        online_ids = list(self.embeddings)
        items = np.concatenate([self.bundle.item_embeddings, np.stack([self.embeddings[i] for i in online_ids])])
        top = exact_top_rows(items, self.bundle.user_embeddings, seen_rows(artifact), users, k)
        n_base, item_ids = len(self.bundle.item_ids), self.bundle.item_ids
        return [{item_ids[r] if r < n_base else online_ids[r - n_base] for r in rows} for rows in top]


def post_batches(base: str, bodies: list[bytes], api_key: str, connections: int = 2) -> tuple[float, list[float]]:
    """Post the prepared ``POST /items:batch`` bodies over ``connections`` keep-alive connections;
    (seconds in all, each request's seconds)."""
    import threading
    import time

    latencies: list[float] = []
    pending = list(reversed(bodies))
    lock = threading.Lock()
    headers = {"Content-Type": "application/json", "X-API-Key": api_key}

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=300) as http:
            while True:
                with lock:
                    if not pending:
                        return
                    body = pending.pop()
                start = time.perf_counter()
                http.post("/items:batch", content=body, headers=headers).raise_for_status()
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies


def measure_recall(base: str, catalog: dict, users: list[int], truth: list[set[str]]) -> float:
    """Mean |served top 20 ∩ ``truth``| / 20 over training users (rows of ``catalog['users']``)."""
    hits = []
    with httpx.Client(base_url=base, timeout=30) as http:
        for u, expected in zip(users, truth, strict=True):
            answer = http.get(f"/recommend/{catalog['users'][u]}", params={"k": 20}).json()
            hits.append(len(expected & {i["item_id"] for i in answer["items"]}) / 20)
    return float(np.mean(hits))


def churn_rows(
    base: str, artifact: Path, catalog: dict, api_key: str, scripts: dict, users: list[int], args: argparse.Namespace
) -> tuple[list[dict], list[dict]]:
    """The churn scenario (module docstring, 5.): rows for the first table and one summary per ``--churn``."""
    mirror = OnlineMirror(artifact, len(catalog["users"]), args.train_items, args.batch)
    rng = np.random.default_rng(3)
    users_by_request = rng.integers(0, len(catalog["users"]), 100_000)
    request_paths = [http_get(f"/recommend/{catalog['users'][u]}?k=20") for u in users_by_request]
    rows, summaries, online = [], [], 0
    for target in sorted(args.churn):
        bodies, fresh = [], []
        while online < target:
            ids, body = mirror.next_batch(size=min(args.batch, target - online))
            bodies.append(body)
            fresh += ids
            online += len(ids)
        seconds, latencies = post_batches(base, bodies, api_key)
        lat = np.array(latencies) * 1e3
        name = f"POST /items:batch ({args.batch} items each) up to {target:,} online items: items/s"
        posted = {"endpoint": name, "rps": len(fresh) / seconds, "p50_ms": float(np.percentile(lat, 50)),
                  "p99_ms": float(np.percentile(lat, 99)), "requests": len(bodies), "errors": 0}  # fmt: skip
        rows.append(posted)
        print(f"  {name}: {posted}", file=sys.stderr)
        # 1% of the online items change: half get new features, half are deleted.
        live = list(mirror.embeddings)
        changed = rng.choice(len(live), max(2, len(live) // 100), replace=False)
        replaced, deleted = [live[i] for i in changed[::2]], [live[i] for i in changed[1::2]]
        for start in range(0, len(replaced), args.batch):
            _, body = mirror.next_batch(ids=replaced[start : start + args.batch])
            post_batches(base, [body], api_key, connections=1)
        with httpx.Client(base_url=base, timeout=30, headers={"X-API-Key": api_key}) as http:
            for item_id in deleted:
                http.delete(f"/items/{item_id}").raise_for_status()
                del mirror.embeddings[item_id]
        online = len(mirror.embeddings)
        recall = measure_recall(base, catalog, users, mirror.exact_top(artifact, users, 20))
        label = f"with {online:,} online items ({len(replaced)} replaced, {len(deleted)} deleted)"
        noop = run_wrk(f"{base}/healthz", None, args.duration, args.connections, args.threads)
        rec = run_wrk(base, scripts["recommend"], args.duration, args.connections, args.threads)
        rate = rec["rps"] / 2
        half = open_loop(
            base, lambda i: request_paths[i % len(request_paths)], rate, args.duration, args.open_connections
        )
        for endpoint, result in (
            (f"GET /healthz (no-op) {label}", noop),
            (f"GET /recommend/{{user}}?k=20 {label}", rec),
            (f"GET /recommend/{{user}}?k=20 at half peak ({rate:.0f}/s, open loop) {label}", half),
        ):
            rows.append({"endpoint": endpoint, **result})
            print(f"  {endpoint}: {result}", file=sys.stderr)
        summaries.append({"online": online, "post_items_s": posted["rps"], "post_p99": posted["p99_ms"],
                          "ratio": rec["rps"] / noop["rps"], "half_p99": half["p99_ms"], "recall": recall})  # fmt: skip
        print(f"  churn {target:,}: recall@20 {recall:.4f}", file=sys.stderr)
    return rows, summaries


# ---------------------------------------------------------------------------------------------------------
# One service
# ---------------------------------------------------------------------------------------------------------


def bench_service(
    artifact: Path, n_items: int, kind: str, fsync: str | None, args: argparse.Namespace
) -> tuple[list[dict], dict]:
    """One service run; ``fsync`` None: Redis at --redis-url, else the service's embedded Redis (a fresh state
    directory) with that appendfsync policy."""
    catalog = json.loads((artifact / CATALOG).read_text())
    modalities = {m["name"]: m["dim"] for m in catalog["modalities"]}
    n_users = len(catalog["users"])
    api_key, namespace, port = uuid.uuid4().hex, f"bench-{uuid.uuid4().hex[:8]}", free_port()
    state_dir = tempfile.TemporaryDirectory(prefix="bench-state-", dir=args.state_parent)
    env = {
        **{k: v for k, v in os.environ.items() if k != "MMF_REDIS_URL"},
        "MMF_NAMESPACE": namespace,
        "MMF_API_KEY": api_key,
        "MMF_INDEX": kind,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    if fsync is None:
        env["MMF_REDIS_URL"] = args.redis_url
    else:
        env.update(MMF_STATE_DIR=state_dir.name, MMF_REDIS_APPENDFSYNC=fsync)
    redis_label = "external" if fsync is None else f"embedded, appendfsync {fsync}"
    cmd = [sys.executable, "-m", "service", "run", "--artifacts", str(artifact), "--port", str(port),
           "--workers", str(args.workers), "--log-level", "warning"]  # fmt: skip
    print(f"[{n_items} items, {kind}, Redis {redis_label}] starting the service ...", file=sys.stderr)
    server = subprocess.Popen(cmd, cwd=ROOT, env=env)
    rows: list[dict] = []
    summary: dict = {"items": n_items, "index": kind, "redis": redis_label}
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(server, base, args.start_timeout)
        info = httpx.get(f"{base}/info", timeout=10).json()
        summary.update(
            params=info["index"]["params"], build_s=info["index"]["build_seconds"], precomputed=info["precomputed"]
        )

        users = np.random.default_rng(1).choice(n_users, min(args.recall_users, n_users), replace=False).tolist()
        truth = exact_top(artifact, users, 20)
        summary["recall"] = measure_recall(base, catalog, users, truth)
        print(f"  build {summary['build_s']:.1f}s, recall@20 {summary['recall']:.4f}", file=sys.stderr)

        with tempfile.TemporaryDirectory() as tmp:
            scripts = lua_scripts(Path(tmp), n_users, modalities, api_key)
            runs = [
                ("GET /healthz (no-op)", None, f"{base}/healthz"),
                ("GET /recommend/{user}?k=20", scripts["recommend"], base),
            ]
            for name, script, url in runs:
                result = run_wrk(url, script, args.duration, args.connections, args.threads)
                rows.append({"items": n_items, "index": kind, "redis": redis_label, "endpoint": name, **result})
                print(f"  {name}: {result}", file=sys.stderr)
            rate = rows[-1]["rps"] / 2
            rng = np.random.default_rng(2)
            paths = [http_get(f"/recommend/{catalog['users'][u]}?k=20") for u in rng.integers(0, n_users, 10_000)]
            result = open_loop(base, lambda i: paths[i % len(paths)], rate, args.duration, args.open_connections)
            name = f"GET /recommend/{{user}}?k=20 at half peak ({rate:.0f}/s, open loop)"
            rows.append({"items": n_items, "index": kind, "redis": redis_label, "endpoint": name, **result})
            print(f"  {name}: {result}", file=sys.stderr)
            result = run_wrk(base, scripts["post"], args.duration, args.connections, args.threads)
            rows.append({"items": n_items, "index": kind, "redis": redis_label, "endpoint": "POST /items", **result})
            print(f"  POST /items: {result}", file=sys.stderr)
            rate = rows[-1]["rps"] / 2
            head, tail = feature_parts(modalities, 1)

            def post(i: int) -> bytes:
                features = f"{head}{(i % 40_000) / 10_000 - 2:.4f}{tail}"
                return http_post("/items", f'{{"item_id": "half-{i}", "features": {features}}}'.encode(), api_key)

            result = open_loop(base, post, rate, args.duration, args.open_connections)
            name = f"POST /items at half peak ({rate:.0f}/s, open loop)"
            rows.append({"items": n_items, "index": kind, "redis": redis_label, "endpoint": name, **result})
            print(f"  {name}: {result}", file=sys.stderr)
            # Again with the items the writes added: each list is merged with the best of them.
            online = (httpx.get(f"{base}/info", timeout=10).json()["precomputed"] or {}).get("online_items")
            result = run_wrk(base, scripts["recommend"], args.duration, args.connections, args.threads)
            name = "GET /recommend/{user}?k=20 after the writes" + (f" ({online:,} online items)" if online else "")
            rows.append({"items": n_items, "index": kind, "redis": redis_label, "endpoint": name, **result})
            print(f"  {name}: {result}", file=sys.stderr)
            healthz, rec, half, post, post_half, rec_after = rows
            summary.update(
                ratio=rec["rps"] / healthz["rps"], half_p99=half["p99_ms"], post_p99=post["p99_ms"],
                post_half_p99=post_half["p99_ms"], ratio_after=rec_after["rps"] / healthz["rps"],
            )  # fmt: skip
            if args.churn:
                churned, summary["churn"] = churn_rows(base, artifact, catalog, api_key, scripts, users, args)
                rows += [{"items": n_items, "index": kind, "redis": redis_label, **r} for r in churned]
    finally:
        server.terminate()
        server.wait(timeout=60)
        if fsync is None:
            import redis

            client = redis.from_url(args.redis_url)
            keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
        state_dir.cleanup()
    return rows, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, action="append", help="catalogue size (repeatable; default 100000)")
    parser.add_argument("--index", choices=KINDS, action="append", help="index kind (repeatable; default all)")
    parser.add_argument("--users", type=int, default=20000, help="users in the synthetic artifact")
    parser.add_argument("--train-items", type=int, default=100_000, help="larger catalogues extend a trained one")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=4, help="concurrent wrk connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--open-connections", type=int, default=32, help="connections of the open-loop run")
    parser.add_argument("--recall-users", type=int, default=1000, help="users whose top 20 is checked")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers")
    parser.add_argument("--start-timeout", type=float, default=3600, help="seconds to wait for readiness")
    parser.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/0", help="Redis of the runs without --appendfsync"
    )
    parser.add_argument(
        "--appendfsync", choices=["everysec", "always"], action="append",
        help="run with the service's embedded Redis and this fsync policy instead of --redis-url (repeatable: the "
        "runs side by side)",
    )  # fmt: skip
    parser.add_argument("--state-parent", help="directory for the embedded Redis' files (default: the temp dir)")
    parser.add_argument(
        "--churn", type=int, action="append",
        help="then post items through POST /items:batch until this many are online, change 1%% of them and "
        "measure again (repeatable, increasing: e.g. --churn 10000 --churn 100000)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=500, help="items per POST /items:batch of the churn scenario")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("error: wrk not found (apt-get install wrk)", file=sys.stderr)
        return 2
    rows, summaries = [], []
    for n in args.items or [100_000]:
        artifact = build_artifact(n, args.users, args.train_items)
        for kind in args.index or list(KINDS):
            for fsync in args.appendfsync or [None]:
                r, s = bench_service(artifact, n, kind, fsync, args)
                rows += r
                summaries.append(s)
    load = os.getloadavg()
    print(f"\nwrk: {args.connections} connection(s), {args.threads} thread(s), {args.duration}s per measurement; "
          f"{args.workers} uvicorn worker(s); {os.cpu_count()} CPU(s); load average at the end "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")  # fmt: skip
    print("| items | index | Redis | endpoint | requests/s | p50 ms | p99 ms | errors |")
    print("| ---: | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        cells = [f"{r['items']:,}", r["index"], r["redis"], r["endpoint"], f"{r['rps']:.0f}", f"{r['p50_ms']:.2f}",
                 f"{r['p99_ms']:.2f}", str(r["errors"])]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print("\n| items | index | Redis | parameters | build s | precomputed lists | recall@20 | /recommend ÷ no-op "
          "throughput (after the writes) | /recommend p99 ms at half peak | "
          "POST /items p99 ms at peak / half peak |")  # fmt: skip
    print("| ---: | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for s in summaries:
        params = ", ".join(f"{k}={v}" for k, v in s["params"].items()) or "exact"
        lists = f"k={s['precomputed']['k']}, {s['precomputed']['seconds']:.1f} s" if s["precomputed"] else "off"
        post = f"{s['post_p99']:.2f} / {s['post_half_p99']:.2f}"
        cells = [f"{s['items']:,}", s["index"], s["redis"], params, f"{s['build_s']:.1f}", lists, f"{s['recall']:.3f}",
                 f"{s['ratio']:.0%} ({s['ratio_after']:.0%})", f"{s['half_p99']:.2f}", post]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    if any("churn" in s for s in summaries):
        print("\n| items | index | online items | POST /items:batch items/s (p99 ms per batch) | /recommend ÷ no-op "
              "throughput | /recommend p99 ms at half peak | recall@20 |")  # fmt: skip
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for s in summaries:
            for c in s.get("churn", []):
                posted = f"{c['post_items_s']:,.0f} ({c['post_p99']:.0f})"
                cells = [f"{s['items']:,}", s["index"], f"{c['online']:,}", posted, f"{c['ratio']:.0%}",
                         f"{c['half_p99']:.2f}", f"{c['recall']:.3f}"]  # fmt: skip
                print("| " + " | ".join(cells) + " |")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
