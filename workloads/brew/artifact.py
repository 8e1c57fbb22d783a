"""The 360Brew model artifact: what training writes and what scoring, evaluation and serving load.

One folder, published atomically, with ``manifest.json`` (a `BrewArtifact`) beside the weights.
Full fine-tuning writes an HF folder (``model/``); LoRA writes only the adapter (``adapter/``) and
points at the base folder, which is how vLLM serves it (``enable_lora`` plus a ``LoRARequest``).
The templates used in training are copied in, so a served model verbalizes the way it was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from workloads.brew.prompts import Templates, load_templates
from workloads.data.atomic import MANIFEST


class BrewArtifact(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["brew"] = "brew"  # tells a 360Brew manifest from other artifacts' manifests
    version: str  # the training run's name
    model_dir: Path  # HF folder: the fine-tuned model, or the base model when adapter_dir is set
    adapter_dir: Path | None = None  # PEFT LoRA adapter on top of model_dir
    lora_rank: int | None = None
    templates_file: Path
    max_context_tokens: int
    yes_token_id: int
    no_token_id: int
    tasks: list[str]  # the tasks fine-tuning saw (T1); others in the templates are zero-shot (T2)
    data_window: dict[str, str]  # ISO times of the training and evaluation periods
    metrics: dict[str, Any] = {}

    def templates(self) -> Templates:
        return load_templates(self.templates_file)

    def save(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(self.model_dump_json(indent=2))


def load_artifact(folder: Path) -> BrewArtifact:
    """Read an artifact folder; relative paths inside it resolve against the folder."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a 360Brew artifact (no {MANIFEST}); run workloads.brew.train"
        )
    raw = json.loads(path.read_text())
    if raw.get("kind") != "brew":
        raise ValueError(f"{path} is not a 360Brew manifest (kind={raw.get('kind')!r}, expected 'brew')")
    for key in ("model_dir", "adapter_dir", "templates_file"):
        if raw.get(key) is not None and not Path(raw[key]).is_absolute():
            raw[key] = str(Path(folder).resolve() / raw[key])
    return BrewArtifact.model_validate(raw)
