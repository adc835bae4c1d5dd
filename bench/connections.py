"""Misbehaving clients: ``GET /healthz`` latency while clients hold or flood connections, with the service's
guarded HTTP protocol (``service/protocol.py``) and with uvicorn's stock httptools protocol, side by side.

    python bench/connections.py                       # trains a tiny artifact first if --artifacts is missing
    python bench/connections.py --artifacts artifacts --seconds 10 --slow-seconds 40

Each protocol runs in its own server process (this script with ``--serve``: the same app and uvicorn options as
``python -m service run``, only the protocol differs; an embedded Redis in a temporary directory; the caller's
``MMF_*`` limits apply, e.g. ``MMF_HEADER_TIMEOUT_S=2``). Scenarios,
one after the other, each measuring ``/healthz`` from one keep-alive client in a loop:

* **quiet**: nothing else;
* **48 MB header**: one client sends a request whose header is 48 MB, in 64 KB writes; the row also says how
  much the server took before it closed the connection (or all of it);
* **600 slow connections**: 200 that send nothing, 200 that send a header line every second and never end the
  headers, 200 that send a body of 1 MB one byte per second, all opened at once and held for
  ``--slow-seconds``; the row says how many the server had closed by then (the guarded protocol: after
  ``MMF_HEADER_TIMEOUT_S`` (10 s) and ``MMF_BODY_TIMEOUT_S`` (30 s));
* **throughput**: ``/healthz`` requests per second from 4 keep-alive connections (closed loop), the protocol's
  own cost on the request path: ``--repeats`` runs per protocol, alternating between the two servers (both
  running from the start), mean ± standard deviation.

Prints a Markdown table. Loopback only; absolute times depend on the machine and its load, compare the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.support import free_port, wait_ready  # noqa: E402

START_TIMEOUT_S = 1800.0  # a loaded machine starts a server slowly; only a hung start waits it out


def serve(protocol: str, artifacts: str, port: int) -> None:
    """The server process: the app of ``python -m service run`` with the given HTTP protocol."""
    import uvicorn

    from service.app import create_app
    from service.cli import uvicorn_options
    from service.settings import load_settings

    settings = load_settings(artifacts=artifacts)
    options = uvicorn_options(settings, "warning")
    if protocol == "stock":
        options.update(http="httptools", limit_concurrency=None, timeout_keep_alive=5)
    uvicorn.run(create_app(settings), host="127.0.0.1", port=port, **options)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


class HealthProbe(threading.Thread):
    """``GET /healthz`` in a loop on one keep-alive client until stopped; latencies in ms, errors counted."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base, self.stop, self.latencies, self.errors = base, threading.Event(), [], 0

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as http:
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    ok = http.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append((time.perf_counter() - start) * 1000)
                self.errors += not ok
                time.sleep(0.01)

    def finish(self) -> dict:
        self.stop.set()
        self.join()
        lat = self.latencies
        return {"n": len(lat), "p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": max(lat, default=0),
                "errors": self.errors}  # fmt: skip


def quiet(port: int, seconds: float) -> str:
    time.sleep(seconds)
    return ""


def big_header(port: int, seconds: float, size: int = 48 * 1024 * 1024) -> str:
    sent, start = 0, time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nX-Big: ")
        try:
            while sent < size:
                sock.sendall(b"a" * 65536)
                sent += 65536
            sock.sendall(b"\r\n\r\n")
            answer = sock.recv(200)
        except OSError:
            answer = b""
    elapsed = time.perf_counter() - start
    time.sleep(max(0.0, seconds - elapsed))
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace") if answer else "connection closed"
    return f"{sent / 2**20:.1f} MB sent in {elapsed:.1f} s, then: {status}"


def slow_connections(port: int, seconds: float, each: int = 200) -> str:
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(each)]
    headers = [socket.create_connection(("127.0.0.1", port)) for _ in range(each)]
    bodies = [socket.create_connection(("127.0.0.1", port)) for _ in range(each)]
    for sock in headers:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n")
    for sock in bodies:
        sock.sendall(b"POST /interactions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1048576\r\n\r\n")  # fmt: skip
    everything = idle + headers + bodies
    closed: set[int] = set()
    for sock in everything:
        sock.setblocking(False)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for n, sock in enumerate(everything):
            if n in closed:
                continue
            try:
                if sock.recv(65536) == b"":
                    closed.add(n)
                    continue
            except BlockingIOError:
                pass
            except OSError:
                closed.add(n)
                continue
            with contextlib.suppress(BlockingIOError):
                try:
                    if n >= 2 * each:
                        sock.send(b" ")
                    elif n >= each:
                        sock.send(b"X-Slow: 1\r\n")
                except OSError:
                    closed.add(n)
        time.sleep(1.0)
    for sock in everything:
        sock.close()
    kinds = [sum(1 for n in closed if lo <= n < lo + each) for lo in (0, each, 2 * each)]
    return (f"closed by the server after {seconds:.0f} s: idle {kinds[0]}/{each}, headers {kinds[1]}/{each}, "
            f"body {kinds[2]}/{each}")  # fmt: skip


