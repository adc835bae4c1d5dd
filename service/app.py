"""The FastAPI application: ``create_app(settings)``; run it with ``python -m service run``."""

import hmac
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import redis
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, Info, generate_latest

from models.artifacts import Bundle
from service import schemas
from service.embedded_redis import EmbeddedRedis
from service.engine import Engine, InputError, NotFound
from service.settings import Settings
from service.state import RedisState, StoredItem
from service.sync import Follower, load_state

log = logging.getLogger("service")
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key (MMF_API_KEY)")
ItemId = Annotated[str, Path(min_length=1, max_length=128, pattern=schemas.ID_PATTERN)]
UserId = Annotated[str, Path(min_length=1, max_length=128, pattern=schemas.ID_PATTERN)]


class BodySizeLimit:
    """Pure ASGI middleware answering 413 for bodies over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        too_large = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                return await too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        # No declared length (chunked): read the body here, so an oversized one is answered 413 before the
        # app sees it (an exception raised from inside FastAPI's body parsing would surface as a 400).
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # client disconnected
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


def _json_safe(value):
    """``value`` with non-finite floats replaced by their names ("nan", "inf"), which JSON cannot hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "mmf_request_seconds", "request latency by route", ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )  # fmt: skip
        self.index_size = Gauge("mmf_index_items", "items in the FAISS index", registry=self.registry)
        self.model = Info("mmf_model", "served artifact", registry=self.registry)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        embedded = None
        redis_url = settings.redis_url
        if redis_url is None:
            embedded = EmbeddedRedis(settings.state_dir).start()
            redis_url = embedded.url
        bundle = Bundle(settings.artifacts)
        engine = Engine(bundle)
        client = redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10)
        state = RedisState(client, settings.namespace, uuid.uuid4().hex, settings.stream_max_len)
        state.init(len(bundle.item_ids), bundle.artifact_id)
        position = load_state(engine, state)
        follower = Follower(engine, state, position, settings.follow_block_ms)
        follower.start()
        app.state.engine, app.state.state, app.state.follower = engine, state, follower
        metrics.model.info({"artifact_id": bundle.artifact_id, "model": bundle.model_config.name})
        log.info(
            "serving artifact %s: %d users, %d items",
            bundle.artifact_id,
            len(bundle.user_ids),
            engine.n_items,
        )
        try:
            yield
        finally:
            follower.stop()
            follower.join(timeout=5)
            client.close()
            if embedded is not None:
                embedded.stop()

    app = FastAPI(
        title="MetaMMF recommendation service",
        version="0.1.0",
        description="Top-k recommendations from MetaMMF_GCN embeddings; new items are fused from their raw "
        "multimodal features by the meta learner and are recommendable at once. Write endpoints need the "
        "X-API-Key header.",
        lifespan=lifespan,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.latency.labels(request.method, path, str(response.status_code)).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default handler echoes the offending input, and a NaN/Infinity in it (which the JSON
        # parser accepts) made rendering the 422 fail with a 500: non-finite numbers are echoed as strings.
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

    @app.exception_handler(InputError)
    async def input_error(_: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(redis.RedisError)
    async def redis_down(_: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("redis error on write: %s", type(exc).__name__)
        return JSONResponse(
            {"detail": "state store unavailable, nothing was written; retry later"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    def check_key(supplied: str | None) -> None:
        if settings.api_key is None:
            raise HTTPException(403, "writes are disabled: the server has no API key (set MMF_API_KEY)")
        if not supplied:
            raise HTTPException(401, "missing X-API-Key header")
        if not hmac.compare_digest(supplied.encode(), settings.api_key.get_secret_value().encode()):
            raise HTTPException(401, "invalid API key")

    def write_access(key: Annotated[str | None, Security(API_KEY_HEADER)]) -> None:
        check_key(key)

    def read_access(key: Annotated[str | None, Security(API_KEY_HEADER)]) -> None:
        if settings.require_key_for_reads:
            check_key(key)

    def engine_of(request: Request) -> Engine:
        return request.app.state.engine

    def state_of(request: Request) -> RedisState:
        return request.app.state.state

    EngineDep = Annotated[Engine, Depends(engine_of)]
    StateDep = Annotated[RedisState, Depends(state_of)]
    K = Annotated[int, Query(ge=1, le=settings.max_k, description=f"number of items, 1..{settings.max_k}")]
    reads = [Depends(read_access)]
    writes = [Depends(write_access)]

    @app.get("/healthz", response_model=schemas.Health, tags=["ops"], summary="Liveness")
    def healthz() -> schemas.Health:
        return schemas.Health(status="ok")

    @app.get("/readyz", response_model=schemas.Health, tags=["ops"], summary="Readiness: artifacts and Redis",
             responses={503: {"model": schemas.Health}})  # fmt: skip
    def readyz(request: Request) -> JSONResponse:
        state = getattr(request.app.state, "state", None)
        if state is None:
            return JSONResponse({"status": "not ready", "detail": "artifacts not loaded"}, status_code=503)
        if not state.ping():
            return JSONResponse({"status": "not ready", "detail": "redis unreachable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
    def prometheus(engine: EngineDep) -> Response:
        metrics.index_size.set(engine.n_items)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/info", response_model=schemas.Info, tags=["items"], dependencies=reads,
             summary="Served model: artifact id, modalities and dimensions")  # fmt: skip
    def info(engine: EngineDep) -> schemas.Info:
        return schemas.Info(
            artifact_id=engine.artifact_id,
            model=engine.bundle.model_config.name,
            modalities=engine.modalities,
            n_users=len(engine.user_rows),
            n_items=engine.n_items,
            embedding_dim=engine.dim,
        )

    @app.get("/recommend/{user_id}", response_model=schemas.RecommendationOut, tags=["recommend"],
             dependencies=reads, summary="Top-k items for a user, already-seen items excluded")  # fmt: skip
    def recommend(user_id: UserId, engine: EngineDep, k: K = 20) -> schemas.RecommendationOut:
        rec = engine.recommend(user_id, k)
        return schemas.RecommendationOut(
            user_id=user_id,
            strategy=rec.strategy,
            artifact_id=engine.artifact_id,
            items=[schemas.ScoredItem(item_id=i, score=s) for i, s in zip(rec.item_ids, rec.scores, strict=True)],
        )

    def write_items(items: list[schemas.ItemIn], engine: Engine, state: RedisState) -> list[schemas.ItemWritten]:
        ids = [item.item_id for item in items]
        if len(set(ids)) != len(ids):
            raise InputError("duplicate item_id in one batch")
        matrix = engine.feature_matrix([item.features for item in items])
        embeddings, states = engine.fuse(matrix)
        new_ids = [i for i in ids if engine.training_row(i) is None]
        allocated = dict(zip(new_ids, state.allocate_rows(new_ids), strict=True)) if new_ids else {}
        rows = [engine.training_row(i) if i not in allocated else allocated[i] for i in ids]
        stored = [
            StoredItem(item.item_id, row, item.features, emb, st)
            for item, row, emb, st in zip(items, rows, embeddings, states, strict=True)
        ]
        created = [not engine.has_item(i) for i in ids]
        state.put_items(stored)  # acknowledged once this transaction commits
        for s in stored:
            engine.upsert(s.item_id, s.row, s.embedding, s.states)
        return [schemas.ItemWritten(item_id=i, created=c) for i, c in zip(ids, created, strict=True)]

    @app.post("/items", response_model=schemas.ItemWritten, status_code=201, tags=["items"],
              dependencies=writes, summary="Add (or update) an item from its raw multimodal features")  # fmt: skip
    def add_item(item: schemas.ItemIn, engine: EngineDep, state: StateDep) -> schemas.ItemWritten:
        return write_items([item], engine, state)[0]

    @app.post("/items:batch", response_model=schemas.ItemBatchWritten, status_code=201, tags=["items"],
              dependencies=writes, summary="Add or update many items in one transaction")  # fmt: skip
    def add_items(batch: schemas.ItemBatchIn, engine: EngineDep, state: StateDep) -> schemas.ItemBatchWritten:
        if len(batch.items) > settings.max_batch:
            raise InputError(f"at most {settings.max_batch} items per batch (MMF_MAX_BATCH), got {len(batch.items)}")
        return schemas.ItemBatchWritten(items=write_items(batch.items, engine, state))

    @app.get("/items/{item_id}", response_model=schemas.ItemOut, tags=["items"], dependencies=reads,
             summary="One item")  # fmt: skip
    def get_item(item_id: ItemId, engine: EngineDep, state: StateDep) -> schemas.ItemOut:
        row = engine.item_row(item_id)
        online = item_id in engine.online_items
        features = None
        if online:
            stored = state.get_item(item_id, engine.dim)
            features = stored.features if stored is not None else None
        return schemas.ItemOut(
            item_id=item_id,
            source="online" if online else "training",
            interactions=int(engine.popularity.get(row, 0)),
            features=features,
        )

    @app.delete("/items/{item_id}", response_model=schemas.Deleted, tags=["items"], dependencies=writes,
                summary="Remove an item from recommendations")  # fmt: skip
    def delete_item(item_id: ItemId, engine: EngineDep, state: StateDep) -> schemas.Deleted:
        engine.item_row(item_id)  # 404 if unknown
        state.delete_item(item_id)
        engine.delete(item_id)
        return schemas.Deleted(item_id=item_id, deleted=True)

    @app.get("/items/{item_id}/similar", response_model=schemas.SimilarOut, tags=["items"], dependencies=reads,
             summary="Items closest to an item by embedding inner product")  # fmt: skip
    def similar(item_id: ItemId, engine: EngineDep, k: K = 20) -> schemas.SimilarOut:
        items, scores = engine.similar(item_id, k)
        return schemas.SimilarOut(
            item_id=item_id,
            items=[schemas.ScoredItem(item_id=i, score=s) for i, s in zip(items, scores, strict=True)],
        )

    @app.post("/interactions", response_model=schemas.InteractionOut, status_code=201, tags=["recommend"],
              dependencies=writes, summary="Record that a user interacted with an item")  # fmt: skip
    def add_interaction(body: schemas.InteractionIn, engine: EngineDep, state: StateDep) -> schemas.InteractionOut:
        engine.item_row(body.item_id)  # 404 if unknown
        state.add_interaction(body.user_id, body.item_id)
        engine.record_interaction(body.user_id, body.item_id)
        return schemas.InteractionOut(user_id=body.user_id, item_id=body.item_id)

    return app
