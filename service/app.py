"""The FastAPI application: ``create_app(settings)``; run it with ``python -m service run``."""

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import math
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import redis
import torch
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, Info, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from service import schemas
from service.check import check_consistency
from service.docs import add_docs
from service.engine import Engine, InputError, NotFound
from service.fast_recommend import DEFAULT_K, FastRecommend, render_recommendation
from service.logs import REDACT
from service.runtime import ReloadBusy, ReloadRefused, Runtime
from service.settings import Settings, load_settings
from service.state import RedisState, StoredItem
from service.sync import sync_item

log = logging.getLogger("service")
_E = {"model": schemas.Error}
AUTH_ERRORS = {401: _E, 403: _E}
READ_ERRORS = {401: _E, 404: _E, 422: _E}
WRITE_ERRORS = {**AUTH_ERRORS, 400: _E, 404: _E, 413: _E, 422: _E, 503: _E}
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key (MMF_API_KEY)")
ItemId = Annotated[str, Path(min_length=1, max_length=schemas.ID_MAX_LENGTH, pattern=schemas.ID_PATTERN)]
UserId = Annotated[str, Path(min_length=1, max_length=schemas.ID_MAX_LENGTH, pattern=schemas.ID_PATTERN)]


class BodySizeLimit:
    """Pure ASGI middleware answering 413 for bodies over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared, chunked = None, False
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                declared = value
            elif name == b"transfer-encoding":
                chunked = True
        if declared is None and not chunked:  # no body (HTTP/1.1: neither header): nothing to limit
            return await self.app(scope, receive, send)
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                return await self._too_large(scope, receive, send)
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
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        # Built only when answered: every request with a body used to build one.
        answer = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)
        await answer(scope, receive, send)


def _json_safe(value):
    """``value`` with what JSON cannot hold made text: non-finite floats by their names ("nan", "inf"), bytes (a
    body that is not JSON, echoed by a validation error) decoded with undecodable bytes escaped ("\\xff")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


MAX_ECHO = 200


def _short_input(error: dict) -> dict:
    """A validation error whose echoed ``input`` is at most MAX_ECHO characters of JSON (an 8 MB body is
    not sent back)."""
    if "input" in error:
        text = json.dumps(_json_safe(error["input"]), ensure_ascii=True, default=str)
        if len(text) > MAX_ECHO:
            error = {**error, "input": text[:MAX_ECHO] + "..."}
    return error


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate from a request ("\\ud800" is valid JSON input) echoed in
    an error cannot make rendering fail with a 500."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


for _name in ("uvicorn", "uvicorn.access", "uvicorn.error", "service", "service.sync", "fastapi"):
    logging.getLogger(_name).addFilter(REDACT)  # also when served without logging_config (plain uvicorn)


class ObserveLatency:
    """Pure ASGI middleware recording each request's latency by method, route and status. (Starlette's
    ``BaseHTTPMiddleware``, which ``@app.middleware("http")`` uses, runs the rest of the app in another task
    behind a memory stream: a large part of a no-op request's time.)"""

    def __init__(self, app, histogram: Histogram) -> None:
        self.app, self.histogram = app, histogram

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")  # FastAPI puts the matched route in scope
            self.histogram.labels(scope["method"], path, str(status)).observe(time.perf_counter() - start)


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


def reload_on_signal(runtime: Runtime) -> None:
    try:
        runtime.reload_in_background()
    except ReloadBusy:
        log.warning("SIGHUP while a reload runs: ignored")


