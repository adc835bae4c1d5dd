"""Command line: ``python -m service {run,export-interactions} --help``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger("service")


def ensure_artifacts(path: Path, train_config: str | None) -> None:
    """Train on the built-in synthetic data (or ``train_config``) when no artifact directory exists."""
    if (path / "manifest.json").is_file():
        return
    from training.cli import main as training_main

    log.info("no artifacts at %s: training a model first (this takes a few minutes on a CPU)", path)
    argv = ["train", "--out", str(path), "--no-progress"]
    if train_config:
        argv += ["--config", train_config]
    if training_main(argv) != 0:
        raise SystemExit(f"training failed; no artifacts at {path}")


def cmd_run(args: argparse.Namespace) -> int:
    import uvicorn

    from service.embedded_redis import EmbeddedRedis
    from service.settings import Settings

    if args.artifacts:
        os.environ["MMF_ARTIFACTS"] = args.artifacts
    settings = Settings()
    ensure_artifacts(settings.artifacts, args.train_config)
    embedded = None
    if settings.redis_url is None:
        # One server for all workers: started here, handed to them through the environment.
        embedded = EmbeddedRedis(settings.state_dir).start()
        os.environ["MMF_REDIS_URL"] = embedded.url
        log.info("embedded Redis at %s (data in %s)", embedded.url, settings.state_dir)
    if settings.api_key is None:
        log.warning("MMF_API_KEY is not set: write endpoints answer 403")
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal; with the default handler that
    # would kill this process before the ``finally`` below and leave the embedded redis-server running.
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run(
            "service.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
            log_level=args.log_level,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, previous)
        if embedded is not None:
            embedded.stop()
    return 0


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def cmd_export_interactions(args: argparse.Namespace) -> int:
    import redis

    from service.embedded_redis import EmbeddedRedis
    from service.settings import Settings
    from service.state import RedisState

    settings = Settings()
    embedded = EmbeddedRedis(settings.state_dir).start() if settings.redis_url is None else None
    try:
        client = redis.from_url(embedded.url if embedded else settings.redis_url)
        state = RedisState(client, settings.namespace, origin="export")
        out = Path(args.out)
        with out.open("w") as fh:
            fh.write("userID\titemID\ttimestamp\n")
            count = 0
            for user_id, item_id, ts in state.interaction_log():
                fh.write(f"{user_id}\t{item_id}\t{ts:.3f}\n")
                count += 1
        print(f"wrote {count} online interactions to {out}")
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="MetaMMF recommendation service. Settings come from MMF_* environment variables (README).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="serve the API; trains on the built-in data first if no artifacts exist")
    p.add_argument("--artifacts", help="artifact directory (default: $MMF_ARTIFACTS or ./artifacts)")
    p.add_argument("--train-config", help="run config used when artifacts must be trained first")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (share one Redis)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("export-interactions", help="write online interactions (for the next training run)")
    p.add_argument("--out", required=True, help="TSV file to write (userID, itemID, timestamp)")
    p.set_defaults(func=cmd_export_interactions)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        from models.artifacts import ArtifactError

        if isinstance(exc, ArtifactError | RuntimeError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
