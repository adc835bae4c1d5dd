"""Command line: ``python -m training {train,evaluate,fusion-share,generate-synthetic,merge-online} --help``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from models.artifacts import CONFIG, MODEL_WEIGHTS, ArtifactError, read_manifest
from models.registry import model_names
from training.allocator import keep_freed_memory
from training.config import ConfigError, DataConfig, RunConfig, load_run_config
from training.data import DataError, RecData, load_mmrec, save_mmrec
from training.synthetic import SyntheticConfig, generate_synthetic
from training.versions import data_checksum, switch_current, trained_version, version_dir, version_key

log = logging.getLogger("training")


def load_data(cfg: DataConfig) -> RecData:
    """The configured MMRec directory, or the built-in synthetic data set."""
    if cfg.path is None:
        return generate_synthetic(cfg.synthetic)
    return load_mmrec(cfg.path, split_seed=cfg.split_seed, cold_users=cfg.cold_users)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.set or [])
    # json.dumps: the values are parsed as YAML, so "2024" or "on" must stay strings.
    if args.data:
        overrides.append(f"data.path={json.dumps(str(Path(args.data).resolve()))}")
    if getattr(args, "device", None):
        overrides.append(f"train.device={json.dumps(args.device)}")
    if getattr(args, "model", None):
        overrides.append(f"model.name={json.dumps(args.model)}")
    return load_run_config(args.config, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from models.registry import is_servable
    from training.coldstart import train_protocol
    from training.export import export_artifacts

    cfg = resolve_config(args)
    if cfg.data.path is not None:  # absolute, so `evaluate` finds the data from any directory
        cfg.data.path = str(Path(cfg.data.path).resolve())
    if args.no_progress:
        cfg.train.progress = False
    out_dir = Path(args.out)
    checksum = data_checksum(cfg.data)
    if args.versioned:
        version = version_key(cfg, checksum)
        out_dir = version_dir(args.out, version)
        if trained_version(args.out, version) is not None:  # same data and config: nothing to train
            switch_current(args.out, version)
            print(json.dumps({"artifacts": str(out_dir), "version": version, "trained": False}, indent=2))
            log.info("version %s (this data and config) is trained already: %s/current points at it", version, args.out)
            return 0
    data = load_data(cfg.data)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # torchrun: rank 0 logs, exports and prints
    if main_rank:
        log.info(
            "data %s: %d users, %d items, %d/%d/%d train/valid/test, modalities %s",
            data.name, data.n_users, data.n_items, len(data.train), len(data.valid), len(data.test),
            data.modality_dims,
        )  # fmt: skip
    start = time.perf_counter()
    result = train_protocol(cfg, data)  # data.protocol: warm, or cold_items (training.coldstart)
    if result is None:  # another rank of a distributed run
        return 0
    if cfg.data.protocol != "warm":
        log.info(
            "data.protocol=%s: the model was trained on the warm items only and is evaluated, not exported",
            cfg.data.protocol,
        )
        out: str | None = None
    elif is_servable(cfg.model.name):
        out = str(export_artifacts(result, data, cfg, out_dir, data_checksum=checksum))
        if args.versioned:
            switch_current(args.out, out_dir.name)
            log.info("%s/current -> %s", args.out, out_dir)
    else:
        log.info(
            "model %s is a baseline: evaluated only, no serving artifact written to %s (the service serves "
            "MetaMMF models only)", cfg.model.name, args.out,
        )  # fmt: skip
        out = None
    summary = {
        "artifacts": out,
        "model": cfg.model.name,
        "protocol": cfg.data.protocol,
        "best_epoch": result.best_epoch,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "test": {k: round(v, 4) for k, v in result.test.metrics.items()},
    }
    print(json.dumps(summary, indent=2))
    return 0


def load_trained(args: argparse.Namespace):
    """The model of an artifact directory (``args.artifacts``) with its weights, its data and its config."""
    import torch
    from safetensors.torch import load_file

    from training.trainer import build_model

    path = Path(args.artifacts)
    read_manifest(path)
    cfg = RunConfig.model_validate_json((path / CONFIG).read_text())
    if args.data:
        cfg.data.path = args.data
    if getattr(args, "device", None):
        cfg.train.device = args.device
    data = load_data(cfg.data)
    model = build_model(data, cfg.model, cfg.train.reg_weight)
    try:
        model.load_state_dict(load_file(path / MODEL_WEIGHTS))
    except RuntimeError as exc:
        raise ArtifactError(f"{path / 'model.safetensors'}: does not fit data {data.name!r}: {exc}") from None
    return model.to(torch.device(cfg.train.device)).eval(), data, cfg


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.trainer import evaluate_split

    model, data, cfg = load_trained(args)
    result = evaluate_split(model, data, args.split, cfg.train)
    print(json.dumps({"split": args.split, **{k: round(v, 5) for k, v in result.metrics.items()}}, indent=2))
    return 0


def cmd_fusion_share(args: argparse.Namespace) -> int:
    from training.fusion_share import fusion_shares

    model, _, cfg = load_trained(args)
    items = getattr(model, "items", None)
    if items is None or not hasattr(items.fusion, "meta_information"):
        print(f"error: model {cfg.model.name!r} has no meta fusion network", file=sys.stderr)
        return 2
    print(
        f"Fusion network of {args.artifacts} ({cfg.model.name}, {cfg.model.tensor} tensor), "
        f"over its {model.n_items} items:"
    )
    print("| layer | dynamic share | static share | std of s_i across items |")
    print("| ---: | ---: | ---: | ---: |")
    for share in fusion_shares(items.fusion, items.item_inputs):
        print(f"| {share.layer} | {share.dynamic_share:.4f} | {share.static_share:.4f} | {share.meta_spread:.4f} |")
    return 0


def cmd_cold_groups(args: argparse.Namespace) -> int:
    from training.cold_groups import cold_group_scores, content_learnability, group_names

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in model_names()]
    if unknown:
        print(f"error: --models: unknown model(s) {unknown}; known: {', '.join(model_names())}", file=sys.stderr)
        return 2
    base = load_run_config(args.config, args.set or [])
    synth = base.data.synthetic
    names = group_names(list(synth.modality_dims), synth.n_groups)
    ranked = (f"Held-out items of the synthetic set ({base.data.cold_item_ratio:.0%}), hit rate at {args.k} of their "
              "test interactions ranked among the held-out items")  # fmt: skip
    if args.learnability:
        rows: dict[str, list[list[float]]] = {}
        for seed in range(args.seeds):
            for learner, rates in content_learnability(base, base.train.seed + seed, args.k).items():
                rows.setdefault(learner, []).append(rates)
        print(f"{ranked} by the generator's true user vectors against latent factors predicted from content by "
              f"learners fit on the warm items' true latent factors, per fusion group; mean ± std over {args.seeds} "
              "seed(s) of the learners:")  # fmt: skip
        print_group_table("learner", names, rows)
        return 0
    hits: dict[str, list[list[float]]] = {}
    probes: dict[str, list[list[float]]] = {}
    for model in models:
        for seed in range(args.seeds):
            overrides = [*(args.set or []), f"model.name={model}", f"train.seed={base.train.seed + seed}",
                         "train.progress=false"]  # fmt: skip
            cfg = load_run_config(args.config, overrides)
            scores = cold_group_scores(cfg, args.k)
            hits.setdefault(model, []).append(scores.hit_rates)
            probes.setdefault(model, []).append(scores.probe_r2)
            log.info("%s seed %d: hit rates %s, probe R^2 %s", model, cfg.train.seed, scores.hit_rates,
                     scores.probe_r2)  # fmt: skip
    print(f"{ranked}, per fusion group; mean ± std over {args.seeds} seed(s):")
    print_group_table("model", names, hits)
    print()
    print("R^2 of the warm items' true latent factor predicted linearly from each model's trained item embeddings "
          "(5-fold ridge over all warm items), per fusion group:")  # fmt: skip
    print_group_table("model", names, probes)
    return 0


def print_group_table(label: str, names: list[str], rows: dict[str, list[list[float]]]) -> None:
    """A markdown table: one row per key, one mean ± std column per fusion group."""
    import numpy as np

    print(f"| {label} | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key, values in rows.items():
        a = np.array(values)
        print(f"| {key} | " + " | ".join(f"{a[:, g].mean():.4f} ± {a[:, g].std():.4f}" for g in range(len(names)))
              + " |")  # fmt: skip


def cmd_generate(args: argparse.Namespace) -> int:
    values = {"seed": args.seed}
    if args.users is not None:
        values["n_users"] = args.users
    if args.items is not None:
        values["n_items"] = args.items
    if args.name:
        values["name"] = args.name
    data = generate_synthetic(SyntheticConfig(**values))
    save_mmrec(data, args.out)
    print(f"wrote {data.name}: {data.n_users} users, {data.n_items} items, "
          f"{len(data.train) + len(data.valid) + len(data.test)} interactions -> {args.out}")  # fmt: skip
    return 0


def cmd_merge_online(args: argparse.Namespace) -> int:
    from training.merge_online import merge_online_dir

    result = merge_online_dir(args.data, args.interactions, args.out, split_seed=args.split_seed)
    print(result.summary(args.out))
    return 0


TRAIN_EPILOG = """\
scaling out:
  data-parallel over N processes (gloo on CPU, NCCL on CUDA, one GPU per process);
  same steps as one process up to float rounding, rank 0 evaluates and writes --out:
    torchrun --nproc_per_node N -m training train --config CONFIG --out DIR
  neighbour-sampled mini-batches (metammf_gcn without the item graph; memory scales
  with the sampled subgraph, evaluation stays full-graph), one fanout per layer:
    --model metammf_gcn --set model.item_graph_k=0 \\
    --set train.neighbor_sampling=true --set 'train.fanouts=[10, 10, 10]'
