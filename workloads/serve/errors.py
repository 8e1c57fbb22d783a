"""Errors the graph answers with instead of a ranking; the ingress turns each into an ``ErrorBody``.

They cross deployment boundaries (Ray re-raises them in the caller as subclasses of the same class),
so they carry only plain data and rebuild from ``args``.
"""

from __future__ import annotations

from collections.abc import Sequence


class ServeError(Exception):
    """A non-200 answer: HTTP status, a short error code, a message, and the request fields at fault."""

    def __init__(self, status: int, error: str, message: str, fields: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(status, error, message, list(fields))
        self.status, self.error, self.message, self.fields = status, error, message, list(fields)

    def __str__(self) -> str:
        return f"{self.status} {self.error}: {self.message}"


def client_error(error: str, field: str, problem: str, status: int = 422) -> ServeError:
    """A client mistake in one field: the message and the field list say the same thing."""
    return ServeError(status, error, f"{field}: {problem}", [(field, problem)])


def unavailable(reason: str) -> ServeError:
    """A dependency (the feature store) failed or timed out after the bounded retries: 503, not a hang."""
    return ServeError(503, "unavailable", reason)
