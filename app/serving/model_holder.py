"""The served models: load, warm-up, verified swap, reload (admin route or SIGHUP), one
``ModelHolder`` per variant (``Variants``; the split is ``app.serving.variants``).

A request takes ONE ``ServingModel`` snapshot at its start and uses only it, so a reload
(an atomic swap of the snapshot) never yields a mixed-version response. A bundle is
refused (``BundleError``; the running model keeps serving) when it fails verification
(``app.core.bundle``), the warm-up through the whole ranking path, or, with
micro-batching on, the check that batched and single requests score alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from app.core.bundle import Bundle, load_bundle
from app.core.context import Personalization, Task
from app.core.errors import BundleError, Forbidden, ModelUnavailable, NotFound
from app.core.ranking import Ranker, RankQuery
from app.core.scoring import ScorerOptions
from app.serving.batching import MicroBatcher, concatenate_requests
from app.serving.config import Settings
from app.serving.metrics import ServiceMetrics
from app.serving.variants import SHADOW, VariantSplit

logger = logging.getLogger("unicorn.model")


@dataclass(frozen=True)
class ServingModel:
    """One loaded model and everything bound to it; replaced whole on reload."""

    bundle: Bundle
    ranker: Ranker
    batcher: MicroBatcher | None
    variant: str  # the name of the holder that serves it

    @property
    def model_version(self) -> str:
        return self.bundle.model_version


@dataclass(frozen=True)
class Reloaded:
    """What a successful reload swapped in."""

    variant: str
    model_version: str
    previous_model_version: str
    bundle: str
    seconds: float


def warm_ranker(ranker: Ranker) -> None:
    """Rank one request per task and level through the whole path (raises on failure)."""
    catalogue = ranker.bundle.catalogue
    rankable = np.flatnonzero(catalogue.rankable)
    pages = np.flatnonzero(~catalogue.rankable)
    queries: list[RankQuery] = [
        RankQuery(task=Task.PREQUERY.value, personalization=level) for level in Personalization
    ]
    if len(rankable):
        video = str(catalogue.entity_id[rankable[0]])
        queries.append(RankQuery(task=Task.MORE_LIKE_THIS.value, source_entity_id=video))
        names = ranker.bundle.text.names[rankable]
        named = np.flatnonzero(np.strings.str_len(names) > 0)
        if len(named):
            name = str(names[named[0]])
            queries.append(RankQuery(task=Task.SEARCH.value, query=name[:3]))
            queries.append(
                RankQuery(task=Task.SEARCH.value, query=name, candidates=(video, "<no such id>"))
            )
    if len(pages):
        page = str(catalogue.entity_id[pages[0]])
        queries.append(RankQuery(task=Task.ENTITY.value, source_entity_id=page))
    for q in queries:
        result = ranker.rank(q)
        if not all(np.isfinite(item.score) for item in result.items):
            raise BundleError(f"warm-up {q.task} request scored non-finite values", "bundle")


def check_batched_scoring(ranker: Ranker, tolerance: float = 1e-5) -> None:
    """The model must score requests concatenated by the micro-batcher (one context row
    per candidate) exactly as it scores them one by one; refuse the bundle otherwise."""
    queries = [
        RankQuery(task=Task.PREQUERY.value, personalization=Personalization.NONE),
        RankQuery(task=Task.PREQUERY.value, user_id="<warm-up>", k=5),
    ]
    inputs = [ranker.prepare(q).inputs for q in queries]
    separate = np.concatenate([ranker.bundle.scorer.score(i) for i in inputs])
    batched = ranker.bundle.scorer.score(concatenate_requests(inputs))
    if batched.shape != separate.shape or not np.allclose(batched, separate, atol=tolerance):
        raise BundleError(
            f"{ranker.bundle.path}: model.onnx scores micro-batched requests differently from "
            f"single requests; serve it with batch_window_ms=0",
            field="bundle",
        )


def load_serving_model(path: Path, settings: Settings) -> tuple[Bundle, Ranker]:
    """Verify, load and warm a bundle (blocking: run it in a worker thread)."""
    options = ScorerOptions(
        intra_op_threads=settings.ort_intra_op_threads,
        inter_op_threads=settings.ort_inter_op_threads,
    )
    try:
        bundle = load_bundle(path, options)
        ranker = Ranker(bundle, max_retrieved=settings.max_retrieved)
        warm_ranker(ranker)
        if settings.batch_window_ms > 0:
            check_batched_scoring(ranker)
    except BundleError:
        raise
    except Exception as exc:  # a bundle that breaks the code path is a refused bundle
        raise BundleError(
            f"{path}: bundle failed warm-up ({type(exc).__name__}: {exc})", field="bundle"
        ) from exc
    return bundle, ranker


def check_reloadable(settings: Settings, configured: Path, target: Path) -> None:
    """A reload may only name a bundle inside the reload root (default: the directory of
    the ``configured`` bundle): the admin route must not read, or tell the existence of,
    directories elsewhere on the host."""
    root = (settings.reload_root or configured.parent).resolve()
    if not target.resolve().is_relative_to(root):
        raise Forbidden(
            "bundle must be a directory inside the reload root (UNICORN_RELOAD_ROOT; "
            "unset: the directory of the configured bundle)",
            field="bundle",
        )


def freeze_heap() -> None:
    """Collect, then move every object alive now (imports, the app, the loaded bundle) out
    of the cyclic collector's generations (``gc.freeze``). A full collection otherwise
    walks all of them, ~80,000 objects on the demo bundle: 60-130 ms during which the loop
    answers nothing, the longest stalls seen under load. Called once serving can start
    and after each reload; ``gc.unfreeze`` at shutdown hands them back."""
    gc.collect()
    gc.freeze()


class ModelHolder:
    """Holds one variant's current ``ServingModel``, loaded from its ``bundle`` path."""

    def __init__(
        self, settings: Settings, metrics: ServiceMetrics, name: str, bundle: Path
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.name = name
        self.bundle = bundle
        self.model: ServingModel | None = None
        self._reload_lock = asyncio.Lock()

    def current(self) -> ServingModel:
        """The snapshot a request uses from its start to its end."""
        model = self.model
        if model is None:
            raise ModelUnavailable("no model is loaded yet", field=None)
        return model

    async def start(self) -> None:
        """Load the configured bundle (raises ``BundleError``)."""
        bundle, ranker = await asyncio.to_thread(load_serving_model, self.bundle, self.settings)
        self._install(bundle, ranker)
        logger.info("%s: serving model %s from %s", self.name, bundle.model_version, bundle.path)

    async def close(self) -> None:
        if self.model is not None and self.model.batcher is not None:
            await self.model.batcher.close()

    def _install(self, bundle: Bundle, ranker: Ranker) -> ServingModel | None:
        """Atomically swap in a new snapshot; returns the previous one."""
        batcher = None
        if self.settings.batch_window_ms > 0:
            batcher = MicroBatcher(
                bundle.scorer.score,
                window_s=self.settings.batch_window_ms / 1000.0,
                max_rows=self.settings.max_batch_size,
                on_batch=self._observe_batch,
            )
        previous = self.model
        self.model = ServingModel(bundle, ranker, batcher, self.name)
        self.metrics.set_model(
            self.name, bundle.model_version, previous.model_version if previous else None
        )
        return previous

    def _observe_batch(self, rows: int, _seconds: float) -> None:
        self.metrics.inference_batch_size.observe(rows)

    async def reload(self, path: Path | None = None) -> Reloaded:
        """Load, verify and warm a bundle in a worker thread, then swap it in atomically.

        A refused bundle raises ``BundleError`` (409) and the running model keeps serving;
        a ``path`` outside the reload root raises ``Forbidden`` (403) before anything is read.
        """
        target = Path(path) if path is not None else self.bundle
        if path is not None:
            check_reloadable(self.settings, self.bundle, target)
        async with self._reload_lock:
            started = time.perf_counter()
            try:
                bundle, ranker = await asyncio.to_thread(load_serving_model, target, self.settings)
            except BundleError as exc:
                self.metrics.model_reloads.labels("refused").inc()
                logger.error("%s: model reload from %s refused: %s", self.name, target, exc.message)
                raise
            previous = self._install(bundle, ranker)
            self.metrics.model_reloads.labels("ok").inc()
            if previous is not None and previous.batcher is not None:
                await previous.batcher.close()  # requests it holds finish on the old model
            old_version = previous.model_version if previous else ""
            del previous  # the old bundle is freed by reference counting (no cycles)
            freeze_heap()  # the new bundle's objects too
            logger.warning(
                "%s: model reloaded: %s -> %s from %s",
                self.name, old_version, bundle.model_version, target,
            )  # fmt: skip
            return Reloaded(
                variant=self.name,
                model_version=bundle.model_version,
                previous_model_version=old_version,
                bundle=str(target),
                seconds=round(time.perf_counter() - started, 3),
            )


class Reloadable(Protocol):
    """What ``POST /admin/reload`` and SIGHUP reload: a variant's holder, or the shadow
    (``app.serving.shadow.Shadow``, in its own process)."""

    name: str

    async def reload(self, path: Path | None = None) -> Reloaded: ...


class Variants:
    """The served variants' holders and the split between them; the shadow, when the app
    has one, is reloaded with them."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        specs = settings.variant_specs
        self.split = VariantSplit(specs, settings.variant_salt)
        self.holders = {s.name: ModelHolder(settings, metrics, s.name, s.bundle) for s in specs}
        self.shadow: Reloadable | None = None  # set by the app once its shadow runs
        self._sighup_installed = False
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def names(self) -> tuple[str, ...]:
        return self.split.names

    @property
    def champion(self) -> str:
        """The first variant: requests without a user id, ``/catalogue/sample``."""
        return self.names[0]

    def __iter__(self) -> Iterator[ModelHolder]:
        yield from self.holders.values()

    def reloadables(self) -> list[Reloadable]:
        return [*self.holders.values(), *([self.shadow] if self.shadow is not None else [])]

    def choose(self, user_id: str | None, asked: str | None = None) -> ServingModel:
        """The ``ServingModel`` snapshot that answers: the variant asked for (already
        validated against ``names``), else the member's."""
        return self.holders[asked or self.split.assign(user_id)].current()

    def holder(self, name: str | None) -> Reloadable:
        """What a reload names (``None``: the champion); 404 for an unknown name."""
        if name is None:
            return self.holders[self.champion]
        if name == SHADOW and self.shadow is not None:
            return self.shadow
        if name not in self.holders:
            served = ", ".join(r.name for r in self.reloadables())
            raise NotFound(f"variant must be one of {served}; got {name!r}", field="variant")
        return self.holders[name]

    async def start(self) -> None:
        """Load every variant (a refused one raises ``BundleError``: the process must not
        serve)."""
        for holder in self.holders.values():
            await holder.start()
        self._install_sighup()

    async def close(self) -> None:
        self._remove_sighup()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for holder in self:
            await holder.close()

    def _install_sighup(self) -> None:
        """SIGHUP reloads each configured bundle, the shadow's too (single-process serving;
        with several workers uvicorn's supervisor restarts them on SIGHUP, which reloads)."""
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        except (NotImplementedError, RuntimeError, ValueError):
            return
        self._sighup_installed = True

    def _remove_sighup(self) -> None:
        if self._sighup_installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup_installed = False

    def _on_sighup(self) -> None:
        logger.warning("SIGHUP: reloading %s", ", ".join(r.name for r in self.reloadables()))
        task = asyncio.get_running_loop().create_task(self._reload_all())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload_all(self) -> None:
        # A refused bundle is logged and counted by reload(); the old model keeps serving.
        for target in self.reloadables():
            with contextlib.suppress(BundleError):
                await target.reload(None)
