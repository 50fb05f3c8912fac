"""Output folders written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import InputError
from .atomic import _umask, write_error


def check_output_folder(out: str | os.PathLike, overwrite: bool, argument: str = "--out") -> Path:
    """Refuse an ``out`` that is a file, or a folder that already holds files unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{argument}: {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{argument}: {str(out)!r} already holds files; pass --overwrite to replace them or pick another folder")
    return out


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, overwrite: bool, argument: str = "--out"):
    """Yield a hidden folder beside ``out`` that becomes ``out`` on success and disappears on failure.

    A run that fails (any exception, KeyboardInterrupt included) leaves ``out`` as it was: no
    partial outputs. With ``overwrite`` an existing ``out`` is replaced only once the new one is whole.
    """
    out = Path(out).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as err:
        raise write_error(out, err, "create the output folder") from err
    try:
        yield stage
        try:
            if out.exists():
                if not out.is_dir() or (any(out.iterdir()) and not overwrite):
                    raise InputError(f"{argument}: {str(out)!r} appeared while the run was going on; the results are not moved there")
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(stage, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(stage, out)
            os.chmod(out, 0o777 & ~_umask())
        except OSError as err:
            raise write_error(out, err, "move the finished outputs into") from err
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
