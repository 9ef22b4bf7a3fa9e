"""Floor B of the benchmark: the service's own HTTP stack answering a route that only
parses the ``/rank`` request and returns a fixed body.

``create_app_with_floor`` is ``app.http.main.create_app`` plus ONE route, ``POST /bench/floor``,
so the floor runs in the same process as ``/rank``: same uvicorn loop and parser, same
middleware (body limit, access log + response counter), same dependency (the loaded
service), the same pydantic parse of the same ``RankRequest`` body (``parse_rank_request``),
and an orjson response of the size of a real ``k=20`` answer. What ``/rank`` costs above
this floor is the ranking service itself: context, cache, retrieval, features, model.

    uvicorn --factory loadtest.floor:create_app_with_floor     # settings from UNICORN_*
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from app.http.deps import ServedDep
from app.http.main import create_app
from app.http.routes import JsonResponse
from app.http.schemas import parse_rank_request
from app.serving.config import Settings

FLOOR_PATH = "/bench/floor"
FLOOR_ITEMS = 20  # the default k


def _fixed_body() -> bytes:
    """A response shaped and sized like a real ``/rank`` answer with 20 items."""
    import orjson

    items = [
        {
            "entity_id": f"v{1000 + i}",
            "score": 0.5 - i / 100.0,
            "name": f"the example title number {i}",
            "entity_type": "video",
        }
        for i in range(FLOOR_ITEMS)
    ]
    return orjson.dumps(
        {
            "items": items,
            "task": "search",
            "model_version": "floor",
            "personalization": "cluster",
            "cache": "bypass",
            "context": {
                "task": "search",
                "user_id": "u1",
                "query": "the exa",
                "country": "US",
                "source_entity_id": "<null_source>",
                "query_imputed": False,
            },
            "unknown_candidates": [],
        }
    )


FIXED_BODY = _fixed_body()


async def floor(request: Request, served: ServedDep) -> JsonResponse:
    """Parse a ``RankRequest`` exactly as ``/rank`` does, then return a fixed body."""
    parse_rank_request(await request.body(), served.limits)
    return JsonResponse(FIXED_BODY)


def create_app_with_floor(settings: Settings | None = None) -> FastAPI:
    """The ranking app with the Floor B route added (benchmarks only)."""
    app = create_app(settings)
    app.add_api_route(
        FLOOR_PATH, floor, methods=["POST"], response_class=JsonResponse, include_in_schema=False
    )
    return app
