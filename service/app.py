"""The FastAPI application: ``create_app(settings)`` assembles it (lifespan, middleware, error handlers, one
router per resource: :mod:`service.routes`); run it with ``python -m service run``."""

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.dependencies import Access
from service.docs import add_docs
from service.engine import Engine
from service.errors import install_error_handlers
from service.fast_recommend import FastRecommend
from service.json_body import JSONBodyRoute
from service.logs import REDACT
from service.middleware import BodySizeLimit, Metrics, ObserveLatency
from service.routes.items import add_items_routes
from service.routes.ops import add_admin_routes, add_health_routes
from service.routes.recommend import add_interactions_routes, add_recommend_routes
from service.runtime import ReloadBusy, Runtime
from service.settings import Settings, load_settings

log = logging.getLogger("service")

for _name in ("uvicorn", "uvicorn.access", "uvicorn.error", "service", "service.sync", "fastapi"):
    logging.getLogger(_name).addFilter(REDACT)  # also when served without logging_config (plain uvicorn)


def reload_on_signal(runtime: Runtime) -> None:
    try:
        runtime.reload_in_background()
    except ReloadBusy:
        log.warning("SIGHUP while a reload runs: ignored")


_startup_objects_frozen = False


def freeze_startup_objects() -> None:
    """Move every object alive after start-up (torch's and the other libraries') out of the
    garbage collector's reach, once per process. Otherwise a full collection traverses them all every time
    enough request objects have survived younger collections: a pause long enough to set the p99 of
    POST /items under load (docs/performance.md, "The request path"). Objects alive at start-up live as long as the
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
            len(engine.catalog.user_rows), engine.n_items, engine.index.kind, engine.index.params,
            engine.index.build_seconds,
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
    app.router.route_class = JSONBodyRoute  # before the routes are added: they parse JSON bodies with it
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

    install_error_handlers(app)
    access = Access(settings)
    add_docs(app, access.reads)
    # Routes are added to the app itself, not through APIRouter.include_router: FastAPI includes routers lazily,
    # and the /recommend fast path and the 405 handler look the app's routes up directly.
    add_health_routes(app, access, metrics)
    add_items_routes(app, settings, access)
    add_recommend_routes(app, settings, access)
    add_interactions_routes(app, access)
    add_admin_routes(app, access)
    return app
