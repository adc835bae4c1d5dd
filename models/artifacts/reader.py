"""Reading an artifact directory: its manifest (checksums verified) and the :class:`Bundle` the service serves.
No pickle anywhere on this path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.artifacts.schema import (
    CATALOG,
    CONFIG,
    EMBEDDINGS,
    ENCODER,
    FORMAT_VERSION,
    INDEX,
    INTERACTIONS,
    MANIFEST,
    METRICS,
    REQUIRED_FILES,
    ArtifactError,
)
from models.artifacts.writer import sha256_file


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
    """A verified artifact directory loaded into memory: what the service serves. The exact FAISS index is
    memory-mapped, not read (the service builds its own index from ``item_embeddings``; this one is checked and
    searchable, its pages read only when searched)."""

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
            self.index = faiss.read_index(str(self.path / INDEX), faiss.IO_FLAG_MMAP_IFC)
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
