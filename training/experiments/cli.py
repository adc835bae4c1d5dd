"""Command line: ``python -m training.experiments {table2,coldstart,depth,rank,static,tsne,all} --help``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from models.artifacts import ArtifactError
from training.allocator import keep_freed_memory
from training.cli import resolve_config
from training.config import ConfigError
from training.data import DataError
from training.experiments.runner import Runner
from training.experiments.stats import TESTS
from training.experiments.suites import DEFAULT_GRID, LAYERS, SUITES, Context, load_tuned

EPILOG = """\
runs are cached under OUT/runs/<hash of config, data and code>/: re-running a command trains only
what is missing (an interrupted command resumes), and commands share runs with equal configs.
examples:
  python -m training.experiments tune --data ../shared/data/tiktok --models lightgcn --grid train.lr=0.001,0.01
  python -m training.experiments table2 --data ../shared/data/tiktok --seeds 5 --tuned --device cuda
  python -m training.experiments coldstart --seeds 5 --set data.cold_item_ratio=0.2
  python -m training.experiments rank --models metammf_gcn --set train.epochs=200
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.experiments",
        description="Train what a paper table or figure needs (cached) and write Markdown tables and PNG plots.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="suite", required=True)
    for name, fn in [*SUITES.items(), ("all", None)]:
        doc = (fn.__doc__ or "").strip().split("\n\n")[0] if fn else "every suite above, in order"
        p = sub.add_parser(name, help=doc.replace("\n", " "), description=doc)
        p.add_argument("--data", help="MMRec data directory (default: built-in synthetic data)")
        p.add_argument("--seeds", type=int, default=1, help="training seeds per variant: train.seed + 0..N-1")
        p.add_argument("--out", default="results", help="results directory (default: results)")
        p.add_argument("--config", help="YAML or TOML base run config (sections data, model, train)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override the base config")
        p.add_argument("--device", help="torch device, e.g. cpu or cuda")
        p.add_argument("--models", help="comma-separated model names (default: the suite's)")
        p.add_argument("--test", choices=TESTS, default="ttest", help="paired significance test (default ttest)")
        p.add_argument("--no-plots", action="store_true", help="tables only")
        p.add_argument(
            "--cached-only", action="store_true", help="tabulate finished runs only; a missing run is an error"
        )
        p.add_argument(
            "--partial",
            action="store_true",
            help="with --cached-only: rows from the seeds that finished (the row says how many)",
        )
        if name in ("tune", "all"):
            p.add_argument(
                "--grid",
                action="append",
                metavar="KEY=V1,V2,...",
                help=f"tune: values of a config key (replaces its default; '{LAYERS}' = the model's layer "
                f"count); default grid: {'; '.join(f'{k}={v}' for k, v in DEFAULT_GRID.items())}",
            )
        if name != "tune":
            tuned_help = "train each model with the settings tune chose (OUT/tune/best.json)"
            if name == "all":
                tuned_help = "always on: all runs tune first and the other suites use its choices"
            p.add_argument("--tuned", action="store_true", help=tuned_help)
        if name in ("tsne", "all"):
            p.add_argument("--users", type=int, default=10, help="tsne: users sampled (default 10)")
            p.add_argument("--sample-seed", type=int, default=0, help="tsne: seed of the user sample")
    return parser


def parse_grid(items: list[str] | None) -> dict[str, list[str]]:
    """``--grid`` items over the default grid; each value parsed as YAML, as ``--set`` values are."""
    grid: dict[str, list] = dict(DEFAULT_GRID)
    for item in items or []:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        key = key.strip()
        if key != LAYERS and (key.count(".") != 1 or key.split(".")[0] not in ("data", "model", "train")):
            raise ConfigError(f"--grid key {key!r}: expected '{LAYERS}' or SECTION.FIELD with SECTION data/model/train")
        grid[key] = [yaml.safe_load(v) for v in values.split(",") if v.strip()]
    return grid


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        keep_freed_memory()
        if args.seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
        base = resolve_config(args)
        base.train.progress = False
        ctx = Context(
            runner=Runner(args.out, cached_only=args.cached_only),
            base=base,
            seeds=args.seeds,
            out=Path(args.out),
            test=args.test,
            models=[m.strip() for m in args.models.split(",") if m.strip()] if args.models else None,
            plots=not args.no_plots,
            options={"users": getattr(args, "users", 10), "sample_seed": getattr(args, "sample_seed", 0)},
        )
        if args.partial and not args.cached_only:
            raise ConfigError("--partial needs --cached-only")
        ctx.partial = args.partial
        if hasattr(args, "grid"):
            ctx.grid = parse_grid(args.grid)
        if getattr(args, "tuned", False) and args.suite != "all":
            ctx.tuned = load_tuned(ctx.out)
        suites = list(SUITES) if args.suite == "all" else [args.suite]
        for suite in suites:
            written = SUITES[suite](ctx)
            if suite == "tune" and args.suite == "all":
                ctx.tuned = load_tuned(ctx.out)
            print(f"{suite}: {ctx.runner.trained} run(s) trained so far; wrote {', '.join(map(str, written))}")
            print((ctx.out / suite / "table.md").read_text())
    except (ConfigError, DataError, ArtifactError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
