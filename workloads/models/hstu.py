"""The HSTU-layer variant of LiGR: LiGR with its transformer layers replaced by HSTU layers (LiGR 5.1).

HSTU (Zhai et al. 2024, "Actions Speak Louder than Words", eqs. 1-3), one layer:

    U, V, Q, K = Split(SiLU(f1(LN(X))))
    A(X) V(X)  = SiLU(Q K^T + rab) V(X) / n        pointwise aggregated attention: no softmax
                                                    (rab: ``ligr.RelativeBucketBias``, T5-style buckets)
    Y          = X + f2(Norm(A(X) V(X)) * U(X))    U gates the attention output; there is no MLP

Everything else (tokens, historical and set-wise masks, heads, losses, single-pass scoring) is LiGR's,
imported, so the comparison varies only the layer. SiLU attention cannot use FlashAttention or
FlexAttention's softmax kernels, so it always runs on the dense mask (appendix A.1 names this as the
reason LiGR scaled further).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from workloads.models.config import HSTUConfig
from workloads.models.ligr import AttentionMask, GenerativeRanker, RelativeBucketBias


class HSTULayer(nn.Module):
    def __init__(
        self, d_model: int, n_heads: int, dropout: float, bias: RelativeBucketBias | None, attn_len: int
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        # HSTU divides by the padded sequence length n; a fixed n keeps a candidate's score independent
        # of how many other candidates share its pass (single-pass == per-candidate scoring)
        self.attn_len = attn_len
        self.input_norm = nn.LayerNorm(d_model)
        self.uvqk_proj = nn.Linear(d_model, 4 * d_model)
        self.rel_bias = bias
        self.attn_norm = nn.LayerNorm(d_model)
        self.o_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, mask: AttentionMask) -> Tensor:  # h: (B, L, D)
        B, L, D = h.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, nh, L, hd)

        u, v, q, k = F.silu(self.uvqk_proj(self.input_norm(h))).chunk(4, dim=-1)
        scores = heads(q) @ heads(k).transpose(-2, -1)  # (B, nh, L, L)
        if self.rel_bias is not None:
            scores = scores + self.rel_bias(mask.position)
        weights = F.silu(scores) * mask.dense()[:, None] / self.attn_len
        y = (weights @ heads(v)).transpose(1, 2).reshape(B, L, D)
        return h + self.dropout(self.o_proj(self.attn_norm(y) * u))


class HSTUForRanking(GenerativeRanker):
    """LiGR's generative ranker with HSTU layers in place of gated transformer blocks."""

    cfg: HSTUConfig

    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__(cfg)

    def make_block(self, setwise: bool) -> nn.Module:
        cfg = self.cfg
        # rab over event distance in the history, over slot distance in the set-wise layers (as LiGR's)
        use_bias = cfg.setwise_slot_bias if setwise else cfg.relative_bias
        bias = RelativeBucketBias(cfg.n_heads, cfg.n_bias_buckets) if use_bias else None
        return HSTULayer(cfg.d_model, cfg.n_heads, cfg.dropout, bias, attn_len=2 * cfg.max_history + 1)
