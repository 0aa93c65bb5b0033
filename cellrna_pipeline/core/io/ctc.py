"""Cell Tracking Challenge (CTC) format: per-frame masks and ``L B E P`` track files.

A CTC folder holds one TIFF per frame, ``mask000.tif`` (results), ``man_seg000.tif``
(segmentation ground truth) or ``man_track000.tif`` (tracking ground truth), each a
``(y, x)`` or ``(z, y, x)`` label image (uint16; 0 = background), numbered from 0 with 3
digits (4 when there are 1000 frames or more), and a track file (``res_track.txt`` /
``man_track.txt``) with one line ``L B E P`` per track: label, first and last frame
(inclusive), parent label (0 = none). A label is present in exactly the frames
``B..E`` (no gaps). Raw images are ``t000.tif`` files.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.io.atomic import atomic_write_text, temporary_sibling
from cellrna_pipeline.core.io.tiff import _tifffile_errors

__all__ = [
    "CTC_TRACKS_SCHEMA",
    "CtcFrames",
    "check_ctc_result",
    "ctc_mask_name",
    "list_ctc_frames",
    "list_ctc_images",
    "read_ctc_frame",
    "read_ctc_image",
    "read_ctc_tracks",
    "write_ctc_result",
    "write_ctc_tracks",
]

CTC_TRACKS_SCHEMA: dict[str, type[pl.DataType] | pl.DataType] = {
    "label": pl.UInt32,
    "begin_t": pl.Int32,
    "end_t": pl.Int32,
    "parent_label": pl.UInt32,
}
"""Columns of a CTC track file read into a table (one row per line ``L B E P``)."""

_MASK_RE = re.compile(r"^(mask|man_track|man_seg)(\d+)\.tiff?$")
_IMAGE_RE = re.compile(r"^t(\d+)\.tiff?$")
_RESULT_FILE_RE = re.compile(r"^(mask\d+\.tiff?|res_track\.txt)$")
_PREFERENCE = ("mask", "man_track", "man_seg")
UINT16_MAX = int(np.iinfo(np.uint16).max)


@dataclass(frozen=True)
class CtcFrames:
    """The per-frame label files of a CTC folder, read lazily.

    Attributes
    ----------
    folder : the folder.
    kind : file prefix used (``"mask"``, ``"man_track"`` or ``"man_seg"``).
    paths : frame index -> file, sorted by frame.
    """

    folder: Path
    kind: str
    paths: dict[int, Path]

    @property
    def frames(self) -> list[int]:
        return sorted(self.paths)

    def read(self, t: int) -> np.ndarray:
        """Frame ``t`` as a ``(z, y, x)`` integer array (a 2D frame has ``z = 1``)."""
        if t not in self.paths:
            raise InputError(f"{self.folder}: no {self.kind} file for frame {t}")
        return read_ctc_frame(self.paths[t])

    def __iter__(self) -> Iterator[np.ndarray]:
        for t in self.frames:
            yield self.read(t)


def ctc_mask_name(t: int, n_frames: int, prefix: str = "mask") -> str:
    """``mask007.tif`` (3 digits; 4 when ``n_frames > 1000``, as the CTC tools expect)."""
    digits = 4 if n_frames > 1000 else 3
    return f"{prefix}{t:0{digits}d}.tif"


def _list(folder: Path, pattern: re.Pattern[str]) -> dict[str, dict[int, Path]]:
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    found: dict[str, dict[int, Path]] = {}
    for entry in os.scandir(folder):
        m = pattern.match(entry.name)
        if m and entry.is_file():
            prefix, number = (m.group(1), m.group(2)) if m.lastindex == 2 else ("t", m.group(1))
            frames = found.setdefault(prefix, {})
            t = int(number)
            if t in frames:
                raise InputError(
                    f"{folder}: two files for frame {t} ({frames[t].name}, {entry.name})"
                )
            frames[t] = Path(entry.path)
    return found


def list_ctc_frames(folder: str | os.PathLike[str], *, consecutive: bool = True) -> CtcFrames:
    """Find the label files of a CTC folder.

    Parameters
    ----------
    folder : a result folder (``mask###.tif``) or a ground-truth ``TRA``/``SEG`` folder.
    consecutive : require frames ``0..T-1`` without holes (tracking input); ``False`` for
        ``SEG`` folders, which annotate only some frames.

    Returns
    -------
    CtcFrames (``mask`` files are preferred over ``man_track`` over ``man_seg`` when a
    folder holds several kinds).

    Raises
    ------
    InputError
        Missing folder, no label files, two files for one frame, or missing frames.
    """
    root = Path(folder)
    found = _list(root, _MASK_RE)
    kind = next((k for k in _PREFERENCE if k in found), None)
    if kind is None:
        raise InputError(
            f"{root}: no CTC label files (mask###.tif, man_track###.tif or man_seg###.tif)"
        )
    paths = dict(sorted(found[kind].items()))
    if consecutive:
        missing = sorted(set(range(max(paths) + 1)) - set(paths))
        if missing:
            shown = ", ".join(str(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise InputError(f"{root}: {kind} files missing for frame(s) {shown}")
    return CtcFrames(folder=root, kind=kind, paths=paths)


def list_ctc_images(folder: str | os.PathLike[str]) -> dict[int, Path]:
    """Raw image files ``t000.tif``, ``t001.tif``, ... of a CTC folder: frame -> path."""
    root = Path(folder)
    found = _list(root, _IMAGE_RE).get("t", {})
    if not found:
        raise InputError(f"{root}: no CTC image files (t000.tif, t001.tif, ...)")
    return dict(sorted(found.items()))


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    with _tifffile_errors(path):  # exceptions and "broken structure" log records
        data = np.asarray(tifffile.imread(path))
    if data.size == 0:
        raise InputError(f"{path}: corrupt TIFF (no image data)")
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim != 3:
        raise InputError(
            f"{path}: expected a 2D (y, x) or 3D (z, y, x) image, got shape {data.shape}"
        )
    return data


def read_ctc_frame(path: str | os.PathLike[str]) -> np.ndarray:
    """One CTC label file as a ``(z, y, x)`` integer array (``z = 1`` for a 2D frame).

    Raises
    ------
    InputError
        Missing, empty or corrupt file, more than 3 dimensions, a non-integer dtype or
        negative labels.
    """
    p = Path(path)
    data = _read_tiff(p)
    if data.dtype.kind not in "ui":
        raise InputError(f"{p}: label images must be integers, got {data.dtype}")
    if data.dtype.kind == "i" and data.size and int(data.min()) < 0:
        raise InputError(f"{p}: negative labels")
    return data


def read_ctc_image(path: str | os.PathLike[str]) -> np.ndarray:
    """One CTC raw image ``t###.tif`` as a ``(z, y, x)`` array (``z = 1`` for 2D)."""
    p = Path(path)
    data = _read_tiff(p)
    if data.dtype.kind not in "uif":
        raise InputError(f"{p}: unsupported image dtype {data.dtype}")
    if data.dtype.kind == "f" and not bool(np.isfinite(data).all()):
        raise InputError(f"{p}: NaN or infinite values")
    return data


def read_ctc_tracks(path: str | os.PathLike[str]) -> pl.DataFrame:
    """A ``res_track.txt`` / ``man_track.txt`` file as a :data:`CTC_TRACKS_SCHEMA` table.

    Raises
    ------
    InputError
        Missing file, a line that is not 4 non-negative integers, a repeated label, or a
        track that ends before it begins.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    rows = []
    for n, line in enumerate(p.read_text(encoding="ascii", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 4 or not all(x.isdigit() for x in parts):
            raise InputError(f"{p}:{n}: expected 'L B E P' (4 non-negative integers), got {line!r}")
        rows.append(tuple(int(x) for x in parts))
    table = pl.DataFrame(rows, schema=CTC_TRACKS_SCHEMA, orient="row")
    if table["label"].is_duplicated().any():
        raise InputError(f"{p}: repeated track label(s)")
    bad = table.filter(pl.col("end_t") < pl.col("begin_t"))
    if bad.height:
        raise InputError(f"{p}: track {bad['label'][0]} ends before it begins")
    return table.sort("label")


def _tracks_text(tracks: pl.DataFrame) -> str:
    missing = [c for c in CTC_TRACKS_SCHEMA if c not in tracks.columns]
    if missing:
        raise InputError(f"CTC track table lacks column(s) {missing}")
    rows = tracks.select(list(CTC_TRACKS_SCHEMA)).sort("label").iter_rows()
    return "".join(f"{lab} {b} {e} {p}\n" for lab, b, e, p in rows)


def write_ctc_tracks(path: str | os.PathLike[str], tracks: pl.DataFrame) -> None:
    """Write a :data:`CTC_TRACKS_SCHEMA` table as ``L B E P`` lines (atomically)."""
    atomic_write_text(path, _tracks_text(tracks), encoding="ascii")


def _write_mask(path: Path, labels: np.ndarray) -> None:
    import tifffile

    data = np.asarray(labels)
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]  # a 2D frame is written as (y, x), as the CTC tools expect
    tifffile.imwrite(path, data.astype(np.uint16), compression="zlib")


def write_ctc_result(
    out_dir: str | os.PathLike[str],
    frames: Iterable[np.ndarray],
    tracks: pl.DataFrame,
    *,
    n_frames: int,
    track_file: str = "res_track.txt",
) -> Path:
    """Write a CTC result folder: ``mask<t>.tif`` per frame and ``res_track.txt``.

    The folder is built under a temporary sibling name and renamed into place, so readers
    see the old or the new result, never a mix. An existing ``out_dir`` is replaced only if
    it is empty or holds nothing but CTC result files.

    Parameters
    ----------
    out_dir : the result folder (e.g. ``01_RES``).
    frames : ``n_frames`` label images ``(z, y, x)`` or ``(y, x)`` whose ids are the CTC
        labels of ``tracks`` (at most 65535, the masks are uint16).
    tracks : :data:`CTC_TRACKS_SCHEMA` table.
    n_frames : number of frames (decides 3 or 4 digits in the file names).
    track_file : name of the track file.

    Returns
    -------
    Path of the folder.

    Raises
    ------
    InputError
        Labels above 65535, a number of frames other than ``n_frames``, or an existing
        folder holding other files (nothing is changed then).
    """
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out} exists and is not a folder")
        foreign = [e.name for e in os.scandir(out) if not _RESULT_FILE_RE.match(e.name)]
        if foreign:
            raise InputError(
                f"{out} holds files that are not CTC results ({foreign[0]}, ...); choose an "
                "empty or new folder"
            )
    text = _tracks_text(tracks)
    if tracks.height and int(tracks["label"].max()) > UINT16_MAX:  # type: ignore[arg-type]
        raise InputError(f"{tracks.height} tracks do not fit the CTC uint16 masks (max 65535)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out)
    tmp.mkdir()
    try:
        count = 0
        for t, frame in enumerate(frames):
            if t >= n_frames:
                raise InputError(f"more than n_frames={n_frames} frames given")
            if int(np.asarray(frame).max(initial=0)) > UINT16_MAX:
                raise InputError(f"frame {t}: labels above 65535 do not fit the CTC uint16 masks")
            _write_mask(tmp / ctc_mask_name(t, n_frames), frame)
            count += 1
        if count != n_frames:
            raise InputError(f"{count} frames given, n_frames={n_frames}")
        (tmp / track_file).write_text(text, encoding="ascii")
        if out.exists():
            trash = temporary_sibling(out)
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_ctc_result(
    folder: str | os.PathLike[str], *, track_file: str = "res_track.txt"
) -> list[str]:
    """Check a CTC result folder the way the CTC evaluation tools validate one.

    Checks: every label of ``track_file`` is present in exactly the frames ``B..E``, no
    mask holds a label that the file does not list, labels are unique, parents exist and
    end before their daughters begin.

    Returns
    -------
    list of problems (empty when the folder is valid).
    """
    root = Path(folder)
    problems: list[str] = []
    tracks = read_ctc_tracks(root / track_file)
    frames = list_ctc_frames(root)
    spans = {int(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in tracks.iter_rows()}
    for label, (_b, _e, parent) in spans.items():
        if parent and parent not in spans:
            problems.append(f"track {label}: parent {parent} is not a track")
        elif parent and spans[parent][1] >= spans[label][0]:
            problems.append(f"track {label}: parent {parent} ends at or after its begin")
    expected: dict[int, set[int]] = {}
    for label, (b, e, _p) in spans.items():
        for t in range(b, e + 1):
            expected.setdefault(t, set()).add(label)
    for t in frames.frames:
        present = set(np.unique(frames.read(t)).tolist()) - {0}
        want = expected.get(t, set())
        if present - want:
            problems.append(f"frame {t}: label(s) {sorted(present - want)[:5]} not in {track_file}")
        if want - present:
            problems.append(
                f"frame {t}: track(s) {sorted(want - present)[:5]} missing from the mask"
            )
    last = max(frames.frames)
    beyond = [lab for lab, (_b, e, _p) in spans.items() if e > last]
    if beyond:
        problems.append(f"track(s) {beyond[:5]} end after the last mask (frame {last})")
    return problems
