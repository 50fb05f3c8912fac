"""``geonn assimilate`` and the ``assimilation`` case kind.

Each method runs on a small Lorenz-63 twin file and writes analysis.nc / config.toml / figures /
metrics.json; bad inputs exit with code 2, a message naming the problem, and no output folder;
a learned model is loaded from a ``geonn case`` run folder; the two assimilation case files load
strictly and run on a reduced setting.
"""

from __future__ import annotations

import json
import math
import tomllib

import numpy as np
import pytest
import xarray as xr

import geonn
from geonn import ConfigError
from geonn.assimilation import ObservationError, Subset, twin_experiment
from geonn.assimilation.command import METHODS, AssimilateSettings, assimilate, make_method
from geonn.cases import check_expected, list_cases, load_case, run_case
from geonn.cases.assimilation import AssimilationCase
from geonn.cases.config import to_toml
from geonn.cli import main
from geonn.errors import InputError
from geonn.io import write_netcdf

CYCLES = 8
RADIUS = {"letkf": ["--radius", "1.0"]}
SMOOTHED = ("enks", "ienks", "4dvar")  # methods whose result holds smoothed_mean


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def twin_dataset():
    ds = twin_experiment(geonn.Lorenz63(), 0.01, 25 * CYCLES, Subset.all(3), ObservationError(std=math.sqrt(2.0)),
                         every=25, seed=3)
    return ds


@pytest.fixture(scope="module")
def twin_file(twin_dataset, tmp_path_factory):
    return write_netcdf(twin_dataset, tmp_path_factory.mktemp("obs") / "twin.nc")


