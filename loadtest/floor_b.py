"""Floor B of the benchmark (docs/BENCHMARKS.md): the service's own HTTP stack on a route,
``POST /bench/floor``, that parses the ``/rank`` request exactly as ``/rank`` does and
returns a fixed body of the size of a real ``k=20`` answer, in the same process as
``/rank``. ``python -m loadtest.floor_b [--http h11]`` is ``app.http.server.run`` (settings
from ``UNICORN_*``) with that route added; ``--http`` exists to measure what httptools buys.
"""

import argparse

import orjson
from fastapi import FastAPI

from app.http.server import run
from app.serving.config import Settings

FLOOR_PATH = "/bench/floor"
ITEMS = [
    {"entity_id": f"v{1000 + i}", "score": 0.5 - i / 100.0,
     "name": f"the example title number {i}", "entity_type": "video"} for i in range(20)
]  # fmt: skip
CONTEXT = {"task": "search", "user_id": "u1", "query": "the exa", "country": "US",
           "source_entity_id": "<null_source>", "query_imputed": False}  # fmt: skip
FIXED_BODY = orjson.dumps(
    {"items": ITEMS, "task": "search", "model_version": "floor", "personalization": "cluster",
     "cache": "bypass", "context": CONTEXT, "unknown_candidates": []}
)  # fmt: skip


def create_app_with_floor(settings: Settings | None = None) -> FastAPI:
    """The ranking app with the Floor B route added (benchmarks only)."""
    # Imported here, not above: ``run`` limits numpy's BLAS threads before numpy loads.
    from fastapi import Request

    from app.http.deps import ServedDep
    from app.http.main import create_app
    from app.http.routes import JsonResponse
    from app.http.schemas import parse_rank_request

    async def floor(request: Request, served: ServedDep) -> JsonResponse:
        parse_rank_request(await request.body(), served.limits)
        return JsonResponse(FIXED_BODY)

    app = create_app(settings)
    app.add_api_route(FLOOR_PATH, floor, methods=["POST"], include_in_schema=False)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m loadtest.floor_b", description=__doc__)
    parser.add_argument("--http", default="httptools", choices=["httptools", "h11"])
    http = parser.parse_args().http
    run(Settings(), app_factory="loadtest.floor_b:create_app_with_floor", http=http)
