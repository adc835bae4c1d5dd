"""Serving benchmark: p50/p99 latency and throughput of the real HTTP service, measured with `wrk`.

Builds (once, cached under bench/.cache) a synthetic artifact with --items items, starts
``python -m service run`` on a free loopback port against Redis (``--redis-url``, a fresh namespace), and
runs wrk against a no-op endpoint (GET /healthz), GET /recommend/{random user} and POST /items (new ids),
in the same run, so the ratios are side by side. Prints a Markdown table.

    python bench/serve.py --items 100000 --duration 10
    python bench/serve.py --items 100000 --items 1000000 --connections 4 --workers 2

Needs `wrk` (Debian/Ubuntu: apt-get install wrk). Loopback only; every run is bounded by --duration.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = ROOT / "bench" / ".cache"


def build_artifact(n_items: int, n_users: int) -> Path:
    """A MetaMMF_GCN artifact over ``n_items`` synthetic items, trained for one epoch (latency does not
    depend on model quality)."""
    out = CACHE / f"serve-{n_items}-{n_users}"
    if (out / "manifest.json").is_file():
        return out
    from models.config import ModelConfig
    from training.config import DataConfig, RunConfig, TrainConfig
    from training.export import export_artifacts
    from training.synthetic import SyntheticConfig, generate_synthetic
    from training.trainer import train

    synth = SyntheticConfig(n_users=n_users, n_items=n_items, interactions_per_user=5.0, seed=0)
    run = RunConfig(
        data=DataConfig(synthetic=synth),
        model=ModelConfig(),
        train=TrainConfig(epochs=1, progress=False, eval_batch_size=max(8, 2_000_000_000 // (4 * n_items * 64))),
    )
    print(f"building a {n_items}-item artifact in {out} ...", file=sys.stderr)
    data = generate_synthetic(synth)
    result = train(data, run.model, run.train)
    return export_artifacts(result, data, run, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lua_scripts(tmp: Path, n_users: int, modalities: dict[str, int], api_key: str) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    features = json.dumps({m: np.round(rng.normal(size=d), 4).tolist() for m, d in modalities.items()})
    recommend = tmp / "recommend.lua"
    recommend.write_text(
        f"math.randomseed(os.time())\n"
        "request = function()\n"
        f'  return wrk.format("GET", "/recommend/" .. math.random(0, {n_users - 1}) .. "?k=20")\n'
        "end\n"
    )
    post = tmp / "post.lua"
    escaped = features.replace('"', '\\"')  # the JSON object as the inside of a Lua string literal
    post.write_text(
        "local counter = 0\n"
        'local prefix = (tostring({}):gsub("table: ", ""))  -- unique per wrk thread\n'
        'wrk.method = "POST"\n'
        f'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["X-API-Key"] = "{api_key}"\n'
        "request = function()\n"
        "  counter = counter + 1\n"
        f'  local body = "{{\\"item_id\\": \\"bench-" .. prefix .. "-" .. counter .. "\\", '
        f'\\"features\\": {escaped}}}"\n'
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
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "5s"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def bench_items(n_items: int, args: argparse.Namespace) -> list[dict]:
    artifact = build_artifact(n_items, args.users)
    catalog = json.loads((artifact / "catalog.json").read_text())
    modalities = {m["name"]: m["dim"] for m in catalog["modalities"]}
    api_key, namespace, port = uuid.uuid4().hex, f"bench-{uuid.uuid4().hex[:8]}", free_port()
    env = {
        **os.environ,
        "MMF_REDIS_URL": args.redis_url,
        "MMF_NAMESPACE": namespace,
        "MMF_API_KEY": api_key,
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "service", "run", "--artifacts", str(artifact), "--port", str(port),
           "--workers", str(args.workers), "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=ROOT, env=env)
    rows = []
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("service did not become ready")
            time.sleep(0.5)
        with tempfile.TemporaryDirectory() as tmp:
            scripts = lua_scripts(Path(tmp), len(catalog["users"]), modalities, api_key)
            runs = [
                ("GET /healthz (no-op)", None, f"{base}/healthz"),
                ("GET /recommend/{user}?k=20", scripts["recommend"], base),
                ("POST /items", scripts["post"], base),
            ]
            for name, script, url in runs:
                result = run_wrk(url, script, args.duration, args.connections, args.threads)
                rows.append({"items": n_items, "endpoint": name, **result})
                print(f"  {name}: {result}", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=30)
        import redis

        client = redis.from_url(args.redis_url)
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, action="append", help="catalogue size (repeatable; default 100000)")
    parser.add_argument("--users", type=int, default=20000, help="users in the synthetic artifact")
    parser.add_argument("--duration", type=int, default=10, help="seconds per endpoint")
    parser.add_argument("--connections", type=int, default=4, help="concurrent wrk connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("error: wrk not found (apt-get install wrk)", file=sys.stderr)
        return 2
    rows = [row for n in (args.items or [100_000]) for row in bench_items(n, args)]
    print(f"\nwrk: {args.connections} connections, {args.threads} thread(s), {args.duration}s per endpoint, "
          f"{args.workers} uvicorn worker(s), {os.cpu_count()} CPU(s)\n")  # fmt: skip
    print("| items | endpoint | requests/s | p50 ms | p99 ms | errors |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        cells = [f"{r['items']:,}", r["endpoint"], f"{r['rps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}"]
        print("| " + " | ".join([*cells, str(r["errors"])]) + " |")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
