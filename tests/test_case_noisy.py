"""The lorenz63-noisy case: strict config, the SINDy baseline's torch tendency and its absence, and a reduced
run that writes its folder (metrics.json, netCDF with CF attributes, figures)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
import xarray as xr

from geonn import ConfigError
from geonn.cases import check_expected, load_case, run_case
from geonn.cases.noisy import Baselines, NoisyCase, PolynomialTendency, fit_sindy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = [
    "data.n_train=500", "data.n_test=200", "data.spinup_steps=200",
    "pretraining.epochs=1", "pretraining.refine_epochs=1", "pretraining.refine_iterations=5",
    "joint.model_std=[0.1, 0.01]", "joint.iterations=3",
    "baselines.regression_training.epochs=1", "baselines.regression_training.refine_epochs=0",
    "metrics.lyapunov_steps=100", "metrics.lyapunov_trajectories=2", "metrics.curve_leads=[1, 2]",
    "metrics.forecast_steps=50", "metrics.posterior_starts=20",
]


def test_the_case_file_loads_with_its_targets():
    case = load_case("lorenz63-noisy")
    assert isinstance(case, NoisyCase) and case.kind == "noisy"
    assert case.data.n_train == 10000 and case.data.obs_noise_std == 1.0 and case.data.dt == 0.01
    assert case.joint.model_std == [0.1, 0.01, 0.001, 0.0001] and case.model.operator == "bilinear"
    assert case.expected.max == {"rmse_lead1": 1e-3} and case.expected.lyapunov_abs_error_max == 0.1


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.obs_noise_std=0", r"data\.obs_noise_std: expected a noise std > 0"),
        ("initial.smoothing_steps=-1", r"initial\.smoothing_steps: expected a width >= 0"),
        ("baselines.sindy_window=10", r"baselines\.sindy_window: expected an odd window"),
        ("joint.model_std=[]", r"joint\.model_std: expected a non-empty list"),
        ("joint.horizons=[0]", r"joint\.horizons: expected a non-empty list of integers >= 1"),
        ("joint.iteration=3", r"unknown key joint\.iteration"),
        ("baselines.regression_training.epoch=3", r"unknown key baselines\.regression_training\.epoch"),
    ],
)
def test_bad_config_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_case("lorenz63-noisy", [override])


def test_sindy_tendency_is_pysindys_model():
    pytest.importorskip("pysindy")
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).cumsum(0) * 0.1
    f = fit_sindy(x, 0.01, Baselines(), ["x", "y", "z"])  # checks itself against pysindy's predict
    assert isinstance(f, PolynomialTendency) and f(0.0, x[:5]).shape == (5, 3)


def test_missing_pysindy_is_reported_with_a_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "pysindy", None)  # import pysindy now raises ImportError
    with pytest.warns(UserWarning, match="pysindy is not installed"):
        assert fit_sindy(torch.zeros(50, 3, dtype=torch.float64), 0.01, Baselines(), ["x", "y", "z"]) is None


@pytest.mark.slow
def test_reduced_run_writes_its_folder(tmp_path):
    case = load_case("lorenz63-noisy", SMALL)
    out = tmp_path / "noisy"
    metrics = run_case(case, out, progress=False)
    for name in ("metrics.json", "config.toml", "states.nc", "forecast.nc", "figures/states.png", "figures/rmse_by_lead.png",
                 "figures/attractor.png", "checkpoints/joint/joint.pt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()).keys() == metrics.keys()
    for key in ("rmse_lead1", "rmse_lead8", "lyapunov_max", "regression_rmse_lead1", "sindy_rmse_lead1", "ratio_to_best_baseline",
                "state_rmse", "posterior_spread_lead1", "observation_rmse"):
        assert key in metrics and isinstance(metrics[key], float), key
    assert math.isfinite(metrics["rmse_lead1"]) and metrics["n_params"] == 57
    assert metrics["state_rmse"] < metrics["observation_rmse"]  # the estimated states are closer to the truth than the data
    with xr.open_dataset(out / "states.nc") as ds:
        assert set(ds.data_vars) == {"truth", "observations", "initial", "estimate"} and ds.sizes["time"] == 501
        assert ds.attrs["Conventions"] == "CF-1.8" and all(ds[v].attrs["units"] == "1" and ds[v].attrs["long_name"] for v in ds.data_vars)
    with xr.open_dataset(out / "forecast.nc") as ds:
        # SINDy's curve is written only where pysindy (the bench extra) is installed
        expected = {"rmse_joint", "rmse_regression"} | ({"rmse_sindy"} if importlib.util.find_spec("pysindy") else set())
        assert expected <= set(ds.data_vars) and ds.lead.attrs["units"] == "steps"
    rows = {name: (value, bound, met) for name, value, bound, met in check_expected(case, metrics)}
    assert set(rows) == {"rmse_lead1", "rmse_lead1 / better baseline's", "|lyapunov_max - 0.9|"}
    again = run_case(case, out, resume=True, progress=False)  # every stage loads its checkpoint
    assert {k: v for k, v in again.items() if k != "case_seconds"} == {k: v for k, v in metrics.items() if k != "case_seconds"}
