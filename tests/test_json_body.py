"""JSON bodies parsed by pydantic-core's parser give the values, and the errors, of the standard library's."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

import service.json_body as json_body
from service.json_body import JSONBodyRequest, JSONBodyRoute
from tests.service_support import AUTH, Artifact

BODIES = [
    b'{"items": [{"item_id": "a", "features": {"visual": [0.1, -2, 1e-310, 3.141592653589793]}}]}',
    b"[1e400, -1e400, NaN, Infinity, -Infinity, -0.0]",
    b"[" + b"9" * 400 + b"]",  # a long integer: a Python int
    b'{"a": 1, "a": 2}',  # the last duplicate wins
    b'  {"a": "caf\\u00e9 \\ud83d\\ude00"}  ',
    b'["\\ud800"]',  # a lone surrogate: json.loads keeps it, pydantic-core refuses it
    "[1, 2]".encode("utf-16"),  # json.loads detects UTF-16; pydantic-core refuses it
    b"[1.5",
    b"[1] x",
    b"\xff",
    b"[" + b"9" * 5000 + b"]",  # past Python's 4,300-digit limit
    b"",
]


def parse(body: bytes):
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    request = JSONBodyRequest({"type": "http", "method": "POST", "headers": [], "path": "/"}, receive)
    return asyncio.run(request.json())


def outcome(call) -> tuple[str, str]:
    """("value", its repr: -0.0, nan and inf spelled out) or (the exception's type, its message)."""
    try:
        return "value", repr(call())
    except Exception as exc:  # the exception is the outcome compared
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_the_same_values_and_errors_as_json_loads(body: bytes) -> None:
    assert outcome(lambda: parse(body)) == outcome(lambda: json.loads(body))


def test_every_route_parses_json_bodies_with_it_and_a_batch_goes_through_the_fast_parser(
    client: TestClient, artifact: Artifact, monkeypatch
) -> None:
    routes = [r for r in client.app.router.routes if isinstance(r, APIRoute)]
    assert routes and all(isinstance(r, JSONBodyRoute) for r in routes)
    calls = []
    original = json_body.pydantic_core.from_json
    monkeypatch.setattr(json_body.pydantic_core, "from_json", lambda body: calls.append(len(body)) or original(body))
    items = [{"item_id": f"jb-{i}", "features": artifact.features(i)} for i in range(3)]
    response = client.post("/items:batch", json={"items": items}, headers=AUTH)
    assert response.status_code == 201, response.text
    assert len(calls) == 1
    assert client.get("/items/jb-2").json()["features"] == artifact.features(2)
