"""The instruction-tuning loss: cross-entropy on the answer tokens, vocabulary logits only where needed.

Kept apart from the Ray Train loop (`workloads.brew.train`) so that the benchmarks can time one step of
it on a machine without Ray.
"""

from __future__ import annotations

import torch

IGNORE = -100  # label value the causal LM loss skips


def language_model_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal LM loss over the batch's targets, with vocabulary logits only where a target needs them.

    Stage 1 labels every token, so the model's own loss is used. In instruction tuning one answer token
    per row is a target: projecting all positions onto the vocabulary (49k entries for SmolLM2) would
    cost more memory than the rest of the step, so only the positions that predict a target are kept
    (`logits_to_keep`); the mean cross-entropy is the same number the model's own loss gives.
    """
    labels = batch["labels"]
    rows, cols = torch.nonzero(labels[:, 1:] != IGNORE, as_tuple=True)  # position t predicts token t + 1
    keep = torch.unique(cols)  # sorted
    if 2 * len(keep) > labels.shape[1]:  # most positions needed anyway (stage 1): the usual full loss
        return model(**batch).loss
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep
    ).logits  # (B, len(keep), V)
    picked = logits[rows, torch.searchsorted(keep, cols)]
    return torch.nn.functional.cross_entropy(picked.float(), labels[rows, cols + 1])
