"""What the routes depend on: the parts the lifespan builds (``Served``), as ``Annotated``
dependency aliases."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from app.core.errors import ModelUnavailable
from app.http.schemas import RankLimits
from app.serving.config import Settings
from app.serving.feedback import Feedback
from app.serving.metrics import ServiceMetrics
from app.serving.model_holder import Variants
from app.serving.pipeline import RankingPipeline
from app.serving.shadow import Shadow
from app.serving.tracing import Tracing


@dataclass
class Served:
    """One app's serving parts, set on ``app.state.served`` once a model is loaded."""

    settings: Settings
    metrics: ServiceMetrics
    models: Variants  # the served variants' model holders (one: default)
    pipeline: RankingPipeline
    stopping: bool = False
    limits: RankLimits = field(init=False)
    user_key: bytes = field(init=False)  # keys the user-id hash of the access log and events
    feedback: Feedback | None = field(init=False)  # None: events off (no sink configured)
    tracing: Tracing | None = field(init=False)  # None: tracing off (no OTLP endpoint)
    shadow: Shadow | None = None  # set once the shadow bundle is loaded; None: no shadow

    def __post_init__(self) -> None:
        self.limits = RankLimits(
            self.settings.max_query_chars, self.settings.max_candidates, self.models.names
        )
        salt = self.settings.log_user_salt
        self.user_key = salt.get_secret_value().encode() if salt else os.urandom(16)
        self.feedback = Feedback.from_settings(self.settings, self.metrics, self.user_key)
        endpoint = self.settings.otlp_endpoint
        self.tracing = (
            None if endpoint is None else Tracing(endpoint, self.settings.trace_sample_ratio)
        )


def served_or_none(request: Request) -> Served | None:
    served = getattr(request.app.state, "served", None)
    return served if isinstance(served, Served) else None


async def get_served(request: Request) -> Served:
    served = served_or_none(request)
    if served is None:
        raise ModelUnavailable("the service is starting: no model is loaded yet")
    return served


ServedDep = Annotated[Served, Depends(get_served)]
