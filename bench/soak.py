"""Soak test of the recommendation service: mixed read/write load from several threads for a fixed time.

    python bench/soak.py --seconds 30                       # starts `python -m service run` itself
    python bench/soak.py --url http://127.0.0.1:8000 --api-key KEY --seconds 60

Without ``--url`` it starts the service on a free loopback port (``--artifacts``, default ./artifacts,
trained first if missing) with a fresh API key, on a private Redis namespace (``--redis-url``; default: an
embedded Redis in a temporary directory), and stops it afterwards. With ``--url`` the target must be on
the loopback interface. Each thread loops over: recommendations (training and new users), similar items,
item reads, item posts (new and updates), interactions, batch posts and deletes of its own items. At the
end every replica-visible write is checked: the index must be consistent with Redis (``GET
/admin/check``). Prints requests, errors and p50/p99/max latency per endpoint; exits 1 on any error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.support import NotReady, free_port, wait_ready  # noqa: E402


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)  # first few error descriptions
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, endpoint: str, seconds: float, error: str | None) -> None:
        with self.lock:
            self.latencies.setdefault(endpoint, []).append(seconds)
            if error is not None:
                self.errors[endpoint] = self.errors.get(endpoint, 0) + 1
                if len(self.samples) < 10:
                    self.samples.append(f"{endpoint}: {error}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Worker(threading.Thread):
    def __init__(self, n: int, base: str, key: str, info: dict, stats: Stats, stop: threading.Event, seed: int):
        super().__init__(name=f"soak-{n}", daemon=True)
        self.n, self.base, self.key, self.info, self.stats, self.stop_event = n, base, key, info, stats, stop
        self.rng = random.Random(seed * 1000 + n)
        self.own: list[str] = []  # items this worker posted and did not delete
        self.counter = 0
        self.training_users = [str(i) for i in range(min(info["n_users"], 100))]

    def features(self) -> dict[str, list[float]]:
        return {m: [round(self.rng.gauss(0, 1), 4) for _ in range(d)] for m, d in self.info["modalities"].items()}

    def call(
        self, http: httpx.Client, endpoint: str, method: str, path: str, ok: set[int], **kw
    ) -> httpx.Response | None:
        start = time.perf_counter()
        try:
            r = http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            self.stats.record(endpoint, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
            return None
        error = None if r.status_code in ok else f"{r.status_code} {r.text[:200]}"
        self.stats.record(endpoint, time.perf_counter() - start, error)
        return r if error is None else None

    def run(self) -> None:
        headers = {"X-API-Key": self.key}
        with httpx.Client(base_url=self.base, timeout=30, headers=headers) as http:
            while not self.stop_event.is_set():
                self.step(http)

    def step(self, http: httpx.Client) -> None:
        rng = self.rng
        roll = rng.random()
        user = rng.choice(self.training_users) if rng.random() < 0.7 else f"soak-{self.n}-u{rng.randrange(20)}"
        if roll < 0.45:
            self.call(http, "GET /recommend/{user_id}", "GET", f"/recommend/{user}", {200}, params={"k": 20})
        elif roll < 0.55:
            item = rng.choice(self.own) if self.own and rng.random() < 0.5 else str(rng.randrange(50))
            self.call(http, "GET /items/{item_id}/similar", "GET", f"/items/{item}/similar", {200, 404},
                      params={"k": 10})  # fmt: skip
        elif roll < 0.62:
            if self.own:
                self.call(http, "GET /items/{item_id}", "GET", f"/items/{rng.choice(self.own)}", {200})
        elif roll < 0.77:
            if self.own and rng.random() < 0.3:
                item_id = rng.choice(self.own)  # an update
            else:
                self.counter += 1
                item_id = f"soak-{self.n}-i{self.counter}"
            body = {"item_id": item_id, "features": self.features()}
            if self.call(http, "POST /items", "POST", "/items", {201}, json=body) and item_id not in self.own:
                self.own.append(item_id)
        elif roll < 0.87:
            item = rng.choice(self.own) if self.own and rng.random() < 0.5 else str(rng.randrange(50))
            self.call(http, "POST /interactions", "POST", "/interactions", {201, 404},
                      json={"user_id": user, "item_id": item})  # fmt: skip
        elif roll < 0.93:
            ids = []
            for _ in range(rng.randint(2, 5)):
                self.counter += 1
                ids.append(f"soak-{self.n}-i{self.counter}")
            body = {"items": [{"item_id": i, "features": self.features()} for i in ids]}
            if self.call(http, "POST /items:batch", "POST", "/items:batch", {201}, json=body):
                self.own.extend(ids)
        elif self.own:
            item_id = self.own.pop(rng.randrange(len(self.own)))
            self.call(http, "DELETE /items/{item_id}", "DELETE", f"/items/{item_id}", {200})


@contextlib.contextmanager
def started_service(args: argparse.Namespace, key: str):
    """``python -m service run`` on a free loopback port; yields its base URL."""
    port = free_port()
    namespace = f"soak-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="mmf-soak-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMF_")}
        env.update(MMF_API_KEY=key, MMF_NAMESPACE=namespace, MMF_STATE_DIR=str(Path(tmp) / "state"))
        if args.redis_url:
            env["MMF_REDIS_URL"] = args.redis_url
        log_path = Path(tmp) / "service.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "service", "run", "--artifacts", str(Path(args.artifacts).resolve()),
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_ready(proc, base, args.start_timeout, log_path)
            except NotReady as exc:
                raise SystemExit(str(exc)) from None
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if args.redis_url:  # a shared Redis: leave nothing behind
                import redis

                client = redis.from_url(args.redis_url)
                keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
                if keys:
                    client.delete(*keys)
                client.close()


def soak(base: str, key: str, seconds: float, threads: int, seed: int) -> tuple[Stats, dict, float]:
    info = httpx.get(f"{base}/info", headers={"X-API-Key": key}, timeout=10).raise_for_status().json()
    stats, stop = Stats(), threading.Event()
    workers = [Worker(n, base, key, info, stats, stop, seed) for n in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    stop.wait(seconds)
    stop.set()
    for w in workers:
        w.join(timeout=60)
    elapsed = time.perf_counter() - start
    check = httpx.get(f"{base}/admin/check", headers={"X-API-Key": key}, timeout=60)
    report = check.json() if check.status_code == 200 else {"ok": False, "problems": [f"{check.status_code}"]}
    if not report.get("ok"):
        stats.record("GET /admin/check", 0.0, f"index inconsistent: {report.get('problems')}")
    return stats, report, elapsed


def table(stats: Stats, elapsed: float) -> str:
    rows = [("endpoint", "requests", "errors", "p50 ms", "p99 ms", "max ms")]
    total = 0
    for endpoint in sorted(stats.latencies):
        lat = stats.latencies[endpoint]
        total += len(lat)
        rows.append((endpoint, str(len(lat)), str(stats.errors.get(endpoint, 0)), f"{percentile(lat, 50) * 1e3:.1f}",
                     f"{percentile(lat, 99) * 1e3:.1f}", f"{max(lat) * 1e3:.1f}"))  # fmt: skip
    rows.append(("total", str(total), str(sum(stats.errors.values())), "", "", f"{total / elapsed:.0f} req/s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="duration of the load (default 30)")
    parser.add_argument("--threads", type=int, default=6, help="client threads (default 6)")
    parser.add_argument("--url", help="target a running service on the loopback interface instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("MMF_API_KEY"), help="key for writes (with --url)")
    parser.add_argument("--artifacts", default="artifacts", help="artifact directory when starting the service")
    parser.add_argument("--redis-url", help="Redis for the started service (default: embedded, temporary)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for start-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.threads < 1:
        parser.error("--seconds must be > 0 and --threads >= 1")
    if args.url:
        host = urlsplit(args.url).hostname
        if host not in LOOPBACK:
            parser.error(f"--url must be on the loopback interface ({', '.join(sorted(LOOPBACK))}), got {host!r}")
        if not args.api_key:
            parser.error("--api-key (or MMF_API_KEY) is needed for the write load")
        target = contextlib.nullcontext(args.url.rstrip("/"))
        key = args.api_key
    else:
        key = secrets.token_urlsafe(24)
        target = started_service(args, key)
    with target as base:
        stats, report, elapsed = soak(base, key, args.seconds, args.threads, args.seed)
    print(f"soak: {args.threads} threads, {elapsed:.1f} s against {base}")
    print(table(stats, elapsed))
    print(f"index check: {'consistent' if report.get('ok') else 'INCONSISTENT'}, {report.get('index_size')} items, "
          f"{report.get('online_items')} online")  # fmt: skip
    for sample in stats.samples:
        print(f"error: {sample}")
    errors = sum(stats.errors.values())
    if args.json:
        out = {
            endpoint: {"requests": len(lat), "errors": stats.errors.get(endpoint, 0),
                       "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3}
            for endpoint, lat in stats.latencies.items()
        }  # fmt: skip
        Path(args.json).write_text(json.dumps({"seconds": elapsed, "endpoints": out, "check": report}, indent=2))
    total = sum(len(v) for v in stats.latencies.values())
    return 1 if errors or total == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
