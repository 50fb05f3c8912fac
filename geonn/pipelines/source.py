"""Open one variable of a netCDF file (or of many) as training and held-out tensors, with every check up front.

A variable that fits in memory is loaded (:class:`FieldData`); a larger one (or any, with
``stream=True``) stays dask-backed and is read a block of time steps at a time
(:class:`StreamedField`): its normalisation statistics are computed out of core.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import xarray as xr

from ..errors import GeonnError, InputError
from ..fields import Grid, Normaliser, TimeSplit, area_weights, calendar_groups, find_grid, time_split, to_tensor

MIN_TRAIN_STEPS = 4   # the emulator needs pairs and the normaliser a spread
MIN_TEST_STEPS = 2


@dataclass
class FieldData:
    """One variable, as tensors, split in time, with its training normalisation.

    Attributes:
        path: the input file.
        da: the variable as read (coordinates, attributes and encoding intact); outputs are
            rebuilt from it with :func:`geonn.fields.from_tensor`.
        grid: its layout (:class:`geonn.fields.Grid`).
        values: ``(time, channel, lat, lon)`` float32 tensor in the variable's units, 0 where missing.
        mask: bool, same shape, True where the input is finite.
        split: the training (first) and held-out (last) time steps.
        weights: ``(lat, lon)`` area weights ``cos(latitude)`` summing to 1 (not masked).
        groups: ``(time,)`` calendar group of each step (one group for annual data).
        normaliser: climatology and a global scale fitted on the training steps only.
        anomalies: ``normaliser.transform(values)``: dimensionless, 0 where missing.
    """

    path: Path
    var: str
    da: xr.DataArray
    grid: Grid
    values: torch.Tensor
    mask: torch.Tensor
    split: TimeSplit
    weights: torch.Tensor
    groups: torch.Tensor
    normaliser: Normaliser
    anomalies: torch.Tensor

    @property
    def units(self) -> str:
        return str(self.da.attrs.get("units", ""))

    @property
    def n_train(self) -> int:
        return self.split.train.stop - self.split.train.start

    @property
    def n_test(self) -> int:
        return self.split.test.stop - self.split.test.start

    def describe(self) -> dict:
        """Flat facts about the input for the resolved config."""
        return {
            "input": str(self.path.resolve()), "var": self.var, "dims": list(self.grid.dims),
            "shape": list(self.grid.sizes), "units": self.units, "n_train": self.n_train, "n_test": self.n_test,
            "missing_fraction": float(1 - self.mask.float().mean()),
        }


STREAM_ABOVE_BYTES = 2 * 1024**3  # variables larger than this are streamed unless told otherwise
_ENGINE_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError)  # what the netCDF engines raise on a bad file


def input_files(path: str | os.PathLike, argument: str = "IN.nc") -> list[Path]:
    """The files ``path`` names: one file, or every file matching a glob pattern (``data/*.nc``), sorted."""
    text = os.fspath(path)
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text))
        if not files:
            raise InputError(f"{argument}: expected netCDF files matching {text!r}, got none")
        return files
    if not Path(text).is_file():
        raise InputError(f"{argument}: expected an existing netCDF file, got {text!r} (no such file)")
    return [Path(text)]


def open_dataset(path: str | os.PathLike, argument: str = "IN.nc", chunks: dict | None = None) -> xr.Dataset:
    """Open a netCDF file, or the files matching a glob pattern, lazily; cftime for any calendar.

    Several files are combined along their coordinates with ``xr.open_mfdataset`` (one dask
    chunk per file unless ``chunks`` says otherwise); one file gets dask chunks where dask is installed.
    """
    files = input_files(path, argument)
    decode = xr.coders.CFDatetimeCoder(use_cftime=True)
    try:
        if len(files) == 1:
            return xr.open_dataset(files[0], decode_times=decode, chunks=_chunks() if chunks is None else chunks)
        return xr.open_mfdataset(files, decode_times=decode, combine="by_coords", data_vars="minimal", coords="minimal",
                                 compat="override", parallel=False, chunks=chunks)
    except ImportError as err:
        raise InputError(f"{argument}: reading several files needs dask: pip install dask ({err})") from None
    except _ENGINE_ERRORS as err:
        raise InputError(f"{argument}: {str(path)!r} is not a readable netCDF file or collection ({type(err).__name__}: {err})") from None


def _chunks():
    try:
        import dask  # noqa: F401
    except ImportError:
        return None
    return {}


@dataclass
class StreamedField:
    """A variable too large for memory: dask-backed, read in blocks of time steps.

    Attributes as :class:`FieldData` where they are small (grid, split, weights, groups, the
    normaliser fitted out of core); ``blocks(times)`` yields ``(steps, values, mask)`` tensors of
    at most ``block`` time steps, and ``anomaly_blocks(times)`` the normalised values.
    """

    path: Path
    var: str
    da: xr.DataArray
    grid: Grid
    split: TimeSplit
    weights: torch.Tensor
    groups: torch.Tensor
    normaliser: Normaliser
    block: int = 64

    units = FieldData.units
    n_train = FieldData.n_train
    n_test = FieldData.n_test

    @property
    def n_valid_train(self) -> torch.Tensor:
        """``(channel, lat, lon)``: the number of training steps at which each point is valid."""
        return self.normaliser.counts.sum(0)

    def blocks(self, times: slice):
        from ..fields.blocks import time_blocks

        return time_blocks(self.da, self.grid, times, self.block)

    def read(self, steps: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """``(anomalies, mask)`` of the time steps ``steps``, read in one piece and normalised on the fly."""
        _, values, mask = next(iter(self.blocks_of(steps, steps.stop - steps.start)))
        return self.normaliser.transform(values, mask, self.groups[steps]), mask

    def blocks_of(self, times: slice, block: int):
        from ..fields.blocks import time_blocks

        return time_blocks(self.da, self.grid, times, block)

    def anomaly_blocks(self, times: slice):
        for steps, values, mask in self.blocks(times):
            yield steps, self.normaliser.transform(values, mask, self.groups[steps]), mask

    def describe(self) -> dict:
        return {
            "input": str(self.path), "var": self.var, "dims": list(self.grid.dims), "shape": list(self.grid.sizes),
            "units": self.units, "n_train": self.n_train, "n_test": self.n_test, "streamed": True, "block": self.block,
        }


def open_field(path: str | os.PathLike, var: str, train_fraction: float = 0.8, *, scale: str | None = "global",
               stream: bool | None = None, block: int = 64) -> FieldData | StreamedField:
    """Read ``var`` from ``path`` and prepare it for a verb.

    Args:
        path: a netCDF file.
        var: the variable name; it needs time, latitude and longitude dimensions (any names
            :func:`geonn.fields.find_grid` recognises).
        train_fraction: the share of the time axis (from the start) used for training, in (0, 1);
            the rest is held out for the scores.
        scale: the normaliser's scale (see :class:`geonn.fields.Normaliser`).
        stream: read the variable in blocks of ``block`` time steps instead of loading it
            (:class:`StreamedField`); ``None``: stream when it is larger than 2 GiB.
        block: time steps per block when streaming.

    Raises:
        InputError: a missing or unreadable file, a missing variable (the message lists the
            file's variables), a variable without time/lat/lon, a non-numeric variable, an
            all-missing variable, or too few time steps to split.
    """
    if not isinstance(train_fraction, (int, float)) or not 0 < train_fraction < 1:
        raise InputError(f"--train-fraction: expected a number in (0, 1), got {train_fraction!r}")
    ds = open_dataset(path)
    if var not in ds.data_vars:
        raise InputError(f"--var: {str(path)!r} has no variable {var!r}; its variables are {sorted(map(str, ds.data_vars))}")
    da = ds[var]
    if not (da.dtype.kind in "fiu"):
        raise InputError(f"--var: expected a numeric variable, got {var!r} of dtype {da.dtype}")
    try:
        grid = find_grid(da)
    except GeonnError as err:
        raise InputError(f"--var {var}: expected time, latitude and longitude dimensions; {err}") from None
    n_times = da.sizes[grid.time]
    try:
        split = time_split(n_times, 1 - train_fraction)
    except InputError:
        split = None
    if split is None or split.train.stop < MIN_TRAIN_STEPS or n_times - split.train.stop < MIN_TEST_STEPS:
        raise InputError(
            f"--var {var}: too few time steps to split: {n_times} along {grid.time!r} with --train-fraction {train_fraction}; "
            f"expected at least {MIN_TRAIN_STEPS} training and {MIN_TEST_STEPS} held-out steps"
        )
    if stream is None:
        stream = da.nbytes > STREAM_ABOVE_BYTES
    if stream:
        # reopen with dask chunks of `block` whole fields, so each block reads just its steps from disk
        da = open_dataset(path, chunks={grid.time: block, grid.lat: -1, grid.lon: -1})[var]
        return _streamed(path, var, da, grid, split, scale, block)
    da = da.load()
    values, mask, grid = to_tensor(da, grid, dtype=torch.float32)
    if not bool(mask[split.train].any()):
        raise InputError(f"--var {var}: every value in the training part is missing (NaN)")
    if bool((values.abs() > 1e30).any()):
        raise InputError(f"--var {var}: values beyond 1e30 (an undeclared fill value?); set _FillValue/missing_value in the file")
    weights = area_weights(grid)
    groups = calendar_groups(da, grid=grid)
    normaliser = Normaliser(scale=scale).fit(values, mask, split.train, groups)
    anomalies = normaliser.transform(values, mask, groups)
    return FieldData(Path(path), var, da, grid, values, mask, split, weights, groups, normaliser, anomalies)


def return_freed_blocks_to_the_system(threshold: int = 1 << 20) -> bool:
    """On glibc (Linux), serve every allocation above ``threshold`` bytes by its own ``mmap``.

    A streamed pass allocates and frees arrays of a block (tens of MB) thousands of times; glibc
    raises its mmap threshold after such frees (up to 32 MB) and then serves these arrays from
    its heap, which fragments and keeps growing (a 4 GB ``reduce --stream`` reached 6 GB resident).
    A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``, what ``MALLOC_MMAP_THRESHOLD_`` sets) gives
    each freed block back to the system at once. Returns whether it was set (False elsewhere).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD = -3 in malloc.h
    except (OSError, AttributeError):
        return False


def _streamed(path, var, da, grid, split, scale, block) -> StreamedField:
    from ..fields.blocks import fit_normaliser

    return_freed_blocks_to_the_system()

    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise InputError(f"block: expected an int >= 1, got {block!r}")
    groups = calendar_groups(da, grid=grid)
    try:
        normaliser = fit_normaliser(Normaliser(scale=scale), da, grid, split.train, groups, block)
    except InputError:
        raise InputError(f"--var {var}: every value in the training part is missing (NaN)") from None
    if bool((normaliser.climatology.abs() > 1e30).any()):
        raise InputError(f"--var {var}: values beyond 1e30 (an undeclared fill value?); set _FillValue/missing_value in the file")
    return StreamedField(Path(path), var, da, grid, split, area_weights(grid), groups, normaliser, block)
