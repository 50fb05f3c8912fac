"""The netCDF pipeline plumbing (geonn.pipelines): every input check before work starts, outputs
whole or not at all, labelled outputs identical in layout to the input, and the ``fields`` case kind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from geonn.cases import check_expected, load_case, run_case
from geonn.cli import main
from geonn.errors import ConfigError, InputError
from geonn.pipelines import open_field, run_verb
from geonn.pipelines.verbs import make_options

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def real_looking_file(path, *, n_times=30, n_lat=9, n_lon=12, land=True):
    """A 360-day annual field with ERA5-style names and order: descending ``latitude``, NaN land."""
    rng = np.random.default_rng(0)
    times = xr.date_range("1900-01-01", periods=n_times, freq="YS", calendar="360_day", use_cftime=True)
    lat = np.linspace(60, 20, n_lat)
    lon = np.linspace(230, 300, n_lon)
    modes = np.sin(np.deg2rad(lat))[:, None] * np.cos(np.deg2rad(lon))[None]
    values = 280 + 3 * rng.standard_normal((n_times, 1, 1)) * modes + 0.3 * rng.standard_normal((n_times, n_lat, n_lon))
    values = values.astype(np.float32)
    if land:
        values[:, 2:4, 3:6] = np.nan
    da = xr.DataArray(
        values, dims=("time", "latitude", "longitude"), name="t2m",
        coords={"time": times, "latitude": ("latitude", lat, {"units": "degrees_north", "standard_name": "latitude"}),
                "longitude": ("longitude", lon, {"units": "degrees_east", "standard_name": "longitude"})},
        attrs={"units": "K", "long_name": "2 metre temperature", "standard_name": "air_temperature"},
    )
    ds = da.to_dataset()
    ds["station_count"] = xr.DataArray(np.arange(n_times), dims="time")
    ds.attrs["title"] = "synthetic"
    ds.to_netcdf(path, encoding={"t2m": {"dtype": "float32", "_FillValue": np.float32(1e20), "zlib": True}})
    return path


def decode(path):
    return xr.open_dataset(path, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))


def test_open_field_reads_a_real_layout(tmp_path):
    path = real_looking_file(tmp_path / "in.nc")
    data = open_field(path, "t2m", 0.8)
    assert data.values.shape == (30, 1, 9, 12) and data.grid.lat_descending
    assert data.n_train == 24 and data.n_test == 6
    assert not bool(data.mask[:, 0, 5:7, 3:6].any())  # NaN land is masked (file rows 2:4 north to south = 5:7 south to north)
    assert int((~data.mask).sum()) == 30 * 2 * 3
    assert float(data.anomalies[data.split.train][data.mask[data.split.train]].mean()) == pytest.approx(0, abs=1e-5)


def test_reduce_writes_labelled_outputs_identical_in_layout(tmp_path):
    path = real_looking_file(tmp_path / "in.nc")
    metrics = run_verb("reduce", path, "t2m", make_options("reduce", modes=3), tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "figures", "latent.nc", "metrics.json", "model.pt",
                                                      "reconstruction.nc"]
    assert json.loads((out / "metrics.json").read_text())["rmse_test"] == pytest.approx(metrics["rmse_test"])
    with decode(path) as source, decode(out / "reconstruction.nc") as rebuilt:
        xr.testing.assert_identical(rebuilt["t2m"].coords.to_dataset(), source["t2m"].coords.to_dataset())
        assert rebuilt["t2m"].attrs == source["t2m"].attrs and rebuilt["t2m"].dims == source["t2m"].dims
        np.testing.assert_array_equal(np.isnan(rebuilt["t2m"].values), np.isnan(source["t2m"].values))
        assert rebuilt["t2m"].encoding["dtype"] == np.float32
    with decode(out / "latent.nc") as latent:
        assert latent["latent"].dims == ("time", "mode") and latent.sizes == {"time": 30, "mode": 3}
    # three strong modes plus noise: 3 EOFs leave about the noise (0.3 K)
    assert 0.2 < metrics["rmse_test"] < 0.45 and metrics["rmse_test"] == metrics["rmse_test_eof"]


def _bad_files(folder):
    good = real_looking_file(folder / "good.nc")
    (folder / "text.nc").write_text("not a netCDF file")
    with decode(good) as ds:
        ds.load()
    ds.rename({"latitude": "row", "longitude": "col"}).drop_vars(["row", "col"]).to_netcdf(folder / "nogrid.nc")
    ds.isel(time=slice(0, 4)).to_netcdf(folder / "short.nc")
    return {
        "missing variable": (good, "tas", r"--var: .* has no variable 'tas'; its variables are \['station_count', 't2m'\]"),
        "not netCDF": (folder / "text.nc", "t2m", r"IN.nc: .*text.nc' is not a readable netCDF file"),
        "no such file": (folder / "absent.nc", "t2m", r"IN.nc: expected an existing netCDF file"),
        "no lat/lon": (folder / "nogrid.nc", "t2m", r"--var t2m: expected time, latitude and longitude dimensions"),
        "too short": (folder / "short.nc", "t2m", r"--var t2m: too few time steps to split: 4 along 'time'"),
        "no grid at all": (good, "station_count", r"--var station_count: expected time, latitude and longitude"),
    }


@pytest.mark.parametrize("problem", ["missing variable", "not netCDF", "no such file", "no lat/lon", "too short",
                                     "no grid at all"])
def test_bad_inputs_are_refused_before_any_output(problem, tmp_path, capsys):
    path, var, message = _bad_files(tmp_path)[problem]
    with pytest.raises(InputError, match=message):
        run_verb("reduce", path, var, make_options("reduce", modes=2), tmp_path / "out", progress=False)
    assert main(["fields", "reduce", str(path), "--var", var, "--modes", "2", "--out", str(tmp_path / "out")]) == 2
    assert "geonn: error:" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))] == []


@pytest.mark.parametrize("args, message", [
    (["--modes", "0"], r"--modes: expected an int >= 1, got 0"),
    (["--modes", "2", "--train-fraction", "1.5"], r"--train-fraction: expected a number in \(0, 1\), got 1.5"),
    (["--modes", "2", "--epochs", "0"], r"--epochs: expected an int >= 1, got 0"),
])
def test_bad_settings_exit_2(args, message, tmp_path, capsys):
    path = real_looking_file(tmp_path / "in.nc")
    assert main(["fields", "reduce", str(path), "--var", "t2m", "--out", str(tmp_path / "out"), *args]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_failure_mid_run_leaves_the_old_folder_and_no_partial_one(tmp_path, monkeypatch):
    path = real_looking_file(tmp_path / "in.nc")
    out = tmp_path / "out"
    run_verb("reduce", path, "t2m", make_options("reduce", modes=2), out, progress=False)
    before = sorted(p.name for p in out.iterdir())
    from geonn.pipelines import reduce

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(reduce, "save_checkpoint", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_verb("reduce", path, "t2m", make_options("reduce", modes=2), out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    with pytest.raises(InputError, match="already holds files; pass --overwrite"):
        run_verb("reduce", path, "t2m", make_options("reduce", modes=2), out, progress=False)


def test_fields_case_kind_sweeps_and_checks(tmp_path):
    path = real_looking_file(tmp_path / "in.nc")
    case = load_case("sat-reduce", [f'data.file="{path}"', 'data.var="t2m"', 'options.method="eof"', "sweep.modes=[1, 2]"])
    metrics = run_case(case, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "modes1" / "reconstruction.nc").is_file() and (tmp_path / "run" / "metrics.json").is_file()
    assert metrics["rmse_test_modes2"] < metrics["rmse_test_modes1"]
    assert metrics["rmse_test_modes2"] == metrics["rmse_test_eof_modes2"]
    rows = check_expected(case, {**metrics, "rmse_test_modes5": 1.0, "rmse_test_eof_modes5": 2.0})
    assert ("rmse_test_modes5/rmse_test_eof_modes5", 0.5, 0.9, True) in rows


@pytest.mark.parametrize("override, message", [
    ('verb="compress"', r"verb: expected one of \['emulate', 'generate', 'reduce'\], got 'compress'"),
    ("sweep.modes=[5, 0]", r"options: --modes: expected an int >= 1, got 0"),
    ("options.epochs=-1", r"options: --epochs: expected an int >= 1, got -1"),
    ("options.colour=1", r"options: reduce: unknown options \['colour'\]"),
    ('data.file="/nonexistent/x.nc"', r"data.file: expected an existing netCDF file"),
])
def test_fields_case_configs_are_strict(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        case = load_case("sat-reduce", [override])
        run_case(case, tmp_path / "run", progress=False)
