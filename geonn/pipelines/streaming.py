"""Verbs on variables larger than memory (:class:`~geonn.pipelines.source.StreamedField`).

``reduce --method eof`` runs out of core: the normaliser and a randomised SVD accumulate over
blocks of time steps (:func:`geonn.emulators.eof.fit_eof_blocks`), the scores accumulate per
block, and ``reconstruction.nc`` is computed and written block by block through dask, so memory
holds a few blocks, never the variable. ``emulate`` trains the CNN on batches read a block of
time steps at a time (:class:`geonn.emulators.cnn.StreamedPairs`) and forecasts, scores and
writes the held-out part block by block (:func:`emulate_streamed`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from .. import distributed
from ..distributed import resolve_device
from ..emulators.eof import fit_eof_blocks
from ..errors import InputError
from ..fields import anomaly_correlation, calendar_groups, from_tensor, to_tensor, weighted_rmse
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



def emulate_streamed(data: StreamedField, options, folder: Path, *, seed: int = 0, progress: bool = True,
                     checkpoints: Path | None = None, resume: bool = False, device: str | torch.device = "cpu") -> dict:
    """``geonn fields emulate`` out of core: the CNN trained on batches read a block of time steps at a time.

    Each epoch visits the training targets a block of ``data.block`` time steps at a time (the
    blocks in a shuffled order, the targets shuffled within each,
    :func:`geonn.emulators.cnn.epoch_batches`), reading each block and the ``history`` steps
    before it from disk and normalising them on the fly with the normaliser fitted out of core.
    The held-out steps are forecast and scored block by block, and ``forecast.nc`` (one-step
    forecasts and the free rollout) is computed and written block by block through dask, so memory
    holds a few blocks, never the variable. The baseline is persistence: ridge regression and the
    linear inverse model need the variable in memory.
    """
    import dask
    import dask.array

    from ..emulators.cnn import CHECKPOINT_NAME, StreamedPairs, fit_emulator, history_windows
    from .emulate import _check_lengths, grid_padding

    _check_lengths(data, options)
    device = resolve_device(device)
    h, grid, test = options.history, data.grid, data.split.test
    padding = grid_padding(data, options.padding)
    torch.manual_seed(seed)
    emulator = options.model(grid.n_channels, padding).to(device)
    source = StreamedPairs(data.read, data.n_train, grid.n_channels, data.block)
    fit = fit_emulator(emulator, source, None, data.weights, options.training(seed), checkpoint_dir=checkpoints or folder,
                       resume=resume, progress=progress)
    if checkpoints is None:
        (folder / CHECKPOINT_NAME).unlink(missing_ok=True)
    if not distributed.current().is_main:
        return {"best_epoch": fit.best_epoch}  # under torchrun rank 0 alone forecasts, scores and writes
    static = (data.n_valid_train == data.n_train).to(device)  # points valid at every training step
    weights = data.weights

    def read(steps: slice):
        """Raw values, mask and anomalies of ``steps``."""
        _, values, mask = next(iter(data.blocks_of(steps, steps.stop - steps.start)))
        return values, mask, data.normaliser.transform(values, mask, data.groups[steps])

    def to_values(anomalies, mask, steps):
        return data.normaliser.inverse(anomalies.cpu().to(torch.float32), mask, data.groups[steps])

    def one_step(steps: slice):
        """(values, mask, CNN forecast, persistence forecast) of the targets ``steps``, in the variable's units."""
        values, mask, anomalies = read(slice(steps.start - h, steps.stop))
        local = torch.arange(h, h + steps.stop - steps.start)
        with torch.no_grad():  # in batches: the activations of one batch, not of a block
            cnn = torch.cat([emulator(history_windows(anomalies, part, h).to(device)).cpu()
                             for part in local.split(options.batch_size)])
        mask, values = mask[local], values[local]
        return values, mask, to_values(cnn, mask, steps), to_values(anomalies[local - 1], mask, steps)

    def rollout(window, steps: slice, mask):
        with torch.no_grad():
            free = emulator.rollout(window, steps.stop - steps.start, mask=static)
        return to_values(free[0], mask, steps), torch.cat([window, free], 1)[:, -h:].clone()  # not a view of the block

    test_blocks = [slice(s, min(s + data.block, test.stop)) for s in range(test.start, test.stop, data.block)]
    bar = tqdm(total=len(test_blocks), desc="forecast (streamed)", unit="block", disable=not progress)
    per_time = {k: [] for k in ("cnn", "persistence", "acc_cnn", "acc_persistence", "rollout", "rollout_persistence")}
    mae = {"cnn": 0.0, "persistence": 0.0, "count": 0.0}
    _, _, start = read(slice(test.start - h, test.start))
    window = start.unsqueeze(0).to(device)
    windows, first = [], None
    last_training = read(slice(test.start - 1, test.start))[0]
    for steps in test_blocks:
        windows.append(window)
        values, mask, cnn, persistence = one_step(steps)
        free, window = rollout(window, steps, mask)
        climatology = data.normaliser.inverse(torch.zeros_like(values), torch.ones_like(mask), data.groups[steps])
        per_time["cnn"].append(weighted_rmse(cnn, values, mask, weights, per_time=True))
        per_time["persistence"].append(weighted_rmse(persistence, values, mask, weights, per_time=True))
        per_time["acc_cnn"].append(anomaly_correlation(cnn, values, climatology, mask, weights, per_time=True))
        per_time["acc_persistence"].append(anomaly_correlation(persistence, values, climatology, mask, weights, per_time=True))
        per_time["rollout"].append(weighted_rmse(free, values, mask, weights, per_time=True))
        per_time["rollout_persistence"].append(weighted_rmse(last_training.expand_as(values), values, mask, weights, per_time=True))
        mae["cnn"] = mae["cnn"] + torch.where(mask, (cnn - values).abs(), 0).sum(0).double()
        mae["persistence"] = mae["persistence"] + torch.where(mask, (persistence - values).abs(), 0).sum(0).double()
        mae["count"] = mae["count"] + mask.sum(0).double()
        if first is None:
            first = (values[0], mask[0], cnn[0], persistence[0], climatology[0])
        bar.update(1)
    bar.close()
    scores = {k: float(torch.nanmean(torch.cat(v).double())) for k, v in per_time.items()}

    # forecast.nc, block by block: each dask chunk recomputes its block (the rollout from its saved starting window)
    like = data.da.isel({grid.time: test})
    axis = like.dims.index(grid.time)

    def chunk(kind: str, k: int) -> np.ndarray:
        steps = test_blocks[k]
        part = like.isel({grid.time: slice(steps.start - test.start, steps.stop - test.start)})
        if kind == "one_step":
            _, mask, forecast, _ = one_step(steps)
        else:
            mask = read(steps)[1]
            forecast = rollout(windows[k], steps, mask)[0]
        return from_tensor(forecast, like=part, grid=grid, mask=mask).values

    def lazy(kind: str) -> xr.DataArray:
        parts = []
        for k, steps in enumerate(test_blocks):
            shape = list(like.shape)
            shape[axis] = steps.stop - steps.start
            parts.append(dask.array.from_delayed(dask.delayed(chunk, pure=False)(kind, k), tuple(shape), dtype=like.dtype))
        return like.copy(data=dask.array.concatenate(parts, axis=axis))

    name = str(data.var)
    one, free = lazy("one_step"), lazy("rollout")
    free.attrs = {**like.attrs, "long_name": f"{like.attrs.get('long_name', name)}, CNN autoregressive forecast from the last training steps"}
    ds = xr.Dataset({name: one, f"{name}_rollout": free})
    ds.attrs = {"title": f"geonn fields emulate: one-step CNN forecasts of {name} for the held-out steps (streamed)",
                "comment": f"{name}: forecast of each held-out step from the true fields before it; "
                           f"{name}_rollout: forecasts fed back as inputs, starting from the last training steps",
                "source_file": str(data.path), "method": "cnn", "train_steps": data.n_train,
                "test_steps": data.n_test, "Conventions": "CF-1.8"}
    keep = ("dtype", "_FillValue", "zlib", "complevel", "scale_factor", "add_offset")
    for variable in (name, f"{name}_rollout"):
        ds[variable].encoding = {k: v for k, v in data.da.encoding.items() if k in keep}
    for coordinate in ds.coords:
        ds[coordinate].encoding = {k: v for k, v in ds[coordinate].encoding.items() if k in ("dtype", "units", "calendar", "_FillValue")}
    with dask.config.set(scheduler="synchronous"):  # one block in flight
        write_netcdf(ds, folder / "forecast.nc")
    save_checkpoint({"var": data.var, "padding": padding, "options": dataclasses.asdict(options),
                     "emulator": {k: v.cpu() for k, v in emulator.state_dict().items()},
                     "normaliser": data.normaliser.state_dict()}, folder / "model.pt")
    _emulate_figures(folder, data, mae, first)
    return {
        "rmse_lead1": scores["cnn"], "acc_lead1": scores["acc_cnn"],
        "rmse_lead1_persistence": scores["persistence"], "acc_lead1_persistence": scores["acc_persistence"],
        "best_baseline": "persistence", "rmse_lead1_best_baseline": scores["persistence"],
        "rmse_ratio_to_best_baseline": scores["cnn"] / scores["persistence"],
        "rmse_validation": float(data.normaliser.std.flatten()[0]) * fit.validation_rmse if data.normaliser.std.numel() == 1 else float("nan"),
        "rmse_rollout": scores["rollout"], "rmse_rollout_persistence": scores["rollout_persistence"],
        "best_epoch": fit.best_epoch, "padding": padding, "train_seconds": fit.train_seconds, "streamed": True,
    }


