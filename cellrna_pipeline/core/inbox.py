"""Which acquisitions in the inbox are complete and may be ingested.

An acquisition is either a folder or a single image file dropped into the inbox.

- A folder with ``manifest.json`` is complete when the manifest parses and every file it
  lists exists with exactly the listed size (the microscope, or ``cellrna synth``, writes
  the manifest last).
- Anything else (a TIFF file, an OME-Zarr folder, a folder without manifest) is complete
  when its size, file count and newest modification time are unchanged since the previous
  scan and the newest modification is at least ``settle_s`` old.

Hidden names and names ending in ``.tmp``/``.part`` are ignored: they are still being written.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from cellrna_pipeline.core.experiment import source_fingerprint

_IMAGE_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".ome.zarr", ".zarr")
_INVALID = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Acquisition:
    """A complete acquisition found in the inbox."""

    path: Path
    experiment: str
    fingerprint: str


def experiment_name_for(path: Path) -> str:
    """Experiment name from a dropped file or folder: its name without image suffixes,
    with characters outside ``[A-Za-z0-9_.-]`` replaced by ``-``."""
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = _INVALID.sub("-", name).strip("-._")
    while "__" in name or ".." in name:
        name = name.replace("__", "_").replace("..", ".")
    return name[:64].strip("-._") or "experiment"


def _stat(path: Path) -> tuple[int, int, int]:
    """(total bytes, file count, newest mtime in ns) of a file or folder tree."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    stats = [p.stat() for p in files]
    return (
        sum(s.st_size for s in stats),
        len(stats),
        max((s.st_mtime_ns for s in stats), default=0),
    )


def scan_inbox(
    inbox: Path,
    previous: dict[str, list[int]],
    *,
    settle_s: float = 5.0,
    now: float | None = None,
) -> tuple[list[Acquisition], dict[str, list[int]]]:
    """Find complete acquisitions.

    Parameters
    ----------
    inbox : the inbox folder (missing means empty).
    previous : what the previous scan saw for manifest-less entries, ``{name: [bytes,
        files, newest_mtime_ns]}`` (kept in the sensor cursor).
    settle_s : seconds a manifest-less entry must have been unmodified.
    now : current UNIX time (for tests).

    Returns
    -------
    complete acquisitions sorted by name, and the observations for the next scan.
    """
    from cellrna_pipeline.core.synth.manifest import acquisition_is_complete

    now = time.time() if now is None else now
    ready: list[Acquisition] = []
    seen: dict[str, list[int]] = {}
    if not inbox.exists():
        return ready, seen
    for path in sorted(inbox.iterdir()):
        name = path.name
        if name.startswith(".") or name.endswith((".tmp", ".part")):
            continue
        if path.is_dir() and (path / "manifest.json").exists():
            if acquisition_is_complete(path):
                ready.append(Acquisition(path, experiment_name_for(path), source_fingerprint(path)))
            continue
        if not path.is_dir() and not name.lower().endswith(_IMAGE_SUFFIXES):
            continue
        observed = list(_stat(path))
        seen[name] = observed
        settled = now - observed[2] / 1e9 >= settle_s
        if previous.get(name) == observed and settled and observed[1] > 0:
            ready.append(Acquisition(path, experiment_name_for(path), source_fingerprint(path)))
    return ready, seen
