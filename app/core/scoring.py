"""Model scoring with onnxruntime: one session per bundle, options chosen by measurement
(see docs/BENCHMARKS.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# No usage telemetry: with this variable unset when onnxruntime loads, it writes a device
# id and a database under $XDG_CACHE_HOME (~/.cache/Microsoft/DeveloperTools), which
# ``disable_telemetry_events`` alone does not stop. A deployment may still set it itself.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np
import onnxruntime as ort

from app.core.errors import BundleError

OUTPUT_NAME = "probability"

# onnxruntime's own (non-JSON, colour-coded) log lines only for errors: the service's log
# stream stays one JSON object per line.
ort.disable_telemetry_events()
ort.set_default_logger_severity(3)


@dataclass(frozen=True)
class ScorerOptions:
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    allow_spinning: bool = False
    graph_optimization: str = "all"  # disable | basic | extended | all

    def session_options(self) -> ort.SessionOptions:
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if self.graph_optimization not in levels:
            raise ValueError(
                f"graph_optimization must be one of {sorted(levels)}, "
                f"got {self.graph_optimization!r}"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = levels[self.graph_optimization]
        spin = "1" if self.allow_spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        opts.log_severity_level = 3
        return opts


class OnnxScorer:
    """Scores model inputs (a dict of numpy arrays) to probabilities, shape (N,)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]

    @classmethod
    def open(cls, path: Path, options: ScorerOptions) -> OnnxScorer:
        try:
            session = ort.InferenceSession(
                str(path),
                sess_options=options.session_options(),
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BundleError(
                f"{path}: onnxruntime cannot load the model ({exc})", field="bundle"
            ) from exc
        return cls(session)

    def score(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {name: inputs[name] for name in self.input_names}
        (probability,) = self.session.run([OUTPUT_NAME], feeds)
        return np.asarray(probability, dtype=np.float32).reshape(-1)
