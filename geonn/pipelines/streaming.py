"""Verbs on variables larger than memory (:class:`~geonn.pipelines.source.StreamedField`).

``reduce --method eof`` runs out of core: the normaliser and a randomised SVD accumulate over
blocks of time steps (:func:`geonn.emulators.eof.fit_eof_blocks`), the scores accumulate per
block, and ``reconstruction.nc`` is computed and written block by block through dask, so memory
holds a few blocks, never the variable.
"""

from __future__ import annotations

from pathlib import Path

import torch
import xarray as xr
from tqdm.auto import tqdm

from ..emulators.eof import fit_eof_blocks
from ..errors import InputError
from ..fields import calendar_groups, from_tensor, to_tensor, weighted_rmse
from ..io import save_checkpoint, write_netcdf
from .source import StreamedField


def reduce_streamed(data: StreamedField, options, folder: Path, *, seed: int = 0, progress: bool = True) -> dict:
    """``geonn fields reduce`` with EOFs, out of core; the same outputs and metrics as in memory."""
    from .reduce import latent_dataset

    if options.method != "eof":
        raise InputError(f"--method: {options.method!r} needs the variable in memory; streamed data take --method eof")
    bar = tqdm(total=4, desc="reduce (streamed)", unit="pass", disable=not progress)
    used = data.n_valid_train == data.n_train

    def training_blocks():
        return data.anomaly_blocks(data.split.train)

    reducer = fit_eof_blocks(training_blocks, options.modes, data.weights, used, power_iterations=2, seed=seed)
    bar.update(2)

    latent, sums = [], _Scores(data)
    for steps, anomalies, mask in data.anomaly_blocks(slice(0, data.da.sizes[data.grid.time])):
        code = reducer.encode(anomalies)
        latent.append(code)
        fields = data.normaliser.inverse(reducer.decode(code).to(anomalies.dtype), mask, data.groups[steps])
        values = data.normaliser.inverse(anomalies, mask, data.groups[steps])
        sums.add(steps, fields, values, mask)
    latent = torch.cat(latent)
    bar.update(1)
    write_netcdf(latent_dataset(latent, data, "eof"), folder / "latent.nc")
    _write_reconstruction(data, reducer, folder / "reconstruction.nc", options.modes)
    save_checkpoint({"method": "eof", "modes": options.modes, "var": data.var, "reducer": reducer.state_dict(),
                     "normaliser": data.normaliser.state_dict()}, folder / "model.pt")
    bar.update(1)
    bar.close()
    found = sums.result()
    return {"method": "eof", "modes": options.modes, **found, "rmse_test_eof": found["rmse_test"],
            "explained_variance_test_eof": found["explained_variance_test"], "rmse_ratio_to_eof": 1.0, "streamed": True}


class _Scores:
    """Area-weighted test RMSE (mean over time of the per-time RMSE) and explained variance, by block."""

    def __init__(self, data: StreamedField):
        self.data, self.rmse_test, self.rmse_train = data, [], []
        self.sse = self.s1 = self.s2 = self.count = None

    def add(self, steps: slice, fields, values, mask):
        data = self.data
        per_time = weighted_rmse(fields, values, mask, data.weights, per_time=True)
        index = torch.arange(steps.start, steps.stop)
        test = index >= data.split.test.start
        self.rmse_test.append(per_time[test])
        self.rmse_train.append(per_time[~test])
        if bool(test.any()):
            w = (data.weights.double() * mask[test]).double()
            x, f = values[test].double(), fields[test].double()
            parts = ((w * (f - x) ** 2).sum(0), (w * x).sum(0), (w * x * x).sum(0), (w > 0).double().sum(0))
            if self.sse is None:
                self.sse, self.s1, self.s2, self.count = (torch.zeros_like(parts[0]) for _ in range(4))
            for total, part in zip((self.sse, self.s1, self.s2, self.count), parts):
                total += part

    def result(self) -> dict:
        rmse_test, rmse_train = torch.cat(self.rmse_test), torch.cat(self.rmse_train)
        # per point: sum w (x - mean)^2 = s2 - s1^2 / count with w constant in time at a point
        weight = self.data.weights.double()
        sst_point = torch.where(self.count > 0, self.s2 - self.s1**2 / (weight * self.count).clamp_min(1e-300), 0)
        sst = float(sst_point.sum())
        return {
            "rmse_test": float(rmse_test[torch.isfinite(rmse_test)].mean()),
            "explained_variance_test": 1 - float(self.sse.sum()) / sst if sst > 0 else float("nan"),
            "rmse_train": float(rmse_train[torch.isfinite(rmse_train)].mean()),
        }


def _write_reconstruction(data: StreamedField, reducer, path: Path, modes: int) -> None:
    """Write the rebuilt variable block by block (dask map_blocks over whole-field time chunks)."""
    grid = data.grid
    source = data.da.chunk({grid.time: data.block, **{d: -1 for d in grid.dims if d != grid.time}})

    def rebuild(block: xr.DataArray) -> xr.DataArray:
        values, mask, _ = to_tensor(block, grid, dtype=torch.float32)
        groups = calendar_groups(block, grid=grid)
        anomalies = data.normaliser.transform(values, mask, groups)
        fields = data.normaliser.inverse(reducer.decode(reducer.encode(anomalies)).to(values.dtype), mask, groups)
        return from_tensor(fields, like=block, grid=grid)

    rebuilt = xr.map_blocks(rebuild, source, template=source)
    rebuilt.attrs, rebuilt.encoding = dict(data.da.attrs), dict(data.da.encoding)
    ds = rebuilt.to_dataset(name=data.var)
    ds.attrs = {"title": f"geonn fields reduce: {data.var} rebuilt from {modes} eof modes (streamed)",
                "source_file": str(data.path), "method": "eof", "modes": modes, "train_steps": data.n_train,
                "test_steps": data.n_test, "Conventions": "CF-1.8"}
    encoding = {k: v for k, v in data.da.encoding.items() if k in ("dtype", "_FillValue", "zlib", "complevel", "scale_factor", "add_offset")}
    for name in ds.variables:
        if name != data.var:
            ds[name].encoding = {k: v for k, v in ds[name].encoding.items() if k in ("dtype", "units", "calendar", "_FillValue")}
    ds[data.var].encoding = encoding
    import dask

    with dask.config.set(scheduler="synchronous"):  # one block in flight: memory holds a block, not one per thread
        write_netcdf(ds, path)

