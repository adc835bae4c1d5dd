"""Writing an artifact directory atomically, with its manifest (:mod:`models.artifacts.schema`); what goes in
each file is the training job's (:mod:`training.export`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.artifacts.schema import FORMAT_VERSION, MANIFEST, REQUIRED_FILES, ArtifactError


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
