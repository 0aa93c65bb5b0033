"""The acquisition manifest: the contract between a writer and the inbox sensor.

A folder is a complete acquisition only when ``manifest.json`` exists, parses, and every
file it lists is present with the listed size in bytes. Writers write the manifest last
and atomically (:func:`write_manifest`), so a half-copied folder is never complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from cellrna_pipeline.core.errors import InputError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "cellrna-acquisition/1"
_REQUIRED_KEYS = ("format", "image", "files")


def file_sizes(folder: Path, relative_paths: Iterable[str]) -> dict[str, int]:
    """``{relative_posix_path: size_in_bytes}`` for files under ``folder``."""
    return {rel: (Path(folder) / rel).stat().st_size for rel in sorted(relative_paths)}


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``folder/manifest.json`` atomically (temporary file, fsync, ``os.replace``)."""
    folder = Path(folder)
    final = folder / MANIFEST_NAME
    tmp = folder / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


def _safe_relative(rel: str) -> bool:
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel


def read_manifest(folder: Path) -> dict[str, Any]:
    """The parsed manifest of an acquisition folder.

    Raises :class:`InputError` (one line) when it is missing, not JSON, of another format,
    or lacks ``format``, ``image`` or ``files``; it does not check the listed files (see
    :func:`acquisition_is_complete`).
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise InputError(
            f"no {MANIFEST_NAME} in {folder}: the acquisition is incomplete or not one"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{path} must hold a JSON object")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise InputError(f"{path} lacks {missing}")
    if manifest["format"] != MANIFEST_FORMAT:
        raise InputError(f"{path} has format {manifest['format']!r}, expected {MANIFEST_FORMAT!r}")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(
        isinstance(k, str)
        and _safe_relative(k)
        and isinstance(v, int)
        and not isinstance(v, bool)
        and v >= 0
        for k, v in files.items()
    ):
        raise InputError(f"{path}: 'files' must map relative paths to sizes in bytes")
    if manifest["image"] not in files:
        raise InputError(f"{path}: image {manifest['image']!r} is not among the listed files")
    return manifest


def acquisition_is_complete(folder: Path) -> bool:
    """True when the manifest is valid and every listed file exists with its size."""
    try:
        manifest = read_manifest(folder)
    except InputError:
        return False
    for rel, size in manifest["files"].items():
        path = Path(folder) / rel
        try:
            if not path.is_file() or path.stat().st_size != size:
                return False
        except OSError:
            return False
    return True
