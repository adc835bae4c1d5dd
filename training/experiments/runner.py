"""Training runs cached by content: ``<root>/runs/<key>/`` holds everything a table or plot needs.

The key is a hash of

* the resolved :class:`~training.config.RunConfig`, less what does not change results
  (``train.progress``) and where the data lives (``data.path``, ``data.synthetic``: the data enter
  through their fingerprint instead, so moving a data directory does not invalidate runs);
* the data fingerprint (:func:`data_fingerprint`: SHA-256 of the sizes, the three splits and the features);
* the code version (:func:`code_version`: SHA-256 of the sources that decide the run's results: the
  model's module and the training loop with the project modules they import), so changing a model or the
  trainer retrains what depends on it, and adding another model does not;
* the scorer (``"popularity"`` for the evaluation-only popularity ranker, else the trained model).

A finished run directory holds ``config.json``, ``metrics.json`` (test/valid metrics, best epoch, epochs
run, per-epoch history, seconds), ``test_per_user.npz`` and ``valid_per_user.npz`` (per-user metrics,
:meth:`~training.evaluate.EvalResult.save_per_user`) and, for trained models, ``embeddings.npz`` (final
user and item embeddings). It is written to a temporary directory and renamed into place, so an interrupted
experiment leaves no half-written run and re-running it trains only what is missing (resumable). Two
processes sharing a results directory (e.g. one per grid axis) train each run once: a run is trained under
an exclusive lock on ``runs/.lock-<key>``, and a process that waited for it finds the run finished.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from training.config import DataConfig, RunConfig
from training.data import RecData

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
# Whose sources decide results: the model's module and the training loop, with the project modules they
# import at module level. Left out: what only maps names or holds settings (the resolved config is hashed
# itself) and data loading (the data fingerprint covers it), so adding a baseline or a config field does
# not invalidate the runs of the other models.
CORE_MODULES = ("training.trainer", "training.coldstart", "training.popularity")
POPULARITY = "popularity"  # the scorer that ranks by training popularity (training/popularity.py), not a model
NOT_CODE = frozenset(
    {"models.registry", "models.config", "training.config", "training.cli", "training.data", "training.synthetic"}
)


def _module_path(module: str) -> Path | None:
    for path in (ROOT / f"{module.replace('.', '/')}.py", ROOT / module.replace(".", "/") / "__init__.py"):
        if path.is_file():
            return path
    return None


def _project_imports(statements: list[ast.stmt]) -> set[str]:
    """Project modules (``models.*``, ``training.*``) imported by ``statements`` (not nested ones)."""
    found = set()
    for node in statements:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in ("models", "training") and _module_path(m) is not None}


_PARSE_LOCK = threading.Lock()


def _parse(source: str) -> ast.Module:
    # CPython 3.11 before 3.11.8 tracks ast.parse's recursion depth per interpreter, not per thread, so two
    # threads parsing at once can fail with "AST constructor recursion depth mismatch" (gh-106905); runners
    # in threads of one process (tests/test_experiments.py) did.
    with _PARSE_LOCK:
        return ast.parse(source)


def code_modules(model: str | None = None) -> tuple[str, list[str]]:
    """(registry part, project modules) whose sources decide the results of ``model`` (None: the
    evaluation-only scorers): the model's registry target and the module-level import closure of its
    module and of the training loop."""
    roots, registry_part = set(CORE_MODULES), ""
    if model is not None:
        from models.registry import get_spec

        spec = get_spec(model)
        registry_part = f"{spec.target} {spec.config.__module__}.{spec.config.__qualname__}"
        roots |= {spec.target.partition(":")[0], spec.config.__module__}
    seen: set[str] = set()
    todo = sorted(roots - NOT_CODE)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += sorted(_project_imports(_parse(_module_path(module).read_text()).body) - NOT_CODE - seen)
    return registry_part, sorted(seen)


def code_version(model: str | None = None) -> str:
    """SHA-256 (16 hex digits) of :func:`code_modules`: the registry part and the modules' sources."""
    registry_part, modules = code_modules(model)
    digest = hashlib.sha256(registry_part.encode())
    for module in modules:
        digest.update(module.encode())
        digest.update(_module_path(module).read_bytes())
    return digest.hexdigest()[:16]


