"""ONNX export with a parity gate (after timm's onnx utils): eval mode, named inputs and
output, dynamic batch axes (traced with batch >= 2), ``onnx.checker`` full check, then
onnxruntime vs PyTorch on held-out rows; a difference above the tolerance fails the build.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import torch

from app.core.features import CANDIDATE_INPUTS, CONTEXT_INPUTS, INPUT_NAMES
from app.core.scoring import OUTPUT_NAME, OnnxScorer, ScorerOptions
from model_export.model import UniCoRn, UniCoRnScorer
from model_export.train import predict, to_tensors

PARITY_TOLERANCE = 1e-5
OPSET = 17


class ParityError(RuntimeError):
    """onnxruntime and PyTorch disagree beyond the tolerance."""


def export_onnx(model: UniCoRn, example: dict[str, np.ndarray], path: Path) -> None:
    """Write ``model`` (with the sigmoid) to ``path``; ``example`` must have >= 2 rows."""
    if example["target"].shape[0] < 2:
        raise ValueError("example must have at least 2 candidate rows to trace a dynamic axis")
    scorer = UniCoRnScorer(model).eval()
    dynamic = {name: {0: "ctx_batch"} for name in CONTEXT_INPUTS}
    dynamic.update({name: {0: "candidates"} for name in CANDIDATE_INPUTS})
    dynamic[OUTPUT_NAME] = {0: "candidates"}
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            scorer,
            tuple(to_tensors(example)),
            buffer,  # type: ignore[arg-type]  # file-like objects are accepted
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))


def check_parity(
    model: UniCoRn,
    path: Path,
    samples: list[dict[str, np.ndarray]],
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Max |p_onnxruntime - p_torch| over ``samples``; raises ``ParityError`` above tolerance."""
    scorer = OnnxScorer.open(path, ScorerOptions())
    worst = 0.0
    for inputs in samples:
        diff = float(np.max(np.abs(scorer.score(inputs) - predict(model, inputs))))
        worst = max(worst, diff)
    if worst > tolerance:
        raise ParityError(f"onnxruntime differs from PyTorch by {worst:.3g} > {tolerance:g}")
    return worst
