"""The artifact directory: the contract between the training job (writer) and the service (reader).

- :mod:`models.artifacts.schema`: the layout, its file names and tensor keys, the format version;
- :mod:`models.artifacts.writer`: an atomic writer that adds the manifest (checksums, library versions);
- :mod:`models.artifacts.reader`: the manifest reader and :class:`Bundle`, what the service serves;
- :mod:`models.artifacts.loading`: :func:`load_bundle`, the reader with diagnostics that name the broken file.

Importing this package loads neither torch nor FAISS (the reader imports them when it reads).
"""

from models.artifacts.loading import diagnose, load_bundle
from models.artifacts.reader import Bundle, read_manifest
from models.artifacts.schema import (
    CATALOG,
    CONFIG,
    EMBEDDING_KEYS,
    EMBEDDINGS,
    ENCODER,
    FORMAT_VERSION,
    INDEX,
    INTERACTIONS,
    MANIFEST,
    METRICS,
    MODEL_WEIGHTS,
    PER_USER_TEST,
    PER_USER_VALID,
    REQUIRED_FILES,
    ArtifactError,
)
from models.artifacts.writer import library_versions, sha256_file, write_artifacts

__all__ = [
    "CATALOG",
    "CONFIG",
    "EMBEDDINGS",
    "EMBEDDING_KEYS",
    "ENCODER",
    "FORMAT_VERSION",
    "INDEX",
    "INTERACTIONS",
    "MANIFEST",
    "METRICS",
    "MODEL_WEIGHTS",
    "PER_USER_TEST",
    "PER_USER_VALID",
    "REQUIRED_FILES",
    "ArtifactError",
    "Bundle",
    "diagnose",
    "library_versions",
    "load_bundle",
    "read_manifest",
    "sha256_file",
    "write_artifacts",
]
