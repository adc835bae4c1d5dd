"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis + hypothesis).

Every operation of ``/openapi.json`` gets generated requests (schema-conforming ones, and invalid ones
from schemathesis' negative mode, wrong methods and missing or wrong auth) sent in-process to the ASGI app
(started with its lifespan, on a real Redis namespace and the tiny trained artifact) with the API key, so
that the write endpoints run too. Since random modality names and item ids would only ever exercise the
422/404 paths, about half of the generated items get features of the right modalities and dimensions
(random values) and half of the interactions name an existing item. After the fuzzing, this replica's
index must still be consistent with Redis (``GET /admin/check``).

Checked for every response: no 5xx; every 4xx is JSON with a non-empty ``detail``; the status code is
documented, the body matches the documented schema (2xx) and the content type is the documented one. Every
operation that takes a body also gets bodies that are not UTF-8, under every content type: a 4xx with a
reason, never a 5xx. The budget is ``FUZZ_EXAMPLES`` per operation (default 30, so the module runs in well
under a minute; ``FUZZ_EXAMPLES=300 pytest tests/test_fuzz.py -s`` for a longer run, which prints the count of
requests by operation and status).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.app import create_app
from service.settings import Settings
from tests.service_support import AUTH, KEY, Artifact, no_mmf_environment  # noqa: F401 (autouse)

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
RESULTS: dict[str, dict[int, int]] = {}


class Delegate:
    """The ASGI app schemathesis talks to: at import time (to read the schema and collect one test per
    operation) an app whose lifespan never runs, during the tests the fixture's fully started app.
    (``schemathesis.pytest.from_fixture`` would be the direct way, but fails on pytest 9.)"""

    def __init__(self, target) -> None:
        self.target = target

    async def __call__(self, scope, receive, send) -> None:
        await self.target(scope, receive, send)


SPEC = create_app(Settings(artifacts="unused", redis_url="redis://unused", api_key=KEY)).openapi()
APP = Delegate(Starlette(routes=[Route("/openapi.json", lambda _: JSONResponse(SPEC))]))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module")
def fuzz_app(artifact: Artifact, redis_url: str) -> Iterator[tuple]:
    from tests.service_support import delete_namespace

    namespace = "fuzz-" + hashlib.sha1(os.urandom(8)).hexdigest()[:12]
    app = create_app(
        Settings(artifacts=artifact.path, redis_url=redis_url, api_key=KEY, namespace=namespace, max_body_bytes=65536)
    )
    schema_only = APP.target
    with TestClient(app):  # runs the lifespan: engine loaded, follower started
        APP.target = app
        try:
            yield app, artifact
        finally:
            APP.target = schema_only
    delete_namespace(redis_url, namespace)
    total = {op: sum(c.values()) for op, c in RESULTS.items()}
    print("\nfuzzing: requests by operation and status:", json.dumps(RESULTS, sort_keys=True), total)


def valid_features(artifact: Artifact, seed: str) -> dict[str, list[float]]:
    rng = np.random.default_rng(int(hashlib.sha1(seed.encode()).hexdigest()[:8], 16))
    return {m: rng.normal(size=d).round(4).tolist() for m, d in artifact.modalities.items()}


def _coin(seed: str) -> bool:
    return bool(int(hashlib.sha1(seed.encode()).hexdigest(), 16) % 2)


def detail_on_4xx(ctx, response, case) -> None:
    """Every 4xx answer is JSON with a non-empty reason in ``detail``."""
    if 400 <= response.status_code < 500:
        body = json.loads(response.content or b"null")
        assert isinstance(body, dict) and body.get("detail"), f"{response.status_code} without detail: {body!r}"


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI failure reproduces locally
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_api_fuzz(case, fuzz_app) -> None:
    _, artifact = fuzz_app
    body = case.body if isinstance(case.body, dict) else None
    item_id = body.get("item_id") if body else None
    if case.method == "POST" and case.path == "/items" and isinstance(item_id, str) and _coin(item_id):
        case.body = {**body, "features": valid_features(artifact, item_id)}
    if case.method == "POST" and case.path == "/items:batch" and body and isinstance(body.get("items"), list):
        for item in body["items"]:
            if isinstance(item, dict) and isinstance(item.get("item_id"), str) and _coin(item["item_id"]):
                item["features"] = valid_features(artifact, item["item_id"])
    if case.method == "POST" and case.path == "/interactions" and isinstance(item_id, str) and _coin(item_id):
        body["item_id"] = artifact.item_ids[len(item_id) % len(artifact.item_ids)]  # an item that exists
    if case.method == "POST" and case.path == "/admin/reload" and body is not None:
        body["wait"] = True  # a background reload would outlive the example
    response = case.call(headers=AUTH)
    op = f"{case.method} {case.path}"
    RESULTS.setdefault(op, {}).setdefault(response.status_code, 0)
    RESULTS[op][response.status_code] += 1
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            detail_on_4xx,
        ],
        headers=AUTH,
    )


BODY_OPERATIONS = sorted(
    (method.upper(), path)
    for path, item in SPEC["paths"].items()
    for method, operation in item.items()
    if "requestBody" in operation
)
CONTENT_TYPES = [
    None, "application/json", "application/json; charset=utf-8", "application/json; charset=utf-16", "text/plain",
    "text/plain; charset=latin-1", "application/x-www-form-urlencoded", "multipart/form-data; boundary=fuzz",
    "application/octet-stream", "application/xml", "*/*",
]  # fmt: skip
NOT_UTF8_BODIES = st.one_of(
    st.binary(min_size=1, max_size=512),
    st.builds(lambda s: b"\xff" + s.encode(), st.text(max_size=64)),  # JSON-looking text after a bad byte
    st.builds(lambda s: s.encode("latin-1", "replace") + b"\xe9", st.text(max_size=64)),
)


def not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.parametrize("operation", BODY_OPERATIONS, ids=" ".join)
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=NOT_UTF8_BODIES.filter(not_utf8), content_type=st.sampled_from(CONTENT_TYPES))
def test_bodies_that_are_not_utf8(operation, body: bytes, content_type: str | None, fuzz_app) -> None:
    """Any body that is not UTF-8, under any content type, gets a 4xx with a reason (never a 5xx)."""
    app, _ = fuzz_app
    method, path = operation
    path = path.replace("{item_id}", "0").replace("{user_id}", "0")
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    client = TestClient(app, raise_server_exceptions=False)  # no `with`: the fixture runs the app's lifespan
    response = client.request(method, path, content=body, headers=headers)
    RESULTS.setdefault(f"{method} {path} (not UTF-8)", {}).setdefault(response.status_code, 0)
    RESULTS[f"{method} {path} (not UTF-8)"][response.status_code] += 1
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.json()["detail"], response.text


def test_index_consistent_after_fuzzing(fuzz_app) -> None:
    from service.check import check_consistency

    app, _ = fuzz_app
    runtime = app.state.runtime
    with runtime.write_lock:  # the replica that took all the fuzzing
        report = check_consistency(runtime.engine, runtime.state)
    assert report["ok"], report
    assert RESULTS.get("POST /items", {}).get(201, 0) > 0, "no valid item was ever posted"
    assert RESULTS.get("POST /interactions", {}).get(201, 0) > 0, "no valid interaction was ever posted"