def _emulate_figures(folder: Path, data: StreamedField, mae: dict, first) -> None:
    """Mean absolute error maps of the CNN and persistence, and the first held-out forecast (as in memory)."""
    from .. import plotting

    lat = data.grid.latitudes
    lon = data.da[data.grid.lon].values if data.grid.lon in data.da.coords else None
    count = mae["count"][0]
    cnn = torch.where(count > 0, mae["cnn"][0] / count.clamp_min(1), float("nan")).numpy()
    persistence = torch.where(count > 0, mae["persistence"][0] / count.clamp_min(1), float("nan")).numpy()
    span = f"{data.n_test} held-out steps"
    plotting.map_panels([cnn, persistence], [f"CNN emulator MAE ({np.nanmean(cnn):.3f})", f"persistence MAE ({np.nanmean(persistence):.3f})"],
                        lat, lon, folder / "figures" / "error_maps.png", units=data.units, cmap="viridis",
                        suptitle=f"{data.var}: one-step mean absolute error over the {span}")
    plotting.map_panels([cnn - persistence], ["CNN MAE minus persistence MAE"], lat, lon, folder / "figures" / "error_difference.png",
                        units=data.units, suptitle=f"{data.var}: negative where the CNN is better ({span})")
    values, mask, forecast, persistence, climatology = (x[0].numpy() for x in first)

    def masked(x):
        return np.where(mask, x, np.nan)

    plotting.map_panels([masked(values - climatology), masked(forecast - climatology), masked(persistence - climatology),
                         masked(forecast - values)],
                        ["truth anomaly", "CNN forecast anomaly", "persistence forecast anomaly", "CNN error"], lat, lon,
                        folder / "figures" / "forecast_heldout.png", units=data.units,
                        suptitle=f"{data.var}: one-step forecast of the first held-out step (anomalies from the training climatology)")
