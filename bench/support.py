"""What the benches and the tests share to run the service as a real process: a free port, and waiting until a
started server answers ``/readyz`` (``import bench.support`` with the repository root on ``sys.path``)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotReady(RuntimeError):
    """The server exited, or did not answer ``/readyz`` with 200 in time; the message holds its log's end."""


def wait_ready(
    proc: subprocess.Popen, base: str, timeout: float, log_path: Path | None = None, poll_s: float = 0.2
) -> None:
    """Until ``base/readyz`` answers 200. Fails at once if ``proc`` exits, so only a hung start-up waits out the
    timeout (a start is slow on a loaded machine: give a generous one)."""
    deadline = time.monotonic() + timeout

    def log_tail() -> str:
        return "" if log_path is None or not log_path.exists() else "\n" + log_path.read_text()[-3000:]

    while True:
        if proc.poll() is not None:
            raise NotReady(f"the service exited with status {proc.returncode} before it was ready{log_tail()}")
        if time.monotonic() > deadline:
            raise NotReady(f"the service was not ready within {timeout:.0f} s{log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        time.sleep(poll_s)
