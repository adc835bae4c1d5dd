"""Loading an artifact directory for serving, with errors that name the broken file.

:class:`models.artifacts.reader.Bundle` verifies the manifest checksums, but a file that is broken *and* listed
with matching checksums (truncated before the manifest was written, or the manifest edited to match) fails
inside safetensors, numpy, FAISS or torch with an error about the directory at best. ``load_bundle`` then
opens every file the service reads on its own to find the culprit, so the error reads
``<dir>/items.faiss: not a readable FAISS index (...)`` instead of a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.artifacts.reader import Bundle
from models.artifacts.schema import (
    CATALOG,
    CONFIG,
    EMBEDDING_KEYS,
    EMBEDDINGS,
    ENCODER,
    INDEX,
    INTERACTIONS,
    METRICS,
    ArtifactError,
)

JSON_FILES = (CATALOG, CONFIG, METRICS)


def load_bundle(path: str | Path) -> Bundle:
    """A verified :class:`Bundle`; raises :class:`ArtifactError` naming the file for every failure."""
    try:
        # A link (ROOT/current) is followed once: switched while loading, it cannot mix two artifacts' files.
        path = Path(path).resolve()
        bundle = Bundle(path)
    except ArtifactError as exc:
        if "unreadable artifact" not in str(exc):
            raise  # already names the file (manifest, checksum, shape)
        raise ArtifactError(diagnose(path) or str(exc)) from None
    except Exception as exc:  # SafetensorError, EOFError, TypeError, ... from deep inside a loader
        problem = _safe_diagnose(path)
        raise ArtifactError(
            problem or f"{path}: unreadable artifact ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    # Files the service does not load (model.safetensors) must still be whole: a cheap header check.
    problem = _check_safetensors(sorted(path.glob("*.safetensors"))) or _check_contents(bundle)
    if problem:
        raise ArtifactError(problem)
    return bundle


def _check_contents(bundle: Bundle) -> str | None:
    """Values Bundle does not check: interaction pairs in range, finite embeddings."""
    import numpy as np

    pairs = bundle.interactions
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iu":
        return f"{bundle.path / 'interactions.npy'}: expected an (n, 2) integer array, got {pairs.dtype} {pairs.shape}"
    if pairs.size and (
        pairs.min() < 0 or pairs[:, 0].max() >= len(bundle.user_ids) or pairs[:, 1].max() >= len(bundle.item_ids)
    ):
        return f"{bundle.path / 'interactions.npy'}: user or item rows out of range of catalog.json"
    for name in ("user_embeddings", "item_embeddings", "item_states"):
        if not np.isfinite(getattr(bundle, name)).all():
            return f"{bundle.path / 'embeddings.safetensors'}: {name} holds NaN or inf"
    return None


def _check_safetensors(files: list[Path]) -> str | None:
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as fh:
                fh.keys()
        except Exception as exc:
            return f"{file}: not a readable safetensors file ({_first_line(exc)})"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _safe_diagnose(path: object) -> str | None:
    try:
        return diagnose(Path(path))  # type: ignore[arg-type]
    except Exception as exc:  # e.g. a path with a NUL byte
        return f"{path!r}: not a usable artifact directory ({_first_line(exc)})"


def diagnose(path: Path) -> str | None:
    """The first problem found in the files the service reads, as ``"<file>: <problem>"``; None if each
    file reads on its own."""
    if not path.is_dir():
        return f"{path}: not a directory"
    parsed = {}
    for name in JSON_FILES:
        file = path / name
        try:
            parsed[name] = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            return f"{file}: not valid JSON ({_first_line(exc)})"
    catalog = parsed[CATALOG]
    try:
        assert isinstance(catalog, dict), "not a JSON object"
        for key in ("users", "items"):
            assert isinstance(catalog.get(key), list), f"{key!r} must be a list of ids"
            assert all(isinstance(v, str) for v in catalog[key]), f"{key!r} must hold strings"
        modalities = catalog.get("modalities")
        assert isinstance(modalities, list) and modalities, "'modalities' must be a non-empty list"
        for m in modalities:
            assert isinstance(m, dict) and isinstance(m.get("name"), str), "modality without a name"
            assert isinstance(m.get("dim"), int) and m["dim"] > 0, f"modality {m.get('name')!r}: bad dim"
    except AssertionError as exc:
        return f"{path / 'catalog.json'}: {exc}"
    config = parsed[CONFIG]
    try:
        from models.registry import parse_model_config

        model_config = parse_model_config(config["model"], ignore_other_settings=True)
    except Exception as exc:
        return f"{path / 'config.json'}: no valid model section ({_first_line(exc)})"

    from safetensors import safe_open

    tensors = {}
    for name, required in ((EMBEDDINGS, EMBEDDING_KEYS), (ENCODER, ())):
        file = path / name
        try:
            with safe_open(str(file), framework="numpy") as fh:
                keys = set(fh.keys())
                tensors[name] = {k: fh.get_tensor(k) for k in keys} if name == ENCODER else None
        except Exception as exc:
            return f"{file}: not a readable safetensors file ({_first_line(exc)})"
        missing = [k for k in required if k not in keys]
        if missing:
            return f"{file}: missing tensors {missing}"

    import numpy as np

    file = path / INTERACTIONS
    try:
        pairs = np.load(file, allow_pickle=False, mmap_mode="r")
    except Exception as exc:
        reason = "not a .npy file, or an object array (never unpickled)" if "pickle" in str(exc) else _first_line(exc)
        return f"{file}: not a readable .npy array ({reason})"
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iu":
        return f"{file}: expected an (n, 2) integer array, got {pairs.dtype} {pairs.shape}"

    import faiss

    file = path / INDEX
    try:
        faiss.read_index(str(file))
    except Exception as exc:
        return f"{file}: not a readable FAISS index ({_first_line(exc)})"

    try:
        import torch

        from models.metammf.inference import InferenceEncoder

        state = {k: torch.from_numpy(np.array(v)) for k, v in tensors[ENCODER].items()}
        InferenceEncoder.from_state_dict(model_config, sum(m["dim"] for m in catalog["modalities"]), state)
    except Exception as exc:
        return f"{path / 'encoder.safetensors'}: weights do not fit config.json and catalog.json ({_first_line(exc)})"
    return None
