"""Atomic file writes: a file appears whole under its name, or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..errors import GeonnError, WriteError


def write_error(path: str | os.PathLike, err: OSError, what: str = "write") -> WriteError:
    """A :class:`~geonn.errors.WriteError` naming ``path`` and the system's reason for ``err``."""
    reason = err.strerror or str(err) or type(err).__name__
    error = WriteError(
        f"could not {what} {str(path)!r}: {reason} ({type(err).__name__}); nothing partial was left there "
        "(an earlier file of that name is unchanged)"
    )
    error.errno = err.errno  # (not filename: OSError would then print "[Errno n] None: path" instead of the message)
    return error


def temporary_pattern(path: str | os.PathLike) -> str:
    """The glob of the temporary names :func:`atomic_path` uses for ``path`` (in the same folder)."""
    return f".{Path(path).name}.*.tmp"


def remove_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a writer of ``path`` killed mid-write (SIGKILL, power loss) left behind.

    Only names of the form ``.NAME.*.tmp`` beside ``path`` are removed; ``path`` itself is never
    touched. Call it where no other process writes ``path`` at the same time (e.g. when a
    training run starts or resumes with its checkpoint folder).

    Returns:
        The paths removed.
    """
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for stale in path.parent.glob(temporary_pattern(path)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
                removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the same folder as ``path``; rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it was (the old file,
    or none). The rename is atomic on POSIX file systems. An ``OSError`` (disk full, permission
    denied, ...) while creating, writing, syncing or renaming becomes a
    :class:`~geonn.errors.WriteError` that names ``path``. A process killed mid-write (SIGKILL)
    can leave only a hidden ``.NAME.*.tmp`` file beside ``path``, never a partial ``path``
    (:func:`remove_temporaries` clears those).

    Example:
        >>> with atomic_path("out/metrics.json") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise write_error(path, err) from err
    tmp = Path(tmp_name)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give outputs the usual permissions
        finally:
            os.close(fd)
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and not isinstance(err, GeonnError):
            raise write_error(path, err) from err
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8; characters UTF-8 cannot hold, such as lone
    surrogates from undecodable file names, are written as backslash escapes)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
    return Path(path)
