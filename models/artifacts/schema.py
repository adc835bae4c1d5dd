"""The artifact format: the contract between the training job (writer) and the service (reader).

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

FORMAT_VERSION = 1
# The file names of the layout above: the writer (training.export), the reader (models.artifacts.reader), the
# benches and the test fixtures name them through these constants.
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
