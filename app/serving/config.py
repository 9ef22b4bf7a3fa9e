"""Service settings: ONE pydantic-settings class, environment variables prefixed ``UNICORN_``.

Every knob an operator may turn is a field here, with its default and why. Build one with
``Settings()`` (reads the environment), or pass values directly in tests:
``create_app(Settings(bundle=path, redis_url=None))``. ``docs/API.md`` lists them all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.serving.variants import VariantSpec, parse_variants

ENV_PREFIX = "UNICORN_"
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
MIN_ADMIN_TOKEN_CHARS = 16
CacheBackend = Literal["memory", "redis", "off"]
EventLoop = Literal["asyncio", "uvloop"]
ExplainMode = Literal["on", "admin", "off"]
INLINE_SLOTS = 4  # default max_in_flight; BATCHING_SLOTS when batch_window_ms > 0
BATCHING_SLOTS = 64


class Settings(BaseSettings):
    """All service settings; each field is read from ``UNICORN_<FIELD>`` (case-insensitive)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        frozen=True,
        hide_input_in_errors=True,  # secrets (admin_token) must not reach logs via errors
    )

    # --- model ------------------------------------------------------------------------
    bundle: Path = Field(
        default=Path("bundles/demo"),
        description="Bundle directory served at start and by SIGHUP / a bodiless reload.",
    )
    variants: str = Field(
        default="",
        description="Serve several bundles at once, members split by a salted hash of the "
        "user id: name=path[:percent],..., e.g. champion=bundles/a,challenger=bundles/b:10 "
        "(entries without a percent share the rest; the first answers requests without a "
        "user id). Empty = one variant, default, serving `bundle` (set, `bundle` is unused).",
    )
    variant_salt: str = Field(
        default="unicorn-variants",
        min_length=1,
        max_length=256,
        description="Salt of the variant split's hash: the same on every replica; a new salt "
        "reshuffles members between variants.",
    )
    shadow_bundle: Path | None = Field(
        default=None,
        description="A bundle that ranks a sample of requests off the request path, its "
        "agreement with the served variant exported as metrics; unset = no shadow. A "
        "refused shadow bundle is logged and leaves shadow scoring off.",
    )
    shadow_sample_ratio: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Share of /rank answers the shadow re-ranks."
    )
    shadow_queue_capacity: int = Field(
        default=16,
        ge=1,
        le=10_000,
        description="Sampled requests waiting for the shadow; beyond, they are dropped "
        '(unicorn_shadow_requests_total{outcome="dropped"}).',
    )
    ort_intra_op_threads: int = Field(
        default=1,
        ge=1,
        le=64,
        description="onnxruntime intra-op threads per session; 1 = one core per inference, "
        "more cores are used through more workers.",
    )
    ort_inter_op_threads: int = Field(
        default=1, ge=1, le=64, description="onnxruntime inter-op threads."
    )

    # --- request limits -------------------------------------------------------------------
    max_query_chars: int = Field(
        default=200, ge=1, le=10_000, description="Longest accepted query."
    )
    max_candidates: int = Field(
        default=1000, ge=1, le=100_000, description="Most candidate ids one request may send."
    )
    max_retrieved: int = Field(
        default=300,
        ge=1,
        le=100_000,
        description="Candidates the service retrieves itself when a request names none.",
    )
    max_body_bytes: int = Field(
        default=256 * 1024, ge=1024, description="Largest request body; larger gets 413."
    )

    # --- connections ----------------------------------------------------------------------
    max_header_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="Largest request line + headers; larger gets 431 and the connection is "
        "closed (browsers and HTTP clients send well under 16 KiB).",
    )
    max_url_bytes: int = Field(
        default=8 * 1024,
        ge=256,
        le=1024 * 1024,
        description="Longest request target (path and query); longer gets 414.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        le=3600.0,
        description="A request's line and headers must arrive within this (from the "
        "connection's start, or the request's first byte), else 408 and the connection "
        "is closed.",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        le=3600.0,
        description="A request's body must arrive within this after its headers, else 408 "
        "and the connection is closed.",
    )
    max_connections: int = Field(
        default=512,
        ge=1,
        le=1_000_000,
        description="Open connections per worker process; one more is answered 503 at once "
        "and closed, before anything is read.",
    )

    # --- admission control ----------------------------------------------------------------
    max_in_flight: int = Field(
        default=INLINE_SLOTS,
        ge=1,
        le=100_000,
        description=f"Scoring slots (cache hits skip them). Inline scoring holds a slot until "
        f"the next event-loop turn, so this is the most requests scored per turn (more "
        f"while refusals crowd scoring out of the loop: up to 16x). With micro-batching "
        f"(default {BATCHING_SLOTS} then), the most requests a batch gathers.",
    )

    queue_timeout_ms: float = Field(
        default=100.0,
        ge=0.0,
        le=60_000.0,
        description="Wait at most this long for a scoring slot, then 503 + Retry-After "
        "(at once when the queue ahead would take longer).",
    )

    # --- micro-batching -------------------------------------------------------------------
    batch_window_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=1000.0,
        description="Collect concurrent requests for up to this long into one onnxruntime "
        "run; 0 = off (each request runs its own inference).",
    )
    max_batch_size: int = Field(
        default=4096, ge=1, le=1_000_000, description="Most candidate rows in one onnxruntime run."
    )

    # --- cache ------------------------------------------------------------------------
    cache_enabled: bool = Field(
        default=True, description="False: every request is scored (bypass)."
    )
    redis_url: str | None = Field(
        default=None,
        description="redis://host:port/db shared by replicas; unset = in-process LRU+TTL cache.",
    )
    cache_ttl_seconds: float = Field(
        default=300.0, gt=0.0, le=86_400.0, description="Entry lifetime."
    )
    cache_max_entries: int = Field(
        default=50_000, ge=1, le=10_000_000, description="In-process cache bound (LRU beyond it)."
    )
    cache_timeout_ms: float = Field(
        default=50.0,
        gt=0.0,
        le=10_000.0,
        description="Deadline of one Redis call, a reconnect included; time the event loop "
        "was stuck elsewhere does not count: a stalled Redis costs a request about this.",
    )
    cache_retry_seconds: float = Field(
        default=5.0,
        gt=0.0,
        le=3600.0,
        description="Circuit breaker: once open, skip Redis this long, then let one request "
        "retry it.",
    )
    cache_failure_threshold: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Circuit breaker: cache failures in a row (errors, timeouts) that open it; "
        "any success resets the count.",
    )
    cache_max_connections: int = Field(default=64, ge=1, le=10_000, description="Redis pool size.")

    # --- admin, logs, process -----------------------------------------------------------
    admin_token: SecretStr | None = Field(
        default=None,
        description=f"Bearer token for /admin/*; unset = admin endpoints disabled (404). At "
        f"least {MIN_ADMIN_TOKEN_CHARS} characters.",
    )
    cors_origins: str = Field(
        default="",
        description="Origins whose browser pages may call the API (CORS), comma-separated, "
        "e.g. https://app.example.com; * = any origin; empty = CORS off (no CORS headers).",
    )
    gzip_min_bytes: int = Field(
        default=0,
        ge=0,
        le=1 << 30,
        description="Gzip answers of at least this many bytes when the client accepts it "
        "(e.g. 4096: explain answers, large k); 0 = off. /metrics is gzipped whenever asked.",
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces): a span "
        "per /rank request and per stage, W3C traceparent honoured; unset = tracing off.",
    )
    trace_sample_ratio: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Share of the traces that start here that are recorded (a caller's "
        "sampled traceparent is always followed).",
    )
    explain: ExplainMode = Field(
        default="on",
        description='`"explain": true` on /rank: on (anyone), admin (the admin token\'s '
        "Bearer header; needs admin_token), off (403).",
    )
    reload_root: Path | None = Field(
        default=None,
        description="Directory a bundle named by POST /admin/reload must lie in (symlinks "
        "resolved; else 403); unset = the directory holding `bundle`.",
    )
    log_level: str = Field(default="INFO", description=f"One of {', '.join(LOG_LEVELS)}.")
    log_queries: bool = Field(
        default=False, description="True: access logs carry the raw query text. Off by default."
    )
    log_user_salt: SecretStr | None = Field(
        default=None,
        description="Key of the user-id hash in access logs; set the same value on every "
        "replica to follow a user across them. Unset = random per process.",
    )
    # --- feedback events (docs/OPERATIONS.md, "Event sinks") ------------------------------
    events_dir: Path | None = Field(
        default=None,
        description="Write an impression per /rank answer and the engagements of POST /events "
        "as Parquet files in this directory. Unset (and no events_redis_url) = events off: "
        "/events answers 404.",
    )
    events_redis_url: str | None = Field(
        default=None,
        description="Write the events to Redis Streams (unicorn:events:*) instead, for several "
        "replicas; `python -m app.serving.events collect` drains them to files. Give events "
        "their own Redis (noeviction, AOF), not the cache's.",
    )
    events_raw_user_ids: bool = Field(
        default=False,
        description="Events carry the raw user id (a bundle trained from them personalises). "
        "Off: the keyed hash of the access log (log_user_salt).",
    )
    events_queue_capacity: int = Field(
        default=10_000,
        ge=100,
        le=10_000_000,
        description="Events held per kind while the sink is slow or down; beyond, the oldest "
        'are dropped (unicorn_events_total{outcome="dropped"}).',
    )
    host: str = Field(default="127.0.0.1", description="Interface to bind.")
    port: int = Field(default=8000, ge=1, le=65_535, description="TCP port.")
    workers: int = Field(default=1, ge=1, le=256, description="uvicorn worker processes.")
    event_loop: EventLoop = Field(
        default="asyncio",
        description="asyncio (stdlib) or uvloop. uvloop is a few percent faster below "
        "capacity (docs/BENCHMARKS.md), but under a flood of clients retrying at once it "
        "left some connections unread for seconds (docs/RELIABILITY.md).",
    )
    metrics_dir: Path | None = Field(
        default=None,
        description="PROMETHEUS_MULTIPROC_DIR for workers > 1; unset = a fresh temp dir.",
    )

    @field_validator("bundle", "metrics_dir", "events_dir", "shadow_bundle", mode="after")
    @classmethod
    def _expand_path(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @field_validator("redis_url", mode="before")
    @classmethod
    def _check_redis_url(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str) or not value.startswith(REDIS_SCHEMES):
            raise ValueError(f"redis_url must start with one of {REDIS_SCHEMES}, got {value!r}")
        return value.strip()

    @field_validator("admin_token", mode="before")
    @classmethod
    def _check_admin_token(cls, value: Any) -> Any:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if not isinstance(raw, str) or len(raw.strip()) < MIN_ADMIN_TOKEN_CHARS:
            # Never echo the token itself.
            raise ValueError(f"admin_token must have at least {MIN_ADMIN_TOKEN_CHARS} characters")
        return raw.strip()

    @field_validator("log_level", mode="before")
    @classmethod
    def _check_log_level(cls, value: Any) -> Any:
        level = str(value).strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {value!r}")
        return level

    @model_validator(mode="before")
    @classmethod
    def _default_slots(cls, data: Any) -> Any:
        """Micro-batching holds a slot for its window: it needs more slots by default."""
        if isinstance(data, dict) and data.get("max_in_flight") is None:
            try:
                batching = float(data.get("batch_window_ms") or 0) > 0
            except (TypeError, ValueError):
                return data  # the field validator names the bad batch_window_ms
            data = {**data, "max_in_flight": BATCHING_SLOTS if batching else INLINE_SLOTS}
        return data

    @model_validator(mode="after")
    def _one_event_sink(self) -> Settings:
        if self.events_dir is not None and self.events_redis_url:
            raise ValueError("set events_dir or events_redis_url, not both")
        if self.events_redis_url and not self.events_redis_url.startswith(REDIS_SCHEMES):
            raise ValueError(f"events_redis_url must start with one of {REDIS_SCHEMES}")
        return self

    @field_validator("cors_origins")
    @classmethod
    def _check_cors_origins(cls, value: str) -> str:
        for origin in filter(None, (o.strip() for o in value.split(","))):
            if origin != "*" and (
                not origin.startswith(("http://", "https://")) or origin.rstrip("/") != origin
            ):
                raise ValueError(
                    f"cors_origins: {origin!r} must be * or scheme://host[:port] without a "
                    "path or trailing slash (as a browser sends Origin)"
                )
        return value

    @model_validator(mode="after")
    def _check_variants(self) -> Settings:
        parse_variants(self.variants, self.bundle)  # raises ValueError naming the rule
        return self

    @property
    def variant_specs(self) -> tuple[VariantSpec, ...]:
        """The served variants, champion first (``app.serving.variants``)."""
        return parse_variants(self.variants, self.bundle)

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @model_validator(mode="after")
    def _check_explain_has_a_token(self) -> Settings:
        if self.explain == "admin" and self.admin_token is None:
            raise ValueError("explain=admin needs admin_token (UNICORN_ADMIN_TOKEN)")
        return self

    @model_validator(mode="after")
    def _check_url_fits_headers(self) -> Settings:
        if self.max_url_bytes > self.max_header_bytes:
            raise ValueError(
                f"max_url_bytes ({self.max_url_bytes}) must be <= max_header_bytes "
                f"({self.max_header_bytes}): the request line is part of the head"
            )
        return self

    @model_validator(mode="after")
    def _check_batch_fits_requests(self) -> Settings:
        largest = max(self.max_candidates, self.max_retrieved)
        if self.max_batch_size < largest:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) must be >= the largest request "
                f"(max_candidates / max_retrieved = {largest}) so one request fits one batch"
            )
        return self

    @property
    def cache_backend(self) -> CacheBackend:
        """``redis``, ``memory`` or ``off``: the cache this configuration runs."""
        if not self.cache_enabled:
            return "off"
        return "redis" if self.redis_url else "memory"

    @property
    def log_level_number(self) -> int:
        return int(logging.getLevelName(self.log_level))

    def to_env(self) -> dict[str, str]:
        """The settings as ``UNICORN_*`` variables: how worker processes receive them."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
        return env
