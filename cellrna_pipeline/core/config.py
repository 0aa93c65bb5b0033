"""Bases for typed configs: unknown keys are an error, not a silent typo."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self, TypeVar

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


class CheckedModel(StrictModel):
    """A :class:`StrictModel` with range checks in :meth:`_check` that raise a one-line
    :class:`InputError` (not pydantic's multi-line ``ValidationError``), whether the model
    is built from keywords or by :meth:`model_validate`. Unknown keys and wrong types still
    raise ``ValidationError``."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise_input_error_inside(exc)
            raise

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:  # type: ignore[override]
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise_input_error_inside(exc)
            raise

    def model_post_init(self, context: Any, /) -> None:
        self._check()

    def _check(self) -> None:
        """Range checks; raise :class:`InputError` naming the field. Default: none."""


C = TypeVar("C", bound=BaseModel)


def read_model_folder_config(folder: Path, config_cls: type[C], kind: str, what: str) -> C:
    """The ``config.json`` of a model folder (one that also holds ``weights.pt``), parsed
    as ``config_cls`` and checked to be of ``kind``; ``what`` names the model in errors.

    Raises
    ------
    InputError
        Files missing, a config that does not parse, or a model of another kind.
    """
    import json

    if not (folder / "config.json").exists() or not (folder / "weights.pt").exists():
        raise InputError(f"{folder}: not a {what} model folder (needs config.json and weights.pt)")
    try:
        config = config_cls(**json.loads((folder / "config.json").read_text()))
    except Exception as exc:
        raise InputError(
            f"{folder}/config.json: not a {what} config ({exc.__class__.__name__})"
        ) from None
    found = getattr(config, "kind", None)
    if found != kind:
        raise InputError(f"{folder}: model kind {found!r}, expected {kind!r}")
    return config


def write_model_folder(
    folder: str | Path,
    state: dict[str, Any],
    config: BaseModel,
    *,
    metrics: dict[str, Any],
    training: dict[str, Any],
    card: str,
) -> Path:
    """Write a model folder: ``weights.pt`` (the ``state`` dict as given), ``config.json``,
    ``metrics.json``, ``training.json`` and ``model_card.md``, through a temporary sibling
    renamed into place; an existing folder is replaced. Returns the folder."""
    import json

    import torch

    from cellrna_pipeline.core.io import atomic_dir

    final = Path(folder)
    with atomic_dir(final, replace=True) as tmp:
        torch.save(state, tmp / "weights.pt")
        (tmp / "config.json").write_text(json.dumps(config.model_dump(), indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "training.json").write_text(json.dumps(training, indent=2) + "\n")
        (tmp / "model_card.md").write_text(card)
    return final
