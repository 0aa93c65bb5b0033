"""Atomic file and directory writes: build under a hidden temporary name, then rename.

A reader (or a concurrent writer) sees either nothing or the complete result, never a
half-written file or directory. Temporary names are siblings of the final path, so the
rename stays on one filesystem (where POSIX ``rename`` is atomic).

Limits: rename is atomic on a local POSIX filesystem; on network filesystems (NFS, SMB)
and object stores it may not be. Files written by :func:`atomic_write_bytes` are
``fsync``-ed before the rename; parent directories are not, so a power cut right after
a write may lose the new name (but never expose a truncated file).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from cellrna_pipeline.core.faults import checkpoint

__all__ = [
    "all_or_nothing",
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "discard",
    "temporary_sibling",
]

TMP_PREFIX = ".tmp-"


def temporary_sibling(final_path: str | os.PathLike[str]) -> Path:
    """A fresh hidden name next to ``final_path``: ``<parent>/.tmp-<name>-<uuid>``.

    Parameters
    ----------
    final_path : path the temporary will be renamed to.

    Returns
    -------
    Path in the same directory (hence the same filesystem) as ``final_path``; nothing is
    created.
    """
    final = Path(final_path)
    return final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex}"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temporary sibling + ``os.replace``).

    Parameters
    ----------
    path : destination file; its parent directories are created if missing. An existing
        file is replaced.
    data : the complete file content.
    fsync : flush the temporary file to disk before the rename (durability).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", fsync: bool = True
) -> None:
    """Write ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path for one file; ``os.replace`` it into place on success.

    The caller creates the file at the yielded path. On an exception the temporary file
    is removed and ``final_path`` is left untouched. If the block ends without creating
    the file, nothing is renamed and ``FileNotFoundError`` is raised.

    Examples
    --------
    >>> with atomic_path(out / "table.parquet") as tmp:  # doctest: +SKIP
    ...     frame.write_parquet(tmp)
    """
    final = Path(final_path)
    tmp = temporary_sibling(final)
    try:
        yield tmp
        if final.suffix:
            checkpoint(f"{final.suffix[1:]}.before_rename")  # e.g. parquet.before_rename
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(
    final_path: str | os.PathLike[str], *, exist_ok: bool = False, replace: bool = False
) -> Iterator[Path]:
    """Yield a new empty temporary directory; rename it to ``final_path`` on success.

    Parameters
    ----------
    final_path : where the finished directory should appear. Its parent must exist
        (it is created if missing).
    exist_ok : what to do when ``final_path`` exists by the time the block finishes
        (e.g. a concurrent process created it first). ``True``: discard our temporary
        directory silently and keep theirs. ``False``: discard ours and raise
        ``FileExistsError``.
    replace : replace an existing ``final_path`` instead (``exist_ok`` is then unused):
        the old directory is renamed aside, ours renamed in, and the old one deleted, so
        a crash at any point leaves a complete directory, at ``final_path`` or (between
        the two renames) at ``<parent>/.tmp-<name>-<uuid>``.

    Notes
    -----
    The temporary directory ``<parent>/.tmp-<name>-<uuid>`` is removed when the block
    raises. A directory is never merged into an existing one: the first complete rename
    wins. An existing *empty* directory at ``final_path`` counts as existing.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replace and final.exists():
        aside = temporary_sibling(final)
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
        return
    try:
        if final.exists():
            # Checked first because rename(2) would silently replace an empty directory.
            raise FileExistsError(errno.EEXIST, "destination exists", str(final))
        os.rename(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        lost_race = isinstance(exc, FileExistsError) or exc.errno in (errno.EEXIST, errno.ENOTEMPTY)
        if lost_race and exist_ok:
            return
        if lost_race and not isinstance(exc, FileExistsError):
            raise FileExistsError(errno.EEXIST, "destination exists", str(final)) from exc
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def all_or_nothing(paths: Iterable[str | os.PathLike[str]]) -> Iterator[None]:
    """Replace a set of files and folders as a whole: the block's result, or the old state.

    Each existing path is first renamed to a hidden temporary sibling (so the block starts
    from nothing there). If the block raises, whatever it created at those paths is
    deleted and the originals are renamed back; if it succeeds, the originals are deleted.

    Parameters
    ----------
    paths : files or folders the block may (re)create.

    Notes
    -----
    Each rename is atomic, the set is not: a process killed inside the block leaves the
    originals under their ``.tmp-`` names and the block's partial result in place (a
    rerun of the block replaces that result; the ``.tmp-`` copies can be deleted).
    """
    targets = [Path(p) for p in paths]
    moved: list[tuple[Path, Path]] = []
    try:
        for path in targets:
            if path.exists() or path.is_symlink():
                tmp = temporary_sibling(path)
                os.rename(path, tmp)
                moved.append((path, tmp))
        yield
    except BaseException:
        for path in targets:
            _remove(path)
        for path, tmp in moved:
            os.rename(tmp, path)
        raise
    for _, tmp in moved:
        _remove(tmp)


def discard(path: str | os.PathLike[str]) -> None:
    """Delete a file or folder so that it disappears at once: rename it to a hidden
    temporary sibling (atomic), then delete that. A missing ``path`` is fine."""
    doomed = temporary_sibling(path)
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    _remove(doomed)
