"""360Brew instruction-tuning step: vocabulary logits at every position vs only where an answer is predicted.

One LoRA training step (forward, backward, optimizer) of ``--batch`` prompts of ``--tokens`` tokens, each
with one answer target as in instruction tuning, computed two ways: the model's own loss (logits for every
position) and `workloads.brew.train.language_model_loss` (logits only at the positions that predict a
target). Each way runs in its own process so that its peak resident memory is its own; the processes
alternate, ``--repeats`` steps each after one warm-up step, and the figures are medians. The model is
SmolLM2-135M-Instruct (vocabulary 49,152), the embedded default base.

Usage: ``python -m bench.brew_train [--batch 4] [--tokens 1024] [--repeats 3] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from workloads.brew.model import smollm2_folder
from workloads.brew.train import IGNORE, language_model_loss

WAYS = ("all_logits", "answer_logits")


def _one_way(way: str, model_dir: Path, batch: int, tokens: int, repeats: int) -> dict[str, float]:
    """Seconds per step (median) and this process's peak RSS for one way of computing the loss."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens))
    lengths = torch.linspace(tokens // 2, tokens, batch).long()  # right-padded rows of different lengths
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
    labels = torch.full_like(ids, IGNORE)
    labels[torch.arange(batch), lengths - 1] = ids[torch.arange(batch), lengths - 1]  # the answer token
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    times = []
    for step in range(repeats + 1):
        began = time.perf_counter()
        loss = model(**inputs).loss if way == "all_logits" else language_model_loss(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(time.perf_counter() - began)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"seconds_per_step": statistics.median(times), "peak_rss_gib": peak_gb}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per way, alternating")
    parser.add_argument("--one", choices=WAYS, help=argparse.SUPPRESS)  # a child process: one way
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        result = _one_way(args.one, args.model_dir, args.batch, args.tokens, args.repeats)
        print(json.dumps(result))
        return result

    model_dir = smollm2_folder()
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            child = [sys.executable, "-m", "bench.brew_train", "--one", way, "--model-dir", str(model_dir)]
            child += [
                "--batch",
                str(args.batch),
                "--tokens",
                str(args.tokens),
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
            runs[way].append(json.loads(out.strip().splitlines()[-1]))
    summary: dict[str, Any] = {"model": "smollm2-135m-instruct", "batch": args.batch, "tokens": args.tokens}
    for way in WAYS:
        summary[way] = {
            key: statistics.median(r[key] for r in runs[way]) for key in ("seconds_per_step", "peak_rss_gib")
        }
    summary["speedup"] = (
        summary["all_logits"]["seconds_per_step"] / summary["answer_logits"]["seconds_per_step"]
    )
    summary["memory_ratio"] = summary["all_logits"]["peak_rss_gib"] / summary["answer_logits"]["peak_rss_gib"]
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
