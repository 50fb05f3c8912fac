"""Writers for what geonn produces (netCDF, JSON, figures) and the checkpoint format.

Every writer goes through :func:`geonn.io.atomic.atomic_path`; every checkpoint is read with
``torch.load(..., weights_only=True)``, so a crafted file cannot run code.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .atomic import atomic_path, write_text


def write_netcdf(ds, path: str | os.PathLike) -> Path:
    """Write an ``xarray.Dataset`` to netCDF-4 atomically.

    Attribute values netCDF cannot hold as they are get the nearest form it can: strings with
    characters UTF-8 cannot encode (lone surrogates from undecodable file names) are written
    with backslash escapes, booleans as 0/1. ``ds`` itself is not changed.

    Raises:
        InputError: ``ds`` has an attribute or variable netCDF cannot store (the message names it).
        WriteError: the file could not be written (disk full, no permission).
    """
    ds = _netcdf_safe(ds)
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"path: netCDF file names must be UTF-8, got {str(path)!r}") from None
    with atomic_path(path) as tmp:
        try:
            ds.to_netcdf(tmp, engine="netcdf4")
        except (TypeError, ValueError) as err:
            raise InputError(f"ds: cannot be written to netCDF {str(path)!r}: {_first_line(err)}") from None
    return Path(path)


def _safe_attribute(value):
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, (bool, np.bool_)):
        return np.int8(value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value):
        return [_safe_attribute(v) for v in value]
    return value


def _netcdf_safe(ds):
    """A shallow copy of ``ds`` whose attributes netCDF can store (see :func:`write_netcdf`)."""
    ds = ds.copy(deep=False)
    ds.attrs = {k: _safe_attribute(v) for k, v in ds.attrs.items()}
    for name in ds.variables:
        variable = ds.variables[name]
        variable.attrs = {k: _safe_attribute(v) for k, v in variable.attrs.items()}
    return ds


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing figure is null
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON atomically; non-finite floats become ``null``."""
    return write_text(path, json.dumps(_json_safe(data), indent=2, sort_keys=True) + "\n")


def write_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Save a checkpoint (tensors, numbers, strings, lists and dicts of them) atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty (a bare EOFError)."""
    lines = str(err).splitlines()
    return lines[0] if lines else type(err).__name__


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: a file that would run code is refused.

    Raises:
        InputError: the file is missing, truncated, or not a safe checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint: expected an existing file, got {str(path)!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputError(
            f"checkpoint {str(path)!r}: refused, it holds objects other than tensors and plain data "
            f"(a file crafted to run code is refused this way): {_first_line(err)}"
        ) from None
    except Exception as err:  # noqa: BLE001 - an untrusted file can make the unpickler fail in any way
        raise InputError(f"checkpoint {str(path)!r}: not a readable torch checkpoint ({_first_line(err)})") from None
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {str(path)!r}: expected a dict of state, got {type(state).__name__}")
    return state
