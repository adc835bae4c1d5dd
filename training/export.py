"""Write a trained model as a serving artifact directory (layout: :mod:`models.artifacts`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from safetensors.torch import save_file

from models.artifacts import (
    CATALOG,
    CONFIG,
    EMBEDDINGS,
    ENCODER,
    INDEX,
    INTERACTIONS,
    METRICS,
    MODEL_WEIGHTS,
    PER_USER_TEST,
    PER_USER_VALID,
    write_artifacts,
)
from models.metammf.inference import InferenceEncoder, item_states
from models.registry import is_servable, servable_names
from training.config import RunConfig
from training.data import RecData
from training.trainer import TrainResult


class NotServableError(ValueError):
    """The model cannot be exported as a serving artifact (the service serves MetaMMF models only)."""


def check_servable(model_name: str) -> None:
    """Raise :class:`NotServableError` for a model the service cannot serve (the baselines)."""
    if not is_servable(model_name):
        raise NotServableError(
            f"model {model_name!r} is a baseline and cannot be exported as a serving artifact: the service "
            f"serves MetaMMF models only ({', '.join(servable_names())}); baselines are trained and evaluated only"
        )


def build_item_index(item_embeddings: np.ndarray) -> faiss.Index:
    """Exact inner-product index; ids are item row numbers, so items can be added and removed later."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(item_embeddings.shape[1]))
    index.add_with_ids(np.ascontiguousarray(item_embeddings, dtype=np.float32),
                       np.arange(len(item_embeddings), dtype=np.int64))  # fmt: skip
    return index


def metrics_summary(result: TrainResult) -> dict:
    return {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "train_seconds": round(result.train_seconds, 3),
        "new_item_scale": result.new_item_scale,
        "precision": result.precision,
        "valid": result.valid.metrics,
        "test": result.test.metrics,
        "history": result.history,
    }


@torch.no_grad()
def export_artifacts(
    result: TrainResult,
    data: RecData,
    run_config: RunConfig,
    out: str | Path,
    item_ids: list[str] | None = None,
    data_checksum: str | None = None,
) -> Path:
    """Write weights, embeddings, the FAISS index, id maps, seen interactions, metrics and config.

    Users and items are served under the data's ids (``data.user_ids``/``data.item_ids``, by default the row
    numbers), or items under ``item_ids`` when given (one per row: e.g. the original ids of a cold-item split's
    warm items). ``data_checksum`` (training.versions) goes into the
    manifest. Raises :class:`NotServableError` for a
    baseline (only MetaMMF models can be served)."""
    check_servable(run_config.model.name)
    if item_ids is not None and (len(item_ids) != data.n_items or len(set(item_ids)) != data.n_items):
        raise ValueError(f"item_ids: expected {data.n_items} distinct ids, one per item row, got {len(item_ids)}")
    model = result.model.cpu().eval()
    user_emb, item_emb = (t.contiguous() for t in model.get_embedding())
    encoder = InferenceEncoder.from_model(model)
    popularity = np.bincount(data.train[:, 1], minlength=data.n_items).astype(np.float32)
    seen = np.unique(np.concatenate([data.train, data.valid, data.test]), axis=0)

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / MODEL_WEIGHTS)
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, tmp / ENCODER)
        save_file(
            {
                "user_embeddings": user_emb,
                "item_embeddings": item_emb,
                "item_states": item_states(model).contiguous(),
                "item_popularity": torch.from_numpy(popularity),
            },
            tmp / EMBEDDINGS,
        )
        faiss.write_index(build_item_index(item_emb.numpy()), str(tmp / INDEX))
        catalog = {
            "users": data.user_id_list(),
            "items": list(item_ids) if item_ids is not None else data.item_id_list(),
            "modalities": [{"name": m, "dim": d} for m, d in data.modality_dims.items()],
        }
        (tmp / CATALOG).write_text(json.dumps(catalog))
        np.save(tmp / INTERACTIONS, seen.astype(np.int64), allow_pickle=False)
        (tmp / CONFIG).write_text(run_config.model_dump_json(indent=2))
        (tmp / METRICS).write_text(json.dumps(metrics_summary(result), indent=2))
        result.valid.save_per_user(tmp / PER_USER_VALID)
        result.test.save_per_user(tmp / PER_USER_TEST)

    # The manifest says what the artifact was trained on: the data (name, checksum: training.versions) and the
    # whole run config (also in config.json), so two artifacts can be told apart without loading them.
    extra = {
        "model": run_config.model.name,
        "data": data.name,
        "data_checksum": data_checksum,
        "config": json.loads(run_config.model_dump_json()),
        "created_unix": int(time.time()),
    }
    return write_artifacts(out, write, extra)
