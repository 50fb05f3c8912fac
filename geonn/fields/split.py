"""A time-ordered train/test split, and batches of (time, patch) samples read lazily.

:class:`FieldBatches` reads a variable one batch at a time with ``da.isel(time=...)``, so a
dask-backed variable (``xr.open_dataset(path, chunks={"time": ...})``) is never loaded whole:
only the chunks that hold the batch's time steps are computed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import xarray as xr

from ..errors import InputError, InputTypeError, describe
from .grid import Grid, check_grid, find_grid
from .tensors import field_array


class TimeSplit(NamedTuple):
    """Training and held-out time steps as slices (usable on tensors and with ``da.isel``)."""

    train: slice
    test: slice


def time_split(n_times: int | xr.DataArray, test_fraction: float = 0.2) -> TimeSplit:
    """Hold out the last ``test_fraction`` of the time steps; train on the ones before.

    Args:
        n_times: the number of time steps, or a variable whose time dimension is counted.
        test_fraction: the held-out share, in (0, 1); the held-out count is rounded to nearest
            (halves up).

    Raises:
        InputError: the fraction is outside (0, 1), or either part would be empty.

    Example:
        >>> time_split(240, 0.2)
        TimeSplit(train=slice(0, 192, None), test=slice(192, 240, None))
    """
    if isinstance(n_times, xr.DataArray):
        n_times = n_times.sizes[find_grid(n_times).time]
    if isinstance(n_times, bool) or not isinstance(n_times, (int, np.integer)):
        raise InputTypeError(f"n_times: expected an int or a DataArray, got {describe(n_times)}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise InputError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    n_test = math.floor(n_times * test_fraction + 0.5)  # to nearest, halves up
    n_train = int(n_times) - n_test
    if n_test < 1 or n_train < 1:
        raise InputError(
            f"n_times: {n_times} time steps with test_fraction={test_fraction} leave {n_train} for training and "
            f"{n_test} for testing; each part needs at least 1 (give more time steps or another fraction)"
        )
    return TimeSplit(slice(0, n_train), slice(n_train, int(n_times)))


class FieldBatch(NamedTuple):
    """A batch of samples; ``values`` and ``mask`` are ``(batch, channel, patch_lat, patch_lon)``."""

    values: torch.Tensor
    mask: torch.Tensor
    time: torch.Tensor  # (batch,) time index into the variable
    lat_start: torch.Tensor  # (batch,) first row of the patch, south to north
    lon_start: torch.Tensor  # (batch,) first column of the patch


class FieldBatches:
    """Batches of (time, patch) samples of a gridded variable, read one batch at a time.

    The samples are every time in ``times`` crossed with every patch origin on a regular tiling
    of the grid (step ``stride``, default the patch size); ``patch_size=None`` takes whole fields.
    Iterating again starts a new epoch (a new order when ``shuffle``).

    Args:
        da: the variable; may be dask-backed (only the batch's time steps are loaded).
        times: the time steps to draw from (a slice such as ``time_split(...).train``, or indices).
        batch_size: samples per batch.
        patch_size: ``(lat, lon)`` size of a patch, or ``None`` for the whole field.
        stride: ``(lat, lon)`` step between patch origins; default ``patch_size``.
        shuffle: draw samples in random order, from ``generator`` when given.
        drop_last: leave out a last, smaller batch.
        grid: the layout; found from ``da`` when not given.
        dtype: the dtype of the values; by default that of ``da``.

    Example:
        >>> for batch in FieldBatches(da, times=split.train, batch_size=16, patch_size=(32, 32), shuffle=True):
        ...     loss = model_loss(batch.values, batch.mask)
    """

    def __init__(self, da: xr.DataArray, times=slice(None), *, batch_size: int = 8, patch_size=None, stride=None,
                 shuffle: bool = False, drop_last: bool = False, generator: torch.Generator | None = None,
                 grid: Grid | None = None, dtype: torch.dtype | None = None):
        self.grid = find_grid(da) if grid is None else grid
        check_grid(da, self.grid)
        self.da, self.shuffle, self.drop_last, self.generator, self.dtype = da, shuffle, drop_last, generator, dtype
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        n_times = da.sizes[self.grid.time]
        index = torch.arange(n_times)[times] if isinstance(times, slice) else torch.as_tensor(times, dtype=torch.long).flatten()
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= n_times:
            raise InputError(f"times: expected time steps within 0..{n_times - 1}, got {describe(times)}")
        shape = (self.grid.size(self.grid.lat), self.grid.size(self.grid.lon))
        patch = shape if patch_size is None else tuple(int(p) for p in patch_size)
        step = patch if stride is None else tuple(int(s) for s in stride)
        if len(patch) != 2 or not all(1 <= p <= n for p, n in zip(patch, shape)):
            raise InputError(f"patch_size: expected (lat, lon) sizes within the grid {shape}, got {patch_size!r}")
        if len(step) != 2 or min(step) < 1:
            raise InputError(f"stride: expected (lat, lon) steps >= 1, got {stride!r}")
        self.patch_size = patch
        rows = torch.arange(0, shape[0] - patch[0] + 1, step[0])
        cols = torch.arange(0, shape[1] - patch[1] + 1, step[1])
        t, r, c = torch.meshgrid(index, rows, cols, indexing="ij")
        self.samples = torch.stack([t.flatten(), r.flatten(), c.flatten()], dim=1)  # (sample, 3)

    def __len__(self) -> int:
        n = self.samples.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[FieldBatch]:
        order = torch.randperm(self.samples.shape[0], generator=self.generator) if self.shuffle else torch.arange(self.samples.shape[0])
        for batch in range(len(self)):
            samples = self.samples[order[batch * self.batch_size:(batch + 1) * self.batch_size]]
            yield self._load(samples)

    def _load(self, samples: torch.Tensor) -> FieldBatch:
        needed, where = torch.unique(samples[:, 0], return_inverse=True)  # sorted time steps
        array = field_array(self.da.isel({self.grid.time: needed.numpy()}), self.grid)  # loads these times only
        (ph, pw), pieces = self.patch_size, []
        for k, (_, row, col) in enumerate(samples.tolist()):
            pieces.append(array[int(where[k]), :, row:row + ph, col:col + pw])
        stacked = np.stack(pieces)
        mask = np.isfinite(stacked)
        values = torch.from_numpy(np.where(mask, stacked, 0))
        values = values if self.dtype is None else values.to(self.dtype)
        return FieldBatch(values, torch.from_numpy(mask), samples[:, 0].clone(), samples[:, 1].clone(), samples[:, 2].clone())
