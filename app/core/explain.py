"""Why an answer is ordered as it is: ``"explain": true`` on ``POST /rank``
(docs/API.md, "Explain").

For each returned item: the model's named dense inputs (the value fed to the model and
the normalised value it computes from it with the training constants), its retrieval
source, and an occlusion attribution per feature group (``FEATURE_GROUPS``): the score
minus the score with that group's features set to their training mean, the item and the
context otherwise unchanged. Occlusion is exact about what the model does with each
group, interactions included, where a gradient or a linear reading would not be; the
attributions of the groups need not add up to the score, so the answer also gives the
score with every dense feature at its mean (``all_at_mean``). The embeddings (task,
country, cluster, query tokens, source, member and item vectors) are not occluded: what
they contribute is in ``all_at_mean``.

All the occluded rows of an answer go to onnxruntime in one batched call:
``k x (groups + 1)`` candidate rows with the request's context.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.core.features import COL, DENSE_FEATURES, FEATURE_GROUPS

ALL_AT_MEAN = "all_at_mean"
NORM_CLAMP = 10.0  # the model clamps normalised inputs to +-10 (model_export.model)


class Occlusion:
    """The training constants of one bundle's dense features, and the occluded feeds."""

    def __init__(self, mean: list[float] | None, std: list[float] | None) -> None:
        n = len(DENSE_FEATURES)
        if mean is None or std is None or len(mean) != n or len(std) != n:
            raise ValueError(
                f"the bundle's normalisation must hold {n} means and stds (manifest "
                "'normalisation'); explain needs them"
            )
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.groups = {g: [COL[f] for f in names] for g, names in FEATURE_GROUPS.items()}

    def normalised(self, dense: np.ndarray) -> np.ndarray:
        return np.clip((dense - self.mean) / self.std, -NORM_CLAMP, NORM_CLAMP)

    def feeds(self, inputs: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        """The request's inputs restricted to ``rows`` (the returned items), repeated once
        per group with that group's columns at their mean, then once with all of them."""
        variants = [*self.groups.values(), list(range(len(DENSE_FEATURES)))]
        dense = np.repeat(inputs["dense"][rows][None], len(variants), axis=0)
        for v, cols in enumerate(variants):
            dense[v][:, cols] = self.mean[cols]
        feed = dict(inputs)
        feed["dense"] = dense.reshape(-1, dense.shape[-1])
        feed["target"] = np.tile(inputs["target"][rows], len(variants))
        feed["item_vec"] = np.tile(inputs["item_vec"][rows], (len(variants), 1))
        return feed

    def explain(
        self,
        inputs: dict[str, np.ndarray],
        rows: np.ndarray,
        scores: np.ndarray,
        occluded_scores: np.ndarray,
        sources: list[str],
    ) -> list[dict[str, Any]]:
        """One explanation per returned item; ``occluded_scores`` = the model on
        ``feeds(inputs, rows)``; ``scores`` and ``sources`` per returned item."""
        k = len(rows)
        occluded = np.asarray(occluded_scores, dtype=np.float64).reshape(-1, k)
        dense = inputs["dense"][rows]
        norm = self.normalised(dense)
        score = np.asarray(scores, dtype=np.float64)
        out = []
        for i in range(k):
            attribution = {g: score[i] - occluded[v, i] for v, g in enumerate(self.groups)}
            out.append(
                {
                    "retrieval": sources[i],
                    "score": float(score[i]),
                    "attribution": {g: round(float(x), 6) for g, x in attribution.items()},
                    ALL_AT_MEAN: round(float(occluded[len(self.groups), i]), 6),
                    "inputs": {
                        name: {
                            "value": round(float(dense[i, c]), 6),
                            "normalised": round(float(norm[i, c]), 4),
                        }
                        for name, c in COL.items()
                    },
                }
            )
        return out
