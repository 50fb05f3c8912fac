"""``geonn fields reduce --method autoencoder`` end to end on a small synthetic netCDF file written the
way real ones are (``latitude`` descending, a 360-day calendar, NaN land), and its input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr

from geonn.cases import load_case, run_case
from geonn.cli import main
from geonn.emulators import AutoencoderReducer
from geonn.errors import InputError
from geonn.io import load_checkpoint
from geonn.pipelines import open_field, run_verb
from geonn.pipelines.reduce import reconstruct
from geonn.pipelines.verbs import make_options

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_file(path, *, n_times=30, n_lat=9, n_lon=13):
    """Annual ``t2m(time, latitude, longitude)``: 360-day cftime times, latitude north to south, NaN land."""
    rng = np.random.default_rng(1)
    times = xr.date_range("2000-01-01", periods=n_times, freq="YS", calendar="360_day", use_cftime=True)
    lat = np.linspace(70, 30, n_lat)
    lon = np.linspace(240, 300, n_lon)
    pattern = np.cos(np.deg2rad(3 * lat))[:, None] * np.sin(np.deg2rad(4 * lon))[None]
    amplitude = rng.standard_normal((n_times, 1, 1))
    values = 275 + 2 * amplitude * pattern + amplitude ** 2 * pattern[::-1] + 0.2 * rng.standard_normal((n_times, n_lat, n_lon))
    values = values.astype(np.float32)
    values[:, 1:3, 8:12] = np.nan  # land
    da = xr.DataArray(
        values, dims=("time", "latitude", "longitude"), name="t2m",
        coords={"time": times, "latitude": ("latitude", lat, {"units": "degrees_north", "standard_name": "latitude"}),
                "longitude": ("longitude", lon, {"units": "degrees_east", "standard_name": "longitude"})},
        attrs={"units": "K", "long_name": "2 metre temperature", "cell_methods": "time: mean"},
    )
    ds = da.to_dataset()
    ds["count"] = xr.DataArray(np.arange(n_times), dims="time")
    ds.to_netcdf(path, encoding={"t2m": {"dtype": "float32", "_FillValue": np.float32(-9999.0)}})
    return path


def opened(path):
    return xr.open_dataset(path, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reduce")
    path = synthetic_file(folder / "in.nc")
    out = folder / "out"
    code = main(["fields", "reduce", str(path), "--var", "t2m", "--modes", "2", "--method", "autoencoder", "--epochs", "3",
                 "--out", str(out), "--quiet"])
    return path, out, code


@pytest.mark.slow  # trains the autoencoder and draws the figures (about 5 s on an idle core)
def test_the_command_writes_every_output(reduced):
    _, out, code = reduced
    assert code == 0
    assert {"latent.nc", "reconstruction.nc", "model.pt", "metrics.json", "config.toml"} <= {p.name for p in out.iterdir()}
    assert {"reconstruction_heldout.png", "eof_modes.png", "modes.png"} <= {p.name for p in (out / "figures").iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("rmse_test", "explained_variance_test", "rmse_test_eof", "explained_variance_test_eof", "validation_rmse",
                "validation_rmse_eof", "best_epoch"):
        assert np.isfinite(metrics[key]), key
    assert metrics["method"] == "autoencoder" and metrics["modes"] == 2 and 0 <= metrics["best_epoch"] <= 3
    assert metrics["rmse_ratio_to_eof"] == pytest.approx(metrics["rmse_test"] / metrics["rmse_test_eof"])


@pytest.mark.slow  # trains the autoencoder and draws the figures (about 5 s on an idle core)
def test_latent_and_reconstruction_are_labelled_like_the_input(reduced):
    path, out, _ = reduced
    with opened(path) as source, opened(out / "latent.nc") as latent, opened(out / "reconstruction.nc") as rebuilt:
        assert latent["latent"].dims == ("time", "mode") and latent["latent"].shape == (30, 2)
        xr.testing.assert_identical(latent["time"], source["time"])
        assert latent["latent"].attrs["units"] == "1" and "autoencoder" in latent["latent"].attrs["long_name"]
        truth, found = source["t2m"], rebuilt["t2m"]
        xr.testing.assert_identical(found.isnull(), truth.isnull())  # NaN exactly where the input was NaN
        xr.testing.assert_identical(found.copy(data=truth.values), truth)  # same dims, coords, attrs
        assert found.encoding["dtype"] == truth.encoding["dtype"] and found["time"].encoding["calendar"] == "360_day"
        assert float(np.abs(found - truth).mean()) < float(np.abs(truth - truth.mean("time")).mean())


@pytest.mark.slow  # trains the autoencoder and draws the figures (about 5 s on an idle core)
def test_model_pt_rebuilds_the_reconstruction(reduced):
    path, out, _ = reduced
    saved = load_checkpoint(out / "model.pt")
    assert saved["method"] == "autoencoder" and saved["modes"] == 2
    reducer = AutoencoderReducer.from_state_dict(saved["reducer"])
    data = open_field(path, "t2m")
    _, fields = reconstruct(reducer, data)
    with opened(out / "reconstruction.nc") as rebuilt:
        values = torch.from_numpy(rebuilt["t2m"].values[:, ::-1].copy())  # file: north to south
    assert torch.allclose(fields[:, 0][data.mask[:, 0]], values[data.mask[:, 0]], atol=1e-4)


def no_outputs(folder):
    return not (folder / "out").exists() and not any(p.name.startswith(".out") for p in folder.iterdir())


@pytest.mark.parametrize("case, message", [
    ("missing variable", r"--var: .* has no variable 'tas'; its variables are \['count', 't2m'\]"),
    ("no lat/lon", r"--var count: expected time, latitude and longitude dimensions"),
    ("not netCDF", r"IN.nc: .* is not a readable netCDF file"),
    ("too few steps", r"--var t2m: too few time steps to split: 4 along 'time'"),
])
def test_bad_inputs_are_refused_before_any_output(tmp_path, case, message, capsys):
    path = synthetic_file(tmp_path / "in.nc", n_times=4 if case == "too few steps" else 12)
    var = {"missing variable": "tas", "no lat/lon": "count"}.get(case, "t2m")
    if case == "not netCDF":
        path = tmp_path / "notes.nc"
        path.write_text("not a netCDF file\n")
    options = make_options("reduce", modes=2, method="autoencoder", epochs=1)
    with pytest.raises(InputError, match=message):
        run_verb("reduce", path, var, options, tmp_path / "out", progress=False)
    assert no_outputs(tmp_path)
    assert main(["fields", "reduce", str(path), "--var", var, "--modes", "2", "--method", "autoencoder",
                 "--out", str(tmp_path / "out")]) == 2
    assert no_outputs(tmp_path)
    assert "error" in capsys.readouterr().err.lower()


def single_point_file(path, values):
    """``tas(time, lat, lon)`` on a grid of one point: EOFs rebuild it exactly."""
    da = xr.DataArray(np.asarray(values, dtype=np.float64)[:, None, None], dims=("time", "lat", "lon"), name="tas",
                      coords={"lat": ("lat", [10.0], {"units": "degrees_north"})}, attrs={"units": "K"})
    da.to_dataset().to_netcdf(path)
    return path


def test_an_exact_eof_baseline_gives_a_ratio_of_one(tmp_path):
    """The EOF baseline's test RMSE is 0: ``rmse_ratio_to_eof`` was 0 / 0 (ZeroDivisionError)."""
    path = single_point_file(tmp_path / "in.nc", [1.0, 2.0, 3.0, 4.0, 1.0, 3.0, 2.0, 4.0])
    metrics = run_verb("reduce", path, "tas", make_options("reduce", modes=1), tmp_path / "out", progress=False)
    assert metrics["rmse_test_eof"] == 0.0 and metrics["rmse_ratio_to_eof"] == 1.0


