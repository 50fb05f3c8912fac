"""``geonn fields reduce``: encode a variable to K latent coordinates and reconstruct it.

The reducer (EOF, or a learned one registered in :data:`METHODS`) is fitted on the training
anomalies (training climatology removed, one global scale); scores compare the reconstruction of
the held-out steps with the data, area-weighted, in the variable's units. The EOF baseline at the
same K is always fitted and scored beside the chosen method.

Outputs: ``latent.nc`` (``latent(time, mode)`` for every time step), ``reconstruction.nc`` (the
variable rebuilt at every time step: same dims, coords, attrs and encoding, NaN where the input was
NaN), ``model.pt`` (reducer and normaliser state, weights-only), ``figures/``; the autoencoder
also leaves its training checkpoint (with the per-epoch history) in ``autoencoder/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .. import distributed, plotting
from ..emulators import EOFReducer
from ..errors import InputError
from ..fields import explained_variance, from_tensor, weighted_rmse
from ..io import save_checkpoint, write_netcdf
from .source import FieldData


def _eof(modes: int, options, data: FieldData, folder: Path, *, seed: int, progress: bool, resume: bool = False) -> EOFReducer:
    train = data.split.train
    return EOFReducer(modes=modes).fit(data.anomalies[train], data.mask[train], data.weights)


def _autoencoder(modes: int, options, data: FieldData, folder: Path, *, seed: int, progress: bool, resume: bool = False):
    from ..emulators.autoencoder import fit_autoencoder

    return fit_autoencoder(data, modes, options, folder, seed=seed, progress=progress, resume=resume)


# method -> fit(modes, options, data, folder, *, seed, progress) returning an object with encode/decode/state_dict
METHODS = {"eof": _eof, "autoencoder": _autoencoder}


# the autoencoder's settings (geonn.emulators.autoencoder): None keeps its default
_AUTOENCODER_INTS = {"hidden": 1, "depth": 1, "patience": 0, "batch_size": 1}
_AUTOENCODER_FLOATS = ("dropout", "learning_rate", "weight_decay", "noise", "validation_fraction")


@dataclass
class Options:
    """Settings of ``geonn fields reduce``.

    Args:
        modes: K, the number of latent coordinates (>= 1).
        method: ``"eof"`` or ``"autoencoder"``.
        epochs: the most training epochs of a learned reducer before its refit (``None``: its default).

    The remaining fields set the autoencoder (:class:`geonn.emulators.AutoencoderReducer` and
    :class:`~geonn.emulators.AutoencoderTraining`; ``None``: its default) and are ignored by EOF:
    ``hidden`` channels of the first convolution level (8), ``depth`` stride-2 levels (3),
    ``dropout`` (0.5), ``residual`` (build on the EOFs, true), ``patience`` (30), ``batch_size``
    (16), ``learning_rate`` (1e-3), ``weight_decay`` (0.01), ``noise`` on the encoder input
    (0, normalised units), ``validation_fraction`` of the training steps used for early
    stopping (0.2).
    """

    modes: int = 5
    method: str = "eof"
    epochs: int | None = None
    hidden: int | None = None
    depth: int | None = None
    dropout: float | None = None
    residual: bool | None = None
    patience: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None
    noise: float | None = None
    validation_fraction: float | None = None

    def __post_init__(self):
        if isinstance(self.modes, bool) or not isinstance(self.modes, int) or self.modes < 1:
            raise InputError(f"--modes: expected an int >= 1, got {self.modes!r}")
        if self.method not in METHODS:
            raise InputError(f"--method: expected one of {sorted(METHODS)}, got {self.method!r}")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1):
            raise InputError(f"--epochs: expected an int >= 1, got {self.epochs!r}")
        for name, minimum in _AUTOENCODER_INTS.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise InputError(f"{name}: expected an int >= {minimum}, got {value!r}")
        for name in _AUTOENCODER_FLOATS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
                raise InputError(f"{name}: expected a number >= 0, got {value!r}")
        if self.dropout is not None and self.dropout >= 1:
            raise InputError(f"dropout: expected a number in [0, 1), got {self.dropout!r}")
        if self.validation_fraction is not None and not 0 < self.validation_fraction < 1:
            raise InputError(f"validation_fraction: expected a number in (0, 1), got {self.validation_fraction!r}")
        if self.residual is not None and not isinstance(self.residual, bool):
            raise InputError(f"residual: expected true or false, got {self.residual!r}")


def reconstruct(reducer, data: FieldData) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latent (time, K), fields (time, channel, lat, lon))`` in the variable's units, every time step."""
    with torch.no_grad():
        # EOFs use the valid points of every training step (missing ones hold 0, the climatology);
        # a learned reducer also reads the mask
        latent = reducer.encode(data.anomalies) if isinstance(reducer, EOFReducer) else reducer.encode(data.anomalies, data.mask)
        anomalies = reducer.decode(latent).to(data.values.dtype)
    return latent, data.normaliser.inverse(anomalies, data.mask, data.groups)