async def _throughput(port: int, seconds: float, connections: int) -> float:
    request = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"
    done = 0
    stop = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(v for k, _, v in (line.partition(b":") for line in head.split(b"\r\n"))
                              if k.lower() == b"content-length"))  # fmt: skip
            await reader.readexactly(length)
            done += 1
        writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return done / seconds


@contextlib.contextmanager
def started(protocol: str, artifacts: Path) -> Iterator[int]:
    """A server process with ``protocol``, ready; yields its port."""
    port = free_port()
    with tempfile.TemporaryDirectory() as state:
        env = {k: v for k, v in os.environ.items() if k not in ("MMF_REDIS_URL", "MMF_ARTIFACTS")}
        env.update(MMF_STATE_DIR=state, MMF_API_KEY=os.urandom(12).hex(), OMP_NUM_THREADS="1")
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", protocol, "--artifacts", str(artifacts), "--port", str(port)],
            cwd=ROOT, env=env,
        )  # fmt: skip
        try:
            wait_ready(server, f"http://127.0.0.1:{port}", START_TIMEOUT_S)
            yield port
        finally:
            server.terminate()
            server.wait(timeout=60)


def scenarios(protocol: str, port: int, args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, scenario, seconds in (("quiet", quiet, args.seconds), ("48 MB header", big_header, args.seconds),
                                    ("600 slow connections", slow_connections, args.slow_seconds)):  # fmt: skip
        probe = HealthProbe(f"http://127.0.0.1:{port}")
        probe.start()
        note = scenario(port, seconds)
        rows.append({"protocol": protocol, "scenario": name, **probe.finish(), "note": note})
        print(f"  {protocol}, {name}: {rows[-1]}", file=sys.stderr)
        time.sleep(1.0)
    return rows


def tiny_artifact(path: Path) -> Path:
    from models.artifacts import MANIFEST

    if (path / MANIFEST).is_file():
        return path
    subprocess.run(
        [sys.executable, "-m", "training", "train", "--out", str(path), "--no-progress", "--set", "train.epochs=1",
         "--set", "data.synthetic.n_users=300", "--set", "data.synthetic.n_items=200"], cwd=ROOT, check=True,
    )  # fmt: skip
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", help="artifact directory (default: a tiny one trained under bench/.cache)")
    parser.add_argument("--seconds", type=float, default=10, help="seconds of the quiet, header and throughput runs")
    parser.add_argument("--slow-seconds", type=float, default=40, help="seconds the slow connections are held")
    parser.add_argument("--protocol", choices=["guarded", "stock"], action="append", help="default: both")
    parser.add_argument("--repeats", type=int, default=5, help="alternating throughput runs per protocol")
    parser.add_argument("--serve", choices=["guarded", "stock"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.artifacts, args.port)
        return 0
    artifacts = Path(args.artifacts) if args.artifacts else tiny_artifact(ROOT / "bench" / ".cache" / "tiny-artifact")
    protocols = args.protocol or ["guarded", "stock"]
    rows, rates = [], {p: [] for p in protocols}
    with contextlib.ExitStack() as stack:
        ports = {p: stack.enter_context(started(p, artifacts)) for p in protocols}
        for protocol, port in ports.items():
            rows += scenarios(protocol, port, args)
        for _ in range(args.repeats):  # alternating, so that a change of load hits both alike
            for protocol, port in ports.items():
                rates[protocol].append(asyncio.run(_throughput(port, args.seconds, 4)))
    for protocol, values in rates.items():
        mean = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        note = f"{mean:.0f} ± {spread:.0f} /healthz per second ({len(values)} runs of {args.seconds:g} s)"
        rows.append({"protocol": protocol, "scenario": "throughput", "note": note})
    load = os.getloadavg()
    print(f"\n{os.cpu_count()} CPU(s); load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print("| scenario | protocol | /healthz requests | p50 ms | p99 ms | max ms | errors | what the clients saw |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in sorted(rows, key=lambda r: (["quiet", "48 MB header", "600 slow connections", "throughput"]
                                         .index(r["scenario"]), r["protocol"])):  # fmt: skip
        if r["scenario"] == "throughput":
            cells = [r["scenario"], r["protocol"], "", "", "", "", "", r["note"]]
        else:
            cells = [r["scenario"], r["protocol"], str(r["n"]), f"{r['p50']:.1f}", f"{r['p99']:.1f}", f"{r['max']:.1f}",
                     str(r["errors"]), r["note"]]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
