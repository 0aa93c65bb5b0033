"""Base for typed configs: unknown keys are an error, not a silent typo."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

from cellrna_pipeline.core.errors import InputError


class StrictModel(BaseModel):
    """A pydantic model that forbids unknown keys and is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def raise_input_error_inside(exc: ValidationError) -> None:
    """Re-raise the :class:`InputError` that pydantic wrapped in ``exc``, if there is one
    (range checks raise InputError; pydantic wraps it in a ValidationError)."""
    for err in exc.errors():
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, InputError):
            raise InputError(str(inner)) from None
