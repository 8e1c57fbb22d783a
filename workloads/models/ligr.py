"""LiGR, LinkedIn's generative ranker, all of it in this one file.

Follows "From Features to Transformers: Redefining Ranking for Scalable Impact" (Borisyuk et al.,
2025; ``shared/papers/ligr.md``), section by section, top to bottom:

- tokens (3.2): each history event is one item token (a few feature embeddings, concatenated and
  projected) followed by its action token (the multi-hot outcome, embedded, added to the item's
  token), HSTU's action interleaving; the candidates of the target session follow the history;
- historical attention (3.2, 4.0.2): an item reads only earlier sessions, so it never sees its own
  outcome or its session neighbours, and candidates never see each other: scoring all candidates of
  a request in one pass equals scoring each alone, and the history is encoded once for all of them;
- gated pre-norm blocks (3.2, Fig. 3, A.1): ``h <- h + F(LN(h)) * sigmoid(h W)`` for attention and MLP;
- set-wise in-session attention (3.2, 4.0.2): separate layers where the candidates of one session
  attend to each other; their output is an additive correction, so serving can apply it to the top
  10 only;
- multi-task heads and losses (3.1-3.2): click, contribution, long dwell; BCE per task plus the
  listwise Attention Rank loss per session;
- retrieval (3.4): a member tower over the history and a shared item tower, ``LiGRRetrieval``.

Attention is written once as a mask predicate (FlexAttention's ``mask_mod``) over per-token session
ids and run by a kernel chosen by name, Hugging Face style: ``eager`` (plain PyTorch, the reference),
``sdpa`` (dense boolean mask) or ``flex`` (FlexAttention block mask).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from workloads.data.schema import COUNTER_FEATURES, N_AGE_BUCKETS, TASKS, PostType
from workloads.models.base import (
    NextItemModel,
    RankingModel,
    RankingOutput,
    bce_per_task,
    counter_inputs,
    next_item_softmax_loss,
    ranking_loss,
)
from workloads.models.batch import N_ACTIONS, RankingBatch, SequenceBatch, task_labels_from_multi_hot
from workloads.models.config import LiGRConfig, LiGRRetrievalConfig, SequenceRankerConfig

# --- Embeddings -------------------------------------------------------------------------------------

_HASH_MULTIPLIER = 0x9E3779B1  # Fibonacci hashing: spreads consecutive ids over the table


def hash_ids(ids: Tensor, size: int, salt: int = 0) -> Tensor:
    return torch.remainder(ids * _HASH_MULTIPLIER + salt, size)


class HashedEmbedding(nn.Module):
    """Collision-based embedding: raw ids hash into a fixed table (5.1: 33M rows for 150M post ids).

    Appendix A.1 found no AUC difference between 33M and 66M rows, so the table size is a knob
    traded against memory, not a vocabulary to keep in sync with the catalog.
    """

    def __init__(self, size: int, dim: int, salt: int = 0) -> None:
        super().__init__()
        self.size, self.salt = size, salt
        self.table = nn.Embedding(size, dim)

    def forward(self, ids: Tensor) -> Tensor:
        return self.table(hash_ids(ids, self.size, self.salt))

    def init_near_zero(self) -> None:
        """DLRM / TorchRec's table init, U(+-1/sqrt(rows)): a row no training example reaches stays ~0."""
        bound = self.size**-0.5
        nn.init.uniform_(self.table.weight, -bound, bound)


