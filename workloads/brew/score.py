"""Score = P(yes): the softmax over the yes / no answer-token logits at the prompt's last position.

Two backends behind one `Scorer` protocol, chosen explicitly by `ScorerConfig.backend`; nothing
falls back silently, so a missing vLLM is an error, not a slower run:

- ``transformers``: plain PyTorch forward passes, right-padded batches, the logit row at each
  prompt's last real token (only those rows are projected onto the vocabulary). The reference, and
  the path for machines without vLLM; it runs on the GPU where there is one (``device``).
- ``vllm``: vLLM's async engine (`AsyncLLMEngine`, an alias of `AsyncLLM`) with
  ``SamplingParams(max_tokens=1, temperature=0, logprob_token_ids=[yes, no])``: one decode step
  returns the log-probabilities of exactly the two answer tokens. Automatic prefix caching lets the
  candidates of one member reuse the encoded history; it caches only full blocks, hence a small
  ``block_size`` for short prompts. LoRA adapters are served with ``enable_lora``.

Both take token ids, never text (the verbalizer's ids), so the two backends see identical inputs.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from workloads.brew.artifact import BrewArtifact

T = TypeVar("T")


class ScorerConfig(BaseModel):
    """Which backend scores prompts, and its knobs."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["transformers", "vllm"] = "vllm"
    dtype: Literal["float32", "bfloat16"] = "float32"
    batch_size: int = Field(16, ge=1, description="transformers: prompts per forward pass")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="transformers: where the model runs; auto = the GPU where there is one"
    )
    enable_prefix_caching: bool = True
    block_size: int = Field(
        32, ge=16, description="vLLM KV block (tokens); prefix caching reuses whole blocks"
    )
    max_model_len: int = Field(2048, ge=64)
    max_num_seqs: int = Field(64, ge=1, description="vLLM: sequences scheduled together")
    kv_cache_gib: int = Field(1, ge=1, description="vLLM CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    enforce_eager: bool = Field(True, description="vLLM: skip torch.compile (engine starts in ~20 s on CPU)")


class Scorer(Protocol):
    def score(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """P(yes) for each prompt (token ids), shape (len(prompts),)."""
        ...

    def close(self) -> None: ...


def p_yes(yes_logit: float | np.ndarray, no_logit: float | np.ndarray) -> np.ndarray:
    """Softmax over the two answer logits (log-probs work too: the shared normalizer cancels)."""
    return 1.0 / (
        1.0 + np.exp(np.asarray(no_logit, dtype=np.float64) - np.asarray(yes_logit, dtype=np.float64))
    )


class TransformersScorer:
    def __init__(self, artifact: BrewArtifact, config: ScorerConfig) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, PreTrainedModel

        dtype = getattr(torch, config.dtype)
        model: PreTrainedModel | PeftModel = AutoModelForCausalLM.from_pretrained(
            artifact.model_dir, dtype=dtype
        )
        if artifact.adapter_dir is not None:
            model = PeftModel.from_pretrained(model, artifact.adapter_dir)
        if config.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("scorer.device: 'cuda' was asked for, but torch sees no GPU")
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if config.device == "auto" else config.device)
        self.model = model.eval()
        self.model.to(self.device)
        self.yes, self.no = artifact.yes_token_id, artifact.no_token_id
        self.pad = int(model.config.pad_token_id or 0)
        self.batch_size = config.batch_size

    @torch.no_grad()
    def score(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        out = np.empty(len(prompts))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            lengths = torch.tensor([len(prompts[i]) for i in idx])
            ids = torch.full((len(idx), int(lengths.max())), self.pad, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(prompts[i])] = torch.tensor(prompts[i])
            mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
            # Only each prompt's last position is projected onto the vocabulary: (B, T, V) logits for
            # 16 prompts of 1,024 tokens would be 3 GiB, the answer rows are 3 MiB.
            keep, where = torch.unique(lengths - 1, return_inverse=True)
            logits = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                logits_to_keep=keep.to(self.device),
            ).logits  # (B, len(keep), V)
            last = logits[torch.arange(len(idx), device=self.device), where.to(self.device)].float()
            out[idx] = p_yes(last[:, self.yes].cpu().numpy(), last[:, self.no].cpu().numpy())
        return out

    def close(self) -> None:
        del self.model


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM allocates adapter slots of these ranks


def _vllm_lora_rank(rank: int | None) -> Any:
    """The smallest slot rank vLLM offers that holds an adapter of `rank` (16 when there is no adapter)."""
    if rank is None:
        return 16
    for slot in VLLM_LORA_RANKS:
        if rank <= slot:
            return slot
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})")


