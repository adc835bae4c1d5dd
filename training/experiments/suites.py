"""What each experiment trains and writes (one function per table/figure of the paper).

Every suite takes a :class:`Context` (runner, base config, number of seeds, output directory), runs its
variants for seeds ``train.seed + 0 .. seeds - 1`` through the cache, and writes under
``<out>/<suite>/``: ``table.md``, ``summary.json`` (the table's numbers, p-values included) and PNGs.

* ``table2``: the baselines, MetaMMF and the popularity ranker, warm protocol (Table 2);
* ``fusion``: static early/late/hybrid fusion against MetaMMF, MF and GCN backbones (Table 3);
* ``coldstart``: MetaMMF_MF/GCN, VBPR, the static-fusion variants and popularity on held-out items;
* ``newitems``: ways to represent and train new items (content only, DropoutNet, distillation, content
  neighbours), one model, held-out items;
* ``depth``: fusion tower depth N = 1..4 with the MF and GCN backbones (Table 3);
* ``rank``: CP rank R in {4, 8, 16, 32} and the full tensor: metrics, epochs to converge, seconds per
  epoch (Figure 5, Table 4);
* ``static``: with and without the static weights W of W_i = W + T x3 s_i (Table 5);
* ``tsne``: t-SNE of sampled users and their items, with the mean silhouette coefficient (Figure 4);
* ``popularity``: the warm runs' test metrics by the popularity of the test item, from the head to the tail;
* ``tune``: a grid over learning rate, L2 weight and layer count per model, chosen on the validation
  split; ``--tuned`` makes the other suites train every model with its chosen settings.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.config import DEFAULT_MODEL
from models.registry import get_spec, model_names, parse_model_config
from training.config import RunConfig
from training.data import RecData
from training.experiments import plots
from training.experiments.runner import POPULARITY, MissingRunError, Runner, RunRecord, RunSpec
from training.experiments.slices import (
    POPULARITY_SLICES,
    embedding_scores,
    evaluate_slices,
    popularity_slices,
    slice_name,
)
from training.experiments.stats import mean_std, paired_pvalue, silhouette_score
from training.experiments.tables import Comparison, Table, metric_keys, results_table
from training.experiments.tsne import sample_users, tsne, user_item_points
from training.popularity import popularity_scores

log = logging.getLogger(__name__)

LABELS = {
    "metammf_gcn": "MetaMMF_GCN",
    "metammf_mf": "MetaMMF_MF",
    "metammf_lightgcn": "MetaMMF_LightGCN",
    "vbpr": "VBPR",
    "lightgcn": "LightGCN",
    "ngcf": "NGCF",
    "graphsage": "GraphSAGE",
    "gat": "GAT",
    "mmgcn": "MMGCN",
    "grcn": "GRCN",
    "lattice": "LATTICE",
    "invrl": "InvRL",
    POPULARITY: "Popularity",
    **{
        f"{mode}_fusion_{b}": f"{mode.capitalize()} fusion ({label})"
        for mode in ("early", "late", "hybrid")
        for b, label in (("mf", "MF"), ("gcn", "GCN"), ("lightgcn", "LightGCN"))
    },
}
METAMMF = ("metammf_mf", "metammf_gcn")  # the paper's two models
SERVABLE_METAMMF = (*METAMMF, "metammf_lightgcn")
PAPER_STATIC_FUSION = [f"{mode}_fusion_{b}" for b in ("mf", "gcn") for mode in ("early", "late", "hybrid")]
STATIC_FUSION = [*PAPER_STATIC_FUSION, *(f"{mode}_fusion_lightgcn" for mode in ("early", "late", "hybrid"))]
COLDSTART_MODELS = [*METAMMF, "vbpr", *PAPER_STATIC_FUSION, POPULARITY]
RANKS: list[int | str] = [4, 8, 16, 32, "full"]
DEPTHS = [1, 2, 3, 4]
LAYERS = "layers"  # grid key: the model's own layer count (ModelSpec.layers_field); skipped where it has none
DEFAULT_GRID: dict[str, list[Any]] = {
    "train.lr": [0.001, 0.005],
    "train.reg_weight": [0.0001, 0.001, 0.01],
    LAYERS: [2, 3],
}
TUNED_FILE = Path("tune") / "best.json"


def label(name: str) -> str:
    return LABELS.get(name, name)


@dataclass
class Context:
    """What a suite needs: the run cache, the base config (``--config``/``--set``), seeds, options."""

    runner: Runner
    base: RunConfig
    seeds: int = 1
    out: Path = Path("results")
    test: str = "ttest"
    models: list[str] | None = None
    plots: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=lambda: dict(DEFAULT_GRID))
    tuned: dict[str, dict[str, Any]] | None = None  # model -> chosen settings (``tune``), used by variant()
    partial: bool = False  # with a cached-only runner: rows from the seeds that finished

    def variant(self, seed_index: int, changes: dict[str, Any]) -> RunConfig:
        """The base config with dotted ``changes`` (e.g. ``{"model.rank": 8}``) and seed ``base + index``;
        with :attr:`tuned`, the model's tuned settings apply first (``changes`` win over them)."""
        dump = self.base.model_dump()
        dump["train"]["seed"] = self.base.train.seed + seed_index
        if self.tuned is not None:
            changes = {**self.tuned.get(changes.get("model.name", self.base.model.name), {}), **changes}
        for dotted, value in changes.items():
            section, key = dotted.split(".", 1)
            dump[section][key] = value
        # The base config's model settings apply to every model that has them (the embedding width, the layer
        # count, ...); each model takes its own.
        dump["model"] = parse_model_config(dump["model"], ignore_other_settings=True).model_dump()
        return RunConfig.model_validate(dump)

    def group(self, row: str, changes: dict[str, Any], *, embeddings: bool = False) -> list[RunRecord]:
        """One run per seed of the variant ``changes`` (``model.name: popularity`` = the popularity ranker)."""
        changes = dict(changes)
        scorer = POPULARITY if changes.get("model.name") == POPULARITY else None
        if scorer:
            changes.pop("model.name")
        records = []
        for i in range(self.seeds):
            spec = RunSpec(self.variant(i, changes), scorer)
            try:
                records.append(self.runner.run(spec, embeddings=embeddings, label=f"{row} seed {i}"))
            except MissingRunError as exc:
                if not self.partial:
                    raise
                log.warning("%s (left out: --partial)", exc)
        if not records:
            raise MissingRunError(f"{row}: no seed has a finished run in {self.runner.runs_dir}")
        return records

    def directory(self, suite: str) -> Path:
        path = self.out / suite
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def top_k(self) -> int:
        return max(self.base.train.ks)


