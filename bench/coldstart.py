"""New items end to end: train on the warm part of a cold-item split, serve it, post the held-out items over
HTTP, and measure how the service recommends them.

For each seed (``train.seed`` + 0..N-1; the held-out item draw is ``data.cold_item_seed``, fixed):

1. **Train** ``--config`` under ``data.protocol=cold_items`` (:mod:`training.coldstart`): a share of the items
   (``data.cold_item_ratio``, default 20%) never enters training; early stopping follows its selection rule
   (the mean of held-out and warm validation Recall@20).
2. **Export** the model as a serving artifact, items under their original ids, and **start the real service**
   (``python -m service run``, embedded Redis in a temporary directory, a free loopback port).
3. **Post** the held-out items' raw features through ``POST /items:batch`` (the meta learner fuses them in the
   service) and the users' held-out *validation* interactions through ``POST /interactions`` (so they are
   excluded as already seen, as the offline test excludes them).
4. **Ask** ``GET /recommend/{user}?k=20`` for every user with a held-out test interaction (full catalogue: warm
   and new items compete) and ``GET /recommend/{user}?k=20&fresh=20`` (every slot fresh: the new items ranked
   among themselves, the cold-only ranking of the cold-start literature).
5. **Score** both with the metrics of :mod:`training.evaluate` against the held-out test interactions, next to
   the offline protocol's numbers for the same model (``training.coldstart.cold_evaluator``) and three
   content baselines computed here with the same masks: a random ranking; a ridge regression from the
   standardised features to the trained item embeddings, scored with the same user embeddings (its L2 weight
   picked on the held-out validation interactions from 0.1-10,000); and the cosine between an item's
   standardised features and the mean of the user's training items'.

Prints one Markdown table, mean ± std over seeds, and writes the per-seed numbers to ``--out``/results.json.

    python bench/coldstart.py --data ../shared/data/tiktok --config configs/tiktok.yaml --seeds 3
    python bench/coldstart.py --seeds 1 --set train.epochs=5          # built-in synthetic data, quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.support import free_port, wait_ready  # noqa: E402
from training.cli import load_data, resolve_config  # noqa: E402
from training.coldstart import ColdItemSplit, cold_item_split, full_catalogue_targets, train_protocol  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.data import RecData  # noqa: E402
from training.evaluate import full_rank_evaluate  # noqa: E402
from training.export import export_artifacts  # noqa: E402

K = 20
METRICS = (f"recall@{K}", f"ndcg@{K}")
RIDGE_L2 = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
ROWS = (
    ("service: new items among themselves (fresh=20)", "service", "cold"),
    ("service: full catalogue", "service", "full"),
    ("offline protocol, same model: new items among themselves", "offline", "cold"),
    ("offline protocol, same model: full catalogue", "offline", "full"),
    ("random ranking: new items among themselves", "random", "cold"),
    ("random ranking: full catalogue", "random", "full"),
    ("ridge regression features -> item embeddings: among themselves", "ridge", "cold"),
    ("ridge regression features -> item embeddings: full catalogue", "ridge", "full"),
    ("content cosine to the user's items: among themselves", "cosine", "cold"),
    ("content cosine to the user's items: full catalogue", "cosine", "full"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", help="MMRec data directory (default: the built-in synthetic data)")
    p.add_argument(
        "--config",
        help="run config (YAML or TOML); its model must be servable (metammf_lightgcn, metammf_gcn, metammf_mf)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override the config, e.g. train.epochs=5")
    p.add_argument("--seeds", type=int, default=3, help="training seeds: train.seed + 0..N-1 (default 3)")
    p.add_argument(
        "--out", default="results/coldstart-service", help="artifacts and results.json (default: %(default)s)"
    )
    p.add_argument("--batch", type=int, default=500, help="items per POST /items:batch (default 500)")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds to wait for the service to be ready")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------------------
# Rankings -> metrics (training.evaluate's definitions and masks)
# ---------------------------------------------------------------------------------------------------------


def list_scorer(lists: dict[int, list[int]], n_items: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Scores that rank each user's list first, in its order (everything else far below)."""

    def score(users: torch.Tensor) -> torch.Tensor:
        out = torch.full((len(users), n_items), -1e9)
        for row, user in enumerate(users.tolist()):
            ranked = lists.get(user, [])
            out[row, ranked] = torch.arange(len(ranked), 0, -1, dtype=torch.float32)
        return out

    return score


