"""The artifact directory: export, manifest checksums, atomic replacement, loading, FAISS retrieval."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.artifacts import (
    FORMAT_VERSION,
    MANIFEST,
    REQUIRED_FILES,
    ArtifactError,
    Bundle,
    read_manifest,
    write_artifacts,
)
from models.metammf.inference import InferenceEncoder
from training.config import RunConfig, TrainConfig
from training.data import RecData
from training.evaluate import topk_items
from training.export import export_artifacts
from training.trainer import TrainResult, build_model, train

MODEL_NAMES = ["metammf_gcn", "metammf_lightgcn", "metammf_mf"]


@pytest.fixture(scope="session")
def runs(tiny_data: RecData, make_config) -> dict[str, tuple[TrainResult, RunConfig]]:
    out = {}
    for name in MODEL_NAMES:
        cfg = RunConfig(
            model=make_config(name),
            train=TrainConfig(epochs=3, batch_size=512, lr=0.01, progress=False, seed=1),
        )
        out[name] = (train(tiny_data, cfg.model, cfg.train), cfg)
    return out


@pytest.fixture(scope="session")
def exported(runs, tiny_data: RecData, tmp_path_factory) -> dict[str, Path]:
    paths = {}
    for name, (result, cfg) in runs.items():
        parent = tmp_path_factory.mktemp(f"export-{name}")
        paths[name] = export_artifacts(result, tiny_data, cfg, parent / "art")
    return paths


@pytest.fixture
def gcn_copy(exported, tmp_path: Path) -> Path:
    """A private copy of the GCN artifact directory that a test may damage."""
    return Path(shutil.copytree(exported["metammf_gcn"], tmp_path / "art"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_export_writes_every_file_with_checksums(exported, name: str) -> None:
    path = exported[name]
    names = {p.name for p in path.iterdir()}
    assert set(REQUIRED_FILES) | {MANIFEST, "per_user_valid.npz", "per_user_test.npz"} <= names
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["model"] == name
    assert set(manifest["files"]) == names - {MANIFEST}
    for file_name, meta in manifest["files"].items():
        file = path / file_name
        assert meta["sha256"] == _sha256(file), file_name
        assert meta["bytes"] == file.stat().st_size, file_name
    assert set(manifest["versions"]) >= {"torch", "faiss", "numpy", "torch_geometric"}
    assert len(manifest["artifact_id"]) == 16
    assert read_manifest(path) == manifest
    # No temporary or backup directories next to it.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bundle_loads_consistent_contents(exported, runs, tiny_data: RecData, make_config, name: str) -> None:
    result, cfg = runs[name]
    bundle = Bundle(exported[name])
    model = result.model.eval()
    user_emb, item_emb = (t.detach().numpy() for t in model.get_embedding())
    n_users, n_items, dim = tiny_data.n_users, tiny_data.n_items, make_config(name).embedding_dim
    np.testing.assert_array_equal(bundle.user_embeddings, user_emb)
    np.testing.assert_array_equal(bundle.item_embeddings, item_emb)
    assert bundle.user_embeddings.shape == (n_users, dim) and bundle.item_embeddings.shape == (n_items, dim)
    assert bundle.item_states.shape == ((1 if name == "metammf_mf" else 3), n_items, dim)
    np.testing.assert_array_equal(bundle.item_popularity, np.bincount(tiny_data.train[:, 1], minlength=n_items))
    assert bundle.user_ids == [str(u) for u in range(n_users)]
    assert bundle.item_ids == [str(i) for i in range(n_items)]
    assert bundle.modalities == tiny_data.modality_dims
    assert bundle.model_config == cfg.model
    assert RunConfig.model_validate(bundle.config) == cfg
    assert bundle.metrics["test"] == result.test.metrics
    assert bundle.metrics["best_epoch"] == result.best_epoch
    seen = np.unique(np.concatenate([tiny_data.train, tiny_data.valid, tiny_data.test]), axis=0)
    np.testing.assert_array_equal(bundle.interactions, seen)
    assert bundle.interactions.dtype == np.int64
    assert bundle.index.ntotal == n_items and bundle.index.d == dim
    # Per-user metrics files hold the evaluated users and their values.
    per_user = np.load(exported[name] / "per_user_test.npz", allow_pickle=False)
    np.testing.assert_array_equal(per_user["users"], result.test.users)
    np.testing.assert_allclose(per_user["recall@20"].mean(), result.test.metrics["recall@20"])

    # The encoder is the trained one: h^0 of the training items = [fusion(x_i); e_i^c].
    reference = InferenceEncoder.from_model(model)
    for key, value in reference.state_dict().items():
        assert torch.equal(bundle.encoder.state_dict()[key], value), key
    features = torch.from_numpy(tiny_data.item_features())
    with torch.no_grad():
        fused = bundle.encoder.fusion(features).numpy()
    fused_dim = make_config(name).fused_dim
    np.testing.assert_allclose(bundle.item_states[0][:, :fused_dim], fused, atol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_weights_reload_into_a_fresh_model(exported, runs, tiny_data: RecData, name: str) -> None:
    _, cfg = runs[name]
    bundle = Bundle(exported[name])
    fresh = build_model(tiny_data, cfg.model, cfg.train.reg_weight)
    fresh.load_state_dict(load_file(exported[name] / "model.safetensors"))  # strict
    fresh.eval()
    user_emb, item_emb = fresh.get_embedding()
    np.testing.assert_allclose(user_emb.detach().numpy(), bundle.user_embeddings, atol=1e-6)
    np.testing.assert_allclose(item_emb.detach().numpy(), bundle.item_embeddings, atol=1e-6)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_faiss_topk_equals_evaluator_topk(exported, tiny_data: RecData, name: str) -> None:
    bundle = Bundle(exported[name])
    k = 20
    n_users, n_items = tiny_data.n_users, tiny_data.n_items
    seen: dict[int, set[int]] = {}
    for u, i in bundle.interactions.tolist():
        seen.setdefault(u, set()).add(i)
    max_seen = max(len(v) for v in seen.values())
    scores, ids = bundle.index.search(np.ascontiguousarray(bundle.user_embeddings), k + max_seen)
    assert ids.min() >= 0  # k + max_seen <= n_items: every slot filled

    user_emb = torch.from_numpy(bundle.user_embeddings)
    item_emb = torch.from_numpy(bundle.item_embeddings)
    ref_items, ref_scores = topk_items(
        lambda users: user_emb[users] @ item_emb.T,
        np.arange(n_users),
        [bundle.interactions],
        n_users,
        n_items,
        k,
    )
    n_tied = 0
    for u in range(n_users):
        keep = [j for j, i in enumerate(ids[u]) if int(i) not in seen.get(u, set())][:k]
        assert len(keep) == k
        items, item_scores = ids[u][keep], scores[u][keep]
        assert not set(items.tolist()) & seen.get(u, set())
        np.testing.assert_allclose(item_scores, ref_scores[u], atol=1e-5, err_msg=f"user {u}")
        differ = items != ref_items[u]
        if differ.any():  # only allowed where scores tie
            n_tied += 1
            np.testing.assert_allclose(item_scores[differ], ref_scores[u][differ], atol=1e-5)
    assert n_tied < n_users // 10


def test_bundle_uses_no_pickle(exported, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle-based loading used")

    real_np_load = np.load

    def np_load_no_pickle(*args, **kwargs):
        assert kwargs.get("allow_pickle") is False, "np.load without allow_pickle=False"
        return real_np_load(*args, **kwargs)

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(np, "load", np_load_no_pickle)
    for path in exported.values():
        bundle = Bundle(path)
        assert bundle.user_embeddings.size > 0
        for file in path.glob("*.safetensors"):  # safetensors: u64 header length, then a JSON header
            raw = file.read_bytes()
            (header_len,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8 : 8 + header_len])
            assert all(v["dtype"] in {"F32", "I64"} for k, v in header.items() if k != "__metadata__")
        assert not [p for p in path.iterdir() if p.suffix in {".pt", ".pth", ".pkl", ".pickle", ".bin"}]


def test_tampered_file_is_rejected(gcn_copy: Path) -> None:
    Bundle(gcn_copy)  # intact copy loads
    target = gcn_copy / "embeddings.safetensors"
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF  # same size, different content
    target.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum mismatch") as info:
        Bundle(gcn_copy)
    assert "embeddings.safetensors" in str(info.value)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        read_manifest(gcn_copy)
    read_manifest(gcn_copy, verify=False)  # the structure itself is fine


def test_tampered_config_with_different_size_is_rejected(gcn_copy: Path) -> None:
    (gcn_copy / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        Bundle(gcn_copy)


def test_missing_manifest_is_rejected(gcn_copy: Path) -> None:
    (gcn_copy / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        Bundle(gcn_copy)
    with pytest.raises(ArtifactError):
        Bundle(gcn_copy.parent / "does-not-exist")


def test_missing_listed_file_is_rejected(gcn_copy: Path) -> None:
    (gcn_copy / "items.faiss").unlink()
    with pytest.raises(ArtifactError, match=r"items\.faiss"):
        Bundle(gcn_copy)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(format_version=FORMAT_VERSION + 1),
        lambda m: m["files"].pop("model.safetensors"),
    ],
    ids=["format_version", "required_file_unlisted"],
)
def test_bad_manifest_is_rejected(gcn_copy: Path, edit) -> None:
    manifest = json.loads((gcn_copy / MANIFEST).read_text())
    edit(manifest)
    (gcn_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError):
        Bundle(gcn_copy)


def test_invalid_manifest_json_is_rejected(gcn_copy: Path) -> None:
    (gcn_copy / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Bundle(gcn_copy)


def test_reexport_replaces_the_directory(runs, tiny_data: RecData, tmp_path: Path) -> None:
    result, cfg = runs["metammf_gcn"]
    out = tmp_path / "art"
    export_artifacts(result, tiny_data, cfg, out)
    (out / "stale-marker.txt").write_text("from the previous export")
    first_id = read_manifest(out)["artifact_id"]
    returned = export_artifacts(result, tiny_data, cfg, out)
    assert returned == out.resolve()
    assert not (out / "stale-marker.txt").exists()
    assert read_manifest(out)["artifact_id"] == first_id  # same content, same id
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no .tmp- / .old- leftovers
    Bundle(out)


def test_failed_write_leaves_the_old_directory_intact(runs, tiny_data: RecData, tmp_path: Path) -> None:
    result, cfg = runs["metammf_gcn"]
    out = tmp_path / "art"
    export_artifacts(result, tiny_data, cfg, out)
    before = {p.name: _sha256(p) for p in out.iterdir()}

    def crashing(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    def incomplete(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")

    with pytest.raises(RuntimeError, match="disk full"):
        write_artifacts(out, crashing, {})
    with pytest.raises(ArtifactError, match="did not produce"):
        write_artifacts(out, incomplete, {})
    assert {p.name: _sha256(p) for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    Bundle(out)