def scores(fields: torch.Tensor, data: FieldData) -> dict[str, float]:
    """Area-weighted test RMSE (variable units) and explained variance of the held-out steps."""
    test = data.split.test
    truth, mask = data.values[test], data.mask[test]
    rmse_test = float(weighted_rmse(fields[test], truth, mask, data.weights))
    try:
        explained = float(explained_variance(fields[test], truth, mask, data.weights))
    except InputError as err:
        if not str(err).startswith("truth:"):
            raise
        raise InputError(
            f"--var: {data.var!r} is constant over the {data.n_test} held-out steps at every valid point, so the "
            f"explained variance of its reconstruction is undefined; give a variable that varies over time, or another "
            f"--train-fraction") from None
    return {
        "rmse_test": rmse_test,
        "explained_variance_test": explained,
        "rmse_train": float(weighted_rmse(fields[data.split.train], data.values[data.split.train], data.mask[data.split.train], data.weights)),
    }


def rmse_ratio(found: float, baseline: float) -> float:
    """``found / baseline`` (the method's test RMSE over the EOF baseline's); 1 when both are 0 (both exact) and
    ``inf`` when only the baseline is (written as ``null`` in ``metrics.json``)."""
    if baseline > 0:
        return found / baseline
    return 1.0 if found == 0 else math.inf


_LATENT_COMMENT = {
    "eof": "principal components: projections of the area-weighted normalised anomalies (training climatology "
           "removed, divided by one global scale) on the EOFs",
    "autoencoder": "the autoencoder's latent coordinates: standardised principal components of the normalised "
                   "anomalies (training climatology removed, divided by one global scale) refined by its encoder",
}


