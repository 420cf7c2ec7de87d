"""The evaluation's error: a case folder, setting or model that cannot be used; the message says what to fix."""

from __future__ import annotations


class EvaluationError(ValueError):
    """A case folder, setting or model that cannot be used; the message says what to fix."""
