"""Markdown result tables: mean ± std over seeds per metric, with paired significance rows.

A table has one row per group of runs (a model or a variant, one run per seed) and one column per
test metric (P, R, HR, NDCG at every K), plus optional extra columns (epochs to converge, seconds per
epoch). The best mean of each metric column is bold.

A :class:`Comparison` adds rows that test a target row against the strongest of some candidate rows,
chosen per column (the candidate with the best mean there, as the paper compares against "the
strongest baseline"):

* improvement of the target's mean over it, in percent;
* p-value over users: a paired test (``ttest`` or ``wilcoxon``, :mod:`.stats`) over the per-user
  test metric, each user's value averaged over the seeds (users common to both rows);
* p-value over seeds: the same paired test over the per-seed metric means (seed i against seed i;
  needs at least two seeds, else ``n/a``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import reduce

import numpy as np

from training.experiments.runner import RunRecord
from training.experiments.stats import mean_std, paired_pvalue

METRICS = ("precision", "recall", "hit", "ndcg")
SHORT = {"precision": "P", "recall": "R", "hit": "HR", "ndcg": "NDCG"}
TEST_NAMES = {"ttest": "paired t-test", "wilcoxon": "Wilcoxon signed-rank"}

Extra = Callable[[RunRecord], float]


def metric_keys(ks: Sequence[int]) -> list[str]:
    """Metric keys in table order: P, R, HR, NDCG at each K."""
    return [f"{m}@{k}" for k in sorted(ks) for m in METRICS]


def column_name(key: str) -> str:
    name, _, k = key.partition("@")
    return f"{SHORT.get(name, name)}@{k}"


@dataclass(frozen=True)
class Comparison:
    """Test row ``target`` against the best of ``candidates`` (per column)."""

    target: str
    candidates: Sequence[str]
    title: str = ""


def format_p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def _format(mean: float, std: float, n: int, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def per_user_pvalue(a: list[RunRecord], b: list[RunRecord], key: str, test: str) -> float:
    """Paired test over users of the per-user ``key`` (averaged over each row's seeds)."""
    users = reduce(np.intersect1d, [r.test_per_user["users"] for r in a + b])
    if len(users) < 2:
        return math.nan

    def average(records: list[RunRecord]) -> np.ndarray:
        rows = []
        for r in records:
            arrays = r.test_per_user
            rows.append(arrays[key][np.searchsorted(arrays["users"], users)])
        return np.mean(rows, axis=0)

    return paired_pvalue(average(a), average(b), test)


def seed_pvalue(a: list[RunRecord], b: list[RunRecord], key: str, test: str) -> float:
    """Paired test over seeds (seed i of ``a`` against seed i of ``b``) of the test metric ``key``."""
    n = min(len(a), len(b))
    if n < 2:
        return math.nan
    return paired_pvalue([r.test[key] for r in a[:n]], [r.test[key] for r in b[:n]], test)


@dataclass
class Table:
    """A rendered table and its numbers (``summary``, JSON-serialisable)."""

    markdown: str
    summary: dict = field(default_factory=dict)


def results_table(
    groups: dict[str, list[RunRecord]],
    keys: Sequence[str],
    *,
    extras: dict[str, Extra] | None = None,
    comparisons: Sequence[Comparison] = (),
    test: str = "ttest",
    caption: str = "",
    digits: int = 4,
    extra_digits: int = 2,
) -> Table:
    """Markdown table of ``groups`` (row label -> runs, one per seed) over the test metrics ``keys``."""
    extras = extras or {}
    stats: dict[str, dict[str, dict[str, float]]] = {}
    for label, records in groups.items():
        row = {}
        for key in keys:
            mean, std = mean_std([r.test[key] for r in records])
            row[key] = {"mean": mean, "std": std, "n": len(records)}
        for name, fn in extras.items():
            mean, std = mean_std([fn(r) for r in records])
            row[name] = {"mean": mean, "std": std, "n": len(records)}
        stats[label] = row
    best = {key: max(groups, key=lambda label: stats[label][key]["mean"]) for key in keys} if groups else {}

    header = ["Model", *(column_name(k) for k in keys), *extras]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    most = max((len(records) for records in groups.values()), default=0)
    for label in groups:
        n = len(groups[label])
        cells = [label if n == most else f"{label} ({n} seed{'s' if n > 1 else ''})"]
        for key in keys:
            s = stats[label][key]
            text = _format(s["mean"], s["std"], s["n"], digits)
            cells.append(f"**{text}**" if best.get(key) == label and len(groups) > 1 else text)
        for name in extras:
            s = stats[label][name]
            missing = not math.isfinite(s["mean"])  # a run without that figure (e.g. popularity's)
            cells.append("n/a" if missing else _format(s["mean"], s["std"], s["n"], extra_digits))
        lines.append(f"| {' | '.join(cells)} |")

    summary: dict = {"rows": stats, "test": test, "comparisons": []}
    pad = [""] * len(extras)
    for comp in comparisons:
        candidates = [c for c in comp.candidates if c in groups]
        if comp.target not in groups or not candidates:
            continue
        columns = {}
        for key in keys:
            base = max(candidates, key=lambda label: stats[label][key]["mean"])
            target_mean, base_mean = stats[comp.target][key]["mean"], stats[base][key]["mean"]
            columns[key] = {
                "baseline": base,
                "improvement": (target_mean - base_mean) / base_mean * 100 if base_mean else math.nan,
                "p_user": per_user_pvalue(groups[comp.target], groups[base], key, test),
                "p_seed": seed_pvalue(groups[comp.target], groups[base], key, test),
            }
        summary["comparisons"].append({"title": comp.title, "target": comp.target, "columns": columns})
        name = TEST_NAMES.get(test, test)
        title = comp.title or f"{comp.target} vs strongest"
        rows = [
            (f"*{title}: compared with*", [columns[k]["baseline"] for k in keys]),
            ("*improvement (%)*", [f"{columns[k]['improvement']:+.2f}" for k in keys]),
            (f"*p-value over users ({name})*", [format_p(columns[k]["p_user"]) for k in keys]),
            (f"*p-value over seeds ({name})*", [format_p(columns[k]["p_seed"]) for k in keys]),
        ]
        lines += [f"| {' | '.join([head, *cells, *pad])} |" for head, cells in rows]

    text = "\n".join(lines) + "\n"
    if caption:
        text = f"{caption}\n\n{text}"
    return Table(text, summary)