def latent_dataset(latent: torch.Tensor, data: FieldData, method: str) -> xr.Dataset:
    time = data.da[data.grid.time]
    modes = np.arange(1, latent.shape[1] + 1, dtype=np.int32)
    ds = xr.Dataset(
        {"latent": ((data.grid.time, "mode"), latent.detach().double().numpy(), {
            "long_name": f"latent coordinates of {data.var} ({method})",
            "units": "1",
            "comment": _LATENT_COMMENT.get(method, _LATENT_COMMENT["eof"]),
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


def _figures(folder: Path, data: FieldData, eof: EOFReducer, found: dict[str, torch.Tensor], modes: int,
             learned: tuple[str, object] | None = None) -> None:
    """``reconstruction_heldout.png`` (one held-out step: data, each reconstruction and its error),
    ``eof_modes.png`` and, for a learned reducer, ``modes.png`` (EOF modes beside the learned ones)."""
    lat, lon = data.grid.latitudes, data.da[data.grid.lon].values if data.grid.lon in data.da.coords else None
    t = data.split.test.start
    when = str(data.da[data.grid.time].values[t]) if data.grid.time in data.da.coords else f"step {t}"
    step, valid = slice(t, t + 1), data.mask[t, 0].numpy()
    climatology = data.normaliser.inverse(torch.zeros_like(data.values[step]), data.mask[step], data.groups[step])[0, 0].numpy()

    def masked(field):
        field = np.array(field, dtype=float)
        field[~valid] = np.nan
        return field

    truth = masked(data.values[t, 0].numpy())
    panels, titles = [truth - climatology], [f"data, {when}"]
    errors, error_titles = [np.full_like(truth, np.nan)], ["(top: anomalies from the training climatology)"]
    for name, fields in found.items():
        rebuilt = masked(fields[t, 0].numpy())
        error = weighted_rmse(fields[step], data.values[step], data.mask[step], data.weights)
        panels.append(rebuilt - climatology)
        titles.append(f"{name}, K={modes}")
        errors.append(rebuilt - truth)
        error_titles.append(f"{name} error (RMSE {float(error):.3g} {data.units})")
    if len(found) > 1:  # what the learned reducer changes on the EOF reconstruction
        names = list(found)
        first, last = names[0], names[-1]
        errors[0] = masked(found[last][t, 0].numpy()) - masked(found[first][t, 0].numpy())
        error_titles[0] = f"{last} minus {first}"
    plotting.map_panels(panels + errors, titles + error_titles, lat, lon, folder / "figures" / "reconstruction_heldout.png",
                        units=data.units, ncols=len(panels), suptitle=f"{data.var}: first held-out step, rebuilt from {modes} modes")
    patterns = eof.patterns[: min(modes, 4), 0].numpy()
    ratio = eof.explained_variance_ratio.numpy()
    plotting.map_panels(list(patterns), [f"EOF {k + 1} ({100 * ratio[k]:.1f}%)" for k in range(len(patterns))], lat, lon,
                        folder / "figures" / "eof_modes.png", shared=False)
    if learned is not None:
        shown = min(modes, 4)
        eof_std = eof.state_dict()["singular_values"][:shown] / max(data.n_train - 1, 1) ** 0.5
        rows = []
        for name, model, unit in (("EOF", eof, eof_std), (*learned, torch.ones(shown))):
            latent = torch.zeros(shown + 1, modes)
            latent[torch.arange(1, shown + 1), torch.arange(shown)] = unit.to(latent.dtype)
            with torch.no_grad():
                fields = model.decode(latent).to(data.values.dtype)
            groups = data.groups[step].expand(shown + 1)
            fields = data.normaliser.inverse(fields, data.mask[step].expand(shown + 1, -1, -1, -1), groups)
            rows.append([(name, k, masked((fields[k + 1, 0] - fields[0, 0]).numpy())) for k in range(shown)])
        plotting.map_panels([p for row in rows for _, _, p in row], [f"{name} mode {k + 1}: +1 std" for row in rows for name, k, _ in row],
                            lat, lon, folder / "figures" / "modes.png", units=data.units, ncols=shown,
                            suptitle=f"{data.var}: decoded change for +1 standard deviation of each latent coordinate")


def _learned_metrics(reducer, data: FieldData) -> dict:
    """Selection facts of a learned reducer, RMSEs in the variable's units."""
    std = data.normaliser.state_dict()["std"]
    scale = float(std.reshape(-1)[0]) if std.numel() == 1 else float("nan")
    return {"best_epoch": int(reducer.best_epoch), "validation_rmse": reducer.validation_rmse * scale,
            "validation_rmse_eof": reducer.validation_rmse_eof * scale,
            "validation_ratio_to_eof": rmse_ratio(reducer.validation_rmse, reducer.validation_rmse_eof),
            "train_seconds": float(reducer.train_seconds)}


def run(data: FieldData, options: Options, folder: Path, *, seed: int = 0, progress: bool = True,
        checkpoints: Path | None = None, resume: bool = False) -> dict:
    """Fit the reducer and the EOF baseline, write the outputs into ``folder``, return the metrics.

    A learned reducer's training checkpoints go to ``checkpoints`` (default ``folder``); ``resume``
    continues from them. Under ``torchrun`` the autoencoder trains data-parallel
    (:meth:`geonn.emulators.AutoencoderReducer.fit`) and rank 0 alone scores and writes.
    """
    torch.manual_seed(seed)
    eof = _eof(options.modes, options, data, folder, seed=seed, progress=progress)
    eof_latent, eof_fields = reconstruct(eof, data)
    baseline = scores(eof_fields, data)
    if options.method == "eof":
        reducer, latent, fields, found = eof, eof_latent, eof_fields, baseline
    else:
        reducer = METHODS[options.method](options.modes, options, data, checkpoints or folder, seed=seed, progress=progress,
                                          resume=resume)
        if not distributed.current().is_main:  # under torchrun rank 0 alone reconstructs, scores and writes
            return {"best_epoch": int(reducer.best_epoch)}
        latent, fields = reconstruct(reducer, data)
        found = scores(fields, data)
    write_netcdf(latent_dataset(latent, data, options.method), folder / "latent.nc")
    write_netcdf(reconstruction_dataset(fields, data, options.method, options.modes), folder / "reconstruction.nc")
    save_checkpoint({"method": options.method, "modes": options.modes, "var": data.var, "reducer": reducer.state_dict(),
                     "normaliser": data.normaliser.state_dict()}, folder / "model.pt")
    curves = {"EOF": eof_fields} if options.method == "eof" else {"EOF": eof_fields, options.method: fields}
    _figures(folder, data, eof, curves, options.modes, None if options.method == "eof" else (options.method, reducer))
    metrics = {"method": options.method, "modes": options.modes, **found,
               "rmse_test_eof": baseline["rmse_test"], "explained_variance_test_eof": baseline["explained_variance_test"],
               "rmse_ratio_to_eof": rmse_ratio(found["rmse_test"], baseline["rmse_test"])}
    if options.method != "eof":
        metrics.update(_learned_metrics(reducer, data))
    return metrics
