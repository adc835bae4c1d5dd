"""What the routes depend on: the API key checks, the per-request runtime objects, and the path and query
parameter types (the bounds of ``k`` come from the settings). The runtime dependencies are coroutines: FastAPI
runs a plain function dependency in the thread pool, one thread hop per dependency per request."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Query, Request, Security
from fastapi.security import APIKeyHeader

from service import schemas
from service.engine import Engine
from service.runtime import Runtime
from service.settings import Settings
from service.state import RedisState

API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key (MMF_API_KEY)")
ApiKey = Annotated[str | None, Security(API_KEY_HEADER)]
ItemId = Annotated[str, Path(min_length=1, max_length=schemas.ID_MAX_LENGTH, pattern=schemas.ID_PATTERN)]
UserId = Annotated[str, Path(min_length=1, max_length=schemas.ID_MAX_LENGTH, pattern=schemas.ID_PATTERN)]

_E = {"model": schemas.Error}
AUTH_ERRORS = {401: _E, 403: _E}
READ_ERRORS = {401: _E, 404: _E, 422: _E}
WRITE_ERRORS = {**AUTH_ERRORS, 400: _E, 404: _E, 413: _E, 422: _E, 503: _E}


async def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


async def engine_of(request: Request) -> Engine:
    return request.app.state.runtime.engine  # the engine a request starts with serves all of it


async def state_of(request: Request) -> RedisState:
    return request.app.state.state


RuntimeDep = Annotated[Runtime, Depends(runtime_of)]
EngineDep = Annotated[Engine, Depends(engine_of)]
StateDep = Annotated[RedisState, Depends(state_of)]


@dataclass
class Access:
    """The API key rules of one app: writes need the key (403 without a configured one), reads only under
    MMF_REQUIRE_KEY_FOR_READS. ``reads`` / ``writes`` are the dependency lists of read and write routes: reads
    resolve nothing when the key is not required, since a dependency costs every request."""

    settings: Settings
    reads: list[Any] = field(init=False)
    writes: list[Any] = field(init=False)

    def __post_init__(self) -> None:
        async def require_key(key: ApiKey) -> None:
            self.check_key(key)

        self.reads = [Depends(require_key)] if self.settings.require_key_for_reads else []
        self.writes = [Depends(require_key)]

    def key_is_valid(self, supplied: str | None) -> bool:
        key = self.settings.api_key
        if key is None or not supplied:
            return False
        return hmac.compare_digest(supplied.encode(), key.get_secret_value().encode())  # constant time

    def check_key(self, supplied: str | None) -> None:
        if self.settings.api_key is None:
            raise HTTPException(403, "writes are disabled: the server has no API key (set MMF_API_KEY)")
        if not supplied:
            raise HTTPException(401, "missing X-API-Key header")
        if not self.key_is_valid(supplied):
            raise HTTPException(401, "invalid API key")


def k_param(settings: Settings) -> Any:
    """``k`` of /recommend and /similar: 1..MMF_MAX_K."""
    return Annotated[int, Query(ge=1, le=settings.max_k, description=f"number of items, 1..{settings.max_k}")]


def fresh_param(settings: Settings) -> Any:
    """``fresh`` of /recommend: slots reserved for items added online (default MMF_FRESH_SLOTS)."""
    return Annotated[
        int | None,
        Query(
            ge=0,
            le=settings.max_k,
            description="reserve up to this many of the k slots for the best items added online within "
            f"MMF_FRESH_WINDOW_S ({settings.fresh_window_s:g} s); default MMF_FRESH_SLOTS ({settings.fresh_slots})",
        ),
    ]
