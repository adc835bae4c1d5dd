"""Request and response bodies of the HTTP API (validated by pydantic, documented in OpenAPI)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

ID_PATTERN = r"^[A-Za-z0-9._:@-]+$"
Identifier = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=ID_PATTERN,
        description="external id: 1-128 characters of A-Z a-z 0-9 . _ : @ -",
        examples=["item-42"],
    ),
]
FeatureVector = Annotated[
    list[Annotated[float, Field(allow_inf_nan=False)]],
    Field(min_length=1, max_length=100_000, description="raw feature values of one modality"),
]


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: Identifier
    features: dict[str, FeatureVector] = Field(
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
    strategy: Literal["model", "inductive", "popular"] = Field(
        description="model: a user from training; inductive: a new user embedded from their online "
        "interactions through the graph layers; popular: no history, most-interacted items"
    )
    artifact_id: str
    items: list[ScoredItem]


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


class Info(BaseModel):
    artifact_id: str
    model: str
    modalities: dict[str, int] = Field(description="modality name -> feature dimension expected by POST /items")
    n_users: int
    n_items: int
    embedding_dim: int


class Health(BaseModel):
    status: str
    detail: str | None = None
