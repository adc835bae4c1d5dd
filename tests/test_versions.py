"""Versioned artifacts (training/versions.py, `train --versioned`): one version per (data, config), a `current`
link switched atomically, nothing retrained for the same data and config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.artifacts import read_manifest
from training.cli import main as training_main
from training.config import DataConfig, RunConfig
from training.data import save_mmrec
from training.synthetic import SyntheticConfig, generate_synthetic
from training.versions import (
    current_version,
    data_checksum,
    switch_current,
    trained_version,
    version_key,
)

SMALL = SyntheticConfig(n_users=80, n_items=60, modality_dims={"visual": 8, "acoustic": 8}, seed=3)
QUICK = ["--set", "train.epochs=1", "--set", "train.threads=1", "--no-progress"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("versions") / "data"
    save_mmrec(generate_synthetic(SMALL), path)
    return path


def train(root: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> dict:
    assert training_main(["train", "--versioned", "--out", str(root), *args, *QUICK]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") :])


def test_the_checksum_follows_the_data_not_its_location(data_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(data_dir, tmp_path / "elsewhere")
    assert data_checksum(DataConfig(path=str(copy))) == data_checksum(DataConfig(path=str(data_dir)))
    features = np.load(copy / "visual_feat.npy")
    features[0, 0] += 1.0
    np.save(copy / "visual_feat.npy", features)
    assert data_checksum(DataConfig(path=str(copy))) != data_checksum(DataConfig(path=str(data_dir)))
    (copy / "notes.txt").write_text("not read by the loader")
    before = data_checksum(DataConfig(path=str(copy)))
    (copy / "notes.txt").write_text("changed")
    assert data_checksum(DataConfig(path=str(copy))) == before
    builtin = data_checksum(DataConfig())
    assert builtin == data_checksum(DataConfig()) != data_checksum(DataConfig(synthetic=SMALL))


def test_the_version_follows_the_settings_that_change_the_model() -> None:
    base = RunConfig()
    key = version_key(base, "abc")
    same = base.model_copy(deep=True)
    same.data.path, same.train.threads, same.train.progress = "/somewhere/else", 1, False
    assert version_key(same, "abc") == key
    other = base.model_copy(deep=True)
    other.train.lr = base.train.lr / 2
    assert version_key(other, "abc") != key and version_key(base, "abd") != key
    assert len(key) == 12 and int(key, 16) >= 0


def test_train_versioned_trains_each_version_once_and_switches_current(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "artifacts"
    first = train(root, "--data", str(data_dir), capsys=capsys)
    version = Path(first["artifacts"]).name
    assert current_version(root) == version and (root / "current").resolve() == (root / "versions" / version)
    manifest = read_manifest(root / "current")
    assert manifest["data_checksum"] == data_checksum(DataConfig(path=str(data_dir)))
    assert manifest["config"]["train"]["epochs"] == 1 and manifest["config"]["model"]["name"] == "metammf_lightgcn"

    again = train(root, "--data", str(data_dir), capsys=capsys)
    assert again == {"artifacts": str(root / "versions" / version), "version": version, "trained": False}
    assert read_manifest(root / "current")["artifact_id"] == manifest["artifact_id"]  # not rewritten

    other = train(root, "--data", str(data_dir), "--set", "train.lr=0.001", capsys=capsys)
    assert Path(other["artifacts"]).name != version and current_version(root) == Path(other["artifacts"]).name
    # back to the first config: found, not trained, the link moves back
    assert train(root, "--data", str(data_dir), capsys=capsys)["trained"] is False
    assert current_version(root) == version
    assert sorted(p.name for p in (root / "versions").iterdir()) == sorted([version, Path(other["artifacts"]).name])


def test_a_directory_named_current_is_kept_as_a_version(data_dir: Path, tmp_path: Path) -> None:
    """A root whose `current` is an artifact directory (written by `train --out ROOT/current`): switching moves
    it under versions/<its artifact id> instead of losing it."""
    root = tmp_path / "artifacts"
    assert training_main(["train", "--data", str(data_dir), "--out", str(root / "current"), *QUICK]) == 0
    artifact_id = read_manifest(root / "current")["artifact_id"]
    (root / "versions" / "v2").mkdir(parents=True)
    switch_current(root, "v2")
    assert current_version(root) == "v2"
    assert read_manifest(root / "versions" / artifact_id)["artifact_id"] == artifact_id


def test_a_damaged_version_is_an_error_not_a_silent_skip(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "artifacts"
    version = Path(train(root, "--data", str(data_dir), capsys=capsys)["artifacts"]).name
    (root / "versions" / version / "items.faiss").write_bytes(b"broken")
    assert trained_version(root, "missing") is None
    assert training_main(["train", "--versioned", "--out", str(root), "--data", str(data_dir), *QUICK]) == 2
    assert "items.faiss" in capsys.readouterr().err
