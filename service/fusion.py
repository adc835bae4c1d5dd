"""The artifact's meta learner on the fly: new items' raw features to embeddings, and the item states of a new
user's history to a user embedding."""

from __future__ import annotations

import threading

import numpy as np
import torch

from service.request_errors import InputError

_torch_threads = threading.local()


def use_torch_threads(n: int) -> None:
    """torch's intra-op thread count for the calling thread. Under OpenMP a count is per thread, but a thread
    takes the process default (the count set last, by any thread) at its first parallel operation: a request
    thread started while precomputed lists were being built (with more threads, service/precomputed.py) would
    keep the build's count. Remembered per thread, so the common case costs no call into torch."""
    if getattr(_torch_threads, "n", None) != n:
        torch.set_num_threads(n)
        _torch_threads.n = n


class Fusion:
    """The artifact's encoder applied to request data, on the calling thread.

    Args:
        encoder: the artifact's item and user encoder.
        modalities: name -> feature dimension, in the order the features were concatenated in training.
        torch_threads: intra-op threads of the calling thread while encoding; None: as the thread has it.
        batch_torch_threads: the same for a batch of at least ``BATCH_MIN_ITEMS`` items (bulk products, which
            more threads speed up); None: ``torch_threads``.
    """

    BATCH_MIN_ITEMS = 32

    def __init__(
        self,
        encoder,
        modalities: dict[str, int],
        torch_threads: int | None = None,
        batch_torch_threads: int | None = None,
    ) -> None:
        self.encoder = encoder
        self.modalities = modalities
        self.torch_threads = torch_threads
        self.batch_torch_threads = batch_torch_threads

    def feature_matrix(self, features: list[dict[str, list[float]]]) -> np.ndarray:
        """Check modality names and dims and concatenate in training order; raises InputError."""
        rows = []
        for n, item in enumerate(features):
            missing = [m for m in self.modalities if m not in item]
            extra = [m for m in item if m not in self.modalities]
            where = f"item {n}: " if len(features) > 1 else ""
            if missing or extra:
                raise InputError(
                    f"{where}features must have exactly the modalities {list(self.modalities)}"
                    + (f"; missing {missing}" if missing else "")
                    + (f"; unknown {extra}" if extra else "")
                )
            for m, dim in self.modalities.items():
                if len(item[m]) != dim:
                    raise InputError(f"{where}modality {m!r} needs {dim} values, got {len(item[m])}")
            rows.append(np.concatenate([np.asarray(item[m], dtype=np.float32) for m in self.modalities]))
        matrix = np.stack(rows)
        if not np.isfinite(matrix).all():
            raise InputError("features must be finite numbers representable as float32")
        return matrix

    def fuse(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(b, d_x) raw features -> embeddings (b, d), states (b, n_states, d); raises InputError on overflow."""
        self._use_threads(len(matrix))
        with torch.no_grad():
            final, states = self.encoder.encode_items(torch.from_numpy(matrix))
        final, states = final.numpy(), states.permute(1, 0, 2).numpy()
        if not (np.isfinite(final).all() and np.isfinite(states).all()):
            raise InputError("features are too large: the fused embedding overflows float32")
        return final, states

    def embed_user(self, item_states: np.ndarray) -> np.ndarray:
        """The embedding of a user known only by the (n_states, n, d) per-layer states of its items."""
        self._use_threads()
        with torch.no_grad():
            return self.encoder.encode_user(torch.from_numpy(item_states)).numpy()

    def _use_threads(self, items: int = 1) -> None:
        threads = self.torch_threads
        if items >= self.BATCH_MIN_ITEMS and self.batch_torch_threads is not None:
            threads = self.batch_torch_threads
        if threads is not None:
            use_torch_threads(threads)
