"""Command line: ``python -m service {run,check,export-interactions} --help``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger("service")
# Set once `run` has started serving: `python -m service` then skips the interpreter's slow teardown (__main__).
server_ran = False


def ensure_artifacts(path: Path, train_config: str | None) -> None:
    """Train on the built-in synthetic data (or ``train_config``) when no artifact directory exists (or an
    empty one). A directory with files but no manifest is a broken artifact, not something to overwrite."""
    from models.artifacts import MANIFEST, ArtifactError

    if (path / MANIFEST).is_file():
        return

    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ArtifactError(f"{path / 'manifest.json'}: missing (not an artifact directory, or an interrupted write)")
    try:
        from training.cli import main as training_main
    except ModuleNotFoundError:  # the API image holds the service only: the trainer writes the artifacts
        raise ArtifactError(
            f"{path / 'manifest.json'}: missing, and the training code is not installed here to train one "
            "(run `python -m training train --out DIR` where it is, then MMF_ARTIFACTS=DIR)"
        ) from None

    log.info("no artifacts at %s: training a model first (this takes a few minutes on a CPU)", path)
    argv = ["train", "--out", str(path), "--no-progress"]
    if train_config:
        argv += ["--config", train_config]
    if training_main(argv) != 0:
        raise SystemExit(f"training failed; no artifacts at {path}")


def cmd_run(args: argparse.Namespace) -> int:
    import uvicorn

    from models.artifacts import load_bundle
    from service.embedded_redis import start_unless_url
    from service.settings import load_settings

    if args.artifacts:
        os.environ["MMF_ARTIFACTS"] = args.artifacts
    settings = load_settings()
    ensure_artifacts(settings.artifacts, args.train_config)
    bundle = load_bundle(settings.artifacts)  # a broken artifact is one line naming the file, exit 2
    embedded = start_unless_url(settings)
    if embedded is not None:
        # One server for all workers: started here, handed to them through the environment.
        os.environ["MMF_REDIS_URL"] = embedded.url
        log.info("embedded Redis at %s (data in %s, appendfsync %s)", embedded.url, settings.state_dir,
                 settings.redis_appendfsync)  # fmt: skip
    try:
        preflight(settings, bundle, os.environ["MMF_REDIS_URL"] if embedded else settings.redis_url)
        del bundle  # each worker loads its own
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
    if settings.api_key is None:
        log.warning("MMF_API_KEY is not set: write endpoints answer 403")
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal; with the default handler that
    # would kill this process before the ``finally`` below and leave the embedded redis-server running. A
    # stop asked for by SIGTERM (docker stop, systemd) that completes is a clean exit: status 0.
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    global server_ran
    server_ran = True
    try:
        uvicorn.run(
            "service.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
            **uvicorn_options(settings, args.log_level),
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, previous)
        if embedded is not None:
            embedded.stop()
    return 0


def uvicorn_options(settings, log_level: str = "info") -> dict:
    """uvicorn's arguments besides the app and the socket: logging (applied in every worker, the key redacted)
    and the connection limits of the settings (service/protocol.py)."""
    import functools

    from service.logs import logging_config
    from service.protocol import ConnectionLimits, GuardedHttpProtocol

    return {
        "log_level": log_level,
        "log_config": logging_config(log_level),
        "http": functools.partial(GuardedHttpProtocol, limits=ConnectionLimits.from_settings(settings)),
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections,
        "timeout_worker_healthcheck": settings.worker_healthcheck_s,
    }


def _exit_on_signal(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def preflight(settings, bundle, redis_url: str) -> None:
    """What the app's start-up would fail on besides the artifact, checked before uvicorn starts, so that
    an unreachable Redis or online items of other modalities are one clear line (exit status 2) instead of
    a traceback from the lifespan."""
    import redis

    from service.runtime import redis_client
    from service.state import RedisState
    from service.sync import IncompatibleState

    settings.index.check(len(bundle.item_ids))  # IndexSettingsError: one line, exit 2
    client = redis_client(redis_url)
    try:
        state = RedisState(client, settings.namespace, origin="preflight")
        try:
            stored = list(state.all_items(bundle.item_embeddings.shape[1]))
        except redis.RedisError as exc:
            raise RuntimeError(f"Redis at {redact(redis_url)} is unreachable: {exc}") from None
        bad = [it.item_id for it in stored if {m: len(v) for m, v in it.features.items()} != bundle.modalities]
        if bad:
            raise IncompatibleState(
                f"{len(bad)} online item(s) in Redis namespace {settings.namespace!r} (e.g. {bad[0]!r}) do not "
                f"have the modalities {bundle.modalities} of the artifact at {settings.artifacts}"
            )
    finally:
        client.close()


def redact(url: str) -> str:
    """A Redis URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def cmd_check(args: argparse.Namespace) -> int:
    """Rebuild an engine from the artifacts plus Redis, as a starting replica would, and check it."""
    import redis

    from models.artifacts import load_bundle
    from service.check import check_consistency
    from service.embedded_redis import start_unless_url
    from service.engine import Engine
    from service.runtime import redis_client
    from service.settings import load_settings
    from service.state import RedisState
    from service.sync import IncompatibleState, load_state

    overrides = {k: v for k, v in (("artifacts", args.artifacts), ("redis_url", args.redis_url),
                                   ("namespace", args.namespace)) if v}  # fmt: skip
    settings = load_settings(**overrides)
    bundle = load_bundle(settings.artifacts)
    embedded = start_unless_url(settings)
    url = embedded.url if embedded else settings.redis_url
    client = redis_client(url)
    try:
        state = RedisState(client, settings.namespace, origin="check")
        threads = settings.torch_threads
        engine = Engine(bundle, settings.index, torch_threads=threads, batch_torch_threads=settings.batch_thread_count)
        try:
            load_state(engine, state)
            report = check_consistency(engine, state)
        except IncompatibleState as exc:
            report = {"ok": False, "problems": [str(exc)], "artifact_id": bundle.artifact_id}
        except redis.RedisError as exc:
            print(f"error: Redis at {redact(url)} is unreachable: {exc}", file=sys.stderr)
            return 2
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        status = "consistent" if report["ok"] else f"INCONSISTENT ({len(report['problems'])} problem(s))"
        print(f"namespace {settings.namespace!r}, artifact {report['artifact_id']}: {status}")
        for key in ("index_size", "expected_size", "training_items", "deleted_training_items", "online_items"):
            if key in report:
                print(f"  {key}: {report[key]}")
        for problem in report["problems"]:
            print(f"  problem: {problem}")
    return 0 if report["ok"] else 1


