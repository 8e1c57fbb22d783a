"""360Brew instruction-tuning step: vocabulary logits at every position vs only where an answer is predicted.

One training step (forward, backward, optimizer) of ``--batch`` prompts of ``--tokens`` tokens, each
with one answer target as in instruction tuning, computed two ways: the model's own loss (logits for every
position) and `workloads.brew.loss.language_model_loss` (logits only at the positions that predict a
target). Each way runs in its own process so that its peak memory is its own; the processes alternate,
``--repeats`` steps each after one warm-up step, and the figures are medians. ``--finetune`` picks LoRA
(r 16, all linear layers) or full fine-tuning, as the trainer's ``finetune_mode`` does.

The model is SmolLM2-135M-Instruct (vocabulary 49,152), the embedded default base; ``--model shape``
instead builds a random decoder of SmolLM2-135M's depth and width (``--shape``, `TinyLlama` fields) for
machines where the checkpoint is not at hand: the step's cost does not depend on the weights. On a GPU
(``--device``) the step runs under bf16 autocast as the trainer's does, and memory is the peak of
PyTorch's CUDA allocator; on CPU it is the process's peak resident set.

Usage: ``python -m bench.brew_train [--batch 4] [--tokens 1024] [--repeats 3] [--rounds 2]
[--finetune lora|full] [--model smollm2|shape] [--device cuda|cpu]``.
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
from transformers import AutoModelForCausalLM, PreTrainedModel

from workloads.brew.loss import IGNORE, language_model_loss
from workloads.brew.model import TinyLlama, random_llama, smollm2_folder

WAYS = ("all_logits", "answer_logits")
# SmolLM2-135M's layout (30 layers, hidden 576, 9 heads of 64, MLP 1,536, vocabulary 49,152); its
# 3 key-value heads are full heads here, so the stand-in has a few more attention weights.
SMOLLM2_SHAPE = TinyLlama(
    hidden_size=576, num_heads=9, num_layers=30, intermediate_size=1536, vocab_size=49152
)


def _model(args: argparse.Namespace) -> PreTrainedModel:
    if args.model == "smollm2":
        return AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    shape = TinyLlama.model_validate_json(args.shape)
    return random_llama(shape, shape.vocab_size)


def _one_way(args: argparse.Namespace) -> dict[str, float]:
    """Seconds per step (median) and peak memory for one way of computing the loss, in this process."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = _model(args)
    vocab = int(base.config.vocab_size)
    model: torch.nn.Module = base
    if args.finetune == "lora":
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch, tokens = args.batch, args.tokens
    ids = torch.randint(0, vocab, (batch, tokens))
    lengths = torch.linspace(tokens // 2, tokens, batch).long()  # right-padded rows of different lengths
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
    labels = torch.full_like(ids, IGNORE)
    labels[torch.arange(batch), lengths - 1] = ids[torch.arange(batch), lengths - 1]  # the answer token
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
    times = []
    for step in range(args.repeats + 1):
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**inputs).loss if args.one == "all_logits" else language_model_loss(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up
            times.append(time.perf_counter() - began)
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"seconds_per_step": statistics.median(times), "peak_memory_gib": peak_gib}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per way, alternating")
    parser.add_argument("--finetune", choices=["lora", "full"], default="lora")
    parser.add_argument("--model", choices=["smollm2", "shape"], default="smollm2")
    parser.add_argument("--shape", default=SMOLLM2_SHAPE.model_dump_json(), help="TinyLlama fields as JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", choices=WAYS, help=argparse.SUPPRESS)  # a child process: one way
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        result = _one_way(args)
        print(json.dumps(result))
        return result

    model_dir = smollm2_folder() if args.model == "smollm2" else Path()
    options = ["--batch", str(args.batch), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    options += ["--finetune", args.finetune, "--model", args.model, "--shape", args.shape]
    options += ["--device", args.device]
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            child = [sys.executable, "-m", "bench.brew_train", "--one", way, "--model-dir", str(model_dir)]
            out = subprocess.run(child + options, check=True, capture_output=True, text=True).stdout
            runs[way].append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps({"way": way, **runs[way][-1]}), file=sys.stderr, flush=True)  # as measured
    summary: dict[str, Any] = {
        "model": "smollm2-135m-instruct" if args.model == "smollm2" else f"random {args.shape}",
        "finetune": args.finetune,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "batch": args.batch,
        "tokens": args.tokens,
    }
    for way in WAYS:
        summary[way] = {key: statistics.median(r[key] for r in runs[way]) for key in runs[way][0]}
    summary["speedup"] = (
        summary["all_logits"]["seconds_per_step"] / summary["answer_logits"]["seconds_per_step"]
    )
    summary["memory_ratio"] = (
        summary["all_logits"]["peak_memory_gib"] / summary["answer_logits"]["peak_memory_gib"]
    )
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
