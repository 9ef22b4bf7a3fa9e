"""Wire schemas of the HTTP API (pydantic), separate from the internal types in
``app.core.ranking``. Everything here holds plain JSON types: numpy never reaches a response.

Unknown fields in a request body are REJECTED (422 naming the field): a misspelled
optional field (``candidate``, ``personalisation``) would otherwise be ignored silently
and the client would get a different ranking than it asked for.

Limits an operator may change (query length, candidate count) come from ``Settings`` and
reach the validators through the validation context (``RankLimits``); the contract's fixed
rules (tasks, k in 1..200, personalization levels) are static.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from app.core.context import Personalization, Task
from app.core.errors import MalformedRequest
from app.core.ranking import RankQuery
from app.serving.cache import CacheOutcome
from app.serving.config import CacheBackend

CacheState = Literal["ok", "degraded", "off"]
M = TypeVar("M", bound=BaseModel)

K_MIN, K_MAX, K_DEFAULT = 1, 200, 20
MAX_ID_CHARS = 128
MAX_COUNTRY_CHARS = 16
SAMPLE_MAX = 1000

EntityId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]


@dataclass(frozen=True)
class RankLimits:
    """The configurable request limits, passed as the pydantic validation context."""

    max_query_chars: int = 200
    max_candidates: int = 1000
    variants: tuple[str, ...] = ("default",)  # the served variants' names


def _limits(info: ValidationInfo) -> RankLimits:
    return info.context if isinstance(info.context, RankLimits) else RankLimits()


class RankRequest(BaseModel):
    """The unified context of one ranking request (docs/API.md, "POST /rank")."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "examples": [
                {
                    "task": "search",
                    "user_id": "u42",
                    "query": "stra",
                    "country": "US",
                    "k": 10,
                    "personalization": "cluster",
                },
                {"task": "more_like_this", "source_entity_id": "v123", "k": 10},
            ]
        },
    )

    task: Task = Field(description="Product surface.")
    user_id: str | None = Field(
        default=None,
        max_length=MAX_ID_CHARS,
        description="Member id; absent or unknown = cold start (not an error).",
    )
    query: str | None = Field(
        default=None,
        description="What was typed (required for search; may be a prefix). At most "
        "max_query_chars characters (default 200).",
    )
    country: str | None = Field(
        default=None,
        max_length=MAX_COUNTRY_CHARS,
        description="ISO country code; absent = unknown.",
    )
    source_entity_id: str | None = Field(
        default=None,
        max_length=MAX_ID_CHARS,
        description="The page's entity; required for more_like_this and entity.",
    )
    candidates: list[EntityId] | None = Field(
        default=None,
        description="Entity ids to rank; absent = the service retrieves candidates. "
        "At most max_candidates ids (default 1000); unknown ids are dropped and listed.",
    )
    k: int = Field(
        default=K_DEFAULT, ge=K_MIN, le=K_MAX, strict=True, description="Items to return."
    )
    personalization: Personalization = Field(
        default=Personalization.CLUSTER,
        description="none | cluster (shared, cached) | full (per user, not cached).",
    )
    variant: str | None = Field(
        default=None,
        max_length=32,
        description="The variant that answers (UNICORN_VARIANTS), for QA and comparisons; "
        "absent = the member's own variant (a salted hash of user_id).",
    )
    explain: bool = Field(
        default=False,
        strict=True,
        description="true: the answer's `explain` says per item why it is where it is "
        "(model inputs, attribution per feature group, retrieval source). Never cached; "
        "one more model call. Allowed by the `explain` setting.",
    )

    @field_validator("query")
    @classmethod
    def _query_length(cls, value: str | None, info: ValidationInfo) -> str | None:
        limit = _limits(info).max_query_chars
        if value is not None and len(value) > limit:
            raise ValueError(f"query must be at most {limit} characters, got {len(value)}")
        return value

    @field_validator("variant")
    @classmethod
    def _served_variant(cls, value: str | None, info: ValidationInfo) -> str | None:
        served = _limits(info).variants
        if value is not None and value not in served:
            raise ValueError(f"variant must be one of {', '.join(served)}; got {value!r}")
        return value

    @field_validator("candidates")
    @classmethod
    def _candidate_count(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        limit = _limits(info).max_candidates
        if value is not None and len(value) > limit:
            raise ValueError(f"candidates must hold at most {limit} ids, got {len(value)}")
        return value

    def to_query(self) -> RankQuery:
        return RankQuery(
            task=self.task.value,
            user_id=self.user_id,
            query=self.query,
            country=self.country,
            source_entity_id=self.source_entity_id,
            candidates=None if self.candidates is None else tuple(self.candidates),
            k=self.k,
            personalization=self.personalization,
            explain=self.explain,
        )


def parse_rank_request(body: bytes, limits: RankLimits) -> RankRequest:
    """Validate a raw ``/rank`` body (pydantic's JSON parser, with the limits). A body that
    is not JSON, or names a field twice, is a 400 ``MalformedRequest``; a rule broken is a
    422 ``ValidationError``."""
    return parse_body(RankRequest, body, limits)


def parse_body(model: type[M], body: bytes, context: Any = None) -> M:
    """``body`` validated as ``model`` by pydantic's JSON parser: not JSON, or a field named
    twice in an object, is a 400 ``MalformedRequest``; a rule broken, a 422."""
    try:
        req = model.model_validate_json(body, context=context)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            detail = errors[0].get("ctx", {}).get("error") or errors[0]["msg"]
            raise MalformedRequest(
                f"request body must be a JSON object ({detail})", field="body"
            ) from None
        raise
    _refuse_duplicate_fields(body)
    return req


def _refuse_duplicate_fields(body: bytes) -> None:
    """JSON parsers keep the last of two equal keys; a body saying ``"k": 5, "k": 50`` is
    ambiguous, so it is refused (in any object of the body)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen:
                raise MalformedRequest(f"{key} is given more than once", field=key)
            seen.add(key)
        return dict(items)

    json.loads(body, object_pairs_hook=pairs)


# --- POST /events -----------------------------------------------------------------------
MAX_EVENTS = 1000
EventId = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[A-Za-z0-9._:\-]+$")
]
EngagementType = Literal["play", "click", "add_to_list", "like", "dislike", "dismiss"]
# Client timestamps: epoch seconds between 2000-01-01 and 2100-01-01.
MIN_TS, MAX_TS = 946_684_800.0, 4_102_444_800.0


class EngagementIn(BaseModel):
    """What a member did with one entity of one ``/rank`` answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: EventId = Field(description="Unique per engagement; a repeat is a duplicate.")
    request_id: EventId = Field(description="The request_id of the /rank answer it was in.")
    entity_id: EntityId = Field(description="The entity engaged with.")
    type: EngagementType = Field(description="What the member did.")
    ts: float | None = Field(
        default=None,
        ge=MIN_TS,
        le=MAX_TS,
        allow_inf_nan=False,
        description="When (epoch seconds, the client's clock); absent = when received.",
    )


class EventsRequest(BaseModel):
    """A batch of engagements (docs/API.md, "POST /events")."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "examples": [
                {
                    "events": [
                        {
                            "event_id": "e-7f3a",
                            "request_id": "4b1c9e0d2a7f4e6b8c3d5a1f0e9b7c2d",
                            "entity_id": "v123",
                            "type": "play",
                            "ts": 1796190000.5,
                        }
                    ]
                }
            ]
        },
    )

    events: list[EngagementIn] = Field(
        min_length=1, max_length=MAX_EVENTS, description=f"1 to {MAX_EVENTS} engagements."
    )


class EventsAccepted(BaseModel):
    accepted: int = Field(description="Engagements queued for the sink.")
    duplicates: int = Field(description="Engagements whose event_id was seen already.")


class RankedItemOut(BaseModel):
    entity_id: str
    score: float = Field(description="P(positive engagement | context, entity), 0..1.")
    name: str
    entity_type: str


class ContextOut(BaseModel):
    """The context after imputation: what the model actually saw."""

    task: Task
    user_id: str
    query: str
    country: str
    source_entity_id: str
    query_imputed: bool


class FeatureValue(BaseModel):
    value: float = Field(description="What the model was fed (after imputation).")
    normalised: float = Field(
        description="(value - training mean) / training std, clamped "
        "to +-10: what the model's first layer reads."
    )


class ItemExplanation(BaseModel):
    """Why one item of the answer is where it is (docs/API.md, "Explain")."""

    retrieval: str = Field(
        description="Where the candidate came from: name_token, typo, trigram (search), "
        "co_engagement, similar (more_like_this), linked (entity), prequery, "
        "popular_in_country (the top-up), given (the request's candidates)."
    )
    score: float = Field(description="The item's score, as in `items`.")
    tier: int = Field(
        description="Search-box tier ordered before the score: 3 exact title, 2 every query "
        "token, 1 some match, 0 none; 0 for the other tasks."
    )
    attribution: dict[str, float] = Field(
        description="Per feature group: score - the score with that group's features at "
        "their training mean (occlusion)."
    )
    all_at_mean: float = Field(description="The score with every dense feature at its mean.")
    inputs: dict[str, FeatureValue] = Field(description="The named dense inputs.")


class RankResponse(BaseModel):
    request_id: str = Field(
        description="This answer's id (also the X-Request-ID header); engagements with its "
        "items name it (POST /events)."
    )
    items: list[RankedItemOut]
    task: Task
    variant: str = Field(description="The variant that answered (default: one variant).")
    model_version: str
    personalization: Personalization
    cache: CacheOutcome
    context: ContextOut
    unknown_candidates: list[str]
    explain: list[ItemExplanation] | None = Field(
        default=None, description='With `"explain": true`: one entry per item, in order.'
    )


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_request.")
    message: str = Field(description="Names the field and the rule that was broken.")
    field: str | None = Field(default=None, description="The offending field, when there is one.")


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready", "not_ready"]
    model_version: str | None = Field(description="The champion's (first variant's).")
    variants: dict[str, str] = Field(
        default_factory=dict,
        description="Each variant's model version, and the shadow's when one is loaded.",
    )
    cache: CacheState
    cache_backend: CacheBackend


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Bundle directory to load; absent = the variant's configured bundle path.",
    )
    variant: str | None = Field(
        default=None,
        max_length=32,
        description="The variant to reload (or shadow); absent = the champion.",
    )


class ReloadResponse(BaseModel):
    variant: str
    model_version: str
    previous_model_version: str
    bundle: str
    seconds: float


class CatalogueSample(BaseModel):
    """Draws from the served bundle, for load tests."""

    model_version: str
    queries: list[str] = Field(description="Search queries users typed (prefixes included).")
    video_ids: list[str] = Field(description="Rankable entities (sources for more_like_this).")
    entity_ids: list[str] = Field(description="Non-video entities (sources for entity pages).")
    countries: list[str]


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The JSON of every error response: ``{"error": {"code", "message", "field"}}``."""
    return {"error": {"code": code, "message": message, "field": field}}
