"""LiGR training throughput vs its HSTU-layer variant at equal size, and single-pass vs per-candidate scoring.

1. Training throughput: forward + backward + AdamW step on random requests (history events and
   candidates), in events per second (real history events plus candidates). The HSTU variant gets
   as many layers as it takes to match LiGR's dense parameter count (an HSTU layer has about 5 d^2
   weights, a gated LiGR block about 14 d^2), so the two are compared at equal size.
2. Single-pass scoring (LiGR section 4.0.2): one request's history is encoded once and all its
   candidates are scored together, versus scoring each candidate as its own request (the history
   encoded once per candidate; those requests still run batched, in chunks). Pointwise scores only,
   so both paths compute the same numbers; the ratio is per-candidate time / single-pass time.

Usage: ``python -m bench.train [--history 128] [--candidates 10 100 500] [--steps 20] [--batch 32]``.
On a GPU (``--device cuda``, the default where one is present) LiGR is timed with each of ``--attn``
(``flex``: compiled FlexAttention over the block mask; ``sdpa``: the dense boolean mask) under bf16
autocast, as the trainer runs it, and the peak GPU memory of every row is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from workloads.data.schema import CONTENT_DIM, COUNTER_FEATURES, N_AGE_BUCKETS, TASKS, Action, PostType
from workloads.models.base import RankingModel
from workloads.models.batch import RankingBatch
from workloads.models.config import HSTUConfig, LiGRConfig
from workloads.models.registry import build_model, dense_params, equal_size_hstu


def random_requests(batch: int, history: int, candidates: int, seed: int = 0) -> RankingBatch:
    """Full-length random requests: ``history`` events in sessions of 10, ``candidates`` candidates."""
    g = torch.Generator().manual_seed(seed)

    def ids(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=g)

    return RankingBatch(
        hist_item_id=ids(10**6, batch, history),
        hist_actor_id=ids(10**4, batch, history),
        hist_post_type=ids(len(PostType), batch, history),
        hist_age_bucket=ids(N_AGE_BUCKETS, batch, history),
        hist_content=torch.randn(batch, history, CONTENT_DIM, generator=g),
        hist_actions=(torch.rand(batch, history, len(Action), generator=g) < 0.1).float(),
        hist_session=(torch.arange(history) // 10).expand(batch, history).clone(),
        hist_mask=torch.ones(batch, history, dtype=torch.bool),
        cand_item_id=ids(10**6, batch, candidates),
        cand_actor_id=ids(10**4, batch, candidates),
        cand_post_type=ids(len(PostType), batch, candidates),
        cand_age_bucket=ids(N_AGE_BUCKETS, batch, candidates),
        cand_content=torch.randn(batch, candidates, CONTENT_DIM, generator=g),
        cand_mask=torch.ones(batch, candidates, dtype=torch.bool),
        cand_position=torch.arange(candidates).expand(batch, candidates).clone(),
        cand_counters=torch.rand(batch, candidates, len(COUNTER_FEATURES), generator=g),
        labels=(torch.rand(batch, candidates, len(TASKS), generator=g) < 0.1).float(),
    )


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn``; on a GPU each call is waited for (kernels run asynchronously)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):  # the first calls also compile FlexAttention's kernels
        fn()
    sync()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def peak_memory_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def training_throughput(
    cfg: LiGRConfig | HSTUConfig, batch: RankingBatch, steps: int, device: torch.device
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.param_groups())
    batch = batch.to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(batch)
        assert out.loss is not None
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(step, steps)
    events = int(batch.hist_mask.sum() + batch.cand_mask.sum())
    return {
        "kind": cfg.kind,
        "attn": cfg.attn_impl if cfg.kind == "ligr" else "dense SiLU",
        "n_layers": cfg.n_layers,
        "dense_params": dense_params(model),
        "step_ms": round(1000 * seconds, 1),
        "events_per_s": round(events / seconds),
        "peak_mib": peak_memory_mib(device),
    }


def split_candidates(request: RankingBatch) -> RankingBatch:
    """One request's S candidates as S one-candidate requests, each carrying the whole history."""
    n = request.cand_item_id.shape[1]
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(request):
        value = getattr(request, field.name)
        if value is None:
            fields[field.name] = None
        elif field.name.startswith("hist_"):
            fields[field.name] = value.expand(n, *value.shape[1:])
        else:
            fields[field.name] = value.transpose(0, 1)  # (1, S, ...) -> (S, 1, ...)
    return RankingBatch(**fields)


def rows(batch: RankingBatch, start: int, stop: int) -> RankingBatch:
    sliced: dict[str, Any] = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        sliced[field.name] = None if value is None else value[start:stop]
    return RankingBatch(**sliced)


@torch.no_grad()
def scoring_cost(
    model: RankingModel, history: int, candidates: int, repeats: int, chunk: int, device: torch.device
) -> dict[str, Any]:
    request = random_requests(1, history, candidates, seed=candidates).to(device)
    singles = split_candidates(request)
    score = model.score_pointwise

    def per_candidate() -> torch.Tensor:
        return torch.cat([score(rows(singles, i, i + chunk))[:, 0] for i in range(0, candidates, chunk)])

    single_pass_s = median_seconds(lambda: score(request), repeats)
    per_candidate_s = median_seconds(per_candidate, repeats, warmup=1)
    return {
        "candidates": candidates,
        "single_pass_ms": round(1000 * single_pass_s, 2),
        "per_candidate_ms": round(1000 * per_candidate_s, 2),
        "ratio": round(per_candidate_s / single_pass_s, 1),
        "max_abs_score_diff": float((score(request)[0] - per_candidate()).abs().max()),
    }


def progress(row: dict[str, Any]) -> dict[str, Any]:
    """Each figure on stderr as soon as it is measured (compiling FlexAttention takes minutes on a GPU)."""
    print(time.strftime("%H:%M:%S"), json.dumps(row), file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--history", type=int, default=128, help="history events per request")
    parser.add_argument("--candidates", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--batch", type=int, default=32, help="requests per training step")
    parser.add_argument("--train-candidates", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (median)")
    parser.add_argument("--repeats", type=int, default=5, help="timed scoring repeats (median)")
    parser.add_argument("--chunk", type=int, default=50, help="one-candidate requests per batch")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--attn", nargs="+", default=["auto"], choices=["auto", "flex", "sdpa"], help="LiGR attention kernels"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    max_candidates = max([*args.candidates, args.train_candidates])
    ligr_by_attn = [
        LiGRConfig(
            d_model=args.d_model,
            n_layers=args.layers,
            n_heads=2,
            max_history=args.history,
            max_candidates=max_candidates,
            max_tokens=2 * args.history + max_candidates,
            dropout=0.0,
            attn_impl=attn,
        )
        for attn in args.attn
    ]
    hstu = equal_size_hstu(ligr_by_attn[0])
    train_batch = random_requests(args.batch, args.history, args.train_candidates)
    configs: list[LiGRConfig | HSTUConfig] = [*ligr_by_attn, hstu]
    throughput = [progress(training_throughput(cfg, train_batch, args.steps, device)) for cfg in configs]

    torch.manual_seed(0)
    scorer = build_model(ligr_by_attn[0]).to(device).eval()
    scoring = [
        progress(scoring_cost(scorer, args.history, n, args.repeats, args.chunk, device))
        for n in args.candidates
    ]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result = {
        "settings": {**vars(args), "gpu": gpu, "torch": torch.__version__},
        "training": throughput,
        "ligr_over_hstu_events_per_s": round(
            throughput[0]["events_per_s"] / throughput[-1]["events_per_s"], 2
        ),
        "scoring": scoring,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
