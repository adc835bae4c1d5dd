"""Versioned artifacts: one directory per (data, config), and a ``current`` link the service follows.

Layout under a root (``python -m training train --out ROOT --versioned``)::

    ROOT/versions/<version>/   an artifact directory (models.artifacts), <version> = version_key(...)
    ROOT/current -> versions/<version>   the one to serve (MMF_ARTIFACTS=ROOT/current)

The version is a checksum of the data (every file the loader reads, or the generator's settings for the built-in
synthetic data) and of the run config, so a new data directory or config trains a new version, the same ones
find the version already trained, and the link switches atomically (a rename), so a service reading
``current`` sees the old artifact or the new one, never a mix. A service started with
``MMF_ARTIFACTS_WATCH_S`` notices the switch and hot-reloads (service/runtime.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from models.artifacts import MANIFEST, read_manifest
from training.config import DataConfig, RunConfig

VERSIONS = "versions"
CURRENT = "current"
# The files training reads from an MMRec directory (training.data.load_mmrec), in a stable order.
DATA_PATTERNS = ("*.inter", "*_feat.npy", "user_ids.txt", "item_ids.txt")


def data_checksum(cfg: DataConfig) -> str:
    """SHA-256 of what the model is trained on: the data directory's files (names and bytes), or, for the
    built-in synthetic data, the generator's settings (it is deterministic)."""
    digest = hashlib.sha256()
    if cfg.path is None:
        digest.update(b"synthetic\0" + cfg.synthetic.model_dump_json().encode())
        return digest.hexdigest()
    root = Path(cfg.path)
    files = sorted({p for pattern in DATA_PATTERNS for p in root.glob(pattern) if p.is_file()})
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def version_key(cfg: RunConfig, checksum: str) -> str:
    """12 hex digits naming a version: the data checksum and every setting that changes the trained model (the
    data's location, progress bars and CPU threads do not)."""
    settings = json.loads(cfg.model_dump_json())
    settings["data"].pop("path", None)
    settings["train"].pop("progress", None)
    settings["train"].pop("threads", None)
    text = json.dumps({"data": checksum, "config": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def version_dir(root: str | Path, version: str) -> Path:
    return Path(root) / VERSIONS / version


def trained_version(root: str | Path, version: str) -> Path | None:
    """The version's directory if it holds a complete artifact (its manifest and every file it lists)."""
    path = version_dir(root, version)
    if not (path / MANIFEST).is_file():
        return None
    read_manifest(path)  # ArtifactError: a damaged version is an error, not something to serve silently
    return path


def current_version(root: str | Path) -> str | None:
    """The version ``ROOT/current`` points at, or None without a link."""
    link = Path(root) / CURRENT
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name


def switch_current(root: str | Path, version: str) -> Path:
    """Point ``ROOT/current`` at ``versions/<version>`` by an atomic rename of a fresh link. A ``current`` that
    is a directory (an artifact written there directly) is first kept as a version of its own, under its
    artifact id, so nothing trained is lost."""
    root = Path(root)
    link = root / CURRENT
    if link.is_dir() and not link.is_symlink():
        artifact_id = read_manifest(link, verify=False)["artifact_id"]
        (root / VERSIONS).mkdir(parents=True, exist_ok=True)
        link.rename(version_dir(root, artifact_id))
    tmp = root / f".{CURRENT}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path(VERSIONS) / version)  # relative: valid wherever the root is mounted
    os.replace(tmp, link)
    return link
