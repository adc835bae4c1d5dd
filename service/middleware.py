"""Pure ASGI middleware of the app (no ``BaseHTTPMiddleware``: it runs the rest of the app in another task behind a
memory stream, a large part of a no-op request's time) and the Prometheus metrics they feed."""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Gauge, Histogram, Info


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
        # Built only when answered, not for every request with a body.
        answer = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)
        await answer(scope, receive, send)


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
