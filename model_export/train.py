"""Training: binary cross-entropy on engagements pooled from every task, Adam.

The loss lives here, not in the model (which returns logits). Deterministic given the
seed: fixed torch/numpy seeds, a fixed thread count, a seeded shuffle.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from app.core.features import INPUT_NAMES
from model_export.dataset import FeaturisedRows
from model_export.model import ModelConfig, UniCoRn


@dataclass(frozen=True)
class TrainConfig:
    # Two passes: the rows are the retriever's candidates (~30 per impression), and more
    # passes overfit the fit window (MovieLens search NDCG@10 0.468 at 2 epochs, 0.459 at 3,
    # 0.446 at 6; synthetic more_like_this 0.098 / 0.077 at 2 / 3; docs/EVALUATION.md).
    epochs: int = 2
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 7
    threads: int = 1  # one thread per process: on a shared 2-core box more threads oversubscribe
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def dense_normalisation(dense: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-feature mean and std over the training rows (std >= 1e-3)."""
    mean = dense.mean(axis=0).astype(np.float64)
    std = np.maximum(dense.std(axis=0).astype(np.float64), 1e-3)
    return mean.tolist(), std.tolist()


def to_tensors(inputs: dict[str, np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in INPUT_NAMES]


def train_model(
    rows: FeaturisedRows, model_config: ModelConfig, config: TrainConfig, desc: str = "train"
) -> tuple[UniCoRn, dict[str, float]]:
    """Train a fresh model on ``rows``; return it (eval mode) and training stats."""
    if len(rows) == 0:
        raise ValueError("cannot train on an empty set of rows")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    mean, std = dense_normalisation(rows.inputs["dense"])
    # A copy: the caller's config stays as given, so it can train another model.
    model = UniCoRn(replace(model_config, dense_mean=mean, dense_std=std))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    tensors = to_tensors(rows.inputs)
    labels = torch.from_numpy(rows.label)
    n = len(rows)
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
    start = time.perf_counter()
    last_loss = float("nan")
    model.train()
    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        desc=desc,
        disable=not config.progress,
        unit="step",
        mininterval=1.0,
    )
    for _ in range(config.epochs):
        perm = torch.from_numpy(rng.permutation(n))
        running, seen = 0.0, 0
        for s in range(steps_per_epoch):
            idx = perm[s * config.batch_size : (s + 1) * config.batch_size]
            logits = model(*(t[idx] for t in tensors))
            loss = loss_fn(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            running += loss.item() * len(idx)
            seen += len(idx)
            bar.update(1)
            if s % 50 == 0:
                bar.set_postfix(loss=f"{running / seen:.4f}")
        last_loss = running / max(seen, 1)
    bar.close()
    model.eval()
    stats = {
        "train_seconds": time.perf_counter() - start,
        "final_loss": last_loss,
        "rows": float(n),
        "parameters": float(sum(p.numel() for p in model.parameters())),
    }
    return model, stats


@torch.no_grad()
def predict(model: UniCoRn, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Probabilities (N,) from PyTorch: the reference for the onnxruntime parity check."""
    model.eval()
    return torch.sigmoid(model(*to_tensors(inputs))).numpy()
