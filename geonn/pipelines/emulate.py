"""``geonn fields emulate``: a CNN one-step emulator of a variable, scored against linear baselines.

Everything runs on the normalised anomalies of :func:`open_field` (training climatology removed,
one global scale). The CNN emulator (:class:`geonn.emulators.CNNEmulator`) and three baselines
(persistence, ridge regression field to field, a linear inverse model on the leading EOFs) are
fitted on the training part only; their model choices (the CNN's epoch count, the ridge penalty)
use a validation slice at the end of the training part. Each held-out step ``t`` is then
forecast one step ahead from the true fields before it, and scored in the variable's units:
area-weighted RMSE and anomaly correlation (ACC, anomalies from the training climatology).

Outputs: ``forecast.nc`` (the one-step forecasts of the held-out steps as the input variable:
same dims, coords, attrs and encoding, NaN where the input was NaN; and ``<var>_rollout``, the
autoregressive forecast from the last training steps), ``model.pt`` (emulator, normaliser and LIM
state, weights-only), ``figures/`` (error maps, a forecast beside the truth).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .. import distributed, plotting
from ..distributed import resolve_device
from ..emulators.cnn import (
    CHECKPOINT_NAME,
    CNNEmulator,
    EmulatorTraining,
    fit_emulator,
    history_windows,
    is_periodic_longitude,
)
from ..emulators.linear import LinearInverseModel, Persistence, RidgeEmulator, validation_slice
from ..errors import InputError
from ..fields import anomaly_correlation, from_tensor, weighted_rmse
from ..io import save_checkpoint, write_netcdf
from .source import FieldData

DEFAULT_EPOCHS = 60
BASELINES = ("persistence", "ridge", "lim")
PADDING_CHOICES = ("auto", "periodic", "replicate", "zeros")


@dataclass
class Options:
    """Settings of ``geonn fields emulate`` (the command line sets ``epochs``; a case file any of them).

    Args:
        epochs: the most training epochs of the CNN (``None``: 60); early stopping on validation.
        history: past steps the CNN reads (its anchor is their affine combination).
        width, depth, kernel_size, dropout: the CNN correction's feature maps, layers, kernel and dropout.
        learning_rate, weight_decay, batch_size, patience, refit: see :class:`geonn.emulators.EmulatorTraining`.
        validation_fraction: the share at the end of the training part used for model selection
            (the CNN's epochs, the ridge penalty); never the held-out part.
        padding: ``"auto"`` (periodic in longitude when the grid spans 360 degrees, else
            replicate), ``"periodic"``, ``"replicate"`` or ``"zeros"``.
        ridge_basis: ``"grid"`` (all grid points) or ``"eof"`` (the leading ``lim_modes`` EOFs).
        lim_modes: EOFs of the linear inverse model (and of an EOF ridge).
        offset_invariant: see :class:`geonn.emulators.CNNEmulator` (``False`` is an ablation).
    """

    epochs: int | None = None
    history: int = 8
    width: int = 16
    depth: int = 3
    kernel_size: int = 3
    dropout: float = 0.0
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 16
    patience: int | None = 20
    refit: bool = True
    validation_fraction: float = 0.2
    padding: str = "auto"
    ridge_basis: str = "grid"
    lim_modes: int = 10
    offset_invariant: bool = True

    def __post_init__(self):
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1):
            raise InputError(f"--epochs: expected an int >= 1, got {self.epochs!r}")
        if self.padding not in PADDING_CHOICES:
            raise InputError(f"padding: expected one of {PADDING_CHOICES}, got {self.padding!r}")
        if self.ridge_basis not in ("grid", "eof"):
            raise InputError(f"ridge_basis: expected 'grid' or 'eof', got {self.ridge_basis!r}")
        if isinstance(self.lim_modes, bool) or not isinstance(self.lim_modes, int) or self.lim_modes < 1:
            raise InputError(f"lim_modes: expected an int >= 1, got {self.lim_modes!r}")
        self.training()
        self.model(channels=1, padding="zeros")

    def training(self, seed: int = 0) -> EmulatorTraining:
        return EmulatorTraining(
            epochs=DEFAULT_EPOCHS if self.epochs is None else self.epochs, batch_size=self.batch_size,
            learning_rate=self.learning_rate, weight_decay=self.weight_decay, validation_fraction=self.validation_fraction,
            patience=self.patience, refit=self.refit, seed=seed,
        )

    def model(self, channels: int, padding: str) -> CNNEmulator:
        return CNNEmulator(channels, self.history, width=self.width, depth=self.depth, kernel_size=self.kernel_size,
                           padding=padding, dropout=self.dropout, offset_invariant=self.offset_invariant)


def grid_padding(data: FieldData, choice: str = "auto") -> str:
    """The CNN's padding: periodic where the longitudes span the whole circle, else replicate."""
    if choice != "auto":
        return choice
    lon = data.da.coords.get(data.grid.lon)
    return "periodic" if lon is not None and lon.ndim == 1 and is_periodic_longitude(lon.values) else "replicate"


def _check_lengths(data: FieldData, options: Options) -> None:
    n_train = data.n_train
    try:
        validation = validation_slice(n_train, options.validation_fraction)
    except InputError:
        validation = slice(0, n_train)
    if validation.start - options.history < 2:
        raise InputError(
            f"--train-fraction: {n_train} training steps of {data.var} leave {validation.start - options.history} one-step "
            f"pairs before the validation slice ({validation.stop - validation.start} steps) with history={options.history}; "
            "expected at least 2: use a longer series, a larger --train-fraction or a shorter history"
        )


def _to_values(anomalies: torch.Tensor, data: FieldData, index: slice) -> torch.Tensor:
    """Normalised anomalies of the steps ``index`` -> the variable's units (0 where missing)."""
    return data.normaliser.inverse(anomalies.to(data.values.dtype), data.mask[index], data.groups[index])


def _climatology(data: FieldData, index: slice) -> torch.Tensor:
    values = data.values[index]
    return data.normaliser.inverse(torch.zeros_like(values), torch.ones_like(values, dtype=torch.bool), data.groups[index])


def _scores(forecast: torch.Tensor, data: FieldData, index: slice) -> tuple[float, float]:
    truth, mask = data.values[index], data.mask[index]
    rmse = weighted_rmse(forecast, truth, mask, data.weights)
    acc = anomaly_correlation(forecast, truth, _climatology(data, index), mask, data.weights)
    return float(rmse), float(acc)


def _validation_rmse(data: FieldData, options: Options, ridge: RidgeEmulator, lim_modes: int) -> dict[str, float]:
    """Validation-slice RMSE (variable units) of the baselines fitted before it (the CNN's selection setting)."""
    train = data.anomalies[data.split.train]
    mask = data.mask[data.split.train]
    validation = validation_slice(train.shape[0], options.validation_fraction)
    std = data.normaliser.std
    scale = float(std.flatten()[0]) if std.numel() == 1 else float("nan")
    truth, previous = train[validation], train[validation.start - 1: validation.stop - 1]
    lim = LinearInverseModel(min(lim_modes, validation.start - 2)).fit(train[:validation.start], mask[:validation.start], data.weights)
    return {
        "persistence": scale * float(weighted_rmse(previous, truth, mask[validation], data.weights)),
        "ridge": scale * ridge.validation_rmse[ridge.penalty],
        "lim": scale * float(weighted_rmse(lim.predict(previous), truth, mask[validation], data.weights)),
        "scale": scale,
    }


def forecast_dataset(forecast: torch.Tensor, rollout: torch.Tensor, data: FieldData) -> xr.Dataset:
    """The held-out one-step forecasts as ``var`` and the free rollout as ``var_rollout``, in the input's layout."""
    test = data.split.test
    like = data.da.isel({data.grid.time: test})
    mask = data.mask[test]
    one_step = from_tensor(forecast, like=like, grid=data.grid, mask=mask)
    free = from_tensor(rollout, like=like, grid=data.grid, mask=mask)
    name = str(data.var)
    free.attrs["long_name"] = f"{like.attrs.get('long_name', name)}, CNN autoregressive forecast from the last training steps"
    ds = xr.Dataset({name: one_step, f"{name}_rollout": free})
    ds.attrs = {"title": f"geonn fields emulate: one-step CNN forecasts of {name} for the held-out steps",
                "comment": f"{name}: forecast of each held-out step from the true fields before it; "
                           f"{name}_rollout: forecasts fed back as inputs, starting from the last training steps",
                "source_file": str(data.path.resolve()), "method": "cnn", "train_steps": data.n_train,
                "test_steps": data.n_test, "Conventions": "CF-1.8"}
    return ds


def _figures(folder: Path, data: FieldData, forecasts: dict[str, torch.Tensor], best: str) -> None:
    test = data.split.test
    lat = data.grid.latitudes
    lon = data.da[data.grid.lon].values if data.grid.lon in data.da.coords else None
    truth, mask = data.values[test][:, 0].numpy(), data.mask[test][:, 0].numpy()
    climatology = _climatology(data, test)[:, 0].numpy()

    def masked(x):  # a map of the first held-out step
        return np.where(mask[0], x, np.nan)

    def mean_abs_error(x):
        valid = mask.sum(0)
        return np.where(valid > 0, np.abs(np.where(mask, x - truth, 0)).sum(0) / np.maximum(valid, 1), np.nan)

    cnn_mae, base_mae = mean_abs_error(forecasts["cnn"][:, 0].numpy()), mean_abs_error(forecasts[best][:, 0].numpy())
    units = data.units
    span = f"{data.n_test} held-out steps"
    plotting.map_panels([cnn_mae, base_mae], [f"CNN emulator MAE ({np.nanmean(cnn_mae):.3f})",
                                              f"{best} MAE ({np.nanmean(base_mae):.3f})"],
                        lat, lon, folder / "figures" / "error_maps.png", units=units, cmap="viridis",
                        suptitle=f"{data.var}: one-step mean absolute error over the {span}")
    plotting.map_panels([cnn_mae - base_mae], [f"CNN MAE minus {best} MAE"], lat, lon,
                        folder / "figures" / "error_difference.png", units=units,
                        suptitle=f"{data.var}: negative where the CNN is better ({span})")
    when = str(data.da[data.grid.time].values[test.start]) if data.grid.time in data.da.coords else f"step {test.start}"
    panels = [masked(truth[0] - climatology[0]), masked(forecasts["cnn"][0, 0].numpy() - climatology[0]),
              masked(forecasts[best][0, 0].numpy() - climatology[0]), masked(forecasts["cnn"][0, 0].numpy() - truth[0])]
    plotting.map_panels(panels, ["truth anomaly", "CNN forecast anomaly", f"{best} forecast anomaly", "CNN error"],
                        lat, lon, folder / "figures" / "forecast_heldout.png", units=units,
                        suptitle=f"{data.var}: one-step forecast of {when} (anomalies from the training climatology)")


def run(data: FieldData, options: Options, folder: Path, *, seed: int = 0, progress: bool = True,
        checkpoints: Path | None = None, resume: bool = False, device: str | torch.device = "cpu") -> dict:
    """Fit the CNN emulator and the baselines on the training part; forecast and score the held-out part.

    The emulator's training checkpoint goes to ``checkpoints`` (default ``folder``); ``resume``
    continues from it. The CNN trains and forecasts on ``device`` (its batches are moved there);
    under ``torchrun`` its training is data-parallel (:func:`geonn.emulators.cnn.fit_emulator`).
    """
    device = resolve_device(device)
    _check_lengths(data, options)
    train, test = data.split.train, data.split.test
    anomalies, mask = data.anomalies, data.mask
    previous = anomalies[test.start - 1: test.stop - 1]
    lim_modes = min(options.lim_modes, data.n_train - 2)
    baselines = {
        "persistence": Persistence(),
        "ridge": RidgeEmulator(options.ridge_basis, modes=lim_modes, validation_fraction=options.validation_fraction),
        "lim": LinearInverseModel(lim_modes),
    }
    forecasts: dict[str, torch.Tensor] = {}
    for name, model in baselines.items():
        model.fit(anomalies[train], mask[train], data.weights)
        forecasts[name] = _to_values(model.predict(previous), data, test)

    padding = grid_padding(data, options.padding)
    torch.manual_seed(seed)
    emulator = options.model(data.grid.n_channels, padding).to(device)
    fit = fit_emulator(emulator, anomalies[train], mask[train], data.weights, options.training(seed),
                       checkpoint_dir=checkpoints or folder, resume=resume, progress=progress)
    if not distributed.current().is_main:
        return {"best_epoch": fit.best_epoch}  # under torchrun rank 0 alone forecasts, scores and writes
    with torch.no_grad():
        one_step = emulator(history_windows(anomalies, test, emulator.history).to(device)).cpu()
        static = mask[train].all(0).to(device)
        start = history_windows(anomalies, [test.start], emulator.history).to(device)
        free = emulator.rollout(start, data.n_test, mask=static)[0].cpu()
    forecasts["cnn"] = _to_values(one_step, data, test)
    rollout = _to_values(free, data, test)
    if checkpoints is None:
        (folder / CHECKPOINT_NAME).unlink(missing_ok=True)

    write_netcdf(forecast_dataset(forecasts["cnn"], rollout, data), folder / "forecast.nc")
    save_checkpoint({"var": data.var, "padding": padding, "options": dataclasses.asdict(options),
                     "emulator": {k: v.cpu() for k, v in emulator.state_dict().items()},
                     "normaliser": data.normaliser.state_dict(), "lim": baselines["lim"].state_dict()}, folder / "model.pt")

    scores = {name: _scores(forecast, data, test) for name, forecast in forecasts.items()}
    best = min(BASELINES, key=lambda name: scores[name][0])
    _figures(folder, data, forecasts, best)
    validation = _validation_rmse(data, options, baselines["ridge"], lim_modes)
    last_training = data.values[test.start - 1: test.start].expand_as(rollout)
    metrics = {"rmse_lead1": scores["cnn"][0], "acc_lead1": scores["cnn"][1]}
    for name in BASELINES:
        metrics[f"rmse_lead1_{name}"], metrics[f"acc_lead1_{name}"] = scores[name]
    metrics.update({
        "best_baseline": best,
        "rmse_lead1_best_baseline": scores[best][0],
        "rmse_ratio_to_best_baseline": scores["cnn"][0] / scores[best][0],
        "rmse_validation": validation["scale"] * fit.validation_rmse,
        **{f"rmse_validation_{name}": validation[name] for name in BASELINES},
        "rmse_rollout": float(weighted_rmse(rollout, data.values[test], mask[test], data.weights)),
        "rmse_rollout_persistence": float(weighted_rmse(last_training, data.values[test], mask[test], data.weights)),
        "best_epoch": fit.best_epoch,
        "ridge_penalty": baselines["ridge"].penalty,
        "lim_modes": lim_modes,
        "padding": padding,
        "train_seconds": fit.train_seconds,
    })
    return metrics
