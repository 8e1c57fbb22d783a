"""Configs of every model in ``workloads.models``, in one place (Hugging Face's ``configuration_*.py``).

Each config is a pydantic model with a ``kind`` tag, so a training or serving config can carry "some
model" and pydantic picks the class (``registry.ModelConfig``). Validation runs before any worker
starts: a nonsensical value fails with the field's name, e.g. ``n_heads`` not dividing ``d_model`` or
a history that cannot fit in ``max_tokens``. Defaults are tiny-world sizes; the paper's production
sizes are noted beside them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from workloads.data.schema import CONTENT_DIM, COUNTER_FEATURES

Feature = Literal["item_id", "actor_id", "post_type", "age_bucket", "content"]
ALL_FEATURES: frozenset[Feature] = frozenset({"item_id", "actor_id", "post_type", "age_bucket", "content"})
AttentionImpl = Literal["auto", "eager", "sdpa", "flex"]
CounterScale = Literal["log1p", "log_odds"]  # see workloads.models.base.counter_inputs
Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @staticmethod
    def _divides(n_heads: int, info: ValidationInfo) -> int:
        d_model = info.data.get("d_model")
        if d_model is not None and d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        return n_heads


class _Optim(_Config):
    """Separate learning rates for embedding tables and dense layers (LiGR appendix A.1)."""

    lr_embedding: PositiveFloat = 0.01
    lr_dense: PositiveFloat = 0.001
    weight_decay: NonNegativeFloat = 0.0  # dense parameters only


class SequenceRankerConfig(_Optim):
    """What LiGR and its HSTU-layer variant share: tokens, masks, heads and losses."""

    d_model: PositiveInt = 64  # paper: 10M dense params over 16 layers
    n_layers: PositiveInt = 2
    n_heads: PositiveInt = 2
    max_history: PositiveInt = 64  # events; each becomes an item and an action token (paper: up to 1,024)
    max_candidates: PositiveInt = 64  # candidates of the target session scored in one pass
    max_tokens: PositiveInt = 1024  # the sequence the attention kernels are sized for (paper: up to 2,048)
    # features of an item token (LiGR Tables 2-3); the paper beats production with at most 7
    use_features: frozenset[Feature] = ALL_FEATURES
    # "top features of the DLRM model" the candidate token also reads (5.4: with too few features the
    # model suffers from item cold start); history tokens have no counters (they are point-in-time at
    # the target session), so these enter the candidate tokens only
    candidate_counters: tuple[str, ...] = ()
    counter_scale: CounterScale = "log1p"  # how those counters are read (base.counter_inputs)
    item_hash_size: PositiveInt = 100_003  # collision-based table (paper: 33M rows for 150M ids)
    actor_hash_size: PositiveInt = 20_011
    id_dim: PositiveInt = 32  # paper: 64
    content_dim: PositiveInt = CONTENT_DIM
    # semantic ids (section 3.3): unigram, bigram and hashed trigram of the RQ-VAE codes, concat-pooled
    use_semantic_ids: bool = False
    sid_levels: Literal[3] = 3
    sid_codebook_size: PositiveInt = 256  # paper: 1,000
    sid_dim: PositiveInt = 16  # paper: 32
    sid_trigram_hash_size: PositiveInt = 100_003  # paper: 10^6
    # set-wise in-session attention over the candidates, added to the pointwise score (section 3.2)
    # how the hashed id rows (item, actor) start: "unit" rows of norm ~1, or DLRM's U(+-1/sqrt(rows)),
    # near zero, so an id no training example reached (most eval posts are new) adds ~nothing to its token
    hashed_id_init: Literal["unit", "dlrm"] = "unit"
    setwise: bool = True
    n_setwise_layers: PositiveInt = 1
    setwise_slot_bias: bool = True  # in-session attention biased by how many slots apart two candidates are
    # ablation: "self" keeps the set-wise layers and loss but lets each candidate read only itself, so a
    # gain that survives it comes from the extra depth, not from seeing the set
    setwise_context: Literal["session", "self"] = "session"
    n_bias_buckets: PositiveInt = 16  # relative-position buckets (set-wise slots; HSTU's rab)
    dropout: Dropout = 0.1
    history_loss_weight: NonNegativeFloat = 1.0  # each history item also predicts its own action
    attention_rank_loss_weight: NonNegativeFloat = 0.1
    attn_impl: AttentionImpl = "auto"  # auto: FlexAttention on GPU, dense SDPA on CPU
    # beyond the paper: history attention also scores "same actor" (unit actor embeddings as extra query /
    # key dimensions, a learned gain per head), so a candidate can pick out its actor's past events with
    # little data; off reproduces the paper's attention (docs/models.md, claim 3)
    actor_match: bool = False
    # beyond the paper, for set-wise attention: the candidates score "same actor" the same way, and a
    # learned sink token lets a candidate attend to nothing when no other candidate repeats its actor
    # (the rule set-wise attention replaced: "two items between posts of one actor", 3.2)
    setwise_actor_match: bool = False

    @field_validator("n_heads")
    @classmethod
    def _heads_divide_width(cls, n_heads: int, info: ValidationInfo) -> int:
        return cls._divides(n_heads, info)

    @field_validator("max_tokens")
    @classmethod
    def _history_fits(cls, max_tokens: int, info: ValidationInfo) -> int:
        history, candidates = info.data.get("max_history"), info.data.get("max_candidates")
        if history is not None and candidates is not None and 2 * history + candidates > max_tokens:
            raise ValueError(
                f"2 * max_history ({history}) + max_candidates ({candidates}) = "
                f"{2 * history + candidates} tokens exceeds max_tokens={max_tokens}"
            )
        return max_tokens

    @field_serializer("use_features", when_used="json")
    def _sorted_features(self, features: frozenset[Feature]) -> list[str]:
        """A set has no order; sorted, equal configs dump to equal JSON (artifacts, cache keys)."""
        return sorted(features)

    @field_validator("candidate_counters")
    @classmethod
    def _known_counters(cls, counters: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in counters if c not in COUNTER_FEATURES]
        if unknown or len(set(counters)) != len(counters):
            raise ValueError(
                f"candidate_counters: {list(counters)} must be distinct names of {COUNTER_FEATURES}"
            )
        return counters

    @model_validator(mode="after")
    def _has_item_features(self) -> SequenceRankerConfig:
        if not self.use_features and not self.use_semantic_ids:
            raise ValueError("use_features: an item token needs at least one feature (or use_semantic_ids)")
        if self.actor_match and "actor_id" not in self.use_features:
            raise ValueError("actor_match: matches actor embeddings, so use_features must include actor_id")
        if self.actor_match and not isinstance(self, LiGRConfig):
            raise ValueError(f"actor_match: only LiGR's attention implements it, not {type(self).__name__}")
        if self.setwise_actor_match and not (self.setwise and "actor_id" in self.use_features):
            raise ValueError("setwise_actor_match: needs setwise: true and actor_id among use_features")
        if self.setwise_actor_match and not isinstance(self, LiGRConfig):
            raise ValueError(
                f"setwise_actor_match: only LiGR's attention implements it, not {type(self).__name__}"
            )
        return self


class LiGRConfig(SequenceRankerConfig):
    kind: Literal["ligr"] = "ligr"
    ffn_mult: PositiveInt = 4


class HSTUConfig(SequenceRankerConfig):
    kind: Literal["hstu"] = "hstu"
    relative_bias: bool = True  # HSTU's relative attention bias, over bucketed event distance


class DCNv2Config(_Optim):
    """The pointwise production baseline (section 3.1): two DCNv2 towers over counters and sparse ids."""

    kind: Literal["dcnv2"] = "dcnv2"
    max_history: PositiveInt = 64  # only read by the optional history summary
    max_candidates: PositiveInt = 64
    item_hash_size: PositiveInt = 100_003
    actor_hash_size: PositiveInt = 20_011
    id_dim: PositiveInt = 16
    content_dim: PositiveInt = CONTENT_DIM
    use_content: bool = True
    use_history_summary: bool = False  # mean embedding of the actors the member engaged with
    counter_scale: CounterScale = "log1p"  # how the counters are read (base.counter_inputs)
    hashed_id_init: Literal["unit", "dlrm"] = "unit"  # as in SequenceRankerConfig
    n_cross_layers: PositiveInt = 3
    mlp_dims: tuple[PositiveInt, ...] = Field(default=(256, 128), min_length=1)
    dropout: Dropout = 0.1
    attention_rank_loss_weight: NonNegativeFloat = 0.0  # production trains pointwise BCE only


class LiGRRetrievalConfig(_Optim):
    """LiGR as a two-tower next-item retriever (section 3.4): member tower over history, shared item tower."""

    kind: Literal["ligr_retrieval"] = "ligr_retrieval"
    d_model: PositiveInt = 64
    n_layers: PositiveInt = 2  # member tower
    n_item_layers: PositiveInt = 1  # item tower, shared by candidates and history items
    n_heads: PositiveInt = 2
    ffn_mult: PositiveInt = 4
    max_len: PositiveInt = 200
    max_tokens: PositiveInt = 1024
    item_hash_size: PositiveInt = 100_003
    interleave_actions: bool = True  # the paper's "green blocks": action tokens and an action head
    action_loss_weight: NonNegativeFloat = 0.1
    dropout: Dropout = 0.1
    attn_impl: AttentionImpl = "auto"

    @field_validator("n_heads")
    @classmethod
    def _heads_divide_width(cls, n_heads: int, info: ValidationInfo) -> int:
        return cls._divides(n_heads, info)

    @field_validator("max_tokens")
    @classmethod
    def _sequence_fits(cls, max_tokens: int, info: ValidationInfo) -> int:
        max_len = info.data.get("max_len")
        if max_len is not None and 2 * max_len > max_tokens:
            raise ValueError(f"2 * max_len ({max_len}) exceeds max_tokens={max_tokens}")
        return max_tokens


class SASRecConfig(_Optim):
    """SASRec (Kang & McAuley 2018) with its published settings: one learning rate for everything."""

    kind: Literal["sasrec"] = "sasrec"
    d_model: PositiveInt = 64
    n_layers: PositiveInt = 2
    n_heads: PositiveInt = 1
    max_len: PositiveInt = 200
    item_hash_size: PositiveInt = 100_003
    dropout: Dropout = 0.2
    lr_embedding: PositiveFloat = 0.001
    lr_dense: PositiveFloat = 0.001
    attn_impl: AttentionImpl = "auto"

    @field_validator("n_heads")
    @classmethod
    def _heads_divide_width(cls, n_heads: int, info: ValidationInfo) -> int:
        return cls._divides(n_heads, info)


class RQVAEConfig(_Config):
    """RQ-VAE semantic ids (section 3.3); the paper's best: 3 codebooks of 1,000 codes, latent dim 8."""

    kind: Literal["rqvae"] = "rqvae"
    input_dim: PositiveInt = CONTENT_DIM
    hidden_dim: PositiveInt = 64
    latent_dim: PositiveInt = 8
    levels: PositiveInt = 3
    codebook_size: PositiveInt = 256
    beta: NonNegativeFloat = 0.25  # commitment weight
    flops_weight: NonNegativeFloat = 0.01  # FLOPs regularizer pushing codes toward even use
    usage_decay: float = Field(default=0.99, gt=0.0, lt=1.0)
    dead_code_threshold: NonNegativeFloat = 0.03  # reset a code used below this share of uniform
    lr: PositiveFloat = 0.003
    steps: PositiveInt = 1500
    batch_size: PositiveInt = 512
    seed: int = 0
