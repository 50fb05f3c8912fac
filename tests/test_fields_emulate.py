"""``geonn fields emulate`` and its baselines: the LIM recovers a known linear operator, ridge regression is
least squares at zero penalty and picks its penalty on the validation slice, the ACC matches a numpy reference
and ignores masked points, and the command writes its outputs (NaN where the input was NaN) on a small
synthetic file with renamed dims, descending latitude, a 360-day calendar and NaN land, or nothing on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr

from geonn.cli import main
from geonn.emulators.linear import LinearInverseModel, Persistence, RidgeEmulator, validation_slice
from geonn.errors import InputError, NotFittedError
from geonn.fields import anomaly_correlation
from geonn.io import load_checkpoint, write_netcdf
from geonn.pipelines import run_verb
from geonn.pipelines.emulate import Options

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- baselines


def ar1_fields(operator: np.ndarray, n_times: int, shape=(6, 8), noise=0.5, seed=0):
    """Fields driven by a K-dimensional AR(1) ``z(t+1) = A z(t) + noise`` on K orthonormal (area-weighted) patterns."""
    rng = np.random.default_rng(seed)
    k, points = operator.shape[0], int(np.prod(shape))
    weights = np.cos(np.deg2rad(np.linspace(-50, 50, shape[0])))[:, None].repeat(shape[1], 1)
    weights = weights / weights.sum()
    patterns, _ = np.linalg.qr(rng.standard_normal((points, k)))  # orthonormal in the weighted space
    patterns = patterns.T / np.sqrt(weights.reshape(-1))          # (K, points) in field space
    z = np.zeros((n_times, k))
    for t in range(1, n_times):
        z[t] = operator @ z[t - 1] + noise * rng.standard_normal(k)
    fields = (z @ patterns).reshape(n_times, 1, *shape)
    return torch.tensor(fields), torch.tensor(weights), patterns


def test_lim_recovers_a_known_linear_operator():
    operator = np.array([[0.8, 0.3, 0.0], [-0.3, 0.7, 0.1], [0.0, 0.0, 0.5]])
    fields, weights, patterns = ar1_fields(operator, 6000)
    lim = LinearInverseModel(modes=3).fit(fields, None, weights)
    # eigenvalues do not depend on the EOF basis
    found = np.sort_complex(torch.linalg.eigvals(lim.operator).numpy())
    true = np.sort_complex(np.linalg.eigvals(operator))
    np.testing.assert_allclose(found, true, atol=0.03)
    # forecasts: the true operator applied to new states
    rng = np.random.default_rng(1)
    z = rng.standard_normal((20, 3))
    states = torch.tensor((z @ patterns).reshape(20, 1, 6, 8))
    expected = torch.tensor(((z @ operator.T) @ patterns).reshape(20, 1, 6, 8))
    error = (lim.predict(states) - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
    assert float(error) < 0.05


def test_ridge_at_zero_penalty_is_least_squares_and_beats_persistence():
    operator = np.diag([0.6, 0.5, 0.3])
    fields, weights, _ = ar1_fields(operator, 400, shape=(3, 4), noise=1.0)
    fields = fields + 0.1 * torch.randn(fields.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    train, test = fields[:300], fields[300:]
    ridge = RidgeEmulator(penalties=(0.0,)).fit(train, None, weights)
    root = np.sqrt(weights.numpy().reshape(-1))
    x = train.numpy().reshape(300, -1) * root
    coefficients, *_ = np.linalg.lstsq(x[:-1], x[1:], rcond=None)
    expected = (test[:-1].numpy().reshape(99, -1) * root) @ coefficients / root
    np.testing.assert_allclose(ridge.predict(test[:-1]).numpy().reshape(99, -1), expected, rtol=1e-6, atol=1e-8)

    chosen = RidgeEmulator().fit(train, None, weights)
    assert chosen.penalty == min(chosen.validation_rmse, key=chosen.validation_rmse.get)
    assert set(chosen.validation_rmse) == set(chosen.penalties)

    def rmse(pred):
        return float((weights * (pred - test[1:]) ** 2).sum((1, 2, 3)).sqrt().mean())

    persistence = Persistence().fit(train).predict(test[:-1])
    torch.testing.assert_close(persistence, test[:-1])
    assert rmse(chosen.predict(test[:-1])) < 0.9 * rmse(persistence)
    eof = RidgeEmulator("eof", modes=3).fit(train, None, weights)
    assert rmse(eof.predict(test[:-1])) < 0.9 * rmse(persistence)


def test_ridge_leaves_out_points_missing_at_some_training_time():
    fields, weights, _ = ar1_fields(np.diag([0.7, 0.4]), 60, shape=(4, 5))
    mask = torch.ones_like(fields, dtype=torch.bool)
    mask[3, 0, 1, 1] = False
    fields = torch.where(mask, fields, 0)
    ridge = RidgeEmulator().fit(fields, mask, weights)
    pred = ridge.predict(fields[-5:])
    assert bool(torch.isfinite(pred).all()) and bool((pred[:, 0, 1, 1] == 0).all())


def test_baselines_refuse_bad_use():
    with pytest.raises(NotFittedError):
        RidgeEmulator().predict(torch.zeros(2, 1, 3, 4))
    with pytest.raises(NotFittedError):
        LinearInverseModel().predict(torch.zeros(2, 1, 3, 4))
    with pytest.raises(InputError, match="basis"):
        RidgeEmulator("pca")
    with pytest.raises(InputError, match="validation_fraction"):
        validation_slice(10, 1.5)
    assert validation_slice(192, 0.2) == slice(154, 192)
    with pytest.raises(InputError, match="modes"):
        LinearInverseModel(modes=10).fit(torch.zeros(8, 1, 3, 4))


# ---------------------------------------------------------------- ACC


def numpy_acc(pred, truth, climatology, mask, weights):
    values = []
    for t in range(pred.shape[0]):
        a, b, m = pred[t] - climatology[0], truth[t] - climatology[0], mask[t]
        w = np.broadcast_to(weights, a.shape)[m]
        a, b = a[m], b[m]
        values.append(np.sum(w * a * b) / np.sqrt(np.sum(w * a * a) * np.sum(w * b * b)))
    return np.mean(values)


def test_anomaly_correlation_matches_numpy_and_ignores_masked_points():
    rng = np.random.default_rng(0)
    truth = rng.standard_normal((5, 2, 4, 6))
    pred = truth + 0.7 * rng.standard_normal(truth.shape)
    climatology = rng.standard_normal((1, 2, 4, 6))
    mask = rng.random(truth.shape) > 0.2
    weights = np.cos(np.deg2rad(np.linspace(-60, 60, 4)))[:, None] * np.ones(6)
    expected = numpy_acc(pred + climatology, truth + climatology, climatology, mask, weights)
    pred_nan = np.where(mask, pred + climatology, np.nan)  # masked entries may be NaN
    found = anomaly_correlation(torch.tensor(pred_nan), torch.tensor(truth + climatology), torch.tensor(climatology),
                                torch.tensor(mask), torch.tensor(weights))
    assert float(found) == pytest.approx(expected, rel=1e-12)
    t = torch.tensor(truth)
    assert float(anomaly_correlation(t, t)) == pytest.approx(1.0)
    assert float(anomaly_correlation(-t, t, 0.0)) == pytest.approx(-1.0)
    per_time = anomaly_correlation(t, t, None, per_time=True)
    assert per_time.shape == (5,)
    with pytest.raises(InputError, match="climatology"):
        anomaly_correlation(t, t, torch.zeros(3, 3))


# ---------------------------------------------------------------- the command


def synthetic_file(path, n_times=40, *, seed=0):
    """A global 360-day annual field with renamed dims, descending latitude, NaN land and a warming trend."""
    rng = np.random.default_rng(seed)
    times = xr.date_range("2000-01-01", periods=n_times, freq="YS", calendar="360_day", use_cftime=True)
    latitudes = np.linspace(60, -60, 7)  # north to south
    longitudes = np.arange(0, 360, 30.0)  # global: 12 points
    trend = 0.05 * np.arange(n_times)[:, None, None]
    pattern = np.cos(np.deg2rad(latitudes))[:, None] * np.sin(np.deg2rad(longitudes))[None, :]
    values = 280 + trend + 2 * pattern + 0.5 * rng.standard_normal((n_times, 7, 12))
    values[:, 2:4, 3:6] = np.nan  # land
    da = xr.DataArray(
        values.astype(np.float32), dims=("t", "y", "x"), name="tas",
        coords={"t": ("t", times, {"standard_name": "time"}),
                "y": ("y", latitudes, {"units": "degrees_north", "standard_name": "latitude"}),
                "x": ("x", longitudes, {"units": "degrees_east", "standard_name": "longitude"})},
        attrs={"units": "K", "long_name": "near-surface air temperature"},
    )
    da.encoding = {"dtype": np.dtype("float32"), "_FillValue": np.float32(1e20)}
    write_netcdf(da.to_dataset(), path)
    return path


def open_var(path, var="tas"):
    with xr.open_dataset(path, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True)) as ds:
        return ds[var].load()


@pytest.mark.slow
def test_the_command_writes_forecasts_nan_where_the_input_was(tmp_path, capsys):
    source = synthetic_file(tmp_path / "in.nc")
    out = tmp_path / "out"
    assert main(["fields", "emulate", str(source), "--var", "tas", "--out", str(out), "--epochs", "2", "--quiet"]) == 0
    assert "rmse_lead1" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"forecast.nc", "model.pt", "metrics.json", "config.toml", "figures"}
    assert {p.name for p in (out / "figures").iterdir()} == {"error_maps.png", "error_difference.png", "forecast_heldout.png"}
    assert not list(tmp_path.glob(".*"))  # no staged leftovers
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("rmse_lead1", "acc_lead1", "rmse_lead1_persistence", "acc_lead1_persistence", "rmse_lead1_ridge",
                 "acc_lead1_ridge", "rmse_lead1_lim", "acc_lead1_lim", "rmse_lead1_best_baseline", "rmse_validation"):
        assert np.isfinite(metrics[name]), name
    assert metrics["padding"] == "periodic"  # the longitudes span 360 degrees
    assert metrics["rmse_ratio_to_best_baseline"] == pytest.approx(metrics["rmse_lead1"] / metrics["rmse_lead1_best_baseline"])

    original = open_var(source).isel(t=slice(32, 40))
    forecast = open_var(out / "forecast.nc")
    assert forecast.dims == original.dims and forecast.attrs == original.attrs
    xr.testing.assert_identical(forecast.coords.to_dataset(), original.coords.to_dataset())
    np.testing.assert_array_equal(forecast.isnull().values, original.isnull().values)
    assert forecast.encoding["dtype"] == np.float32
    rollout = open_var(out / "forecast.nc", "tas_rollout")
    np.testing.assert_array_equal(rollout.isnull().values, original.isnull().values)
    state = load_checkpoint(out / "model.pt")
    assert {"emulator", "normaliser", "lim", "options"} <= set(state)


@pytest.mark.slow
def test_the_verb_with_options_and_a_regional_grid(tmp_path):
    source = synthetic_file(tmp_path / "in.nc")
    regional = open_var(source).isel(x=slice(0, 8))  # 0..210 degrees east: not global
    path = write_netcdf(regional.to_dataset(), tmp_path / "regional.nc")
    metrics = run_verb("emulate", path, "tas", Options(epochs=2, history=3, width=4, depth=2, refit=False), tmp_path / "out",
                       progress=False)
    assert metrics["padding"] == "replicate" and 1 <= metrics["best_epoch"] <= 2
    forecast = open_var(tmp_path / "out" / "forecast.nc")
    assert forecast.sizes == {"t": 8, "y": 7, "x": 8}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--var", "pr"], "has no variable 'pr'"),
        (["--var", "tas", "--train-fraction", "0.2"], "one-step pairs before the validation slice"),
        (["--var", "tas", "--epochs", "0"], "--epochs: expected an int >= 1"),
    ],
)
def test_bad_inputs_leave_no_output(tmp_path, capsys, argv, message):
    source = synthetic_file(tmp_path / "in.nc")
    out = tmp_path / "out"
    assert main(["fields", "emulate", str(source), "--out", str(out), "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_file_that_is_not_netcdf_or_a_variable_without_a_grid_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.nc"
    bad.write_text("not netCDF")
    assert main(["fields", "emulate", str(bad), "--var", "tas", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "not a readable netCDF file" in capsys.readouterr().err
    series = xr.DataArray(np.arange(40.0), dims="t", name="index", coords={"t": np.arange(40)}).to_dataset()
    path = write_netcdf(series, tmp_path / "series.nc")
    assert main(["fields", "emulate", str(path), "--var", "index", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "expected time, latitude and longitude" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_an_interrupted_verb_resumes_from_its_checkpoints(tmp_path, monkeypatch):
    """Interrupted after the checkpoint of epoch 2, the verb leaves no output folder but keeps its
    checkpoints beside it; ``resume=True`` ends with the metrics of an uninterrupted run."""
    from geonn.emulators import cnn

    source = synthetic_file(tmp_path / "in.nc")
    options = Options(epochs=4, history=3, width=4, depth=2, refit=False, patience=10)
    clean = run_verb("emulate", source, "tas", options, tmp_path / "clean", progress=False)
    real_save, saved = cnn.save_checkpoint, []

    def save_then_stop(state, path):
        real_save(state, path)
        saved.append(path)
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cnn, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_verb("emulate", source, "tas", options, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.checkpoints").is_dir()
    monkeypatch.setattr(cnn, "save_checkpoint", real_save)
    resumed = run_verb("emulate", source, "tas", options, tmp_path / "out", progress=False, resume=True)
    assert not (tmp_path / ".out.checkpoints").exists()
    for key in ("rmse_lead1", "acc_lead1", "best_epoch", "rmse_validation"):
        assert resumed[key] == clean[key], key
    torch.testing.assert_close(load_checkpoint(tmp_path / "out" / "model.pt")["emulator"],
                               load_checkpoint(tmp_path / "clean" / "model.pt")["emulator"], rtol=0, atol=0)