def _write(ctx: Context, suite: str, table: Table, figures: list[Path]) -> list[Path]:
    out = ctx.directory(suite)
    (out / "table.md").write_text(table.markdown)
    summary = {**table.summary, "seeds": ctx.seeds, "figures": [p.name for p in figures]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    return [out / "table.md", out / "summary.json", *figures]


def _json_default(value: Any) -> Any:
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {value!r}")


def _figure(ctx: Context, draw: Callable[[], Path]) -> list[Path]:
    if not ctx.plots:
        return []
    if not plots.available():
        log.warning("matplotlib is not installed: no figures (pip install -e .[experiments])")
        return []
    return [draw()]


def _caption(ctx: Context, what: str, protocol: str, measure: str = "test metrics") -> str:
    data = ctx.base.data.path or f"built-in synthetic ({ctx.base.data.synthetic.n_users} users)"
    bold = "; best per column in bold" if measure == "test metrics" else ""
    settings = f"; settings tuned per model on the validation split ({TUNED_FILE})" if ctx.tuned is not None else ""
    return (
        f"{what}. Data: {data}; protocol: {protocol}; {measure}, mean ± std over {ctx.seeds} seed(s) "
        f"(train.seed {ctx.base.train.seed}..{ctx.base.train.seed + ctx.seeds - 1}){settings}{bold}."
    )


def _model_table(ctx: Context, suite: str, models: list[str], protocol: str, what: str) -> list[Path]:
    groups = {label(m): ctx.group(label(m), {"model.name": m, "data.protocol": protocol}) for m in models}
    # The first MetaMMF model listed (the served default first) against the strongest baseline.
    subject = label(next((m for m in models if m in SERVABLE_METAMMF), "metammf_gcn"))
    baselines = [label(m) for m in models if m not in SERVABLE_METAMMF]
    comparisons = [Comparison(subject, baselines, f"{subject} vs strongest baseline")]
    table = results_table(
        groups,
        metric_keys(ctx.base.train.ks),
        extras=slice_columns(protocol, ctx.top_k),
        extra_digits=4,
        comparisons=comparisons,
        test=ctx.test,
        caption=_caption(ctx, what, protocol),
    )
    curves = {row: records[0].history for row, records in groups.items() if records[0].history}
    figures = _figure(
        ctx, lambda: plots.learning_curves(curves, f"recall@{ctx.top_k}", ctx.directory(suite) / "learning_curves.png")
    )
    return _write(ctx, suite, table, figures)


def slice_columns(protocol: str, k: int) -> dict[str, Callable[[RunRecord], float]]:
    """Extra test columns: under the warm protocol, Recall@k on the interactions with items that have no
    training interaction; under cold_items, Recall@k of the held-out items among all items and the warm
    items' Recall@k (training.coldstart.cold_evaluator). NaN for runs that lack them (popularity)."""

    def column(key: str) -> Callable[[RunRecord], float]:
        return lambda record: record.test.get(key, float("nan"))

    if protocol == "warm":
        return {f"R@{k} items without training interactions": column(f"untrained_recall@{k}")}
    return {f"R@{k} among all items": column(f"full_recall@{k}"), f"warm R@{k}": column(f"warm_recall@{k}")}


def table2(ctx: Context) -> list[Path]:
    """The baselines, MetaMMF_MF/GCN and the popularity ranker, warm protocol (the paper's Table 2; the
    static-fusion variants are the ``fusion`` suite)."""
    return _model_table(ctx, "table2", ctx.models or table2_models(), "warm", "Table 2: overall performance")


def table2_models() -> list[str]:
    """Every registered model but the static-fusion variants, and the popularity ranker."""
    return [*(m for m in model_names() if m not in STATIC_FUSION), POPULARITY]


def fusion(ctx: Context) -> list[Path]:
    """Static early, late and hybrid fusion against MetaMMF's dynamic fusion, MF and GCN backbones (the
    fusion comparison of the paper's Table 3)."""
    models = ctx.models or [*PAPER_STATIC_FUSION, *METAMMF]
    groups = {label(m): ctx.group(label(m), {"model.name": m, "data.protocol": "warm"}) for m in models}
    comparisons = [
        Comparison(label(dynamic), [label(m) for m in STATIC_FUSION if m.endswith(f"_{backbone}") and m in models],
            f"{label(dynamic)} vs the strongest static fusion ({label(dynamic).split('_')[1]})")
        for dynamic, backbone in (("metammf_mf", "mf"), ("metammf_gcn", "gcn"), ("metammf_lightgcn", "lightgcn"))
        if dynamic in models
    ]  # fmt: skip
    table = results_table(
        groups,
        metric_keys(ctx.base.train.ks),
        comparisons=comparisons,
        test=ctx.test,
        caption=_caption(ctx, "Table 3: static fusion against dynamic (meta-learned) fusion", "warm"),
    )
    return _write(ctx, "fusion", table, [])


def coldstart(ctx: Context) -> list[Path]:
    """Held-out items ranked from content (training.coldstart)."""
    models = ctx.models or COLDSTART_MODELS
    ratio = ctx.base.data.cold_item_ratio
    what = f"Cold-start items: {ratio:.0%} of items held out, ranked among the held-out items only"
    return _model_table(ctx, "coldstart", models, "cold_items", what)


# Every new-item setting of models/metammf/cold_items.py, as the paper has them (a row sets all of them, whatever
# the base config says) ...
_PAPER = {
    "model.untrained_items": "id",
    "model.isolated_nodes": "zeros",
    "model.cold_item_dropout": 0.0,
    "model.content_alignment": 0.0,
    "model.content_neighbors": 0,
    "model.content_residual": True,
}
# ... held-out items from content alone ("self": a new item's graph layers keep its own state) ...
_CONTENT = {**_PAPER, "model.untrained_items": "content", "model.isolated_nodes": "self"}
# ... and placed among its k nearest trained items by content, the scale of their mean learned.
_NEIGHBORS = {**_CONTENT, "model.cold_item_dropout": 0.2, "model.content_residual": False}
NEW_ITEM_VARIANTS: dict[str, dict[str, Any]] = {
    "ID embedding as trained (the paper)": _PAPER,
    "content only, DropoutNet p=0.2": {**_CONTENT, "model.cold_item_dropout": 0.2},
    "content only, distillation to the trained embedding": {**_CONTENT, "model.content_alignment": 1.0},
    "content neighbours k=10": {**_NEIGHBORS, "model.content_neighbors": 10},
    "content neighbours k=30": {**_NEIGHBORS, "model.content_neighbors": 30},
    "content neighbours k=30, no dropout": {**_NEIGHBORS, "model.content_neighbors": 30,
                                            "model.cold_item_dropout": 0.0},
    "content neighbours k=30 + content residual": {**_NEIGHBORS, "model.content_neighbors": 30,
                                                   "model.content_residual": True},
}  # fmt: skip


def newitems(ctx: Context) -> list[Path]:
    """Ways to represent and train new items (models.metammf.cold_items), one model (the base config's), under the
    cold-item protocol: each variant's held-out items ranked among themselves, among all items, and the
    warm items' ranking; the variant with the best validation selection score is compared with the others."""
    groups = {
        row: ctx.group(row, {**changes, "data.protocol": "cold_items"}) for row, changes in NEW_ITEM_VARIANTS.items()
    }
    monitor = ctx.base.train.monitor
    extras = {
        "valid selection": lambda r: selection(r.info["valid"], monitor),
        **slice_columns("cold_items", ctx.top_k),
    }
    chosen = max(groups, key=lambda row: mean_std([selection(r.info["valid"], monitor) for r in groups[row]])[0])
    what = (
        f"New items: {label(ctx.base.model.name)}, {ctx.base.data.cold_item_ratio:.0%} of items held out; plain "
        "columns rank them among the held-out items; 'valid selection' is the mean of held-out and warm validation "
        f"R@{ctx.top_k} (the early-stopping rule), whose best row ({chosen}) is compared with the others"
    )
    table = results_table(
        groups,
        metric_keys(ctx.base.train.ks),
        extras=extras,
        extra_digits=4,
        comparisons=[Comparison(chosen, [row for row in groups if row != chosen], f"{chosen} vs the best other")],
        test=ctx.test,
        caption=_caption(ctx, what, "cold_items"),
    )
    return _write(ctx, "newitems", table, [])


def _sweep_rows(ctx: Context, backbones: list[str], values: list, changes_of) -> dict[str, dict[Any, list[RunRecord]]]:
    return {b: {v: ctx.group(f"{label(b)} {v}", {"model.name": b, **changes_of(v)}) for v in values} for b in backbones}


def _sweep_series(rows: dict[str, dict[Any, list[RunRecord]]], value: Callable[[RunRecord], float]):
    series = {}
    for backbone, by_value in rows.items():
        stats = [mean_std([value(r) for r in records]) for records in by_value.values()]
        series[label(backbone)] = ([m for m, _ in stats], [s for _, s in stats])
    return series


def depth(ctx: Context) -> list[Path]:
    """Fusion tower depth N = 1..4, MF and GCN backbones (the paper's Table 3)."""
    backbones = ctx.models or list(METAMMF)
    rows = _sweep_rows(ctx, backbones, DEPTHS, lambda d: {"model.fusion_layers": d})
    groups = {f"{label(b)} N={d}": records for b, by in rows.items() for d, records in by.items()}
    table = results_table(
        groups,
        metric_keys(ctx.base.train.ks),
        test=ctx.test,
        caption=_caption(ctx, "Table 3: depth N of the fusion network", ctx.base.data.protocol),
    )
    k = ctx.top_k
    panels = [(f"test {m}@{k}", _sweep_series(rows, lambda r, m=m: r.test[f"{m}@{k}"])) for m in ("recall", "ndcg")]
    figures = _figure(
        ctx, lambda: plots.sweep(DEPTHS, "fusion layers N", panels, ctx.directory("depth") / "depth_sweep.png")
    )
    return _write(ctx, "depth", table, figures)


def _rank_changes(r: int | str) -> dict[str, Any]:
    return {"model.tensor": "full"} if r == "full" else {"model.tensor": "cp", "model.rank": r}


def rank(ctx: Context) -> list[Path]:
    """CP rank R in {4, 8, 16, 32} and the full tensor: metrics, epochs to converge, seconds per epoch
    (the paper's Figure 5 and Table 4).

    Epochs to converge: the epoch of the best validation score (the one early stopping keeps); seconds
    per epoch: training time only (no evaluation), averaged over the epochs run."""
    backbones = ctx.models or list(METAMMF)
    rows = _sweep_rows(ctx, backbones, RANKS, _rank_changes)
    groups = {f"{label(b)} R={r}": records for b, by in rows.items() for r, records in by.items()}
    extras = {"epochs to converge": lambda r: r.best_epoch, "seconds / epoch": lambda r: r.seconds_per_epoch}
    table = results_table(
        groups,
        metric_keys(ctx.base.train.ks),
        extras=extras,
        test=ctx.test,
        caption=_caption(ctx, "Table 4 / Figure 5: rank R of the meta tensor", ctx.base.data.protocol),
    )
    k = ctx.top_k
    panels = [
        (f"test recall@{k}", _sweep_series(rows, lambda r: r.test[f"recall@{k}"])),
        (f"test ndcg@{k}", _sweep_series(rows, lambda r: r.test[f"ndcg@{k}"])),
        ("epochs to converge", _sweep_series(rows, lambda r: r.best_epoch)),
        ("seconds / epoch", _sweep_series(rows, lambda r: r.seconds_per_epoch)),
    ]
    out = ctx.directory("rank")
    figures = _figure(ctx, lambda: plots.sweep(RANKS, "rank R", panels, out / "rank_sweep.png"))
    curves = {f"{label(b)} R={r}": records[0].history for b, by in rows.items() for r, records in by.items()}
    figures += _figure(ctx, lambda: plots.learning_curves(curves, f"recall@{k}", out / "learning_curves.png"))
    return _write(ctx, "rank", table, figures)


def static(ctx: Context) -> list[Path]:
    """With and without the static weights W (the paper's Table 5)."""
    backbones = ctx.models or list(METAMMF)
    groups, comparisons = {}, []
    for b in backbones:
        with_w, without_w = label(b), f"{label(b)} w/o static W"
        groups[with_w] = ctx.group(with_w, {"model.name": b, "model.static_weights": True})
        groups[without_w] = ctx.group(without_w, {"model.name": b, "model.static_weights": False})
        comparisons.append(Comparison(with_w, [without_w], f"{label(b)}: with vs without W"))
    table = results_table(
        groups,
        metric_keys(ctx.base.train.ks),
        comparisons=comparisons,
        test=ctx.test,
        caption=_caption(ctx, "Table 5: static weights W in W_i = W + T x3 s_i", ctx.base.data.protocol),
    )
    return _write(ctx, "static", table, [])


def tsne_study(ctx: Context) -> list[Path]:
    """t-SNE of sampled users and their items per model, with the mean silhouette coefficient (labels:
    the user; in the 2-D t-SNE map and in the embedding space) (the paper's Figure 4)."""
    models = ctx.models or ["vbpr", "metammf_mf", "invrl", "metammf_gcn"]
    n_users, sample_seed = ctx.options.get("users", 10), ctx.options.get("sample_seed", 0)
    data, _ = ctx.runner.data(ctx.base.data)
    users = sample_users(data, n_users, sample_seed)
    groups, stats, panels = {}, {}, []
    for m in models:
        records = ctx.group(label(m), {"model.name": m, "data.protocol": "warm"}, embeddings=True)
        groups[label(m)] = records
        map_scores, space_scores = [], []
        for i, record in enumerate(records):
            points, labels, is_user = user_item_points(data, users, *record.embeddings())
            coords = tsne(points, seed=sample_seed)
            map_scores.append(silhouette_score(coords, labels))
            space_scores.append(silhouette_score(points, labels))
            if i == 0:
                panels.append((f"{label(m)} (silhouette {map_scores[-1]:.3f})", coords, labels, is_user))
        stats[label(m)] = {"tsne": mean_std(map_scores), "embedding": mean_std(space_scores)}
    lines = [
        _caption(
            ctx,
            f"Figure 4: t-SNE of {len(users)} sampled users and their items (any split), labelled by user",
            "warm",
            "mean silhouette coefficient",
        ),
        "",
        "| Model | silhouette (t-SNE 2-D) | silhouette (embedding space) |",
        "|---|---|---|",
    ]
    for row, s in stats.items():
        cells = [f"{s[k][0]:.4f} ± {s[k][1]:.4f}" if ctx.seeds > 1 else f"{s[k][0]:.4f}" for k in ("tsne", "embedding")]
        lines.append(f"| {row} | {' | '.join(cells)} |")
    summary = {"rows": {row: {k: {"mean": v[0], "std": v[1]} for k, v in s.items()} for row, s in stats.items()}}
    summary["users"] = users.tolist()
    figures = _figure(ctx, lambda: plots.embedding_scatter(panels, ctx.directory("tsne") / "tsne.png"))
    return _write(ctx, "tsne", Table("\n".join(lines) + "\n", summary), figures)


def popularity(ctx: Context) -> list[Path]:
    """Test Recall@k and NDCG@k of each model's warm runs on slices of the test interactions by the training
    popularity of their item, from the head to the tail (:mod:`training.experiments.slices`), and the paired
    tests over users of the first model listed against each other one, slice by slice."""
    models = ctx.models or [DEFAULT_MODEL, "lightgcn", "lattice", POPULARITY]
    data, _ = ctx.runner.data(ctx.base.data)
    names = [slice_name(*bounds) for bounds in POPULARITY_SLICES]
    slices = dict(zip(names, popularity_slices(data.train, data.n_items), strict=True))
    shares = [float(np.isin(data.test[:, 1], slice_items).mean()) for slice_items in slices.values()]
    k, metrics = ctx.top_k, ("recall", "ndcg")
    scores = {label(m): _slice_scores(ctx, data, slices, m) for m in models}
    rows = {
        row: {name: {key: mean_std(seeds) for key, (seeds, _) in by[name].items()} for name in names}
        for row, by in scores.items()
    }
    subject, *others = list(scores)
    pvalues = {
        other: {
            name: {
                key: paired_pvalue(scores[subject][name][key][1], scores[other][name][key][1], ctx.test)
                for key in scores[subject][name]
            }
            for name in names
        }
        for other in others
    }

    def cell(stats: dict[str, tuple[float, float]]) -> str:
        if not stats:
            return "-"
        return " / ".join(f"{m:.4f} ± {s:.4f}" if ctx.seeds > 1 else f"{m:.4f}" for m, s in stats.values())

    def p_cell(values: dict[str, float]) -> str:
        return " / ".join(f"{values[key]:.3g}" for key in metrics) if values else "-"

    header = [f"{name} ({share:.1%} of test interactions)" for name, share in zip(names, shares, strict=True)]
    lines = [
        _caption(ctx, "Slices of the test split by the popularity of the item", "warm", f"test Recall@{k} / NDCG@{k}"),
        "",
        f"| Model | {' | '.join(header)} |",
        f"|---|{'---|' * len(names)}",
        *(f"| {row} | {' | '.join(cell(by[name]) for name in names)} |" for row, by in rows.items()),
        *(
            f"| *{subject} vs {other}: p-value over users ({ctx.test})* | "
            f"{' | '.join(p_cell(by[name]) for name in names)} |"
            for other, by in pvalues.items()
        ),
    ]
    summary = {
        "slices": [
            {"name": name, "bounds": list(bounds), "test_share": share}
            for name, bounds, share in zip(names, POPULARITY_SLICES, shares, strict=True)
        ],
        "rows": {
            row: {name: {key: {"mean": v[0], "std": v[1]} for key, v in stats.items()} for name, stats in by.items()}
            for row, by in rows.items()
        },
        "pvalues": {f"{subject} vs {other}": by for other, by in pvalues.items()},
    }
    return _write(ctx, "popularity", Table("\n".join(lines) + "\n", summary), [])


def _slice_scores(
    ctx: Context, data: RecData, slices: dict[str, np.ndarray], model: str
) -> dict[str, dict[str, tuple[list[float], np.ndarray]]]:
    """Per popularity slice (``slices``: name -> its items) and metric (recall, ndcg at ``ctx.top_k``): the value
    of each seed's run and the per-user values averaged over the seeds (for paired tests); no entry for a slice
    without test interactions."""
    k = ctx.top_k
    records = ctx.group(label(model), {"model.name": model, "data.protocol": "warm"}, embeddings=model != POPULARITY)
    found: dict[str, dict[str, list]] = {name: {} for name in slices}
    for record in records:
        if model == POPULARITY:
            score = popularity_scores(data.train, data.n_items)
        else:
            score = embedding_scores(*record.embeddings())
        every = [np.arange(data.n_items), *slices.values()]
        results = evaluate_slices(score, data, every, (k,), ctx.base.train.eval_batch_size)
        whole, results = results[0], results[1:]
        if whole is not None and abs(whole.metrics[f"ndcg@{k}"] - record.test[f"ndcg@{k}"]) > 1e-5:
            raise ValueError(
                f"{label(model)}: its saved embeddings do not reproduce its test NDCG@{k} "
                f"({whole.metrics[f'ndcg@{k}']:.6f} against {record.test[f'ndcg@{k}']:.6f}); the popularity "
                "suite scores models by the dot product of their final user and item embeddings"
            )
        for name, result in zip(found, results, strict=True):
            if result is not None:
                for key in ("recall", "ndcg"):
                    value = (result.metrics[f"{key}@{k}"], result.per_user[f"{key}@{k}"])
                    found[name].setdefault(key, []).append(value)
    return {
        name: {key: ([v for v, _ in runs], np.mean([u for _, u in runs], axis=0)) for key, runs in by.items()}
        for name, by in found.items()
    }


def selection(valid: dict[str, float], monitor: str) -> float:
    """The validation score early stopping followed: the protocol's selection rule where it has one
    (cold_items: held-out and warm together), else ``monitor``."""
    return valid.get("selection", valid[monitor])


def grid_points(grid: dict[str, list[Any]], model: str) -> list[dict[str, Any]]:
    """Every combination of ``grid`` for ``model``: the ``layers`` key becomes the model's own layer
    field (``model.gcn_layers``, ...) and is left out for models without one."""
    field_name = get_spec(model).layers_field
    keys = {k: (f"model.{field_name}" if k == LAYERS else k) for k in grid if k != LAYERS or field_name}
    return [
        {"model.name": model, **dict(zip(keys.values(), values, strict=True))}
        for values in itertools.product(*(grid[k] for k in keys))
    ]


def load_tuned(out: Path) -> dict[str, dict[str, Any]]:
    """The settings ``tune`` chose per model (``<out>/tune/best.json``)."""
    path = out / TUNED_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist: run the tune suite with the same --out first")
    return json.loads(path.read_text())


def tune(ctx: Context) -> list[Path]:
    """Grid search per model (default: learning rate x L2 weight x layer count), each point trained for
    --seeds seeds and ranked by the validation metric that early stopping monitors.

    Each model's grid and scores go to tune/models/<model>.json (so separate invocations, e.g. with
    different grids per model, add up); table.md and best.json (the chosen settings, read by
    ``--tuned``) are made from all of them."""
    monitor, k = ctx.base.train.monitor, ctx.top_k
    models_dir = ctx.directory("tune") / "models"
    models_dir.mkdir(exist_ok=True)
    for model in ctx.models or model_names():
        rows = []
        for point in grid_points(ctx.grid, model):
            changes = {key: value for key, value in point.items() if key != "model.name"}
            name = ", ".join(f"{key.split('.', 1)[1]}={value}" for key, value in changes.items())
            records = ctx.group(f"{label(model)} {name}", point)
            rows.append(
                {
                    "changes": changes,
                    "valid": mean_std([selection(r.info["valid"], monitor) for r in records])[0],
                    "test_recall": mean_std([r.test[f"recall@{k}"] for r in records])[0],
                    "test_ndcg": mean_std([r.test[f"ndcg@{k}"] for r in records])[0],
                    "best_epoch": mean_std([r.best_epoch for r in records])[0],
                }
            )
        chosen = max(range(len(rows)), key=lambda i: rows[i]["valid"])
        record = {"grid": ctx.grid, "seeds": ctx.seeds, "monitor": monitor, "k": k, "rows": rows, "chosen": chosen}
        (models_dir / f"{model}.json").write_text(json.dumps(record, indent=1, default=_json_default))
    return _write_tuning(ctx, models_dir.parent)


def _write_tuning(ctx: Context, out: Path) -> list[Path]:
    order = {name: i for i, name in enumerate(model_names())}
    files = sorted((out / "models").glob("*.json"), key=lambda p: order.get(p.stem, len(order)))
    tuned = {p.stem: json.loads(p.read_text()) for p in files}
    best = {model: t["rows"][t["chosen"]]["changes"] for model, t in tuned.items()}
    settings = sorted({key for t in tuned.values() for row in t["rows"] for key in row["changes"]})
    lines = [
        "Tuning: every point of each model's grid trained and ranked by the mean validation metric early "
        "stopping monitors; the chosen point in bold. Data: "
        f"{ctx.base.data.path or 'built-in synthetic'}.",
        "",
    ]
    monitor, k = ctx.base.train.monitor, ctx.top_k
    header = ["Model", *(key.split(".", 1)[1] for key in settings), "seeds", f"valid {monitor}"]
    header += [f"test recall@{k}", f"test ndcg@{k}", "best epoch"]
    lines += [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    for model, t in tuned.items():
        for i, row in enumerate(t["rows"]):
            cells = [label(model), *(str(row["changes"].get(key, "-")) for key in settings), str(t["seeds"])]
            cells += [f"{row[name]:.4f}" for name in ("valid", "test_recall", "test_ndcg")]
            cells.append(f"{row['best_epoch']:.0f}")
            lines.append(f"| {' | '.join(f'**{c}**' for c in cells) if i == t['chosen'] else ' | '.join(cells)} |")
    (out / "best.json").write_text(json.dumps(best, indent=1))
    table = Table("\n".join(lines) + "\n", {"models": tuned, "best": best})
    return [*_write(ctx, "tune", table, []), out / "best.json"]


SUITES: dict[str, Callable[[Context], list[Path]]] = {
    "tune": tune,
    "table2": table2,
    "fusion": fusion,
    "coldstart": coldstart,
    "newitems": newitems,
    "depth": depth,
    "rank": rank,
    "static": static,
    "tsne": tsne_study,
    "popularity": popularity,
}
