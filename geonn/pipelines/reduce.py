"""``geonn fields reduce``: encode a variable to K latent coordinates and reconstruct it.

The reducer (EOF, or a learned one registered in :data:`METHODS`) is fitted on the training
anomalies (training climatology removed, one global scale); scores compare the reconstruction of
the held-out steps with the data, area-weighted, in the variable's units. The EOF baseline at the
same K is always fitted and scored beside the chosen method.

Outputs: ``latent.nc`` (``latent(time, mode)`` for every time step), ``reconstruction.nc`` (the
variable rebuilt at every time step: same dims, coords, attrs and encoding, NaN where the input was
NaN), ``model.pt`` (reducer and normaliser state, weights-only), ``figures/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .. import plotting
from ..emulators import EOFReducer
from ..errors import InputError
from ..fields import explained_variance, from_tensor, weighted_rmse
from ..io import save_checkpoint, write_netcdf
from .source import FieldData


def _eof(modes: int, options, data: FieldData, folder: Path, *, seed: int, progress: bool) -> EOFReducer:
    train = data.split.train
    return EOFReducer(modes=modes).fit(data.anomalies[train], data.mask[train], data.weights)


def _autoencoder(modes: int, options, data: FieldData, folder: Path, *, seed: int, progress: bool):
    from ..emulators.autoencoder import fit_autoencoder

    return fit_autoencoder(data, modes, options, folder, seed=seed, progress=progress)


# method -> fit(modes, options, data, folder, *, seed, progress) returning an object with encode/decode/state_dict
METHODS = {"eof": _eof, "autoencoder": _autoencoder}


@dataclass
class Options:
    """Settings of ``geonn fields reduce``.

    Args:
        modes: K, the number of latent coordinates (>= 1).
        method: ``"eof"`` or ``"autoencoder"``.
        epochs: training epochs of a learned reducer (``None``: its default).
    """

    modes: int = 5
    method: str = "eof"
    epochs: int | None = None

    def __post_init__(self):
        if isinstance(self.modes, bool) or not isinstance(self.modes, int) or self.modes < 1:
            raise InputError(f"--modes: expected an int >= 1, got {self.modes!r}")
        if self.method not in METHODS:
            raise InputError(f"--method: expected one of {sorted(METHODS)}, got {self.method!r}")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1):
            raise InputError(f"--epochs: expected an int >= 1, got {self.epochs!r}")


def reconstruct(reducer, data: FieldData) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latent (time, K), fields (time, channel, lat, lon))`` in the variable's units, every time step."""
    with torch.no_grad():
        latent = reducer.encode(data.anomalies)
        anomalies = reducer.decode(latent).to(data.values.dtype)
    return latent, data.normaliser.inverse(anomalies, data.mask, data.groups)


def scores(fields: torch.Tensor, data: FieldData) -> dict[str, float]:
    """Area-weighted test RMSE (variable units) and explained variance of the held-out steps."""
    test = data.split.test
    truth, mask = data.values[test], data.mask[test]
    return {
        "rmse_test": float(weighted_rmse(fields[test], truth, mask, data.weights)),
        "explained_variance_test": float(explained_variance(fields[test], truth, mask, data.weights)),
        "rmse_train": float(weighted_rmse(fields[data.split.train], data.values[data.split.train], data.mask[data.split.train], data.weights)),
    }


def latent_dataset(latent: torch.Tensor, data: FieldData, method: str) -> xr.Dataset:
    time = data.da[data.grid.time]
    modes = np.arange(1, latent.shape[1] + 1, dtype=np.int32)
    ds = xr.Dataset(
        {"latent": ((data.grid.time, "mode"), latent.detach().double().numpy(), {
            "long_name": f"latent coordinates of {data.var} ({method})",
            "units": "1",
            "comment": "in the units of the normalised anomalies (training climatology removed, divided by one global scale)",
        })},
        coords={data.grid.time: time, "mode": ("mode", modes, {"long_name": "latent mode number", "units": "1"})},
        attrs={"title": f"geonn fields reduce: {method}, {latent.shape[1]} modes of {data.var}",
               "source_file": str(data.path.resolve()), "train_steps": data.n_train, "test_steps": data.n_test,
               "Conventions": "CF-1.8"},
    )
    return ds


def reconstruction_dataset(fields: torch.Tensor, data: FieldData, method: str, modes: int) -> xr.Dataset:
    da = from_tensor(fields, like=data.da, grid=data.grid)
    ds = da.to_dataset(name=data.var)
    ds.attrs = {"title": f"geonn fields reduce: {data.var} rebuilt from {modes} {method} modes",
                "source_file": str(data.path.resolve()), "method": method, "modes": modes,
                "train_steps": data.n_train, "test_steps": data.n_test, "Conventions": "CF-1.8"}
    return ds


def _figures(folder: Path, data: FieldData, eof: EOFReducer, found: dict[str, torch.Tensor], modes: int) -> None:
    lat, lon = data.grid.latitudes, data.da[data.grid.lon].values if data.grid.lon in data.da.coords else None
    t = data.split.test.start
    when = str(data.da[data.grid.time].values[t]) if data.grid.time in data.da.coords else f"step {t}"
    truth = data.values[t, 0].numpy().copy()
    truth[~data.mask[t, 0].numpy()] = np.nan
    panels, titles = [truth - np.nanmean(truth)], [f"data (minus its mean), {when}"]
    for name, fields in found.items():
        panels.append(fields[t, 0].numpy() - truth)
        titles.append(f"{name} K={modes} error")
    plotting.map_panels(panels, titles, lat, lon, folder / "figures" / "reconstruction_heldout.png", units=data.units,
                        suptitle=f"{data.var}: first held-out step")
    patterns = eof.patterns[: min(modes, 4), 0].numpy()
    ratio = eof.explained_variance_ratio.numpy()
    plotting.map_panels(list(patterns), [f"EOF {k + 1} ({100 * ratio[k]:.1f}%)" for k in range(len(patterns))], lat, lon,
                        folder / "figures" / "eof_modes.png", shared=False)


def run(data: FieldData, options: Options, folder: Path, *, seed: int = 0, progress: bool = True) -> dict:
    """Fit the reducer and the EOF baseline, write the outputs into ``folder``, return the metrics."""
    torch.manual_seed(seed)
    eof = _eof(options.modes, options, data, folder, seed=seed, progress=progress)
    eof_latent, eof_fields = reconstruct(eof, data)
    baseline = scores(eof_fields, data)
    if options.method == "eof":
        reducer, latent, fields, found = eof, eof_latent, eof_fields, baseline
    else:
        reducer = METHODS[options.method](options.modes, options, data, folder, seed=seed, progress=progress)
        latent, fields = reconstruct(reducer, data)
        found = scores(fields, data)
    write_netcdf(latent_dataset(latent, data, options.method), folder / "latent.nc")
    write_netcdf(reconstruction_dataset(fields, data, options.method, options.modes), folder / "reconstruction.nc")
    save_checkpoint({"method": options.method, "modes": options.modes, "var": data.var, "reducer": reducer.state_dict(),
                     "normaliser": data.normaliser.state_dict()}, folder / "model.pt")
    curves = {"EOF": eof_fields} if options.method == "eof" else {"EOF": eof_fields, options.method: fields}
    _figures(folder, data, eof, curves, options.modes)
    metrics = {"method": options.method, "modes": options.modes, **found,
               "rmse_test_eof": baseline["rmse_test"], "explained_variance_test_eof": baseline["explained_variance_test"],
               "rmse_ratio_to_eof": found["rmse_test"] / baseline["rmse_test"]}
    return metrics
