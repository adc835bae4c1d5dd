"""The app's error answers: one JSON shape (``{"detail": ...}``) for validation errors, HTTP errors, bad input,
unknown ids and an unreachable Redis, rendered so that no input can turn an error into a 500."""

from __future__ import annotations

import json
import logging
import math

import redis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from service.request_errors import InputError, NotFound

log = logging.getLogger("service")


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


def allowed_methods(app: FastAPI, scope: dict) -> set[str]:
    """Methods of every route whose path matches the request's (``Allow`` of a 405)."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods
    return methods


def install_error_handlers(app: FastAPI) -> None:
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