def cmd_export_interactions(args: argparse.Namespace) -> int:
    import redis

    from service.embedded_redis import start_unless_url
    from service.settings import load_settings
    from service.state import RedisState

    settings = load_settings()
    embedded = start_unless_url(settings)
    try:
        client = redis.from_url(embedded.url if embedded else settings.redis_url)
        kept, dropped = RedisState(client, settings.namespace, origin="export").export_interactions()
        out = Path(args.out)
        with out.open("w") as fh:
            fh.write("userID\titemID\ttimestamp\n")
            fh.writelines(f"{e.user_id}\t{e.item_id}\t{e.timestamp:.3f}\n" for e in kept)
        print(
            f"wrote {len(kept)} online interactions to {out} (left out: {dropped['repeated']} repeated pairs, "
            f"{dropped['stale']} with an item deleted or changed since)"
        )
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="MetaMMF recommendation service. Settings come from MMF_* environment variables "
        "(docs/configuration.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "run",
        help="serve the API; trains on the built-in data first if no artifacts exist",
        description="Serve the API. The item index is chosen with MMF_INDEX: flat (default, exact), hnsw or "
        "ivf (approximate, for large catalogues; MMF_HNSW_M, MMF_HNSW_EF_CONSTRUCTION, MMF_HNSW_EF_SEARCH, "
        "MMF_IVF_NLIST, MMF_IVF_NPROBE); each worker builds it from the artifact at start-up. "
        "MMF_FAISS_THREADS (default 1): FAISS threads per request. Other settings: docs/configuration.md.",
    )
    p.add_argument("--artifacts", help="artifact directory (default: $MMF_ARTIFACTS or ./artifacts)")
    p.add_argument(
        "--train-config",
        help="run config (YAML) used when the artifacts must be trained first (default: the built-in synthetic data)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="uvicorn worker processes (share one Redis; each holds its own index)")  # fmt: skip
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="log level of uvicorn and the service (default: %(default)s); the API key is redacted at every level",
    )
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check", help="check that Redis and a freshly built index agree (exit 1 if not)")
    p.add_argument("--artifacts", help="artifact directory (default: $MMF_ARTIFACTS or ./artifacts)")
    p.add_argument("--redis-url", help="Redis URL (default: $MMF_REDIS_URL, else the embedded Redis)")
    p.add_argument("--namespace", help="Redis key prefix (default: $MMF_NAMESPACE or mmf)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser(
        "export-interactions",
        help="write online interactions (for the next training run)",
        description="Write the interactions recorded through POST /interactions as TSV (userID, itemID, timestamp), "
        "each (user, item) pair once (its first record), leaving out pairs whose item was deleted, or re-posted "
        "with other features, since the interaction. Redis: $MMF_REDIS_URL, else the embedded one in $MMF_STATE_DIR.",
    )
    p.add_argument("--out", required=True, help="TSV file to write (userID, itemID, timestamp)")
    p.set_defaults(func=cmd_export_interactions)
    return parser


def main(argv: list[str] | None = None) -> int:
    from service.logs import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", "info"))  # the API key redacted from here on
    try:
        return args.func(args)
    except Exception as exc:
        import redis

        from models.artifacts import ArtifactError
        from service.settings import SettingsError

        if isinstance(exc, ArtifactError | RuntimeError | SettingsError):  # IncompatibleState: RuntimeError
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, redis.RedisError):
            print(f"error: Redis: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        raise
