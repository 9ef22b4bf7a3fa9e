"""``GET /catalogue/sample``: queries, videos and page entities drawn from the served
bundle, so that load tests send what members would."""

from __future__ import annotations

import numpy as np

from app.http.schemas import CatalogueSample
from app.serving.model_holder import ServingModel


def sample_catalogue(model: ServingModel, n: int, seed: int = 0) -> CatalogueSample:
    """Up to ``n`` of each, drawn without replacement, in catalogue order."""
    rng = np.random.default_rng(seed)
    catalogue, tables = model.bundle.catalogue, model.bundle.tables

    def draw(values: np.ndarray) -> list[str]:
        if len(values) == 0:
            return []
        picked = rng.choice(len(values), size=min(n, len(values)), replace=False)
        return [str(v) for v in values[np.sort(picked)].tolist()]

    queries = tables.query_keys if len(tables.query_keys) else model.bundle.text.names
    has_links = np.diff(catalogue.link_indptr) > 0
    return CatalogueSample(
        model_version=model.model_version,
        queries=[q for q in draw(queries) if q],
        video_ids=draw(catalogue.entity_id[catalogue.rankable]),
        entity_ids=draw(catalogue.entity_id[~catalogue.rankable & has_links]),
        countries=list(catalogue.country_names),
    )
