"""360Brew scoring throughput: one member x N candidates through vLLM, prefix caching on vs off.

All candidates of a member share the verbalized prefix (instruction, profile, history); only the
question suffix differs. With automatic prefix caching vLLM encodes that prefix once per member and
each further candidate costs its suffix alone, so the saving grows with the history's share of the
prompt. The benchmark builds the prompts of the busiest member of a small generated world, then for
each setting starts one engine, warms it up, and times ``--repeats`` requests of N candidates,
clearing the prefix cache before each (every request is a cold member). The transformers backend
(no cache, padded batches; on the GPU where there is one) is timed on the same prompts for reference.
Figures are medians. ``--backends transformers`` skips vLLM (a machine without it); ``--tiny-shape``
sizes the random test decoder (e.g. SmolLM2-135M's layout where its checkpoint is not at hand).

Usage: ``python -m bench.brew [--model tiny|smollm2] [--candidates 50] [--max-context 1024] [--repeats 5]
[--backends vllm transformers] [--tiny-shape JSON] [--dtype float32|bfloat16]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workloads.brew.data import (
    EntityText,
    TimeSplit,
    entity_corpus,
    impression_examples,
    load_world,
    member_history,
    resolve_periods,
)
from workloads.brew.model import TinyLlama, answer_token_ids, build_tiny_llama, load_tokenizer, smollm2_folder
from workloads.brew.prompts import DEFAULT_TEMPLATES, HistoryEvent, Verbalizer, load_templates
from workloads.brew.score import Scorer, ScorerConfig, TransformersScorer, VLLMScorer, artifact_for_base
from workloads.data.synth import WorldConfig, generate


def _time(scorer: Scorer, prompts: list[list[int]], repeats: int, reset: bool) -> float:
    """Median seconds per request of all `prompts` (one member's candidates)."""
    scorer.score(prompts)  # warm-up
    times = []
    for _ in range(repeats):
        if reset and isinstance(scorer, VLLMScorer):
            scorer.reset_prefix_cache()
        began = time.perf_counter()
        scorer.score(prompts)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--max-context", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--members", type=int, default=300, help="size of the generated world")
    parser.add_argument(
        "--backends", nargs="+", choices=["vllm", "transformers"], default=["vllm", "transformers"]
    )
    parser.add_argument(
        "--tiny-shape", default=TinyLlama().model_dump_json(), help="TinyLlama fields as JSON"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="transformers: prompts per forward pass")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both backends")
    args = parser.parse_args(argv)

    templates = load_templates()
    with tempfile.TemporaryDirectory() as tmp:
        world_dir = Path(tmp) / "world"
        generate(WorldConfig(members=args.members, seed=11), world_dir)
        world = load_world(world_dir)
        periods = resolve_periods(world_dir, TimeSplit())
        text = EntityText(world, templates)
        if args.model == "tiny":
            corpus = list(entity_corpus(world, text, periods.eval_start))
            shape = TinyLlama.model_validate_json(args.tiny_shape)
            model_dir = build_tiny_llama(Path(tmp) / "tiny", corpus, templates, shape)
        else:
            model_dir = smollm2_folder()
        tokenizer = load_tokenizer(model_dir)
        yes, no = answer_token_ids(tokenizer, templates)
        artifact = artifact_for_base(model_dir, yes, no, DEFAULT_TEMPLATES, args.max_context)

        task = templates.task("feed_like")
        counts = np.diff(world.member_offsets)
        member = int(np.argmax(counts))  # the busiest member: the longest history
        items, actions, _ = member_history(world, member, periods.eval_start, task)
        history = [HistoryEvent(text.item(int(i)), int(a)) for i, a in zip(items, actions, strict=True)]
        pool = impression_examples(
            world, templates, "feed_like", periods.eval_start, periods.eval_end, 10_000, 0
        )
        candidates = sorted({e.question_id for e in pool})[: args.candidates]
        verbalizer = Verbalizer(templates, tokenizer, args.max_context)
        prompts = verbalizer.verbalize(
            "feed_like", text.member(member), history, [text.item(c) for c in candidates]
        )
        prefix_tokens = len(tokenizer.encode(prompts.prefix, add_special_tokens=False))
        n = len(prompts.token_ids)

        seconds: dict[str, float] = {}
        device = torch.device("cpu")
        for caching in (True, False) if "vllm" in args.backends else ():
            scorer = VLLMScorer(
                artifact, ScorerConfig(backend="vllm", enable_prefix_caching=caching, dtype=args.dtype)
            )
            seconds[f"vllm_cache_{'on' if caching else 'off'}"] = _time(
                scorer, prompts.token_ids, args.repeats, True
            )
            scorer.close()
        if "transformers" in args.backends:
            reference = TransformersScorer(
                artifact, ScorerConfig(backend="transformers", batch_size=args.batch_size, dtype=args.dtype)
            )
            device = reference.device
            seconds["transformers"] = _time(reference, prompts.token_ids, args.repeats, False)

    result = {
        "model": args.model if args.model == "smollm2" else f"tiny {args.tiny_shape}",
        "transformers_device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "candidates": n,
        "prompt_tokens": max(len(p) for p in prompts.token_ids),
        "shared_prefix_tokens": prefix_tokens,
        "history_in_prompt": prompts.history_used,
        **{f"{k}_prompts_per_s": round(n / v, 1) for k, v in seconds.items()},
    }
    if "vllm" in args.backends:
        result["prefix_cache_speedup"] = round(seconds["vllm_cache_off"] / seconds["vllm_cache_on"], 2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