def data_fingerprint(data: RecData) -> str:
    """SHA-256 (16 hex digits) of a data set's content (not its location)."""
    digest = hashlib.sha256(json.dumps([data.name, data.n_users, data.n_items]).encode())
    for arr in (data.train, data.valid, data.test):
        digest.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    for name, feat in data.features.items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(feat, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class RunSpec:
    """One run: a resolved config and the scorer (``None`` = train ``config.model``; ``"popularity"``)."""

    config: RunConfig
    scorer: str | None = None

    def key_payload(self) -> dict[str, Any]:
        dump = self.config.model_dump(mode="json")
        dump["train"].pop("progress", None)
        for field in ("path", "synthetic"):
            dump["data"].pop(field, None)
        if self.scorer is not None:  # an evaluation-only scorer: the model and optimiser play no part
            dump.pop("model")
            dump["train"] = {k: dump["train"][k] for k in ("ks", "eval_batch_size", "device")}
        return {"config": dump, "scorer": self.scorer}


def run_key(spec: RunSpec, fingerprint: str, code: str) -> str:
    payload = {**spec.key_payload(), "data": fingerprint, "code": code}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class RunRecord:
    """A finished run, read back from its directory."""

    key: str
    path: Path
    info: dict[str, Any]

    @property
    def test(self) -> dict[str, float]:
        return self.info["test"]

    @property
    def history(self) -> list[dict[str, float]]:
        return self.info["history"]

    @property
    def seconds_per_epoch(self) -> float:
        return float(self.info["seconds_per_epoch"])

    @property
    def best_epoch(self) -> int:
        return int(self.info["best_epoch"])

    @cached_property
    def test_per_user(self) -> dict[str, np.ndarray]:
        with np.load(self.path / "test_per_user.npz", allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.path / "embeddings.npz", allow_pickle=False) as npz:
            return npz["users"], npz["items"]

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        return cls(path.name, path, json.loads((path / "metrics.json").read_text()))


def load_data(cfg: DataConfig) -> RecData:
    from training.cli import load_data as load

    return load(cfg)


class MissingRunError(ValueError):
    """A run that a cached-only runner would have to train."""


class Runner:
    """Runs (or finds) :class:`RunSpec` results under ``root / 'runs'``.

    ``train_fn(config, data)`` trains a run (default :func:`training.coldstart.train_protocol`); tests
    substitute it to count calls. ``cached_only`` refuses to train (:class:`MissingRunError`). Data sets
    are loaded once per distinct data section.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        train_fn: Callable[[RunConfig, RecData], Any] | None = None,
        data_fn: Callable[[DataConfig], RecData] = load_data,
        cached_only: bool = False,
    ) -> None:
        self.root = Path(root)
        self.cached_only = cached_only  # tabulate finished runs only: a missing run is an error
        self.runs_dir = self.root / "runs"
        self.train_fn = train_fn
        self.data_fn = data_fn
        self._code: dict[str | None, str] = {}
        self._data: dict[str, tuple[RecData, str]] = {}
        self.trained = 0  # runs trained (not found in the cache) by this runner

    def data(self, cfg: DataConfig) -> tuple[RecData, str]:
        """The data set of ``cfg`` and its fingerprint (loaded once)."""
        key = cfg.model_dump_json(include={"path", "split_seed", "cold_users", "synthetic"})
        if key not in self._data:
            data = self.data_fn(cfg)
            self._data[key] = (data, data_fingerprint(data))
        return self._data[key]

    def code(self, spec: RunSpec) -> str:
        """The code version of ``spec``'s model (computed once per model)."""
        model = None if spec.scorer is not None else spec.config.model.name
        if model not in self._code:
            self._code[model] = code_version(model)
        return self._code[model]

    def key(self, spec: RunSpec) -> str:
        return run_key(spec, self.data(spec.config.data)[1], self.code(spec))

    def run(self, spec: RunSpec, *, embeddings: bool = False, label: str = "") -> RunRecord:
        """The finished run of ``spec``: read from the cache, or trained and written there first.
        ``embeddings=True`` also needs the final embeddings (a cached run without them is trained again)."""
        data, fingerprint = self.data(spec.config.data)
        code = self.code(spec)
        key = run_key(spec, fingerprint, code)
        path = self.runs_dir / key

        def finished() -> bool:
            return (path / "metrics.json").is_file() and (not embeddings or (path / "embeddings.npz").is_file())

        if finished():
            log.info("%s: cached run %s", label or key, key)
            return RunRecord.load(path)
        if self.cached_only:
            raise MissingRunError(f"{label or 'run'}: run {key} is not in {self.runs_dir} (--cached-only)")
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.runs_dir / f".lock-{key}", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            if finished():  # another process trained it while this one waited
                log.info("%s: cached run %s (trained by another process meanwhile)", label or key, key)
                return RunRecord.load(path)
            log.info("%s: training run %s", label or key, key)
            tmp = self.runs_dir / f".tmp-{key}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                self._execute(spec, data, fingerprint, code, tmp, embeddings)
                shutil.rmtree(path, ignore_errors=True)
                os.replace(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self.trained += 1
        return RunRecord.load(path)

    def _execute(self, spec: RunSpec, data: RecData, fingerprint: str, code: str, out: Path, embeddings: bool) -> None:
        cfg = spec.config
        start = time.perf_counter()
        info: dict[str, Any] = {"scorer": spec.scorer or cfg.model.name, "protocol": cfg.data.protocol}
        if spec.scorer == POPULARITY:
            from training.popularity import evaluate_popularity  # (torch: imported when a run needs it)

            valid, test = evaluate_popularity(cfg, data)
            info.update(best_epoch=0, epochs=0, history=[], train_seconds=0.0, seconds_per_epoch=0.0)
            model = None
        elif spec.scorer is None:
            from training.coldstart import train_protocol

            result = (self.train_fn or train_protocol)(cfg, data)
            valid, test, model = result.valid, result.test, result.model
            epochs = len(result.history)
            info.update(
                best_epoch=result.best_epoch,
                epochs=epochs,
                history=result.history,
                train_seconds=result.train_seconds,
                new_item_scale=result.new_item_scale,
                seconds_per_epoch=result.train_seconds / max(epochs, 1),
            )
        else:
            raise ValueError(f"unknown scorer {spec.scorer!r}")
        info.update(
            test=test.metrics,
            valid=valid.metrics,
            wall_seconds=time.perf_counter() - start,
            data=fingerprint,
            code=code,
            n_test_users=len(test.users),
        )
        test.save_per_user(out / "test_per_user.npz")
        valid.save_per_user(out / "valid_per_user.npz")
        if embeddings and model is None:
            raise ValueError(f"scorer {spec.scorer!r} has no embeddings")
        if model is not None:  # always kept (a few MB): a later t-SNE study need not train the run again
            import torch

            with torch.no_grad():
                model.eval()
                users, items = (t.detach().cpu().numpy() for t in model.get_embedding())
            np.savez(out / "embeddings.npz", users=users, items=items)
        (out / "config.json").write_text(json.dumps({**spec.key_payload(), "resolved": cfg.model_dump(mode="json")}))
        (out / "metrics.json").write_text(json.dumps(info, indent=1))