def leftovers(folder):
    """Hidden staging folders or temp files a run left behind."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def run(args, capsys):
    code = main(["assimilate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- every method ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_each_method_writes_its_outputs(method, twin_file, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["--members", "8"] if method not in ("3dvar", "4dvar") else ["--background-scale", "0.1"]
    code, stdout, stderr = run([twin_file, "--model", "lorenz63", "--method", method, *extra, *RADIUS.get(method, []),
                                "--truth", twin_file, "--burn-in", "0.5", "--out", out], capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["analysis.nc", "config.toml", "figures", "metrics.json"]
    assert (out / "figures" / "analysis.png").stat().st_size > 0 and (out / "figures" / "error.png").is_file()
    assert leftovers(tmp_path) == []
    with xr.open_dataset(out / "analysis.nc") as ds:
        assert ds.analysis.dims == ("time", "component") and ds.sizes["time"] == CYCLES
        assert ds.attrs["Conventions"] == "CF-1.8" and ds.analysis.attrs["units"] == "1"
        assert ds.time.attrs["units"] == "model time units" and list(ds.component.values) == ["x", "y", "z"]
        assert np.isfinite(ds.analysis.values).all()
        if method in SMOOTHED:
            assert ds.smoothed.dims == ("time", "component") and "smoothed_spread" in ds
        if method not in ("3dvar", "4dvar"):
            assert "analysis_spread" in ds and "forecast" in ds
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["cycles"] == CYCLES
    assert 0 < metrics["rmse_analysis"] < 2.5  # below the free run's ~10, around the obs error sqrt(2)
    assert ("rmse_smoothed" in metrics) == (method in SMOOTHED)
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["method"]["name"] == method and config["dt"] == 0.01 and config["burn_in_rows"] == 2
    assert config["model"]["kind"] == "reference" and config["model"]["parameters"]["rho"] == 28.0
    assert f"outputs in {out}" in stdout


def test_dt_from_the_command_line_and_no_truth(twin_dataset, tmp_path, capsys):
    path = write_netcdf(twin_dataset.drop_attrs().assign_attrs(obs_error_std=math.sqrt(2.0)), tmp_path / "plain.nc")
    code, _, stderr = run([path, "--model", "lorenz63", "--method", "etkf", "--out", tmp_path / "a"], capsys)
    assert code == 2 and "--dt" in stderr and not (tmp_path / "a").exists()
    code, _, stderr = run([path, "--model", "lorenz63", "--method", "etkf", "--dt", "0.01", "--members", "5",
                           "--out", tmp_path / "b"], capsys)
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert "rmse_analysis" not in metrics and metrics["spread_analysis"] > 0
    assert not (tmp_path / "b" / "figures" / "error.png").exists()


# --- bad inputs: exit code 2, a message, no output folder -----------------------------------------------------


def _bad_files(ds, folder):
    bad = {
        "missing variable": (ds.rename({"observations": "y"}), "missing variable 'observations'"),
        "NaN std": (ds.assign_attrs(obs_error_std=float("nan")), "obs_error_std"),
        "negative std": (ds.assign_attrs(obs_error_std=-1.0), "obs_error_std"),
        "off-grid times": (ds.assign_coords(time=ds.time.values + 0.005), "multiples of dt"),
    }
    paths = {name: (write_netcdf(d, folder / f"{name.replace(' ', '-')}.nc"), message) for name, (d, message) in bad.items()}
    text = folder / "notes.nc"
    text.write_text("this is not netCDF\n")
    paths["not netCDF"] = (text, "not a readable netCDF file")
    paths["missing file"] = (folder / "absent.nc", "existing observation file")
    return paths


def test_bad_inputs_exit_2_and_leave_nothing(twin_dataset, tmp_path, capsys):
    for name, (path, message) in _bad_files(twin_dataset, tmp_path).items():
        out = tmp_path / "out" / name.replace(" ", "-")
        code, _, stderr = run([path, "--model", "lorenz63", "--method", "etkf", "--out", out], capsys)
        assert code == 2, name
        assert stderr.startswith("geonn: error:") and message in stderr, (name, stderr)
        assert not out.exists(), name
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "lorenz96"], "--model lorenz96"),
    (["--model", "navier-stokes"], "--model"),
    (["--model", "lorenz63", "--method", "3dvar", "--members", "5"], "'members' is not a setting of Var3D"),
    (["--model", "lorenz63", "--method", "letkf"], "--radius"),
    (["--model", "lorenz63", "--method", "etkf", "--lag", "2"], "'lag' is not a setting of ETKF"),
    (["--model", "lorenz63", "--method", "ienks", "--lag", "0"], "lag"),
    (["--model", "lorenz63", "--burn-in", "100"], "--burn-in"),
    (["--model", "lorenz63", "--truth", "absent.nc"], "--truth"),
])
def test_bad_settings_exit_2(args, message, twin_file, tmp_path, capsys):
    if "--method" not in args:
        args = [*args, "--method", "etkf"]
    out = tmp_path / "out"
    code, _, stderr = run([twin_file, *args, "--out", out], capsys)
    assert code == 2 and message in stderr, stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_failure_during_the_run_leaves_no_folder(twin_file, tmp_path, monkeypatch):
    from geonn.assimilation import command

    def broken(*args, **kwargs):
        raise InputError("figures: the disk is full")

    monkeypatch.setattr(command, "write_figures", broken)
    settings = AssimilateSettings(observations=str(twin_file), model="lorenz63", method="etkf", out=str(tmp_path / "run"),
                                  members=5)
    with pytest.raises(InputError, match="disk is full"):
        assimilate(settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_occupied_folder_is_refused_unless_overwrite(twin_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    args = [twin_file, "--model", "lorenz63", "--method", "etkf", "--members", "5", "--out", out]
    code, _, stderr = run(args, capsys)
    assert code == 2 and "--overwrite" in stderr and (out / "old.txt").is_file()
    code, _, stderr = run([*args, "--overwrite"], capsys)
    assert code == 0, stderr
    assert not (out / "old.txt").exists() and (out / "metrics.json").is_file() and leftovers(tmp_path) == []


def test_make_method_maps_the_flags():
    assert make_method("ienks", members=10, lag=2, inflation=None) == geonn.assimilation.IEnKS(members=10, lag=2)
    assert make_method("etkf").members == 20
    fourdvar = make_method("4dvar", lag=3, scale=0.2)
    assert fourdvar.window == 3 and fourdvar.scale == 0.2 and fourdvar.B == "climatology"
    with pytest.raises(InputError, match="method"):
        make_method("kalman")


# --- a learned model from a case run ---------------------------------------------------------------------------

SMALL = [
    "data.n_train=400", "data.n_test=200", "data.spinup_steps=100", "training.epochs=2", "training.refine_epochs=1",
    "training.refine_iterations=10", "metrics.lyapunov_steps=100", "metrics.lyapunov_trajectories=2",
    "metrics.forecast_steps=50", "metrics.curve_leads=[1,2]",
]


@pytest.mark.slow
def test_a_learned_model_from_a_case_run(twin_file, tmp_path, capsys):
    run_dir = tmp_path / "learned"
    run_case(load_case("lorenz63", SMALL), run_dir, progress=False)
    for model in (run_dir, run_dir / "checkpoints" / "checkpoint.pt"):
        out = tmp_path / f"da-{model.name}"
        code, _, stderr = run([twin_file, "--model", model, "--method", "etkf", "--members", "10", "--inflation", "1.05",
                               "--truth", twin_file, "--out", out], capsys)
        assert code == 0, stderr
        config = tomllib.loads((out / "config.toml").read_text())
        assert config["model"]["kind"] == "learned" and config["model"]["trained_on"] == "lorenz63"
        assert config["model"]["checkpoint"].endswith("checkpoint.pt")
        metrics = json.loads((out / "metrics.json").read_text())
        assert math.isfinite(metrics["rmse_analysis"])
    (run_dir / "config.toml").unlink()
    code, _, stderr = run([twin_file, "--model", run_dir, "--method", "etkf", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "config.toml" in stderr and not (tmp_path / "x").exists()
    code, _, stderr = run([twin_file, "--model", tmp_path, "--method", "etkf", "--out", tmp_path / "y"], capsys)
    assert code == 2 and "checkpoint" in stderr


# --- the assimilation cases ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lorenz63-da", "lorenz96-da"])
def test_the_assimilation_cases_load(name, tmp_path):
    assert name in list_cases()
    case = load_case(name)
    assert isinstance(case, AssimilationCase) and case.kind == "assimilation" and case.twin.cycles == 1000
    assert case.description and case.expected.source and case.expected.max and case.expected.reference
    assert "ienks" in [m.label for m in case.methods]
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(case), encoding="utf-8")
    assert load_case(str(path)) == case
    assert load_case(name, ["twin.cycles=30"]).twin.cycles == 30


@pytest.mark.parametrize(("override", "message"), [
    ("twin.cycle=5", r"unknown key twin\.cycle"),
    ("twin.model=lorenz84", "twin.model"),
    ("twin.obs_error_std=0", "obs_error_std"),
    ("twin.cycles=1.5", "twin.cycles"),
])
def test_assimilation_case_configs_are_strict(override, message):
    with pytest.raises(ConfigError, match=message):
        load_case("lorenz63-da", [override])


def test_assimilation_case_methods_are_checked_when_loading(tmp_path):
    text = (list_cases()["lorenz63-da"]).read_text(encoding="utf-8")
    for extra, message in (("[[methods]]\nmethod = \"etkf\"\nmembers = 5\n", "unique"),
                           ("[[methods]]\nmethod = \"pf\"\n", "methods.method"),
                           ("[[methods]]\nmethod = \"letkf\"\nlabel = \"local\"\n", "--radius"),
                           ("[[methods]]\nmethod = \"etkf\"\nlabel = \"x\"\nmembrs = 5\n", "membrs")):
        path = tmp_path / "case.toml"
        path.write_text(text.replace("[expected]", extra + "\n[expected]"), encoding="utf-8")
        with pytest.raises(ConfigError, match=message):
            load_case(str(path))


def test_check_expected_for_assimilation_cases():
    case = load_case("lorenz96-da")
    rows = check_expected(case, {"rmse_analysis_ienks": 0.28})
    assert rows == [("rmse_analysis_ienks", 0.28, 0.29, True)]
    assert check_expected(case, {"rmse_analysis_ienks": 0.3})[0][3] is False


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lorenz63-da", "lorenz96-da"])
def test_the_assimilation_cases_run_reduced(name, tmp_path):
    case = load_case(name, ["twin.cycles=6"])
    out = tmp_path / name
    metrics = run_case(case, out, progress=False)
    for method in case.methods:
        assert math.isfinite(metrics[f"rmse_analysis_{method.label}"]), method.label
        assert (out / f"analysis-{method.label}.nc").is_file()
        assert (out / "figures" / f"analysis-{method.label}.png").is_file()
    assert math.isfinite(metrics["rmse_smoothed_ienks"])
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    assert tomllib.loads((out / "config.toml").read_text())["kind"] == "assimilation"
    assert sorted(p.name for p in out.glob("observations*.nc")) == (
        ["observations.nc"] if name == "lorenz63-da" else ["observations-every1.nc", "observations-every4.nc"])