class SemanticIdEmbedding(nn.Module):
    """Prefix n-grams of an item's 3 RQ-VAE codes (5.1): unigram, bigram, hashed trigram, concat-pooled.

    Items without semantic ids (code -1) share one learned "unknown" row per n-gram table.
    """

    def __init__(self, codebook_size: int, dim: int, trigram_size: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.unigram = nn.Embedding(codebook_size + 1, dim)
        self.bigram = nn.Embedding(codebook_size**2 + 1, dim)
        self.trigram = HashedEmbedding(trigram_size, dim, salt=3)

    def forward(self, codes: Tensor) -> Tensor:  # codes: (..., 3)
        if codes.shape[-1] != 3:
            raise ValueError(f"semantic ids: expected 3 levels per item, got {codes.shape[-1]}")
        K = self.codebook_size
        known = (codes >= 0).all(dim=-1)
        c1, c2, c3 = codes.clamp(min=0).unbind(dim=-1)
        unigram = torch.where(known, c1, K)
        bigram = torch.where(known, c1 * K + c2, K * K)
        trigram = torch.where(known, (c1 * K + c2) * K + c3, -1)
        return torch.cat([self.unigram(unigram), self.bigram(bigram), self.trigram(trigram)], dim=-1)


class ItemTokenizer(nn.Module):
    """One token per item: its enabled feature embeddings, concatenated and projected to d_model (3.2)."""

    def __init__(self, cfg: SequenceRankerConfig) -> None:
        super().__init__()
        features = cfg.use_features
        tables: dict[str, nn.Module] = {}
        if "item_id" in features:
            tables["item_id"] = HashedEmbedding(cfg.item_hash_size, cfg.id_dim, salt=1)
        if "actor_id" in features:
            tables["actor_id"] = HashedEmbedding(cfg.actor_hash_size, cfg.id_dim, salt=2)
        if "post_type" in features:
            tables["post_type"] = nn.Embedding(len(PostType), cfg.id_dim)
        if "age_bucket" in features:
            tables["age_bucket"] = nn.Embedding(N_AGE_BUCKETS, cfg.id_dim)
        if "content" in features:
            tables["content"] = nn.Linear(cfg.content_dim, cfg.id_dim)
        width = cfg.id_dim * len(tables)
        if cfg.use_semantic_ids:
            tables["semantic_ids"] = SemanticIdEmbedding(
                cfg.sid_codebook_size, cfg.sid_dim, cfg.sid_trigram_hash_size
            )
            width += 3 * cfg.sid_dim
        self.features = nn.ModuleDict(tables)
        self.proj = nn.Linear(width, cfg.d_model)

    def forward(self, inputs: Mapping[str, Tensor | None]) -> Tensor:  # -> (..., D)
        parts = []
        for name, embed in self.features.items():
            value = inputs[name]
            if value is None:
                raise ValueError(
                    f"batch has no {name!r} but the model uses it (collate with a SemanticIdTable)"
                )
            parts.append(embed(value))
        return self.proj(torch.cat(parts, dim=-1))


def history_features(batch: RankingBatch) -> dict[str, Tensor | None]:
    return {
        "item_id": batch.hist_item_id,
        "actor_id": batch.hist_actor_id,
        "post_type": batch.hist_post_type,
        "age_bucket": batch.hist_age_bucket,
        "content": batch.hist_content,
        "semantic_ids": batch.hist_semantic_ids,
    }


def candidate_features(batch: RankingBatch) -> dict[str, Tensor | None]:
    return {
        "item_id": batch.cand_item_id,
        "actor_id": batch.cand_actor_id,
        "post_type": batch.cand_post_type,
        "age_bucket": batch.cand_age_bucket,
        "content": batch.cand_content,
        "semantic_ids": batch.cand_semantic_ids,
    }


# --- Attention masks from session ids ------------------------------------------------------------------

MATCH_GAIN_SCALE = 10.0  # the match gain learns at 10x the dense learning rate (Adam steps ~ lr)
# set-wise actor match starts at +10 logits for a candidate of the same actor within two slots (the rule
# set-wise attention replaced: "a minimum gap of two items between posts by the same actor", 3.2) and 0
# farther away, so a near repeat takes the attention from the sink at the first step; from the history's
# +1 the readout and the gain would both have to grow from near zero
SETWISE_MATCH_GAIN_INIT = 1.0
SETWISE_MATCH_NEAR = (-2, -1, 1, 2)  # slot distances that start with the gain
SINK_SLOT = -(10**6)  # the set-wise sink token's slot: farther from every candidate than any other
ITEM, ACTION, CANDIDATE = 0, 1, 2  # token kinds
TARGET_SESSION = 1 << 40  # the candidates' session: later than every history session

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (batch, head, query, key) -> may attend


@dataclass
class TokenLayout:
    """Per-token facts the masks are built from; every tensor is (B, L)."""

    session: Tensor  # session ordinal, TARGET_SESSION for candidates
    kind: Tensor  # ITEM, ACTION or CANDIDATE
    valid: Tensor  # False at padding
    # history: events between the token and the target session (1 = latest event, 0 = the target);
    # a candidate set: the slot each candidate is shown in
    position: Tensor

    def historical(self) -> MaskMod:
        """Items read earlier sessions only (plus themselves); actions also read their own session so far.

        Only tokens of later sessions read an action token, so no item ever sees an outcome of its
        own session, and candidates (all in the target session) never see each other. Padding reads
        only itself, which keeps every softmax row finite.
        """
        session, kind, valid = self.session, self.kind, self.valid

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            earlier = session[b, k] < session[b, q]
            own_session_so_far = (kind[b, q] == ACTION) & (session[b, k] == session[b, q]) & (k <= q)
            return (q == k) | (valid[b, q] & valid[b, k] & (earlier | own_session_so_far))

        return mask_mod

    def in_session(self) -> MaskMod:
        """Set-wise attention: tokens of one session read each other (SetRank-style, 3.2)."""
        session, valid = self.session, self.valid

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            return (q == k) | (valid[b, q] & valid[b, k] & (session[b, k] == session[b, q]))

        return mask_mod

    def alone(self) -> MaskMod:
        """The set-wise ablation (``setwise_context="self"``): every token reads only itself."""

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            return q == k

        return mask_mod

    @classmethod
    def interleaved(cls, hist_session: Tensor, hist_mask: Tensor, cand_mask: Tensor) -> TokenLayout:
        """item_0, action_0, item_1, action_1, ..., then the candidates (S may be 0)."""
        B, H = hist_mask.shape
        S = cand_mask.shape[1]
        device = hist_mask.device
        recency = (hist_mask.sum(dim=1, keepdim=True) - torch.arange(H, device=device)).clamp(min=0)  # (B, H)
        kinds = torch.tensor([ITEM, ACTION], device=device).repeat(H).expand(B, 2 * H)
        return cls(
            session=torch.cat(
                [hist_session.repeat_interleave(2, dim=1), torch.full((B, S), TARGET_SESSION, device=device)],
                dim=1,
            ),
            kind=torch.cat([kinds, torch.full((B, S), CANDIDATE, device=device)], dim=1),
            valid=torch.cat([hist_mask.repeat_interleave(2, dim=1), cand_mask], dim=1),
            position=torch.cat(
                [recency.repeat_interleave(2, dim=1), torch.zeros((B, S), dtype=torch.long, device=device)],
                dim=1,
            ),
        )

    @classmethod
    def one_session(cls, valid: Tensor, slots: Tensor | None = None) -> TokenLayout:
        """Tokens that all belong to one session: a request's candidates (shown in ``slots``, by default
        in the order given) or an item's feature tokens."""
        zeros = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
        if slots is None:
            slots = torch.arange(valid.shape[1], device=valid.device).expand(valid.shape)
        return cls(session=zeros, kind=torch.full_like(zeros, CANDIDATE), valid=valid, position=slots)


class AttentionMask:
    """One mask predicate, materialized on demand for the kernel in use (and cached across layers)."""

    def __init__(self, mask_mod: MaskMod, layout: TokenLayout) -> None:
        self.mask_mod = mask_mod
        self.position = layout.position  # (B, L), for relative position biases
        self.batch, self.length = layout.valid.shape
        self.device = layout.valid.device
        self._dense: Tensor | None = None
        self._block: BlockMask | None = None
        self.match_keys: Tensor | None = None  # (B, L, E) unit vectors; see MultiHeadAttention.match_gain
        self.match_cosine: Tensor | None = None  # (B, L, L), the set-wise form; see MultiHeadAttention.bias

    def dense(self) -> Tensor:  # (B, L, L) bool
        if self._dense is None:
            b = torch.arange(self.batch, device=self.device)[:, None, None]
            q = torch.arange(self.length, device=self.device)[None, :, None]
            k = torch.arange(self.length, device=self.device)[None, None, :]
            head = torch.zeros((), dtype=torch.long, device=self.device)
            self._dense = self.mask_mod(b, head, q, k).expand(self.batch, self.length, self.length)
        return self._dense

    def block_mask(self) -> BlockMask:
        if self._block is None:
            self._block = create_block_mask(
                self.mask_mod, self.batch, None, self.length, self.length, device=str(self.device)
            )
        return self._block


def relative_buckets(distance: Tensor, n_buckets: int, max_distance: int = 128) -> Tensor:
    """T5-style buckets of a signed distance: exact near 0, log-spaced up to ``max_distance``, and
    separate halves for keys before and after the query."""
    half = n_buckets // 2
    exact = max(half // 2, 1)
    magnitude = distance.abs()
    log_scale = torch.log(magnitude.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + log_scale * (half - exact)).long().clamp(max=half - 1)
    return (distance > 0).long() * half + torch.where(magnitude < exact, magnitude, far)


class RelativeBucketBias(nn.Module):
    """A learned per-head attention bias by bucketed relative position (HSTU's rab; LiGR's set-wise slots)."""

    def __init__(self, n_heads: int, n_buckets: int) -> None:
        super().__init__()
        self.n_buckets = n_buckets
        self.bias = nn.Parameter(torch.zeros(n_heads, n_buckets))

    def forward(self, position: Tensor) -> Tensor:  # position: (B, L) -> (B, nh, L, L)
        bucket = relative_buckets(position[:, None, :] - position[:, :, None], self.n_buckets)  # (B, L, L)
        # an embedding lookup rather than ``bias[:, bucket]``: on a GPU the backward of that indexing adds
        # B*L*L gradients into nh*n_buckets cells one atomic add at a time; embedding's backward sorts
        return F.embedding(bucket, self.bias.t()).permute(0, 3, 1, 2)  # (B, L, L, nh) -> (B, nh, L, L)


def near_slot_match(n_heads: int, n_buckets: int) -> RelativeBucketBias:
    """Set-wise actor match gains by slot distance: ``SETWISE_MATCH_GAIN_INIT`` within two slots, else 0."""
    gains = RelativeBucketBias(n_heads, n_buckets)
    with torch.no_grad():
        gains.bias[:, relative_buckets(torch.tensor(SETWISE_MATCH_NEAR), n_buckets)] = SETWISE_MATCH_GAIN_INIT
    return gains


# --- Attention kernels, chosen by name --------------------------------------------------------------

# q, k, v: (B, nh, L, hd); bias: None or (B, nh, L, L) added to the scores before the softmax
AttentionFn = Callable[[Tensor, Tensor, Tensor, AttentionMask, Tensor | None], Tensor]


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, bias: Tensor | None) -> Tensor:
    """The reference: softmax(q k^T / sqrt(d) + bias + mask) v in plain PyTorch."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, nh, L, L)
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~mask.dense()[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, bias: Tensor | None) -> Tensor:
    allowed = mask.dense()[:, None]  # (B, 1, L, L)
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~allowed, float("-inf")))


@cache
def _compiled_flex_attention() -> Callable[..., Any]:
    # FlexAttention is only fused (FlashAttention-like memory) when compiled; shapes that vary from
    # batch to batch make it recompile once with dynamic shapes (collate(pad_to_limits=True) avoids that)
    return cast(Callable[..., Any], torch.compile(flex_attention))


FLEX_MIN_HEAD_DIM = 16  # the compiled Triton kernels refuse smaller query/key/value head dims
# Smaller backward tiles for half-precision head dims >= 128: on an H100 the default backward tiles
# needed 236,544 bytes of shared memory (limit 232,448) and compiling the backward pass failed.
FLEX_LARGE_HEAD_BACKWARD = {"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}


def flex_kernel_options(q: Tensor) -> dict[str, int] | None:
    large_half = q.shape[-1] >= 128 and q.dtype in (torch.bfloat16, torch.float16)
    return FLEX_LARGE_HEAD_BACKWARD if large_half and q.requires_grad else None


def flex_attention_kernel(
    q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, bias: Tensor | None
) -> Tensor:
    """FlexAttention over the block mask: compiled on GPU; on CPU unfused, and for inference only."""
    if not q.is_cuda and q.requires_grad:
        # torch 2.13's CPU FlexAttention has no backward pass: train on CPU with the dense mask
        return sdpa_attention(q, k, v, mask, bias)
    if q.is_cuda and q.shape[-1] < FLEX_MIN_HEAD_DIM:
        return sdpa_attention(q, k, v, mask, bias)  # tiny heads (test-sized models): the dense kernel
    score_mod = None
    if bias is not None:
        bias_table = bias

        def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return score + bias_table[b, h, q_idx, kv_idx]

    if q.is_cuda:
        flex = _compiled_flex_attention()
        options = flex_kernel_options(q)
        return cast(
            Tensor, flex(q, k, v, score_mod=score_mod, block_mask=mask.block_mask(), kernel_options=options)
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return cast(Tensor, flex_attention(q, k, v, score_mod=score_mod, block_mask=mask.block_mask()))


ATTENTION_FUNCTIONS: dict[str, AttentionFn] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flex": flex_attention_kernel,
}


def attention_function(impl: str, device: torch.device) -> AttentionFn:
    if impl == "auto":
        impl = "flex" if device.type == "cuda" else "sdpa"
    return ATTENTION_FUNCTIONS[impl]


# --- The gated transformer block ------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        attn_impl: str,
        rel_bias: RelativeBucketBias | None = None,
        match: bool = False,
        slot_match: RelativeBucketBias | None = None,
    ) -> None:
        super().__init__()
        self.n_heads, self.attn_impl = n_heads, attn_impl
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model)
        self.rel_bias = rel_bias
        # per head, the logit bonus (x MATCH_GAIN_SCALE) for a key whose match key equals the query's
        self.match_gain = nn.Parameter(torch.full((n_heads,), 0.1)) if match else None
        # set-wise: the same bonus per unit of actor cosine, per head and slot distance (near_slot_match)
        self.slot_match = slot_match

    def with_match(self, q: Tensor, k: Tensor, mask: AttentionMask) -> tuple[Tensor, Tensor]:
        """Append the match keys to q and k so that q k^T / sqrt(d) gains gain_h * <m_q, m_k>."""
        if self.match_gain is None or mask.match_keys is None:
            return q, k
        hd, m = q.shape[-1], mask.match_keys[:, None]  # (B, 1, L, E)
        widened = math.sqrt((hd + m.shape[-1]) / hd)  # keeps the q k^T / sqrt(hd) term as it was
        gain = (MATCH_GAIN_SCALE * self.match_gain)[None, :, None, None] * math.sqrt(hd + m.shape[-1])
        q = torch.cat([q * widened, gain * m.expand(-1, self.n_heads, -1, -1)], dim=-1)
        k = torch.cat([k, m.expand(-1, self.n_heads, -1, -1)], dim=-1)
        return q, k

    def bias(self, mask: AttentionMask) -> Tensor | None:
        """(B, nh, L, L) added to the scores: the slot-distance bias, and gain_h * cos(actor_q, actor_k)
        by slot distance where the mask carries pairwise actor cosines (set-wise: short sets, a dense
        bias is cheap)."""
        bias = None if self.rel_bias is None else self.rel_bias(mask.position)
        if self.slot_match is not None and mask.match_cosine is not None:
            match = MATCH_GAIN_SCALE * self.slot_match(mask.position) * mask.match_cosine[:, None]
            bias = match if bias is None else bias + match
        return bias

    def heads(self, t: Tensor) -> Tensor:  # (B, L, D) -> (B, nh, L, hd)
        B, L, D = t.shape
        return t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2)

    def forward(self, x: Tensor, mask: AttentionMask) -> Tensor:  # x: (B, L, D)
        q, k, v = self.heads(self.q_proj(x)), self.heads(self.k_proj(x)), self.heads(self.v_proj(x))
        q, k = self.with_match(q, k, mask)
        y = attention_function(self.attn_impl, x.device)(q, k, v, mask, self.bias(mask))  # (B, nh, L, hd)
        return self.o_proj(y.transpose(1, 2).reshape(x.shape))

    def weights(self, x: Tensor, mask: AttentionMask) -> Tensor:
        """The softmax each token reads its keys with, (B, nh, L, L): for analysis (the kernels never
        materialize it). ``o_proj(weights @ v)`` is ``forward``'s output."""
        q, k = self.with_match(self.heads(self.q_proj(x)), self.heads(self.k_proj(x)), mask)
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        bias = self.bias(mask)
        if bias is not None:
            scores = scores + bias
        return torch.softmax(scores.masked_fill(~mask.dense()[:, None], float("-inf")), dim=-1)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, mult: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d_model, mult * d_model)
        self.down_proj = nn.Linear(mult * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class GatedBlock(nn.Module):
    """Pre-norm block whose sublayer outputs, not the skips, are gated (3.2, Fig. 3, appendix A.1).

    The gate reads the un-normalized residual stream: sigmoid(h W), as in the paper's equation.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        ffn_mult: int,
        dropout: float,
        attn_impl: str,
        rel_bias: RelativeBucketBias | None = None,
        match: bool = False,
        slot_match: RelativeBucketBias | None = None,
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, attn_impl, rel_bias, match, slot_match)
        self.attn_gate = nn.Linear(d_model, d_model, bias=False)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_mult)
        self.ffn_gate = nn.Linear(d_model, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, mask: AttentionMask) -> Tensor:  # h: (B, L, D)
        # h_{j+1} = h_j + F(LN(h_j)) * sigmoid(h_j W)
        h = h + self.dropout(self.attn(self.attn_norm(h), mask)) * torch.sigmoid(self.attn_gate(h))
        h = h + self.dropout(self.ffn(self.ffn_norm(h))) * torch.sigmoid(self.ffn_gate(h))
        return h


# --- Backbone, heads, ranker ------------------------------------------------------------------------------


class LiGRModel(nn.Module):
    """Interleaved history tokens + candidate tokens -> hidden states under historical attention."""

    counter_index: Tensor

    def __init__(self, cfg: SequenceRankerConfig, make_block: Callable[[bool], nn.Module]) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = ItemTokenizer(cfg)
        index = [COUNTER_FEATURES.index(c) for c in cfg.candidate_counters]
        self.register_buffer("counter_index", torch.tensor(index, dtype=torch.long), persistent=False)
        self.counters = nn.Linear(len(index), cfg.d_model) if index else None
        self.actions = nn.Linear(N_ACTIONS, cfg.d_model)
        # learned positions by recency (A.1 found them as good as a relative bias); 0 = target session
        self.position = nn.Embedding(cfg.max_history + 1, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(make_block(False) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, batch: RankingBatch) -> tuple[Tensor, Tensor]:
        """(item-token states (B, H, D), candidate states (B, S, D))."""
        H, S = batch.hist_item_id.shape[1], batch.cand_item_id.shape[1]
        if self.cfg.max_history < H or self.cfg.max_candidates < S:
            raise ValueError(
                f"batch has {H} history events and {S} candidates; the model was built for "
                f"max_history={self.cfg.max_history}, max_candidates={self.cfg.max_candidates}"
            )
        layout = TokenLayout.interleaved(batch.hist_session, batch.hist_mask, batch.cand_mask)
        position = self.position(layout.position[:, 0 : 2 * H : 2])  # (B, H, D)
        item_tokens = self.items(history_features(batch)) + position
        # the outcome token carries its item too, so later sessions read (item, outcome) pairs directly;
        # with the action embedding alone, tiny worlds never learned member-actor affinity (docs/models.md)
        action_tokens = item_tokens + self.actions(batch.hist_actions)
        history = torch.stack([item_tokens, action_tokens], dim=2).flatten(1, 2)  # (B, 2H, D)
        candidates = self.items(candidate_features(batch)) + self.position(layout.position[:, 2 * H :])
        if self.counters is not None:
            counters = batch.cand_counters[..., self.counter_index]
            candidates = candidates + self.counters(
                counter_inputs(counters, self.cfg.candidate_counters, self.cfg.counter_scale)
            )
        x = self.dropout(torch.cat([history, candidates], dim=1))  # (B, 2H + S, D)
        mask = AttentionMask(layout.historical(), layout)
        if self.cfg.actor_match:
            actors = torch.cat([batch.hist_actor_id.repeat_interleave(2, dim=1), batch.cand_actor_id], dim=1)
            mask.match_keys = F.normalize(self.items.features["actor_id"](actors), dim=-1)
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        # outputs at action positions are not used (3.2): they only serve as keys for later sessions
        return x[:, 0 : 2 * H : 2], x[:, 2 * H :]


class TaskHeads(nn.Module):
    """One small MLP per task; each action is its own task (5.1)."""

    def __init__(self, d_model: int, tasks: list[str] = TASKS) -> None:
        super().__init__()
        self.hidden = nn.ModuleDict({task: nn.Linear(d_model, d_model) for task in tasks})
        self.out = nn.ModuleDict({task: nn.Linear(d_model, 1) for task in tasks})

    def forward(self, x: Tensor) -> Tensor:  # (..., D) -> (..., T)
        return torch.cat([self.out[task](F.silu(hidden(x))) for task, hidden in self.hidden.items()], dim=-1)


def init_weights(module: nn.Module) -> None:
    """Scale-preserving init at any width: LeCun-normal linears, embedding rows of norm about 1.

    (nanoGPT's fixed 0.02 suits d_model=768; at the small widths used here it would shrink every
    projection's output and bury item features under the position embeddings.)
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=module.in_features**-0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=module.embedding_dim**-0.5)


class GenerativeRanker(RankingModel):
    """What LiGR and its HSTU variant share: tokens, masks, set-wise layers, heads, losses.

    Subclasses choose the transformer layer (``make_block``); everything else is identical, so the
    LiGR vs HSTU comparison (5.1) varies only the layer.
    """

    cfg: SequenceRankerConfig

    def __init__(self, cfg: SequenceRankerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = LiGRModel(cfg, self.make_block)
        self.pointwise_head = TaskHeads(cfg.d_model)
        if cfg.setwise:
            self.setwise_blocks = nn.ModuleList(self.make_block(True) for _ in range(cfg.n_setwise_layers))
            self.setwise_norm = nn.LayerNorm(cfg.d_model)
            self.setwise_head = TaskHeads(cfg.d_model)
        self.apply(init_weights)
        if cfg.setwise and cfg.setwise_actor_match:
            # a token every candidate may attend to instead of another candidate (its "nothing repeats")
            self.setwise_sink = nn.Parameter(torch.randn(cfg.d_model) * cfg.d_model**-0.5)
        if cfg.hashed_id_init == "dlrm":
            for module in self.modules():
                if isinstance(module, HashedEmbedding):
                    module.init_near_zero()

    def make_block(self, setwise: bool) -> nn.Module:
        """One transformer layer: of the historical stack, or of the set-wise stack."""
        raise NotImplementedError

    def encode(self, batch: RankingBatch) -> Tensor:
        """(B, S, D) candidate states after historical attention: the history is encoded once."""
        return self.backbone(batch)[1]

    def setwise_correction(
        self,
        cand_states: Tensor,
        cand_mask: Tensor,
        slots: Tensor | None = None,
        actor_ids: Tensor | None = None,
    ) -> Tensor:
        """(B, S, T): the candidates of one session attend to each other; the result is added to pointwise.

        ``slots`` (B, S) are the positions the candidates are shown in; None means in the order given.
        ``actor_ids`` (B, S) are needed with ``setwise_actor_match``, which also puts the sink first.
        """
        x, cosine = cand_states, None
        if self.cfg.setwise_actor_match:
            if actor_ids is None:
                raise ValueError("setwise_correction: setwise_actor_match needs the candidates' actor_ids")
            B, S, _ = x.shape
            actors = F.normalize(self.backbone.items.features["actor_id"](actor_ids), dim=-1)  # (B, S, E)
            # a candidate's own actor is no news: only the others' count, so with no repeat it reads the sink
            others = ~torch.eye(S, dtype=torch.bool, device=x.device)
            cosine = F.pad((actors @ actors.transpose(1, 2)) * others, (1, 0, 1, 0))  # the sink matches none
            x = torch.cat([self.setwise_sink.expand(B, 1, -1), x], dim=1)
            cand_mask = F.pad(cand_mask, (1, 0), value=True)
            if slots is None:
                slots = torch.arange(S, device=x.device).expand(B, S)
            slots = F.pad(slots.long(), (1, 0), value=SINK_SLOT)
        layout = TokenLayout.one_session(cand_mask, slots)
        context = layout.in_session() if self.cfg.setwise_context == "session" else layout.alone()
        mask = AttentionMask(context, layout)
        mask.match_cosine = cosine
        for block in self.setwise_blocks:
            x = block(x, mask)
        logits = self.setwise_head(self.setwise_norm(x))
        return logits if cosine is None else logits[:, 1:]

    def forward(self, batch: RankingBatch) -> RankingOutput:
        hist_states, cand_states = self.backbone(batch)
        pointwise = self.pointwise_head(cand_states)  # (B, S, T)
        setwise = None
        if self.cfg.setwise:
            setwise = self.setwise_correction(
                cand_states, batch.cand_mask, batch.cand_position, batch.cand_actor_id
            )
        logits = pointwise if setwise is None else pointwise + setwise
        loss = None
        if batch.labels is not None:
            loss = self.loss(batch, batch.labels, logits, pointwise, hist_states)
        return RankingOutput(logits=logits, pointwise_logits=pointwise, setwise_logits=setwise, loss=loss)

    def loss(
        self, batch: RankingBatch, labels: Tensor, logits: Tensor, pointwise: Tensor, hist_states: Tensor
    ) -> Tensor:
        weight = self.cfg.attention_rank_loss_weight
        loss = ranking_loss(logits, labels, batch.cand_mask, weight)
        if self.cfg.setwise:
            # serving ranks items 11..end by the pointwise part alone (4.0.2), so it is trained alone too
            loss = loss + ranking_loss(pointwise, labels, batch.cand_mask, weight)
        if self.cfg.history_loss_weight > 0:
            # generative training (3.2): every history item predicts its own outcome from earlier sessions
            hist_labels = task_labels_from_multi_hot(batch.hist_actions)
            hist_loss = bce_per_task(self.pointwise_head(hist_states), hist_labels, batch.hist_mask)
            loss = loss + self.cfg.history_loss_weight * hist_loss
        return loss

    def score_pointwise(self, batch: RankingBatch, cand_states: Tensor | None = None) -> Tensor:
        """(B, S, T); pass ``cand_states`` from ``encode`` to reuse one history encoding."""
        return self.pointwise_head(self.encode(batch) if cand_states is None else cand_states)

    def score_setwise(
        self, batch: RankingBatch, top_k_idx: Tensor, cand_states: Tensor | None = None
    ) -> Tensor:
        """(B, k, T) correction for the candidates ``top_k_idx`` (B, k) as one set, shown in that order."""
        if not self.cfg.setwise:
            return super().score_setwise(batch, top_k_idx)
        states = self.encode(batch) if cand_states is None else cand_states
        chosen = states.gather(1, top_k_idx.unsqueeze(-1).expand(-1, -1, states.shape[-1]))  # (B, k, D)
        return self.setwise_correction(
            chosen, batch.cand_mask.gather(1, top_k_idx), actor_ids=batch.cand_actor_id.gather(1, top_k_idx)
        )


class LiGRForRanking(GenerativeRanker):
    """LiGR: the generative ranker with gated pre-norm transformer blocks."""

    cfg: LiGRConfig

    def __init__(self, cfg: LiGRConfig) -> None:
        super().__init__(cfg)

    def make_block(self, setwise: bool) -> nn.Module:
        cfg = self.cfg
        # set-wise attention knows how far apart two candidates are shown: the rules it replaces
        # ("two items between posts of one actor", 3.2) are about order; history uses absolute positions
        slot_bias = setwise and cfg.setwise_slot_bias
        rel_bias = RelativeBucketBias(cfg.n_heads, cfg.n_bias_buckets) if slot_bias else None
        match = cfg.actor_match and not setwise
        slot_match = (
            near_slot_match(cfg.n_heads, cfg.n_bias_buckets) if setwise and cfg.setwise_actor_match else None
        )
        return GatedBlock(
            cfg.d_model, cfg.n_heads, cfg.ffn_mult, cfg.dropout, cfg.attn_impl, rel_bias, match, slot_match
        )


# --- Retrieval (3.4) -----------------------------------------------------------------------------------


class LiGRRetrieval(NextItemModel):
    """Two towers for next-item retrieval: a LiGR member tower over the interleaved history, and an item
    tower whose layers are shared by the candidates and the history items (5.2: sharing helped most).

    With ``interleave_actions`` (the paper's "green blocks") each event is an item token and an action
    token; an item token predicts its action (a shared action head) and the action token's state is
    the user after that event, which retrieves the next item. The item tower reads the item's feature
    tokens; MovieLens items have one, the id. Scores are dot products, so the whole catalog is ranked
    with one matrix product.
    """

    cfg: LiGRRetrievalConfig

    def __init__(self, cfg: LiGRRetrievalConfig) -> None:
        super().__init__()
        self.cfg = cfg
        block = partial(GatedBlock, cfg.d_model, cfg.n_heads, cfg.ffn_mult, cfg.dropout, cfg.attn_impl)
        self.item_id = HashedEmbedding(cfg.item_hash_size, cfg.d_model, salt=1)
        self.item_blocks = nn.ModuleList(block() for _ in range(cfg.n_item_layers))
        self.item_norm = nn.LayerNorm(cfg.d_model)
        self.actions = nn.Linear(N_ACTIONS, cfg.d_model)
        self.position = nn.Embedding(cfg.max_len + 1, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.member_blocks = nn.ModuleList(block() for _ in range(cfg.n_layers))
        self.member_norm = nn.LayerNorm(cfg.d_model)
        self.action_head = nn.Linear(cfg.d_model, N_ACTIONS)
        self.apply(init_weights)

    def item_embedding(self, item_ids: Tensor) -> Tensor:
        tokens = self.item_id(item_ids.reshape(-1, 1))  # (N, F=1, D): one token per item feature
        layout = TokenLayout.one_session(torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))
        mask = AttentionMask(layout.in_session(), layout)
        for block in self.item_blocks:
            tokens = block(tokens, mask)
        return self.item_norm(tokens).mean(dim=1).reshape(*item_ids.shape, -1)

    def member_states(self, batch: SequenceBatch) -> tuple[Tensor, Tensor]:
        """(item-token states, user states after each event), both (B, L, D)."""
        B, L = batch.item_id.shape
        if self.cfg.max_len < L:
            raise ValueError(f"sequence length {L} exceeds max_len={self.cfg.max_len}")
        every_event_a_session = torch.arange(L, device=batch.item_id.device).expand(B, L)
        no_candidates = batch.mask[:, :0]
        layout = TokenLayout.interleaved(every_event_a_session, batch.mask, no_candidates)
        position = self.position(layout.position[:, 0 : 2 * L : 2])  # (B, L, D)
        items = self.item_embedding(batch.item_id) + position
        if not self.cfg.interleave_actions:
            layout = TokenLayout(
                layout.session[:, ::2], layout.kind[:, ::2], batch.mask, layout.position[:, ::2]
            )
            x = self.dropout(items)
        else:
            if batch.actions is None:  # zeros would silently train and score on "no outcome" everywhere
                raise ValueError(
                    "batch.actions: interleave_actions=True needs each event's action bitmask "
                    "(collate_sequences(..., actions=...)); or build the model with interleave_actions=False"
                )
            x = self.dropout(torch.stack([items, items + self.actions(batch.actions)], dim=2).flatten(1, 2))
        mask = AttentionMask(layout.historical(), layout)
        for block in self.member_blocks:
            x = block(x, mask)
        x = self.member_norm(x)
        if not self.cfg.interleave_actions:
            return x, x
        return x[:, 0::2], x[:, 1::2]

    def user_embedding(self, batch: SequenceBatch) -> Tensor:
        _, user_states = self.member_states(batch)
        last = (batch.mask.sum(dim=1) - 1).clamp(min=0)
        return user_states[torch.arange(len(last), device=last.device), last]  # (B, D)

    def loss(self, batch: SequenceBatch, candidate_ids: Tensor | None = None) -> Tensor:
        item_states, user_states = self.member_states(batch)
        pairs = batch.mask[:, :-1] & batch.mask[:, 1:]  # the state after event t retrieves event t+1
        if not pairs.any():
            raise ValueError("next-item loss needs sequences with at least two events")
        loss = next_item_softmax_loss(
            user_states[:, :-1][pairs], batch.item_id[:, 1:][pairs], self.item_embedding, candidate_ids
        )
        if self.cfg.interleave_actions and batch.actions is not None and self.cfg.action_loss_weight > 0:
            action_logits = self.action_head(item_states)[batch.mask]
            loss = loss + self.cfg.action_loss_weight * F.binary_cross_entropy_with_logits(
                action_logits, batch.actions[batch.mask]
            )
        return loss
