"""Recommendations and the interactions that shape them."""

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from service import schemas, writes
from service.dependencies import READ_ERRORS, WRITE_ERRORS, Access, RuntimeDep, UserId, fresh_param, k_param
from service.fast_recommend import DEFAULT_K, render_recommendation
from service.settings import Settings


def add_recommend_routes(app: FastAPI, settings: Settings, access: Access) -> None:
    tags = ["recommend"]
    K, Fresh = k_param(settings), fresh_param(settings)

    @app.get(
        "/recommend/{user_id}",
        tags=tags,
        response_model=schemas.RecommendationOut,
        dependencies=access.reads,
        responses=READ_ERRORS,
        summary="Top-k items for a user, already-seen items excluded",
    )
    async def recommend(request: Request, user_id: UserId, k: K = DEFAULT_K, fresh: Fresh = None) -> Response:
        engine = request.app.state.runtime.engine  # as engine_of, without a dependency to resolve
        fresh = settings.fresh_slots if fresh is None else fresh
        if fresh == 0 and engine.quick_recommend(user_id, k):
            rec = engine.recommend(user_id, k)  # bounded work (precomputed list, approximate or small index)
        else:
            rec = await run_in_threadpool(engine.recommend, user_id, k, fresh, settings.fresh_window_s)
        body = render_recommendation(user_id, engine.artifact_id, rec.strategy, rec.item_ids, rec.scores, rec.fresh)
        return Response(body, media_type="application/json")


def add_interactions_routes(app: FastAPI, access: Access) -> None:
    tags = ["recommend"]

    @app.post(
        "/interactions",
        tags=tags,
        response_model=schemas.InteractionOut,
        status_code=201,
        dependencies=access.writes,
        responses=WRITE_ERRORS,
        summary="Record that a user interacted with an item",
    )
    def add_interaction(body: schemas.InteractionIn, runtime: RuntimeDep) -> schemas.InteractionOut:
        writes.add_interaction(body.user_id, body.item_id, runtime)
        return schemas.InteractionOut(user_id=body.user_id, item_id=body.item_id)
