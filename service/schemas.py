"""Request and response bodies of the HTTP API (validated by pydantic, documented in OpenAPI)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

# Any of these characters, except exactly "." or "..": URL dot-segments, which clients normalise away, so such
# an item could be created but never fetched or deleted. (No lookahead: pydantic's regex engine has none.)
ID_PATTERN = r"^(?:[A-Za-z0-9_:@-][A-Za-z0-9._:@-]*|\.[A-Za-z0-9_:@-][A-Za-z0-9._:@-]*|\.\.[A-Za-z0-9._:@-]+)$"
ID_MAX_LENGTH = 128
Identifier = Annotated[
    str,
    Field(
        min_length=1,
        max_length=ID_MAX_LENGTH,
        pattern=ID_PATTERN,
        description="external id: 1-128 characters of A-Z a-z 0-9 . _ : @ -, other than `.` and `..`",
        examples=["item-42"],
    ),
]
# Strict: JSON numbers only (integers allowed); "1.5", true and null are 422, not silently coerced.
FeatureValue = Annotated[float, Field(strict=True, allow_inf_nan=False)]
FeatureVector = Annotated[
    list[FeatureValue],
    Field(min_length=1, max_length=100_000, description="raw feature values of one modality"),
]


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: Identifier
    features: dict[str, FeatureVector] = Field(
        max_length=64,
        description="modality name -> raw features; names and dimensions as in GET /info",
        examples=[{"visual": [0.1, 0.2], "acoustic": [0.3, 0.4]}],
    )


class ItemBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemIn] = Field(min_length=1, description="items to add or update (bounded by MMF_MAX_BATCH)")


class ItemWritten(BaseModel):
    item_id: str
    created: bool = Field(description="false when an existing item was updated")


class ItemBatchWritten(BaseModel):
    items: list[ItemWritten]


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RecommendationOut(BaseModel):
    user_id: str
    strategy: Literal["model", "inductive", "popular", "model+fresh", "inductive+fresh", "popular+fresh"] = Field(
        description="model: a user from training; inductive: a new user embedded from their online "
        "interactions through the graph layers; popular: no history, most-interacted items; '+fresh': some "
        "slots were reserved for items added online recently (`fresh`)"
    )
    artifact_id: str
    items: list[ScoredItem]
    fresh: list[int] | None = Field(
        None,
        description="positions (0-based) in `items` of the fresh slots: the best-scoring items added online "
        "within MMF_FRESH_WINDOW_S; absent when no slot was reserved",
    )


class SimilarOut(BaseModel):
    item_id: str
    items: list[ScoredItem]


class ItemOut(BaseModel):
    item_id: str
    source: Literal["training", "online"]
    interactions: int = Field(description="training interactions plus online ones")
    features: dict[str, list[float]] | None = Field(None, description="raw features (online items only)")


class InteractionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Identifier
    item_id: Identifier


class InteractionOut(BaseModel):
    user_id: str
    item_id: str


class Deleted(BaseModel):
    item_id: str
    deleted: bool


class IndexInfo(BaseModel):
    kind: str = Field(description="flat (exact), hnsw or ivf (approximate)")
    params: dict[str, int | float] = Field(
        description="effective parameters of the kind; hnsw and ivf: calibrated_recall, the recall@20 against "
        "exact search measured on sample user queries after the build (MMF_ANN_TARGET_RECALL)"
    )
    build_seconds: float = Field(description="time this replica took to build it from the artifact")
    dead_slots: int = Field(description="deleted or replaced vectors still held (hnsw, ivf: until the next build)")


class PrecomputedInfo(BaseModel):
    k: int = Field(description="length of each training user's exact top-k list (MMF_PRECOMPUTED_K)")
    seconds: float = Field(description="time this replica took to compute the lists")
    changed_training_items: int = Field(
        description="training items deleted or replaced since the artifact (skipped in the lists)"
    )
    online_items: int = Field(description="items added or replaced online, searched next to the lists")
    online_search: str = Field(
        description='how they are searched: "scan" (exactly, while they are few) or the kind of their own index'
    )
    online_candidates: int | None = Field(
        None,
        description="(training user, online item) pairs filed at write time, from which /recommend reads a training "
        "user's online items (MMF_ONLINE_CANDIDATES_MAX_USERS); null: off, every request searches them",
    )


class Info(BaseModel):
    artifact_id: str = Field(description="artifact served by this replica")
    stored_artifact_id: str | None = Field(
        None, description="artifact id recorded in Redis by the replica that loaded one last (null: Redis unreachable)"
    )
    artifacts: str | None = Field(
        None, description="artifact directory this replica loaded (null unless the request carries the API key)"
    )
    loaded_at: float = Field(description="unix time the served engine was built")
    model: str
    modalities: dict[str, int] = Field(description="modality name -> feature dimension expected by POST /items")
    n_users: int
    n_items: int
    embedding_dim: int
    index: IndexInfo = Field(description="the item index this replica searches (MMF_INDEX)")
    precomputed: PrecomputedInfo | None = Field(
        None, description="the precomputed top-k lists /recommend answers training users from (null: off)"
    )


class Error(BaseModel):
    detail: str | list | dict = Field(description="why the request was refused")


class ReloadIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    artifacts: str | None = Field(
        None, min_length=1, max_length=4096, description="artifact directory to load; default: the served one, re-read"
    )
    wait: StrictBool = Field(
        True, description="answer when the reload is done (200); false: answer 202 at once (JSON true or false only)"
    )


class ReloadOut(BaseModel):
    state: Literal["idle", "loading", "succeeded", "failed"]
    artifacts: str | None = None
    artifact_id: str | None = Field(None, description="served after the last successful reload")
    previous_artifact_id: str | None = None
    detail: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    reloads: int = Field(0, description="successful reloads of this replica")


class CheckOut(BaseModel):
    ok: bool
    problems: list[str]
    artifact_id: str
    index_size: int
    expected_size: int
    training_items: int
    deleted_training_items: int
    online_items: int
    deleted_online_items: int
    index_kind: str | None = None


class Health(BaseModel):
    status: str
    detail: str | None = None
