"""Operations: liveness, readiness, Prometheus metrics, hot reload and the consistency check."""

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import schemas
from service.check import check_consistency
from service.dependencies import AUTH_ERRORS, WRITE_ERRORS, Access, EngineDep, RuntimeDep
from service.middleware import Metrics
from service.runtime import ReloadBusy, ReloadRefused


def add_health_routes(app: FastAPI, access: Access, metrics: Metrics) -> None:
    tags = ["ops"]

    @app.get("/healthz", tags=tags, response_model=schemas.Health, summary="Liveness")
    async def healthz() -> schemas.Health:
        return schemas.Health(status="ok")

    @app.get(
        "/readyz",
        tags=tags,
        response_model=schemas.Health,
        summary="Readiness: artifacts and Redis",
        responses={503: {"model": schemas.Health}},
    )
    def readyz(request: Request) -> JSONResponse:
        state = getattr(request.app.state, "state", None)
        if state is None:
            return JSONResponse({"status": "not ready", "detail": "artifacts not loaded"}, status_code=503)
        if not state.ping():
            return JSONResponse({"status": "not ready", "detail": "redis unreachable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=tags, summary="Prometheus metrics", response_class=Response, dependencies=access.reads)
    def prometheus(engine: EngineDep) -> Response:
        metrics.index_size.set(engine.n_items)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def add_admin_routes(app: FastAPI, access: Access) -> None:
    tags = ["ops"]

    @app.post(
        "/admin/reload",
        tags=tags,
        dependencies=access.writes,
        response_model=schemas.ReloadOut,
        responses={202: {"model": schemas.ReloadOut}, 409: {"model": schemas.Error}, **WRITE_ERRORS},
        summary="Load a new artifact version and swap it in without downtime",
    )
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

    @app.get(
        "/admin/reload",
        tags=tags,
        dependencies=access.writes,
        response_model=schemas.ReloadOut,
        responses=AUTH_ERRORS,
        summary="State of the last reload",
    )
    def reload_status(runtime: RuntimeDep) -> schemas.ReloadOut:
        return schemas.ReloadOut(**runtime.status.as_dict())

    @app.get(
        "/admin/check",
        tags=tags,
        dependencies=access.writes,
        response_model=schemas.CheckOut,
        responses={**AUTH_ERRORS, 503: {"model": schemas.Error}},
        summary="Consistency of this replica's index with Redis (once writes have settled)",
    )
    def check(runtime: RuntimeDep) -> schemas.CheckOut:
        with runtime.write_lock:
            return schemas.CheckOut(**check_consistency(runtime.engine, runtime.state))