class VLLMEngine:
    """vLLM's async engine scoring prompts; create it inside the event loop that will use it."""

    def __init__(self, artifact: BrewArtifact, config: ScorerConfig) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
        from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams, TokensPrompt
        from vllm.lora.request import LoRARequest

        lora = artifact.adapter_dir is not None
        args = AsyncEngineArgs(
            model=str(artifact.model_dir),
            dtype=config.dtype,
            seed=0,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enable_prefix_caching=config.enable_prefix_caching,
            block_size=config.block_size,
            enforce_eager=config.enforce_eager,
            enable_lora=lora,
            max_lora_rank=_vllm_lora_rank(artifact.lora_rank),
            disable_log_stats=True,
            distributed_executor_backend="uni",  # one model replica: run it inside the engine-core process
        )
        self.engine = AsyncLLMEngine.from_engine_args(args)
        self.params = SamplingParams(
            max_tokens=1, temperature=0.0, logprob_token_ids=[artifact.yes_token_id, artifact.no_token_id]
        )
        self.lora = LoRARequest("brew", 1, str(artifact.adapter_dir)) if lora else None
        self.yes, self.no = artifact.yes_token_id, artifact.no_token_id
        self._ids = itertools.count()
        self._prompt = TokensPrompt

    async def _one(self, prompt: Sequence[int]) -> float:
        final = None
        async for output in self.engine.generate(
            self._prompt(prompt_token_ids=list(prompt)),
            self.params,
            f"brew-{next(self._ids)}",
            lora_request=self.lora,
        ):
            final = output
        assert final is not None and final.outputs[0].logprobs is not None
        logprobs = final.outputs[0].logprobs[0]  # the first (only) generated position
        return float(p_yes(logprobs[self.yes].logprob, logprobs[self.no].logprob))

    async def score(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """All prompts go to the engine at once; it batches them and shares cached prefixes."""
        return np.array(await asyncio.gather(*(self._one(p) for p in prompts)), dtype=np.float64)

    async def reset_prefix_cache(self) -> None:
        await self.engine.reset_prefix_cache()

    def close(self) -> None:
        self.engine.shutdown()
        del self.engine  # now, not in __del__ at interpreter exit when vLLM's modules are gone


class VLLMScorer:
    """The synchronous face of `VLLMEngine`: owns an event loop thread the engine lives on."""

    def __init__(self, artifact: BrewArtifact, config: ScorerConfig) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-scorer", daemon=True)
        self._thread.start()

        async def start() -> VLLMEngine:
            return VLLMEngine(artifact, config)

        self.engine = self._run(start())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def score(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        return self._run(self.engine.score(prompts))

    def reset_prefix_cache(self) -> None:
        self._run(self.engine.reset_prefix_cache())

    def close(self) -> None:
        self.engine.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def make_scorer(artifact: BrewArtifact, config: ScorerConfig) -> Scorer:
    """The backend `config.backend` names; vLLM missing is an ImportError, never a silent switch."""
    if config.backend == "transformers":
        return TransformersScorer(artifact, config)
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "scorer backend 'vllm' needs vLLM (`pip install -e '.[llm-cpu]'` on CPU, `vllm` on GPU); "
            "set backend: transformers to score without it"
        ) from err
    return VLLMScorer(artifact, config)


def artifact_for_base(
    model_dir: Path, yes_id: int, no_id: int, templates_file: Path, max_context: int
) -> BrewArtifact:
    """An artifact wrapping an untrained HF folder (zero-shot scoring of a base model, tests, benchmarks)."""
    return BrewArtifact(
        version=f"base:{Path(model_dir).name}",
        model_dir=model_dir,
        templates_file=templates_file,
        max_context_tokens=max_context,
        yes_token_id=yes_id,
        no_token_id=no_id,
        tasks=[],
        data_window={},
    )
