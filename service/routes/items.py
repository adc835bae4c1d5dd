"""Items: the served model's description, new items fused from their raw features, lookups, deletions, similar
items. The write logic lives in :mod:`service.writes`."""

import redis
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from service import schemas, writes
from service.dependencies import (
    READ_ERRORS,
    WRITE_ERRORS,
    Access,
    ApiKey,
    EngineDep,
    ItemId,
    RuntimeDep,
    StateDep,
    k_param,
)
from service.fast_recommend import DEFAULT_K
from service.request_errors import InputError
from service.settings import Settings


def add_items_routes(app: FastAPI, settings: Settings, access: Access) -> None:
    tags = ["items"]
    K = k_param(settings)

    @app.get(
        "/info",
        tags=tags,
        response_model=schemas.Info,
        dependencies=access.reads,
        responses=READ_ERRORS,
        summary="Served model: artifact id, modalities and dimensions",
    )
    def info(engine: EngineDep, state: StateDep, key: ApiKey) -> schemas.Info:
        try:
            stored = state.stored_artifact()
        except redis.RedisError:
            stored = None
        return schemas.Info(
            artifact_id=engine.artifact_id,
            stored_artifact_id=stored,
            artifacts=str(engine.bundle.path) if access.key_is_valid(key) else None,  # a server path: operators only
            loaded_at=engine.loaded_at,
            model=engine.bundle.model_config.name,
            modalities=engine.modalities,
            n_users=len(engine.catalog.user_rows),
            n_items=engine.n_items,
            embedding_dim=engine.dim,
            index=schemas.IndexInfo(
                kind=engine.index.kind,
                params=engine.index.params,
                build_seconds=round(engine.index.build_seconds, 3),
                dead_slots=engine.index.dead_slots,
            ),
            precomputed=engine.precomputed_info(),
        )

    @app.post(
        "/items",
        tags=tags,
        response_model=schemas.ItemWritten,
        status_code=201,
        dependencies=access.writes,
        responses=WRITE_ERRORS,
        summary="Add (or update) an item from its raw multimodal features",
    )
    async def add_item(item: schemas.ItemIn, runtime: RuntimeDep) -> schemas.ItemWritten:
        # A coroutine handing the blocking write to the thread pool itself: for a plain function FastAPI also
        # validates the response in the pool, a second thread hop per request.
        return (await run_in_threadpool(writes.write_items, [item], runtime))[0]

    @app.post(
        "/items:batch",
        tags=tags,
        response_model=schemas.ItemBatchWritten,
        status_code=201,
        dependencies=access.writes,
        responses=WRITE_ERRORS,
        summary="Add or update many items in one transaction",
    )
    async def add_items(batch: schemas.ItemBatchIn, runtime: RuntimeDep) -> schemas.ItemBatchWritten:
        if len(batch.items) > settings.max_batch:
            raise InputError(f"at most {settings.max_batch} items per batch (MMF_MAX_BATCH), got {len(batch.items)}")
        return schemas.ItemBatchWritten(items=await run_in_threadpool(writes.write_items, batch.items, runtime))

    @app.get(
        "/items/{item_id}",
        tags=tags,
        response_model=schemas.ItemOut,
        dependencies=access.reads,
        responses=READ_ERRORS,
        summary="One item",
    )
    def get_item(item_id: ItemId, runtime: RuntimeDep, response: Response) -> schemas.ItemOut:
        engine, state = runtime.engine, runtime.state
        row = writes.item_row(runtime, engine, item_id)
        online = item_id in engine.online.ids
        features = None
        if online:
            try:
                stored = state.get_item(item_id, engine.dim)
                features = stored.features if stored is not None else None
            except redis.RedisError:  # served from memory; only the raw features live in Redis alone
                response.headers["Warning"] = '199 - "state store unavailable: features omitted"'
        return schemas.ItemOut(
            item_id=item_id,
            source="online" if online else "training",
            interactions=int(engine.popularity.count(row)),
            features=features,
        )

    @app.delete(
        "/items/{item_id}",
        tags=tags,
        response_model=schemas.Deleted,
        dependencies=access.writes,
        responses=WRITE_ERRORS,
        summary="Remove an item from recommendations",
    )
    def delete_item(item_id: ItemId, runtime: RuntimeDep) -> schemas.Deleted:
        writes.delete_item(item_id, runtime)
        return schemas.Deleted(item_id=item_id, deleted=True)

    @app.get(
        "/items/{item_id}/similar",
        tags=tags,
        response_model=schemas.SimilarOut,
        dependencies=access.reads,
        responses=READ_ERRORS,
        summary="Items closest to an item by embedding inner product",
    )
    def similar(item_id: ItemId, runtime: RuntimeDep, k: K = DEFAULT_K) -> schemas.SimilarOut:
        engine = runtime.engine
        writes.item_row(runtime, engine, item_id)  # 404 if unknown
        items, scores = engine.similar(item_id, k)
        return schemas.SimilarOut(
            item_id=item_id,
            items=[schemas.ScoredItem(item_id=i, score=s) for i, s in zip(items, scores, strict=True)],
        )
