"""The ``python -m training`` command line, end to end in subprocesses.

Starting an interpreter costs a few seconds (torch + torch_geometric imports), so the quick commands
(help texts, error exits, data generation) run in one subprocess that executes ``training.__main__``
once per argument list via :mod:`runpy` (exactly what ``python -m training`` does) and reports each
exit status; ``train`` and ``evaluate`` run as real ``python -m training`` processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.patience import HANG_GUARD_S
from training.cli import build_parser, resolve_config
from training.config import RunConfig
from training.data import load_mmrec

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

BATCH_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys
    results = []
    for argv in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        sys.argv = ["python -m training", *argv]
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_module("training", run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    print(json.dumps(results))
    """
)


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


def run_batch(argvs: list[list[str]], cwd: Path = ROOT) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", BATCH_SCRIPT, json.dumps(argvs)],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def quick(workdir: Path) -> dict[str, dict]:
    """Exit status and output of the quick commands, by name."""
    commands = {
        "help": ["--help"],
        "train_help": ["train", "--help"],
        "evaluate_help": ["evaluate", "--help"],
        "generate_help": ["generate-synthetic", "--help"],
        "generate": ["generate-synthetic", "--out", str(workdir / "data"), "--users", "200", "--items", "150"],
        "missing_data": ["train", "--data", "/nonexistent/metammf-data", "--out", str(workdir / "never")],
        "bad_rank": ["train", "--out", str(workdir / "never"), "--set", "model.rank=abc"],
        "bad_key": ["train", "--out", str(workdir / "never"), "--set", "train.no_such_option=1"],
        "no_command": [],
    }
    return dict(zip(commands, run_batch(list(commands.values()), cwd=workdir), strict=True))


@pytest.fixture(scope="module")
def trained(quick, workdir: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    assert quick["generate"]["code"] == 0, quick["generate"]["stderr"]
    art = workdir / "art"
    proc = run_cli("train", "--data", str(workdir / "data"), "--out", str(art), "--set", "train.epochs=2",
                   "--no-progress", cwd=workdir)  # fmt: skip
    return proc, art


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("help", ["train", "evaluate", "generate-synthetic"]),
        ("train_help", ["--config", "--data", "--out", "--set", "--no-progress", "--model"]),
        ("evaluate_help", ["--artifacts", "--split", "--data"]),
        ("generate_help", ["--out", "--users", "--items", "--seed"]),
    ],
)
def test_help(quick, name: str, expected: list[str]) -> None:
    result = quick[name]
    assert result["code"] == 0, result["stderr"]
    assert "usage:" in result["stdout"]
    for option in expected:
        assert option in result["stdout"]


def test_missing_command_is_a_usage_error(quick) -> None:
    assert quick["no_command"]["code"] == 2
    assert "usage:" in quick["no_command"]["stderr"]


def test_generate_synthetic(quick, workdir: Path) -> None:
    assert "200 users, 150 items" in quick["generate"]["stdout"]
    data = load_mmrec(workdir / "data")
    assert (data.n_users, data.n_items) == (200, 150)
    assert data.modality_dims == {"acoustic": 128, "visual": 128}


def test_train_writes_artifacts_and_prints_json(trained) -> None:
    proc, art = trained
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # stdout is exactly one JSON document; logs go to stderr
    assert summary["artifacts"] == str(art.resolve())
    assert summary["model"] == "metammf_lightgcn"
    assert summary["best_epoch"] in (1, 2)
    plain = {f"{m}@{k}" for m in ("recall", "ndcg", "precision", "hit") for k in (10, 20)}
    # (with the slice of items without training interactions where the data has any)
    assert set(summary["test"]) - plain in (set(), {f"untrained_{key}" for key in plain}) and plain <= set(
        summary["test"]
    )
    assert all(0.0 <= v <= 1.0 for v in summary["test"].values())
    assert (art / "manifest.json").is_file()
    metrics = json.loads((art / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    assert summary["test"]["recall@20"] == pytest.approx(metrics["test"]["recall@20"], abs=5e-5)


def test_resolved_config_is_written(trained, workdir: Path) -> None:
    _, art = trained
    # Read as plain JSON: the subprocess may see a newer ModelConfig than this interpreter imported.
    written = json.loads((art / "config.json").read_text())
    assert set(written) == {"data", "model", "train"}
    assert written["train"]["epochs"] == 2
    assert written["train"]["progress"] is False
    assert written["data"]["path"] == str(workdir / "data")
    assert written["model"]["name"] == "metammf_lightgcn"
    defaults = RunConfig().model_dump(mode="json")
    for section in ("model", "train"):  # untouched defaults are written out in full
        for key, value in defaults[section].items():
            if key not in ("epochs", "progress"):
                assert written[section][key] == value, f"{section}.{key}"


def test_evaluate_reproduces_train_metrics(trained, workdir: Path) -> None:
    train_proc, art = trained
    assert train_proc.returncode == 0, train_proc.stderr
    proc = run_cli("evaluate", "--artifacts", str(art), cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["split"] == "test"
    printed = json.loads(train_proc.stdout)["test"]
    for key in ("recall@20", "ndcg@20", "recall@10"):
        assert result[key] == pytest.approx(printed[key], abs=1e-4), key


def test_fusion_share_prints_a_row_per_fusion_layer(trained, workdir: Path) -> None:
    _, art = trained
    proc = run_cli("fusion-share", "--artifacts", str(art), cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1, proc.stdout
    dynamic, static, spread = (float(cell) for cell in rows[0].strip("|").split("|")[1:])
    assert 0 <= dynamic <= 1 and 0 <= static <= 1 and spread >= 0


def test_missing_data_directory_exits_2(quick) -> None:
    result = quick["missing_data"]
    assert result["code"] == 2
    assert "/nonexistent/metammf-data" in result["stderr"]
    assert "Traceback" not in result["stderr"]


def test_bad_override_value_exits_2_naming_the_key(quick) -> None:
    result = quick["bad_rank"]
    assert result["code"] == 2
    assert "model.rank" in result["stderr"]
    assert "Traceback" not in result["stderr"]


def test_unknown_override_key_exits_2(quick) -> None:
    result = quick["bad_key"]
    assert result["code"] == 2
    assert "no_such_option" in result["stderr"]


def test_data_path_override_keeps_plain_paths(tmp_path: Path) -> None:
    args = build_parser().parse_args(["train", "--data", str(tmp_path / "some data"), "--set", "model.rank=4"])
    cfg = resolve_config(args)
    assert cfg.data.path == str(tmp_path / "some data") and cfg.model.rank == 4


def test_data_path_with_yaml_special_characters(tmp_path: Path) -> None:
    path = str(tmp_path / "run #1")
    args = build_parser().parse_args(["train", "--data", path])
    assert resolve_config(args).data.path == path