def evaluate_both(split: ColdItemSplit, score_cold, score_full) -> dict[str, dict[str, float]]:
    """{'cold': ..., 'full': ...} metrics of the held-out test interactions (cold-only and full-catalogue)."""
    n_users, n_warm, n_cold = split.warm.n_users, split.warm.n_items, split.n_cold
    cold = full_rank_evaluate(score_cold, split.test, [split.valid], n_users, n_cold, ks=[K])
    targets, exclude = full_catalogue_targets(split, "test")
    full = full_rank_evaluate(score_full, targets, exclude, n_users, n_warm + n_cold, ks=[K])
    return {"cold": {m: cold.metrics[m] for m in METRICS}, "full": {m: full.metrics[m] for m in METRICS}}


def embedding_scorers(users: torch.Tensor, warm_items: torch.Tensor, cold_items: torch.Tensor):
    catalogue = torch.cat([warm_items, cold_items])
    return (lambda u: users[u] @ cold_items.T), (lambda u: users[u] @ catalogue.T)


# ---------------------------------------------------------------------------------------------------------
# Content baselines
# ---------------------------------------------------------------------------------------------------------


def ridge_items(split: ColdItemSplit, users: torch.Tensor, warm_items: torch.Tensor) -> torch.Tensor:
    """Held-out item embeddings predicted from features by ridge regression on the warm items; the L2
    weight is the one whose predictions rank the held-out *validation* interactions best."""
    x_warm, x_cold = split.standardized_features()
    y = warm_items.double().numpy()
    gram, cross = x_warm.T @ x_warm, x_warm.T @ y
    best, best_recall = None, -1.0
    for l2 in RIDGE_L2:
        items = torch.from_numpy(x_cold @ np.linalg.solve(gram + l2 * np.eye(len(gram)), cross)).float()
        valid = full_rank_evaluate(lambda u, items=items: users[u] @ items.T, split.valid, [], split.warm.n_users,
                                   split.n_cold, ks=[K])  # fmt: skip
        if valid.metrics[f"recall@{K}"] > best_recall:
            best, best_recall = items, valid.metrics[f"recall@{K}"]
    return best


def cosine_scorers(split: ColdItemSplit):
    x_warm, x_cold = split.standardized_features()
    unit = np.concatenate([x_warm, x_cold])
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    profiles = np.zeros((split.warm.n_users, unit.shape[1]))
    np.add.at(profiles, split.warm.train[:, 0], unit[split.warm.train[:, 1]])
    profiles /= np.maximum(np.linalg.norm(profiles, axis=1, keepdims=True), 1e-12)
    users = torch.from_numpy(profiles).float()
    items = torch.from_numpy(unit).float()
    return embedding_scorers(users, items[: split.warm.n_items], items[split.warm.n_items :])


def random_scorers(split: ColdItemSplit, seed: int):
    generator = torch.Generator().manual_seed(seed)
    n_warm, n_cold = split.warm.n_items, split.n_cold

    def full(users: torch.Tensor) -> torch.Tensor:
        return torch.rand(len(users), n_warm + n_cold, generator=generator)

    return (lambda u: full(u)[:, n_warm:]), full


