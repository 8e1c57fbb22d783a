"""Batch sizes from the serve config: ``@serve.batch`` takes constants, the graph's args take numbers."""

from __future__ import annotations

from typing import Any


def configure_batching(method: Any, max_batch_size: int, batch_wait_timeout_s: float) -> None:
    """Set a replica's ``@serve.batch`` method's batch size and wait (Ray's documented setters)."""
    method.set_max_batch_size(max_batch_size)
    method.set_batch_wait_timeout_s(batch_wait_timeout_s)
