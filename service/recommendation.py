"""What a recommendation answers, and how fresh items take their reserved places in it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Recommendation:
    strategy: str  # "model", "inductive" or "popular"; "+fresh" when fresh slots were filled
    item_ids: list[str]
    scores: list[float]
    fresh: list[int] = field(default_factory=list)  # positions in item_ids of the fresh slots


def with_fresh(rec: Recommendation, fresh_ids: list[str], fresh_scores: list[float], k: int) -> Recommendation:
    """``rec`` cut to make room for ``fresh_ids`` (scored like its items), which join it by score and keep
    their places even where they rank below the k-th; ``fresh`` names their positions."""
    if not fresh_ids:
        return rec
    picked = set(fresh_ids)
    rest = [(i, s) for i, s in zip(rec.item_ids, rec.scores, strict=True) if i not in picked][: k - len(picked)]
    # By score, the model's items first on ties (a stable sort of the two lists, each ordered already).
    merged = sorted(
        [(s, False, i) for i, s in rest] + [(s, True, i) for i, s in zip(fresh_ids, fresh_scores, strict=True)],
        key=lambda entry: (-entry[0], entry[1]),
    )
    return Recommendation(
        f"{rec.strategy}+fresh",
        [i for _, _, i in merged],
        [float(s) for s, _, _ in merged],
        [position for position, (_, is_fresh, _) in enumerate(merged) if is_fresh],
    )
