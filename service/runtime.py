"""What one service process runs: the Redis connection, the current :class:`Engine` with its follower, and
the machinery that replaces the engine without stopping service: hot reload of a new artifact version
(``POST /admin/reload``, SIGHUP, or a watch on the artifact directory: MMF_ARTIFACTS_WATCH_S) and a rebuild
when the event stream cannot bring the engine up to date.

A new engine is built next to the serving one (artifact verified, modalities checked, online items re-fused
from their stored raw features) and swapped in under the write lock, so no request ever sees a half-built
engine: a request keeps the engine it started with, and writes are retried on the new one if a swap happened
between validating them and committing them.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis

from models.artifacts import ArtifactError, Bundle, load_bundle, read_manifest
from service.embedded_redis import EmbeddedRedis, start_unless_url
from service.engine import Engine
from service.settings import Settings
from service.state import RedisState
from service.sync import Follower, IncompatibleState, load_state

log = logging.getLogger("service")
# How long a reload waits for the previous one, whose outcome is recorded already, to let go of the lock.
RELOAD_RELEASE_WAIT_S = 5.0


class ReloadBusy(RuntimeError):
    """Another reload is running."""


class ReloadRefused(RuntimeError):
    """The new artifact cannot replace the served one (``kind``: "invalid" or "incompatible")."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ReloadStatus:
    state: str = "idle"  # idle, loading, succeeded, failed
    artifacts: str | None = None
    artifact_id: str | None = None  # served after the last successful reload
    previous_artifact_id: str | None = None
    detail: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    reloads: int = 0  # successful ones
    history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("history")
        return out