defaults: the served model (metammf_lightgcn, models/config.py); the paper's
MetaMMF_GCN: --config configs/tiktok-metammf_gcn.yaml (or synthetic-metammf_gcn.yaml)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a model and write a serving artifact directory",
        description="Train a model and write a serving artifact directory.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML or TOML run config (sections data, model, train)")
    p.add_argument("--data", help="MMRec data directory (default: built-in synthetic data)")
    p.add_argument("--out", default="artifacts", help="artifact directory to write (default: artifacts)")
    p.add_argument("--model", choices=model_names(), help="shortcut for --set model.name= (baselines: no artifact)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (shortcut for --set train.device=)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.rank=8 --set train.lr=0.002")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--versioned",
        action="store_true",
        help="treat --out as a root: write OUT/versions/<version> (a checksum of the data and the config; skipped "
        "when that version exists) and point OUT/current at it, the directory a service with "
        "MMF_ARTIFACTS=OUT/current and MMF_ARTIFACTS_WATCH_S reloads",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="full-ranking evaluation of a trained artifact directory")
    p.add_argument("--artifacts", required=True, help="artifact directory written by train")
    p.add_argument("--data", help="data directory (default: the one in the artifact's config)")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--device", help="torch device")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "fusion-share",
        help="how much of each item's fused representation depends on its meta information s_i",
        description="Split every fusion layer's output x_i W_i into the static map at the mean meta information "
        "(W + T x3 mean(s)) and the item-specific rest (T x3 (s_i - mean(s))), and print each part's share of the "
        "output energy over the artifact's items (training/fusion_share.py).",
    )
    p.add_argument("--artifacts", required=True, help="artifact directory written by train")
    p.add_argument("--data", help="data directory (default: the one in the artifact's config)")
    p.set_defaults(func=cmd_fusion_share)

    p = sub.add_parser(
        "cold-groups",
        help="new items of the synthetic set ranked per fusion group (training/cold_groups.py)",
        description="Train each model under the cold-item protocol on the built-in synthetic data and print, per "
        "fusion group of the generator, the hit rate at k of the held-out items' test interactions ranked among "
        "the held-out items: which ways of carrying an item's latent factor in its content a model learns.",
    )
    p.add_argument("--config", help="YAML or TOML run config (default: the code's defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--models", default="metammf_lightgcn,late_fusion_lightgcn", help="comma-separated model names")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per model: train.seed + 0..N-1")
    p.add_argument("--k", type=int, default=20, help="cut-off of the hit rate")
    p.add_argument(
        "--learnability",
        action="store_true",
        help="train no recommender: fit the warm items' true latent factors from their content (ridge, the MetaMMF "
        "fusion network at d_s 5 and 16, an MLP) and rank the held-out items' predicted factors with the true user "
        "vectors (--seeds seeds the learners; --models is not used)",
    )
    p.set_defaults(func=cmd_cold_groups)

    p = sub.add_parser("generate-synthetic", help="write the built-in synthetic data set in MMRec format")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--users", type=int, help="number of users (default 9308)")
    p.add_argument("--items", type=int, help="number of items (default 6710)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="data set name (default synthetic)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "merge-online",
        help="add the service's online interactions to a data set, for retraining",
        description="Write a data directory: --data (all splits, features, ids) plus the interactions of "
        "--interactions (written by python -m service export-interactions) in the train split. A user id not in the "
        "data becomes a new user, served under the same id after retraining; interactions with items not in the data "
        "(posted online: their features are in Redis only) and pairs the data holds already are left out and counted.",
    )
    p.add_argument("--data", required=True, help="MMRec data directory the served artifact was trained on")
    p.add_argument("--interactions", required=True, help="TSV file with columns userID, itemID (timestamp ignored)")
    p.add_argument("--out", required=True, help="directory to write: new, empty, or an earlier merge's output")
    p.add_argument("--split-seed", type=int, default=DataConfig().split_seed,
                   help="seed of the split drawn when --data has no x_label column (default: %(default)s, "
                   "as in train)")  # fmt: skip
    p.set_defaults(func=cmd_merge_online)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        keep_freed_memory()
        return args.func(args)
    except (ConfigError, DataError, ArtifactError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. pydantic validation of synthetic sizes
        print(f"error: {exc}", file=sys.stderr)
        return 2
