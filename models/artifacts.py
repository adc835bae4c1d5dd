"""The artifact directory: the contract between the training job (writer) and the service (reader).

Layout (every file listed in ``manifest.json`` with its SHA-256)::

    manifest.json           format version, artifact id, library versions, file checksums
    config.json             the resolved run configuration
    metrics.json            best epoch, validation/test metrics, per-epoch history
    model.safetensors       all trained weights
    encoder.safetensors     InferenceEncoder weights: fusion network, graph layers, mean embeddings
    embeddings.safetensors  user_embeddings (U, d), item_embeddings (I, d), item_states (L+1, I, d),
                            item_popularity (I,)
    items.faiss             FAISS inner-product index over item_embeddings, ids = item row numbers
    catalog.json            external user / item ids (row order) and the modalities (name, dim)
    interactions.npy        (n, 2) int64 (user row, item row): every known interaction, excluded
                            from recommendations
    per_user_valid.npz, per_user_test.npz   per-user metrics for paired significance tests
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
# The file names of the layout above: every writer and reader (training.export, service.loading, the benches and
# the tests) names them through these constants.
MANIFEST = "manifest.json"
CONFIG = "config.json"
METRICS = "metrics.json"
MODEL_WEIGHTS = "model.safetensors"
ENCODER = "encoder.safetensors"
EMBEDDINGS = "embeddings.safetensors"
INDEX = "items.faiss"
CATALOG = "catalog.json"
INTERACTIONS = "interactions.npy"
PER_USER_VALID = "per_user_valid.npz"
PER_USER_TEST = "per_user_test.npz"
REQUIRED_FILES = (CONFIG, METRICS, MODEL_WEIGHTS, ENCODER, EMBEDDINGS, INDEX, CATALOG, INTERACTIONS)
# The tensors of EMBEDDINGS.
EMBEDDING_KEYS = ("user_embeddings", "item_embeddings", "item_states", "item_popularity")


class ArtifactError(RuntimeError):
    """An artifact directory that is missing, incomplete, corrupt or of another format."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import faiss
    import numpy
    import torch
    import torch_geometric

    return {
        "torch": torch.__version__,
        "torch_geometric": torch_geometric.__version__,
        "faiss": faiss.__version__,
        "numpy": numpy.__version__,
    }


def write_artifacts(out: str | Path, write_files: Callable[[Path], None], extra: dict[str, Any]) -> Path:
    """Build an artifact directory atomically: ``write_files`` fills a temporary sibling directory, the
    manifest is added, then it replaces ``out`` by rename, so readers never see a half-written one."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_files(tmp)
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        missing = [name for name in REQUIRED_FILES if name not in files]
        if missing:
            raise ArtifactError(f"artifact writer did not produce {missing}")
        artifact_id = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
        manifest = {
            "format_version": FORMAT_VERSION,
            "artifact_id": artifact_id,
            "versions": library_versions(),
            "files": files,
            **extra,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            # Two renames: readers may briefly see no directory (never a partial one); a failed
            # second rename restores the previous artifact.
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read ``manifest.json``; with ``verify`` check that every file is present with its checksum."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path}: missing (not an artifact directory, or an interrupted write)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    for name in REQUIRED_FILES:
        if name not in manifest.get("files", {}):
            raise ArtifactError(f"{manifest_path}: does not list required file {name}")
    if verify:
        for name, meta in manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise ArtifactError(f"{file}: listed in the manifest but missing")
            if file.stat().st_size != meta["bytes"] or sha256_file(file) != meta["sha256"]:
                raise ArtifactError(f"{file}: checksum mismatch (corrupt or modified artifact)")
    return manifest


class Bundle:
    """A verified artifact directory loaded into memory (no pickle anywhere on this path)."""

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        import faiss
        import numpy as np
        from safetensors.torch import load_file

        from models.metammf.inference import InferenceEncoder
        from models.registry import parse_model_config

        self.path = Path(path)
        self.manifest = read_manifest(self.path, verify=verify)
        self.artifact_id: str = self.manifest["artifact_id"]
        try:
            self.config: dict[str, Any] = json.loads((self.path / CONFIG).read_text())
            self.metrics: dict[str, Any] = json.loads((self.path / METRICS).read_text())
            catalog = json.loads((self.path / CATALOG).read_text())
            self.user_ids: list[str] = catalog["users"]
            self.item_ids: list[str] = catalog["items"]
            self.modalities: dict[str, int] = {m["name"]: int(m["dim"]) for m in catalog["modalities"]}
            self.model_config = parse_model_config(self.config["model"], ignore_other_settings=True)
            embeddings = load_file(self.path / EMBEDDINGS)
            self.user_embeddings = embeddings["user_embeddings"].numpy()
            self.item_embeddings = embeddings["item_embeddings"].numpy()
            self.item_states = embeddings["item_states"].numpy()
            self.item_popularity = embeddings["item_popularity"].numpy()
            self.interactions = np.load(self.path / INTERACTIONS, allow_pickle=False)
            self.encoder = InferenceEncoder.from_state_dict(
                self.model_config, sum(self.modalities.values()), load_file(self.path / ENCODER)
            )
            self.index = faiss.read_index(str(self.path / INDEX))
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            raise ArtifactError(f"{self.path}: unreadable artifact ({type(exc).__name__}: {exc})") from None
        self._check_shapes()

    def _check_shapes(self) -> None:
        n_users, n_items, dim = len(self.user_ids), len(self.item_ids), self.model_config.embedding_dim
        checks = {
            "user_embeddings": (self.user_embeddings.shape, (n_users, dim)),
            "item_embeddings": (self.item_embeddings.shape, (n_items, dim)),
            "item_states": (self.item_states.shape, (self.encoder.n_states, n_items, dim)),
            "item_popularity": (self.item_popularity.shape, (n_items,)),
            INDEX: ((self.index.ntotal, self.index.d), (n_items, dim)),
        }
        for name, (got, want) in checks.items():
            if tuple(got) != tuple(want):
                raise ArtifactError(f"{self.path}: {name} has shape {tuple(got)}, expected {want}")