def allowed_methods(app: FastAPI, scope: dict) -> set[str]:
    """Methods of every route whose path matches the request's (``Allow`` of a 405)."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods
    return methods


_startup_objects_frozen = False


def freeze_startup_objects() -> None:
    """Move every object alive after start-up (torch and the other libraries: about 365k objects) out of the
    garbage collector's reach, once per process. Otherwise a full collection traverses them all every time
    enough request objects have survived younger collections: a 0.2 s pause (at least; longer on a busy
    CPU) that showed up as the p99 of POST /items under load. Objects alive at start-up live as long as the
    process; an engine replaced by a reload is still freed (by reference counting: it holds no cycles)."""
    global _startup_objects_frozen
    if not _startup_objects_frozen:
        _startup_objects_frozen = True
        gc.collect()
        gc.freeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    metrics = Metrics()
    if settings.api_key is not None:
        REDACT.add(settings.api_key.get_secret_value())

    def on_swap(engine: Engine) -> None:
        app.state.engine = engine
        metrics.model.info({"artifact_id": engine.artifact_id, "model": engine.bundle.model_config.name})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(settings.torch_threads)  # per process: each uvicorn worker runs this
        runtime = await asyncio.to_thread(Runtime(settings, on_swap).start)
        app.state.runtime, app.state.state = runtime, runtime.state
        freeze_startup_objects()
        engine = runtime.engine
        log.info(
            "serving artifact %s: %d users, %d items, %s index %s built in %.1f s", engine.artifact_id,
            len(engine.user_rows), engine.n_items, engine.index.kind, engine.index.params, engine.index.build_seconds,
        )  # fmt: skip
        # SIGHUP reloads the artifact (the served directory, re-read: point a symlink at the new version).
        # Only possible in the main thread (python -m service run); uvicorn's multi-worker supervisor
        # restarts its workers on SIGHUP, which reloads them too.
        loop = asyncio.get_running_loop()
        hup = False
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, reload_on_signal, runtime)
            hup = True
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            await asyncio.to_thread(runtime.stop)

    closed_reads = settings.require_key_for_reads
    app = FastAPI(
        title="MetaMMF recommendation service",
        version="0.1.0",
        description="Top-k recommendations from the embeddings of a trained MetaMMF model (the artifact's: "
        "MetaMMF_LightGCN by default, MetaMMF_GCN or MetaMMF_MF); new items are fused from their raw "
        "multimodal features by the meta learner and are recommendable at once. Write endpoints need the "
        "X-API-Key header" + (", and so do reads (MMF_REQUIRE_KEY_FOR_READS)." if closed_reads else "."),
        lifespan=lifespan,
        docs_url=None,  # served below, from the package's assets (FastAPI's pages load them from a CDN)
        redoc_url=None,
        openapi_url=None if closed_reads else "/openapi.json",
    )
    # Innermost: the requests it answers still pass the body limit, CORS and the latency metrics.
    # (the middleware answers plain requests only: with default fresh slots every request needs the route)
    fast = settings.fast_recommend and not settings.require_key_for_reads and settings.fresh_slots == 0
    app.add_middleware(FastRecommend, max_k=settings.max_k, enabled=fast)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:  # outermost, so that error answers (413 too) carry the CORS headers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["X-API-Key", "Content-Type"],
            max_age=600,
        )

    app.add_middleware(ObserveLatency, histogram=metrics.latency)  # outermost: errors and 413s are counted

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default handler echoes the offending input, and a NaN/Infinity in it (which the JSON
        # parser accepts) made rendering the 422 fail with a 500: non-finite numbers are echoed as strings,
        # long inputs are cut short.
        errors = [_short_input(e) for e in jsonable_encoder(_json_safe(exc.errors()))]
        return SafeJSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code, headers=exc.headers)
        headers, detail = exc.headers, exc.detail
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's JSON body parsing
            cause = exc.__cause__
            detail = f"request body is not UTF-8 ({cause.reason} at byte {cause.start}): send JSON in UTF-8"
        if exc.status_code == 405:  # Starlette names the methods of the first route matching the path only
            headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed_methods(request.app, request.scope)))}
        return SafeJSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(InputError)
    async def input_error(_: Request, exc: InputError) -> JSONResponse:
        return SafeJSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound) -> JSONResponse:
        return SafeJSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("redis error on %s %r: %s", request.method, request.url.path, type(exc).__name__)
        return JSONResponse(
            {"detail": "state store unavailable, nothing was written; retry later"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    def key_is_valid(supplied: str | None) -> bool:
        return (
            settings.api_key is not None
            and bool(supplied)
            and hmac.compare_digest(supplied.encode(), settings.api_key.get_secret_value().encode())
        )

    def check_key(supplied: str | None) -> None:
        if settings.api_key is None:
            raise HTTPException(403, "writes are disabled: the server has no API key (set MMF_API_KEY)")
        if not supplied:
            raise HTTPException(401, "missing X-API-Key header")
        if not hmac.compare_digest(supplied.encode(), settings.api_key.get_secret_value().encode()):
            raise HTTPException(401, "invalid API key")

    async def write_access(key: Annotated[str | None, Security(API_KEY_HEADER)]) -> None:
        check_key(key)

    async def read_access(key: Annotated[str | None, Security(API_KEY_HEADER)]) -> None:
        if settings.require_key_for_reads:
            check_key(key)

    async def engine_of(request: Request) -> Engine:
        return request.app.state.runtime.engine  # the engine a request starts with serves all of it

    async def state_of(request: Request) -> RedisState:
        return request.app.state.state

    async def runtime_of(request: Request) -> Runtime:
        return request.app.state.runtime

    # The dependencies above are coroutines: FastAPI runs a plain function dependency in the thread pool,
    # one thread hop per dependency per request.
    EngineDep = Annotated[Engine, Depends(engine_of)]
    StateDep = Annotated[RedisState, Depends(state_of)]
    RuntimeDep = Annotated[Runtime, Depends(runtime_of)]
    K = Annotated[int, Query(ge=1, le=settings.max_k, description=f"number of items, 1..{settings.max_k}")]
    Fresh = Annotated[
        int | None,
        Query(
            ge=0,
            le=settings.max_k,
            description="reserve up to this many of the k slots for the best items added online within "
            f"MMF_FRESH_WINDOW_S ({settings.fresh_window_s:g} s); default MMF_FRESH_SLOTS ({settings.fresh_slots})",
        ),
    ]
    # Reads check the key only when MMF_REQUIRE_KEY_FOR_READS is set (then the OpenAPI schema says so too):
    # resolving a dependency costs every request.
    reads = [Depends(read_access)] if settings.require_key_for_reads else []
    writes = [Depends(write_access)]

    add_docs(app, reads)

    @app.get("/healthz", response_model=schemas.Health, tags=["ops"], summary="Liveness")
    async def healthz() -> schemas.Health:
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

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response, dependencies=reads)
    def prometheus(engine: EngineDep) -> Response:
        metrics.index_size.set(engine.n_items)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/info", response_model=schemas.Info, tags=["items"], dependencies=reads, responses=READ_ERRORS,
             summary="Served model: artifact id, modalities and dimensions")  # fmt: skip
    def info(engine: EngineDep, state: StateDep, key: Annotated[str | None, Security(API_KEY_HEADER)]) -> schemas.Info:
        try:
            stored = state.stored_artifact()
        except redis.RedisError:
            stored = None
        return schemas.Info(
            artifact_id=engine.artifact_id,
            stored_artifact_id=stored,
            artifacts=str(engine.bundle.path) if key_is_valid(key) else None,  # a server path: operators only
            loaded_at=engine.loaded_at,
            model=engine.bundle.model_config.name,
            modalities=engine.modalities,
            n_users=len(engine.user_rows),
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

    @app.get("/recommend/{user_id}", response_model=schemas.RecommendationOut, tags=["recommend"],
             dependencies=reads, responses=READ_ERRORS,
             summary="Top-k items for a user, already-seen items excluded")  # fmt: skip
    async def recommend(request: Request, user_id: UserId, k: K = DEFAULT_K, fresh: Fresh = None) -> Response:
        engine = request.app.state.runtime.engine  # as engine_of, without a dependency to resolve
        fresh = settings.fresh_slots if fresh is None else fresh
        if fresh == 0 and engine.quick_recommend(user_id, k):
            rec = engine.recommend(user_id, k)  # bounded work (precomputed list, approximate or small index)
        else:
            rec = await run_in_threadpool(engine.recommend, user_id, k, fresh, settings.fresh_window_s)
        body = render_recommendation(user_id, engine.artifact_id, rec.strategy, rec.item_ids, rec.scores, rec.fresh)
        return Response(body, media_type="application/json")

    def item_row(runtime: Runtime, engine: Engine, item_id: str) -> int:
        """The item's row; an item this replica has not seen yet but Redis holds (written through another
        replica a moment ago, its event not applied yet) is applied now, so that a client can use an item
        right after creating it, whichever replica it reaches. NotFound otherwise."""
        try:
            return engine.item_row(item_id)
        except NotFound:
            try:
                exists = runtime.state.r.exists(runtime.state.key("item", item_id))
            except redis.RedisError:
                exists = False
            if not exists:
                raise
            with runtime.write_lock:
                sync_item(engine, runtime.state, item_id)
            return engine.item_row(item_id)

    def write_items(items: list[schemas.ItemIn], runtime: Runtime) -> list[schemas.ItemWritten]:
        ids = [item.item_id for item in items]
        if len(set(ids)) != len(ids):
            raise InputError("duplicate item_id in one batch")
        state = runtime.state
        while True:
            engine = runtime.engine
            matrix = engine.feature_matrix([item.features for item in items])
            embeddings, states = engine.fuse(matrix)
            with runtime.write_lock:
                if runtime.engine is not engine:
                    continue  # swapped by a reload meanwhile: validate and fuse with the new model
                stored = [
                    StoredItem(item.item_id, engine.training_row(item.item_id), item.features, emb, st,
                               engine.artifact_id)
                    for item, emb, st in zip(items, embeddings, states, strict=True)
                ]  # fmt: skip
                created = [not engine.has_item(i) for i in ids]
                # One round trip: online rows allocated (or read) and the items stored, acknowledged once
                # the script has run.
                now = time.time()
                rows = state.put_items(stored, origin=engine.origin, now=now)
                for s, row in zip(stored, rows, strict=True):
                    engine.upsert(s.item_id, row, s.embedding, s.states, now)
            return [schemas.ItemWritten(item_id=i, created=c) for i, c in zip(ids, created, strict=True)]

    @app.post("/items", response_model=schemas.ItemWritten, status_code=201, tags=["items"],
              dependencies=writes, responses=WRITE_ERRORS,
              summary="Add (or update) an item from its raw multimodal features")  # fmt: skip
    async def add_item(item: schemas.ItemIn, runtime: RuntimeDep) -> schemas.ItemWritten:
        # A coroutine handing the blocking write to the thread pool itself: for a plain function FastAPI also
        # validates the response in the pool, a second thread hop per request.
        return (await run_in_threadpool(write_items, [item], runtime))[0]

    @app.post("/items:batch", response_model=schemas.ItemBatchWritten, status_code=201, tags=["items"],
              dependencies=writes, responses=WRITE_ERRORS,
              summary="Add or update many items in one transaction")  # fmt: skip
    async def add_items(batch: schemas.ItemBatchIn, runtime: RuntimeDep) -> schemas.ItemBatchWritten:
        if len(batch.items) > settings.max_batch:
            raise InputError(f"at most {settings.max_batch} items per batch (MMF_MAX_BATCH), got {len(batch.items)}")
        return schemas.ItemBatchWritten(items=await run_in_threadpool(write_items, batch.items, runtime))

    @app.get("/items/{item_id}", response_model=schemas.ItemOut, tags=["items"], dependencies=reads,
             responses=READ_ERRORS, summary="One item")  # fmt: skip
    def get_item(item_id: ItemId, runtime: RuntimeDep, response: Response) -> schemas.ItemOut:
        engine, state = runtime.engine, runtime.state
        row = item_row(runtime, engine, item_id)
        online = item_id in engine.online_items
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
            interactions=int(engine.popularity.get(row, 0)),
            features=features,
        )

    @app.delete("/items/{item_id}", response_model=schemas.Deleted, tags=["items"], dependencies=writes,
                responses=WRITE_ERRORS, summary="Remove an item from recommendations")  # fmt: skip
    def delete_item(item_id: ItemId, runtime: RuntimeDep) -> schemas.Deleted:
        with runtime.write_lock:
            engine = runtime.engine
            item_row(runtime, engine, item_id)  # 404 if unknown
            runtime.state.delete_item(item_id, origin=engine.origin)
            engine.delete(item_id)
        return schemas.Deleted(item_id=item_id, deleted=True)

    @app.get("/items/{item_id}/similar", response_model=schemas.SimilarOut, tags=["items"], dependencies=reads,
             responses=READ_ERRORS, summary="Items closest to an item by embedding inner product")  # fmt: skip
    def similar(item_id: ItemId, runtime: RuntimeDep, k: K = DEFAULT_K) -> schemas.SimilarOut:
        engine = runtime.engine
        item_row(runtime, engine, item_id)  # 404 if unknown
        items, scores = engine.similar(item_id, k)
        return schemas.SimilarOut(
            item_id=item_id,
            items=[schemas.ScoredItem(item_id=i, score=s) for i, s in zip(items, scores, strict=True)],
        )

    @app.post("/interactions", response_model=schemas.InteractionOut, status_code=201, tags=["recommend"],
              dependencies=writes, responses=WRITE_ERRORS,
              summary="Record that a user interacted with an item")  # fmt: skip
    def add_interaction(body: schemas.InteractionIn, runtime: RuntimeDep) -> schemas.InteractionOut:
        with runtime.write_lock:
            engine = runtime.engine
            item_row(runtime, engine, body.item_id)  # 404 if unknown
            runtime.state.add_interaction(body.user_id, body.item_id, origin=engine.origin)
            engine.record_interaction(body.user_id, body.item_id)
        return schemas.InteractionOut(user_id=body.user_id, item_id=body.item_id)

    # -- administration ---------------------------------------------------------------------------------
    @app.post("/admin/reload", response_model=schemas.ReloadOut, tags=["ops"], dependencies=writes,
              responses={202: {"model": schemas.ReloadOut}, 409: {"model": schemas.Error}, **WRITE_ERRORS},
              summary="Load a new artifact version and swap it in without downtime")  # fmt: skip
    def reload(runtime: RuntimeDep, body: schemas.ReloadIn | None = None) -> JSONResponse:
        body = body or schemas.ReloadIn()
        try:
            if not body.wait:
                return JSONResponse(runtime.reload_in_background(body.artifacts), status_code=202)
            status = runtime.reload(body.artifacts)
        except ReloadBusy as exc:
            raise HTTPException(409, str(exc)) from None
        except ReloadRefused as exc:
            raise HTTPException(409 if exc.kind == "incompatible" else 422, str(exc)) from None
        return JSONResponse(status.as_dict())

    @app.get("/admin/reload", response_model=schemas.ReloadOut, tags=["ops"], dependencies=writes,
             responses=AUTH_ERRORS, summary="State of the last reload")  # fmt: skip
    def reload_status(runtime: RuntimeDep) -> schemas.ReloadOut:
        return schemas.ReloadOut(**runtime.status.as_dict())

    @app.get("/admin/check", response_model=schemas.CheckOut, tags=["ops"], dependencies=writes,
             responses={**AUTH_ERRORS, 503: {"model": schemas.Error}},
             summary="Consistency of this replica's index with Redis (once writes have settled)")  # fmt: skip
    def check(runtime: RuntimeDep) -> schemas.CheckOut:
        with runtime.write_lock:
            return schemas.CheckOut(**check_consistency(runtime.engine, runtime.state))

    return app