def redis_client(url: str) -> redis.Redis:
    """Bounded failure time: redis-py's default retries a failing command 10 times with backoff (seconds, or
    10 x socket_timeout against a hung server) before a write could answer 503; here 2 quick retries."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.from_url(
        url,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 2),
    )


class Runtime:
    def __init__(self, settings: Settings, on_swap: Callable[[Engine], None] | None = None) -> None:
        self.settings = settings
        self.on_swap = on_swap
        self.write_lock = threading.RLock()  # local writes and follower applies, engine swaps
        self._reload_lock = threading.Lock()
        self.status = ReloadStatus()
        self.artifacts = Path(settings.artifacts)
        self.engine: Engine | None = None
        self.follower: Follower | None = None
        self._followers: list[Follower] = []
        self.embedded: EmbeddedRedis | None = None
        self.client: redis.Redis | None = None
        self.state: RedisState | None = None
        self._stopped = threading.Event()

    # -- life cycle -------------------------------------------------------------------------------------
    def start(self) -> Runtime:
        self.embedded = start_unless_url(self.settings)
        redis_url = self.embedded.url if self.embedded else self.settings.redis_url
        try:
            bundle = load_bundle(self.artifacts)
            self.client = redis_client(redis_url)
            self.state = RedisState(
                self.client, self.settings.namespace, uuid.uuid4().hex, self.settings.stream_max_len
            )
            self.state.init(bundle.artifact_id)
            engine, position = self.build(bundle)
            self.swap(engine, position)
        except BaseException:
            self.stop()
            raise
        self.status.artifact_id, self.status.artifacts = bundle.artifact_id, str(self.artifacts)
        if self.settings.artifacts_watch_s > 0:
            threading.Thread(target=self._watch_artifacts, name="artifact-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        for follower in self._followers:  # the current one and those of replaced engines
            follower.stop()
        for follower in self._followers:
            follower.join(timeout=5)
        if self.client is not None:
            self.client.close()
        if self.embedded is not None:
            self.embedded.stop()

    # -- building and swapping engines ------------------------------------------------------------------
    def build(self, bundle: Bundle) -> tuple[Engine, str]:
        """A new engine for ``bundle`` holding everything in Redis (online items re-fused if they were
        fused by another artifact); raises IncompatibleState if stored items do not fit it."""
        settings = self.settings
        engine = Engine(bundle, settings.index, self.precomputed_k(bundle), settings.torch_threads,
                        settings.batch_thread_count, self.candidate_cap(bundle))  # fmt: skip
        position = load_state(engine, self.state)
        return engine, position

    def precomputed_k(self, bundle: Bundle) -> int:
        """MMF_PRECOMPUTED_K, or 0 (no lists) when users x items is above MMF_PRECOMPUTED_MAX_PAIRS: the lists
        cost one inner product per pair before the engine serves."""
        pairs = len(bundle.user_ids) * len(bundle.item_ids)
        if self.settings.precomputed_k and pairs > self.settings.precomputed_max_pairs:
            log.warning(
                "no precomputed lists: %d users x %d items = %.3g pairs is above MMF_PRECOMPUTED_MAX_PAIRS=%.3g",
                len(bundle.user_ids), len(bundle.item_ids), pairs, self.settings.precomputed_max_pairs,
            )  # fmt: skip
            return 0
        return self.settings.precomputed_k

    def candidate_cap(self, bundle: Bundle) -> int:
        """Online items filed per training user at write time: twice the lists' length, or 0 (every request
        searches the online items) above MMF_ONLINE_CANDIDATES_MAX_USERS training users, where scoring each
        write against every user costs more than it saves."""
        if len(bundle.user_ids) > self.settings.online_candidates_max_users:
            return 0
        return 2 * self.settings.precomputed_k

    def swap(self, engine: Engine, position: str) -> None:
        follower = Follower(
            engine, self.state, position, self.settings.follow_block_ms, self.write_lock, self.resync_in_background
        )
        with self.write_lock:
            old = self.follower
            if old is not None:
                old.stop()  # it may still be blocked reading: it will return without applying anything
            self.engine, self.follower = engine, follower
            self._followers = [f for f in self._followers if f.is_alive()] + [follower]
            follower.start()
        if self.on_swap is not None:
            self.on_swap(engine)

    # -- hot reload -------------------------------------------------------------------------------------
    def reload(self, artifacts: str | Path | None = None) -> ReloadStatus:
        """Load, verify and swap in the artifact at ``artifacts`` (default: the one served, re-read).
        Raises ReloadBusy, ReloadRefused, or redis.RedisError; the served engine stays on failure."""
        self._acquire_reload()
        try:
            self._begin(artifacts)
            return self._reload_locked()
        finally:
            self._reload_lock.release()

    def _acquire_reload(self) -> None:
        """The reload lock, or ReloadBusy while a reload runs. A reload records its outcome just before it lets
        go of the lock: a client that has read that outcome and starts the next one waits for that moment."""
        if self._reload_lock.acquire(blocking=False):
            return
        if self.status.state != "loading" and self._reload_lock.acquire(timeout=RELOAD_RELEASE_WAIT_S):
            return
        raise ReloadBusy("a reload is already running")

    def reload_in_background(self, artifacts: str | Path | None = None) -> dict:
        """Start a reload in a thread and return the status it starts with (state "loading"): taken before the
        thread runs, so it never mixes the new state with an outcome. Raises ReloadBusy if one is running."""
        self._acquire_reload()
        try:
            self._begin(artifacts)
            started = self.status.as_dict()
        except BaseException:
            self._reload_lock.release()
            raise

        def run() -> None:
            try:
                self._reload_locked()
            except Exception:
                pass  # recorded in self.status and logged by _reload_locked()
            finally:
                self._reload_lock.release()

        threading.Thread(target=run, name="artifact-reload", daemon=True).start()
        return started

    def _watch_artifacts(self) -> None:
        """Reload when the served path (a link such as ROOT/current, switched by `train --versioned`) holds an
        artifact other than the one served. Only the manifest's id is read each time; an artifact whose reload
        failed is not tried again until the path changes once more."""
        tried: str | None = None
        while not self._stopped.wait(self.settings.artifacts_watch_s):
            try:
                artifact_id = read_manifest(self.artifacts, verify=False)["artifact_id"]
            except (ArtifactError, OSError, KeyError, TypeError, AttributeError):
                continue  # being replaced, or broken: a reload would say which; wait for a complete one
            if artifact_id in (self.engine.artifact_id, tried):
                continue
            tried = artifact_id
            try:
                self.reload_in_background()
                log.info("artifact %s appeared at %r: reloading", artifact_id, str(self.artifacts))
            except ReloadBusy:
                tried = None  # another reload runs: look again next time

    def _begin(self, artifacts: str | Path | None) -> None:
        path = Path(artifacts) if artifacts is not None else self.artifacts
        self.status.state, self.status.artifacts, self.status.detail = "loading", str(path), None
        self.status.started_at, self.status.finished_at = time.time(), None

    def _reload_locked(self) -> ReloadStatus:
        path = Path(self.status.artifacts)
        old = self.engine
        try:
            try:
                bundle = load_bundle(path)
            except ArtifactError as exc:
                raise ReloadRefused(str(exc), "invalid") from None
            if bundle.modalities != old.modalities:
                raise ReloadRefused(
                    f"artifact {bundle.artifact_id} at {path} expects modalities {bundle.modalities}, the served "
                    f"artifact {old.artifact_id} {old.modalities}: refused (items are posted with the served "
                    "modalities; restart the service to change them)",
                    "incompatible",
                )
            try:
                engine, position = self.build(bundle)
            except IncompatibleState as exc:
                raise ReloadRefused(str(exc), "incompatible") from None
            self.swap(engine, position)
            self.artifacts = path
        except BaseException as exc:
            self._finish("failed", str(exc) or type(exc).__name__)
            log.warning("reload of %r failed, still serving %s: %r", str(path), old.artifact_id, str(exc))
            raise
        try:  # recorded before the reload reports success, so a client that saw "succeeded" reads it
            self.state.set_artifact(bundle.artifact_id)
        except redis.RedisError:
            log.warning("could not record artifact %s in Redis", bundle.artifact_id)
        self.status.previous_artifact_id, self.status.artifact_id = old.artifact_id, bundle.artifact_id
        self.status.reloads += 1
        self._finish("succeeded", None)
        log.info("reloaded: serving artifact %s from %r (was %s)", bundle.artifact_id, str(path), old.artifact_id)
        return self.status

    def _finish(self, state: str, detail: str | None) -> None:
        self.status.state, self.status.detail, self.status.finished_at = state, detail, time.time()
        self.status.history = [*self.status.history[-9:], self.status.as_dict()]

    # -- resync after a gap in the event stream ---------------------------------------------------------
    def resync_in_background(self, reason: str) -> None:
        def run() -> None:
            backoff = 0.2
            while not self._stopped.is_set():
                try:
                    with self._reload_lock:  # never interleaved with a reload (which rebuilds anyway)
                        bundle = self.engine.bundle
                        self.state.init(bundle.artifact_id)  # Redis may have lost the counter and the id
                        engine, position = self.build(bundle)
                        self.swap(engine, position)
                    log.info("index rebuilt from Redis (%s)", reason)
                    return
                except redis.RedisError as exc:
                    log.warning("rebuild failed (%s); retrying", type(exc).__name__)
                except Exception:
                    log.exception("rebuild failed; still serving the previous index")
                    return
                self._stopped.wait(backoff)
                backoff = min(2 * backoff, 5.0)

        threading.Thread(target=run, name="index-rebuild", daemon=True).start()
