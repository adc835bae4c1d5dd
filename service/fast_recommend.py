"""``GET /recommend/{user_id}`` without the framework, for the requests where the framework is most of the cost.

With a precomputed list or a bounded index search (hnsw, ivf, a small flat index) a recommendation for a
training user costs less than FastAPI's routing, parameter validation and dependency resolution around it, which
would hold the endpoint well under half the requests per second of a no-op one (docs/performance.md, "The
/recommend fast path and one torch thread").
"""

from __future__ import annotations

import json
import math
import re
from json.encoder import encode_basestring_ascii as _string  # what json.dumps uses for str

from service.schemas import ID_MAX_LENGTH, ID_PATTERN

RECOMMEND_PREFIX = "/recommend/"
DEFAULT_K = 20  # the route's default k too
_USER_ID = re.compile(ID_PATTERN)
_CANONICAL_K = re.compile(r"^k=([1-9][0-9]{0,8})$")  # decimal, no sign, no leading zero, nothing else
_HEADERS = [(b"content-type", b"application/json")]


def render_recommendation(
    user_id: str, artifact_id: str, strategy: str, items: list[str], scores: list[float], fresh: list[int] = ()
) -> bytes:
    """The body of a recommendation, in the shape of ``schemas.RecommendationOut`` (the documented model):
    the bytes of ``json.dumps(body, separators=(",", ":"))``, assembled from pieces because the JSON
    encoder's per-dict work is a large part of a fast-path request (docs/performance.md, "The /recommend fast
    path and one torch thread")."""
    if not all(map(math.isfinite, scores)):  # json.dumps spells these NaN / Infinity; repr does not
        return _render_with_json(user_id, artifact_id, strategy, items, scores, fresh)
    rows = ",".join(f'{{"item_id":{_string(i)},"score":{s!r}}}' for i, s in zip(items, scores, strict=True))
    head = f'{{"user_id":{_string(user_id)},"strategy":{_string(strategy)},"artifact_id":{_string(artifact_id)}'
    tail = f',"fresh":[{",".join(map(str, fresh))}]' if fresh else ""
    return f'{head},"items":[{rows}]{tail}}}'.encode()


def _render_with_json(
    user_id: str, artifact_id: str, strategy: str, items: list[str], scores: list[float], fresh: list[int] = ()
) -> bytes:
    body = {
        "user_id": user_id,
        "strategy": strategy,
        "artifact_id": artifact_id,
        "items": [{"item_id": i, "score": s} for i, s in zip(items, scores, strict=True)],
    }
    if fresh:
        body["fresh"] = list(fresh)
    return json.dumps(body, separators=(",", ":")).encode()


class FastRecommend:
    """Pure ASGI middleware that answers ``GET /recommend/{user_id}`` itself when it can give exactly the
    answer the FastAPI route would, and passes every other request on.

    It takes a request only when: the method is GET; the rest of the path is one segment that satisfies the
    route's ``user_id`` constraints (1 to ``ID_MAX_LENGTH`` characters of ``ID_PATTERN``); the query string is
    empty or exactly ``k=N`` with N in canonical decimal form within 1..``max_k``; reads need no API key; and
    the engine can answer on the event loop (``Engine.quick_recommend``: a training user whose precomputed
    list answers, or a bounded index search). All else, errors included, goes to the FastAPI route, which stays
    the documented endpoint (OpenAPI) and the reference: tests compare the two answers byte for byte. The
    matched route is put in the scope as FastAPI does, so request metrics label these requests like the
    route's own.
    """

    def __init__(self, app, max_k: int, enabled: bool = True) -> None:
        self.app, self.max_k, self.enabled = app, max_k, enabled
        self._route = None

    def _route_of(self, scope):
        if self._route is None:
            routes = scope["app"].router.routes
            self._route = next(r for r in routes if getattr(r, "path", None) == RECOMMEND_PREFIX + "{user_id}")
        return self._route

    async def __call__(self, scope, receive, send) -> None:
        body = self._answer(scope) if self.enabled and scope["type"] == "http" else None
        if body is None:
            return await self.app(scope, receive, send)
        scope["route"] = self._route_of(scope)
        headers = [(b"content-length", str(len(body)).encode()), *_HEADERS]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _answer(self, scope) -> bytes | None:
        """The response body, or None to leave the request to the FastAPI route."""
        path: str = scope["path"]
        if scope["method"] != "GET" or not path.startswith(RECOMMEND_PREFIX) or scope.get("root_path"):
            return None
        user_id = path[len(RECOMMEND_PREFIX) :]
        if not 1 <= len(user_id) <= ID_MAX_LENGTH or "/" in user_id or not _USER_ID.fullmatch(user_id):
            return None
        k = DEFAULT_K
        if query := scope.get("query_string", b""):
            match = _CANONICAL_K.match(query.decode("latin-1"))
            if match is None or int(match.group(1)) > self.max_k:
                return None
            k = int(match.group(1))
        runtime = getattr(scope["app"].state, "runtime", None)
        engine = getattr(runtime, "engine", None)
        if engine is None or not engine.quick_recommend(user_id, k):
            return None
        try:
            rec = engine.recommend(user_id, k)
        except Exception:  # the route answers it (and its error handlers render any error)
            return None
        return render_recommendation(user_id, engine.artifact_id, rec.strategy, rec.item_ids, rec.scores)
