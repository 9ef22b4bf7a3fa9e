"""The UniCoRn ranking model: one network for every task and personalization level.

    x0 = [task | country | cluster | level | source | pooled query tokens | target
          | normalised dense features | adapted user (.) item vector]          # (N, D)
    x_{l+1} = x0 * (U_l (V_l^T x_l) + b_l) + x_l                               # DCN-v2 cross
    h = W_in x_L;  h = h + W_2 relu(W_1 LN(h))  (residual blocks)               # (N, H)
    logit = w^T h + c                                                            # (N,)

Context inputs may have batch 1 (one request, N candidates: the service) or batch N (one
row per candidate: training); they are broadcast to N. The module returns logits only;
the loss lives in ``model_export.train``. ``UniCoRnScorer`` adds the sigmoid for export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from app.core.context import Personalization, Task
from app.core.features import CAT_COL


@dataclass
class ModelConfig:
    n_entities: int  # catalogue size; index n_entities is the null-source token
    n_countries: int  # including the unknown country (row 0)
    n_clusters: int  # including "no cluster" (0)
    n_dense: int
    vec_dim: int
    token_buckets: int
    n_tasks: int = len(Task)
    n_levels: int = len(Personalization)
    emb_dim: int = 16
    n_cross: int = 2
    cross_rank: int = 32  # 0 = full-rank cross weight
    mlp_width: int = 128
    n_res_blocks: int = 2
    dropout: float = 0.0
    # A learned embedding per TARGET id memorises the fit window instead of generalising
    # (the exact-title relevance guard falls: docs/MODEL.md, "Features"). Off by default;
    # the source-entity embedding stays.
    target_id_embedding: bool = False
    dense_mean: list[float] = field(default_factory=list)
    dense_std: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in (
            "n_entities",
            "n_countries",
            "n_clusters",
            "n_dense",
            "vec_dim",
            "token_buckets",
            "n_tasks",
            "n_levels",
            "emb_dim",
            "mlp_width",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_cross", "cross_rank", "n_res_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("dense_mean", "dense_std"):
            values = getattr(self, name)
            if values and len(values) != self.n_dense:
                raise ValueError(
                    f"{name} must have n_dense={self.n_dense} values, got {len(values)}"
                )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class CrossLayer(nn.Module):
    """x_{l+1} = x0 * (W x_l + b) + x_l with W = U V^T when rank > 0. Shapes (N, D)."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        if rank > 0:
            self.proj: nn.Module = nn.Sequential(
                nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim)
            )
        else:
            self.proj = nn.Linear(dim, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.proj(x) + x


class ResidualBlock(nn.Module):
    """h + W2 relu(W1 LN(h)). Shape (N, H)."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.ff = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.ff(self.norm(h))


class UniCoRn(nn.Module):
    dense_mean: torch.Tensor
    dense_std: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        e = config.emb_dim
        self.task_emb = nn.Embedding(config.n_tasks, e)
        self.country_emb = nn.Embedding(config.n_countries, e)
        self.cluster_emb = nn.Embedding(config.n_clusters, e)
        self.level_emb = nn.Embedding(config.n_levels, e)
        # Shared between source and target: "this title" means the same on both sides.
        self.entity_emb = nn.Embedding(config.n_entities + 1, e)
        self.token_emb = nn.Embedding(config.token_buckets, e, padding_idx=0)
        for emb in (self.entity_emb, self.token_emb):
            nn.init.normal_(emb.weight, std=0.01)
        # normal_ overwrote the padding row: zero it again, or every padding slot adds a
        # frozen random vector to the pooled query (padding_idx only stops its gradient).
        with torch.no_grad():
            self.token_emb.weight[0].zero_()
        # Fine-tuning of the pre-trained user-item vectors: start from the identity.
        # No bias: a masked (all-zero) user vector must give a zero interaction, or the
        # item vector would leak item identity into the none/cluster levels.
        self.user_adapter = nn.Linear(config.vec_dim, config.vec_dim, bias=False)
        self.item_adapter = nn.Linear(config.vec_dim, config.vec_dim, bias=False)
        for adapter in (self.user_adapter, self.item_adapter):
            nn.init.eye_(adapter.weight)
        mean = config.dense_mean or [0.0] * config.n_dense
        std = config.dense_std or [1.0] * config.n_dense
        self.register_buffer("dense_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("dense_std", torch.tensor(std, dtype=torch.float32).clamp_min(1e-6))
        dim = (7 if config.target_id_embedding else 6) * e + config.n_dense + 1
        self.cross = nn.ModuleList(
            CrossLayer(dim, config.cross_rank) for _ in range(config.n_cross)
        )
        self.inp = nn.Linear(dim, config.mlp_width)
        self.blocks = nn.Sequential(
            *(ResidualBlock(config.mlp_width, config.dropout) for _ in range(config.n_res_blocks))
        )
        self.head = nn.Sequential(
            nn.LayerNorm(config.mlp_width), nn.ReLU(), nn.Linear(config.mlp_width, 1)
        )

    def forward(
        self,
        ctx_cat: torch.Tensor,  # (B, len(CTX_CAT)) int64
        ctx_source: torch.Tensor,  # (B,) int64
        ctx_tokens: torch.Tensor,  # (B, T) int64
        user_vec: torch.Tensor,  # (B, d) float32
        target: torch.Tensor,  # (N,) int64
        item_vec: torch.Tensor,  # (N, d) float32
        dense: torch.Tensor,  # (N, F) float32
    ) -> torch.Tensor:
        tok = self.token_emb(ctx_tokens)  # (B, T, E)
        n_tok = (ctx_tokens > 0).sum(dim=1, keepdim=True).clamp_min(1).to(tok.dtype)
        ctx = torch.cat(
            [
                self.task_emb(ctx_cat[:, CAT_COL["task"]]),
                self.country_emb(ctx_cat[:, CAT_COL["country"]]),
                self.cluster_emb(ctx_cat[:, CAT_COL["cluster"]]),
                self.level_emb(ctx_cat[:, CAT_COL["level"]]),
                self.entity_emb(ctx_source),
                tok.sum(dim=1) / n_tok,
            ],
            dim=1,
        )  # (B, 6E), computed once per request at serving time
        n = dense.shape[0]
        user = self.user_adapter(user_vec).expand(n, -1)  # (N, d)
        item = self.item_adapter(item_vec)  # (N, d)
        norm_dense = ((dense - self.dense_mean) / self.dense_std).clamp(-10.0, 10.0)
        parts = [ctx.expand(n, -1)]
        if self.config.target_id_embedding:
            parts.append(self.entity_emb(target))
        # Only the bilinear score u^T A_u^T A_i i: feeding the 16-d product u * i itself
        # let the network memorise items and lowered full-level NDCG (docs/EVALUATION.md).
        parts += [norm_dense, (user * item).sum(dim=1, keepdim=True)]
        x0 = torch.cat(parts, dim=1)  # (N, D)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        h = self.blocks(self.inp(x))  # (N, H)
        return self.head(h).squeeze(1)  # (N,)


class UniCoRnScorer(nn.Module):
    """The exported graph: probabilities, shape (N,)."""

    def __init__(self, model: UniCoRn) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        ctx_cat: torch.Tensor,
        ctx_source: torch.Tensor,
        ctx_tokens: torch.Tensor,
        user_vec: torch.Tensor,
        target: torch.Tensor,
        item_vec: torch.Tensor,
        dense: torch.Tensor,
    ) -> torch.Tensor:
        logits = self.model(ctx_cat, ctx_source, ctx_tokens, user_vec, target, item_vec, dense)
        return torch.sigmoid(logits)