def test_a_variable_constant_over_the_held_out_steps_is_refused_naming_var(tmp_path, capsys):
    """The message named the inner argument ``truth`` of ``explained_variance``, not the command's ``--var``."""
    path = single_point_file(tmp_path / "in.nc", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 7.0])  # the last 2 steps are held out
    with pytest.raises(InputError, match=r"--var: 'tas' is constant over the 2 held-out steps"):
        run_verb("reduce", path, "tas", make_options("reduce", modes=1), tmp_path / "out", progress=False)
    assert main(["fields", "reduce", str(path), "--var", "tas", "--modes", "1", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("geonn: error: --var: 'tas' is constant")
    assert no_outputs(tmp_path)


def test_autoencoder_options_are_checked():
    with pytest.raises(InputError, match="learning_rate: expected a number >= 0, got -0.1"):
        make_options("reduce", method="autoencoder", learning_rate=-0.1)
    with pytest.raises(InputError, match=r"validation_fraction: expected a number in \(0, 1\), got 1"):
        make_options("reduce", method="autoencoder", validation_fraction=1)
    with pytest.raises(InputError, match="hidden: expected an int >= 1, got 0"):
        make_options("reduce", method="autoencoder", hidden=0)


@pytest.mark.slow  # trains the autoencoder and draws the figures (about 5 s on an idle core)
def test_the_sat_reduce_case_runs_on_a_reduced_setting(tmp_path):
    path = synthetic_file(tmp_path / "in.nc", n_times=20, n_lat=5, n_lon=7)
    case = load_case("sat-reduce", [f'data.file="{path}"', 'data.var="t2m"', "sweep.modes=[1]", "options.epochs=1"])
    metrics = run_case(case, tmp_path / "run", progress=False)
    assert metrics["method_modes1"] == "autoencoder" and np.isfinite(metrics["rmse_test_modes1"])
    assert (tmp_path / "run" / "modes1" / "figures" / "modes.png").is_file()