# ---------------------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_service(artifact: Path, api_key: str, start_timeout: float) -> Iterator[str]:
    """``python -m service run`` on ``artifact`` with an embedded Redis in a temporary directory; yields its URL."""
    with tempfile.TemporaryDirectory() as state:
        port = free_port()
        env = {**os.environ, "MMF_API_KEY": api_key, "MMF_STATE_DIR": state, "OMP_NUM_THREADS": "1"}
        env.pop("MMF_REDIS_URL", None)
        cmd = [sys.executable, "-m", "service", "run", "--artifacts", str(artifact), "--port", str(port),
               "--log-level", "warning"]  # fmt: skip
        server = subprocess.Popen(cmd, cwd=ROOT, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(server, base, start_timeout)
            yield base
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def serve_and_ask(split: ColdItemSplit, artifact: Path, args: argparse.Namespace) -> dict[str, dict[int, list[int]]]:
    """Post the held-out items and validation interactions, then the two rankings of every test user, as
    {'cold': user -> held-out indices, 'full': user -> catalogue rows (warm first, then n_warm + held-out)}."""
    n_warm = split.warm.n_items
    row_of = {str(item): row for row, item in enumerate(split.warm_items.tolist())}
    row_of.update({str(item): n_warm + c for c, item in enumerate(split.cold_items.tolist())})
    features = {m: split.cold_features[m] for m in split.warm.features}
    api_key = uuid.uuid4().hex
    headers = {"X-API-Key": api_key}
    lists: dict[str, dict[int, list[int]]] = {"cold": {}, "full": {}}
    with (
        running_service(artifact, api_key, args.start_timeout) as base,
        httpx.Client(base_url=base, timeout=120) as http,
    ):
        start = time.perf_counter()
        for lo in range(0, split.n_cold, args.batch):
            items = [
                {
                    "item_id": str(split.cold_items[c]),
                    "features": {m: f[c].astype(float).tolist() for m, f in features.items()},
                }
                for c in range(lo, min(lo + args.batch, split.n_cold))
            ]
            http.post("/items:batch", json={"items": items}, headers=headers).raise_for_status()
        print(f"  posted {split.n_cold} items in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        for user, c in split.valid.tolist():
            body = {"user_id": str(user), "item_id": str(split.cold_items[c])}
            http.post("/interactions", json=body, headers=headers).raise_for_status()
        for user in np.unique(split.test[:, 0]).tolist():
            for name, params in (("full", {"k": K}), ("cold", {"k": K, "fresh": K})):
                answer = http.get(f"/recommend/{user}", params=params)
                answer.raise_for_status()
                rows = [row_of[i["item_id"]] for i in answer.json()["items"]]
                lists[name][user] = [r - n_warm for r in rows] if name == "cold" else rows
    return lists


# ---------------------------------------------------------------------------------------------------------
# One seed, all seeds
# ---------------------------------------------------------------------------------------------------------


def run_seed(
    cfg: RunConfig, data: RecData, out: Path, args: argparse.Namespace
) -> dict[str, dict[str, dict[str, float]]]:
    split = cold_item_split(data, cfg.data.cold_item_ratio, cfg.data.cold_item_seed)
    print(
        f"seed {cfg.train.seed}: training on {split.warm.n_items} warm items ({split.n_cold} held out) ...",
        file=sys.stderr,
    )
    result = train_protocol(cfg, data)
    print(f"  best epoch {result.best_epoch}, {result.train_seconds:.0f} s", file=sys.stderr)
    served = RecData(
        split.warm.name,
        split.warm.n_users,
        split.warm.n_items,
        split.warm.train,
        split.warm.valid,
        np.zeros((0, 2), dtype=np.int64),
        split.warm.features,
    )  # fmt: skip (seen = train + valid)
    artifact = export_artifacts(result, served, cfg, out / f"seed-{cfg.train.seed}", [str(i) for i in split.warm_items])
    metrics = {"offline": {
        "cold": {m: result.test.metrics[m] for m in METRICS},
        "full": {m: result.test.metrics[f"full_{m}"] for m in METRICS},
    }, "warm": {m: result.test.metrics.get(f"warm_{m}", float("nan")) for m in METRICS}}  # fmt: skip

    lists = serve_and_ask(split, artifact, args)
    n_warm, n_cold = split.warm.n_items, split.n_cold
    metrics["service"] = evaluate_both(
        split, list_scorer(lists["cold"], n_cold), list_scorer(lists["full"], n_warm + n_cold)
    )
    model = result.model.cpu().eval()
    with torch.no_grad():
        users, warm_items = (t.detach() for t in model.get_embedding())
    metrics["ridge"] = evaluate_both(
        split, *embedding_scorers(users, warm_items, ridge_items(split, users, warm_items))
    )
    metrics["cosine"] = evaluate_both(split, *cosine_scorers(split))
    metrics["random"] = evaluate_both(split, *random_scorers(split, cfg.train.seed))
    return metrics


def table(runs: list[dict], caption: str) -> str:
    def cell(values: list[float]) -> str:  # sample standard deviation, as the experiments' tables give it
        return f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.4f}"

    lines = [caption, "", f"| ranking | Recall@{K} | NDCG@{K} |", "|---|---|---|"]
    for label, source, where in ROWS:
        lines.append(f"| {label} | " + " | ".join(cell([r[source][where][m] for r in runs]) for m in METRICS) + " |")
    lines.append(
        "| the same model on the warm items' test interactions (warm protocol) | "
        + " | ".join(cell([r["warm"][m] for r in runs]) for m in METRICS)
        + " |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.set = [*(args.set or []), "data.protocol=cold_items", "train.progress=false"]
    base = resolve_config(args)
    data = load_data(base.data)
    out = Path(args.out)
    runs = []
    for offset in range(args.seeds):
        cfg = base.model_copy(update={"train": base.train.model_copy(update={"seed": base.train.seed + offset})})
        runs.append(run_seed(cfg, data, out, args))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(runs, indent=2))
    seeds = f"train.seed {base.train.seed}..{base.train.seed + args.seeds - 1}"
    caption = (
        f"New items through the service: {data.name}, {base.model.name}, {base.data.cold_item_ratio:.0%} of the items "
        f"held out (data.cold_item_seed {base.data.cold_item_seed}), test interactions of held-out items, mean ± std "
        f"over {args.seeds} seed(s) ({seeds})."
    )
    print(table(runs, caption))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
