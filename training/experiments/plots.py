"""PNG figures with matplotlib (the optional ``experiments`` extra: ``pip install -e .[experiments]``).

Every function writes one file and returns its path; :func:`available` says whether matplotlib is
installed (the experiment commands then skip their figures with a warning).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

Series = dict[str, tuple[Sequence[float], Sequence[float]]]  # label -> (means, stds)


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def learning_curves(curves: dict[str, list[dict[str, float]]], metric: str, path: str | Path) -> Path:
    """Training loss and validation ``metric`` per epoch, one line per label (one run's history each)."""
    plt = _pyplot()
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    for label, history in curves.items():
        epochs = [h["epoch"] for h in history]
        ax_loss.plot(epochs, [h["loss"] for h in history], label=label)
        evaluated = [h for h in history if f"valid_{metric}" in h]
        ax_metric.plot([h["epoch"] for h in evaluated], [h[f"valid_{metric}"] for h in evaluated], label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss (BPR + L2)", title="Training loss")
    ax_metric.set(xlabel="epoch", ylabel=f"validation {metric}", title=f"Validation {metric}")
    ax_metric.legend(fontsize="small", ncol=2)
    return _save(fig, path)


def sweep(x_labels: Sequence[str], x_name: str, panels: Sequence[tuple[str, Series]], path: str | Path) -> Path:
    """One panel per (y name, series): means with std error bars against categorical x values."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    x = np.arange(len(x_labels))
    for ax, (y_name, series) in zip(axes[0], panels, strict=True):
        for label, (means, stds) in series.items():
            ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=label)
        ax.set_xticks(x, [str(v) for v in x_labels])
        ax.set(xlabel=x_name, ylabel=y_name)
        ax.legend(fontsize="small")
    return _save(fig, path)


def embedding_scatter(panels: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """t-SNE panels (title, coords (n, 2), labels (n,), is_user (n,)): points coloured by user; users as
    stars, their items as dots."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.8), squeeze=False)
    n_colors = max(len(np.unique(p[2])) for p in panels) if panels else 1
    cmap = plt.get_cmap("tab10" if n_colors <= 10 else "tab20")
    for ax, (title, coords, labels, is_user) in zip(axes[0], panels, strict=True):
        classes = {c: n for n, c in enumerate(np.unique(labels))}
        colors = [cmap(classes[c] % cmap.N) for c in labels]
        items = ~is_user
        ax.scatter(coords[items, 0], coords[items, 1], c=[colors[i] for i in np.flatnonzero(items)], s=14, alpha=0.8)
        ax.scatter(
            coords[is_user, 0],
            coords[is_user, 1],
            c=[colors[i] for i in np.flatnonzero(is_user)],
            s=160,
            marker="*",
            edgecolors="black",
            linewidths=0.6,
        )
        ax.set_title(title, fontsize="medium")
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)
