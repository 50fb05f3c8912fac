"""The stochastic simulator (Euler-Maruyama increments have the stated law, seeds repeat, bad input is
refused) and the lorenz63-stochastic case on a reduced setting (writes its folder, resumes, refuses bad config)."""

from __future__ import annotations

import math

import pytest
import torch
import xarray as xr

import geonn
from geonn import ConfigError, InputError, InputTypeError, NonFiniteError
from geonn.cases import check_expected, load_case, read_metrics, run_case
from geonn.dynamics import euler_maruyama, simulate_stochastic

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DTYPE = torch.float64

SMALL = [
    "data.n_train=400",
    "data.n_test=300",
    "data.spinup_steps=100",
    "training.epochs=2",
    "metrics.crps_leads=[1,10]",
    "metrics.curve_leads=[1,5,10]",
    "metrics.members=8",
    "metrics.crps_starts=20",
    "metrics.forecast_steps=40",
]


# --- the simulator ---------------------------------------------------------------------------------


def test_euler_maruyama_increments_have_the_stated_mean_and_covariance():
    model, dt, s = geonn.Lorenz63(), 0.01, 2.0
    path = torch.as_tensor(simulate_stochastic(model, 500, dt, s, members=40, spinup_steps=100, seed=3).state.values)
    # remove the drift part of each increment: what is left is sqrt(dt) s xi
    noise = (path[1:] - path[:-1] - dt * model(0.0, path[:-1])) / math.sqrt(dt)  # (time, member, component)
    noise = noise.transpose(0, 1).reshape(-1, 3)  # (member * time, component)
    n = noise.shape[0]
    assert noise.mean(0).abs().max() < 4 * s / math.sqrt(n)
    covariance = noise.T @ noise / n
    assert torch.allclose(torch.diagonal(covariance), torch.full((3,), s**2, dtype=DTYPE), rtol=0.05)
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))
    assert off_diagonal.abs().max() < 0.05 * s**2
    # independent in time: lag-one correlation near zero
    per_member = noise.reshape(40, 500, 3)
    lag_one = (per_member[:, 1:] * per_member[:, :-1]).mean((0, 1)) / s**2
    assert lag_one.abs().max() < 4 / math.sqrt(n)


def test_euler_maruyama_with_a_full_diffusion_factor():
    factor = torch.tensor([[1.0, 0.0], [0.5, 0.2]], dtype=DTYPE)

    def zero_drift(t, x):
        return torch.zeros_like(x)

    x0 = torch.zeros(40000, 2, dtype=DTYPE)
    path = euler_maruyama(zero_drift, x0, 1, 0.25, factor, generator=torch.Generator().manual_seed(0))
    increments = path[1] / math.sqrt(0.25)
    assert torch.allclose(increments.T @ increments / 40000, factor @ factor.T, atol=0.03)
    # a (d,) vector is a diagonal factor
    path = euler_maruyama(zero_drift, x0, 1, 1.0, torch.tensor([3.0, 0.5], dtype=DTYPE), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(path[1].std(0), torch.tensor([3.0, 0.5], dtype=DTYPE), rtol=0.03)


def test_seeds_repeat_paths_and_members_get_independent_noise():
    model = geonn.Lorenz63()
    a = simulate_stochastic(model, 50, 0.01, 1.0, members=3, seed=5)
    b = simulate_stochastic(model, 50, 0.01, 1.0, members=3, seed=5)
    c = simulate_stochastic(model, 50, 0.01, 1.0, members=3, seed=6)
    xr.testing.assert_identical(a, b)
    assert not (a.state.values == c.state.values).all()
    assert a.state.dims == ("time", "member", "component")
    same_start = simulate_stochastic(model, 50, 0.01, 1.0, x0=torch.zeros(2, 3, dtype=DTYPE) + 1.0, members=2, seed=0)
    assert not (same_start.state.values[-1, 0] == same_start.state.values[-1, 1]).all()
    # zero noise is the deterministic Euler scheme
    quiet = simulate_stochastic(model, 50, 0.01, 0.0, seed=0)
    euler = geonn.simulate(model, 50, 0.01, scheme="euler")
    assert (abs(quiet.state.values - euler.state.values) < 1e-12).all()


def test_simulate_stochastic_records_its_noise_in_cf_attributes():
    ds = simulate_stochastic(geonn.Lorenz63(), 10, 0.01, 2.0, spinup_steps=5)
    assert ds.attrs["scheme"] == "euler-maruyama" and ds.attrs["Conventions"] == "CF-1.8"
    assert list(ds.attrs["noise_std"]) == [2.0, 2.0, 2.0] and ds.attrs["dt"] == 0.01
    assert ds.state.attrs["units"] == "1" and ds.state.attrs["long_name"]
    assert ds.sizes["time"] == 11 and ds.time.attrs["units"] == "model time units"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"noise": -1.0}, InputError, r"noise: expected a finite level >= 0, got -1\.0"),
        ({"noise": float("nan")}, InputError, r"noise: expected a finite level"),
        ({"noise": [1.0, -0.1, 1.0]}, InputError, r"noise: expected levels >= 0"),
        ({"noise": [1.0, 1.0]}, InputError, r"noise: expected a number, shape \(3,\) or \(3, 3\), got shape \(2,\)"),
        ({"noise": torch.ones(3, 3, dtype=DTYPE)}, InputError, r"noise: expected a lower-triangular"),
        ({"noise": True}, InputTypeError, r"noise: expected a number"),
        ({"noise": "big"}, InputTypeError, r"noise: expected a number"),
        ({"dt": 0.0}, InputError, r"dt: expected a finite step > 0"),
        ({"n_steps": -1}, InputError, r"n_steps: expected an integer >= 0"),
        ({"x0": torch.tensor([1.0, float("nan"), 2.0], dtype=DTYPE)}, InputError, r"x0: expected finite values"),
        ({"x0": torch.ones(4, dtype=DTYPE)}, InputError, r"x0: expected last dimension 3"),
        ({"x0": [1.0, 2.0, 3.0]}, InputTypeError, r"x0: expected a floating-point tensor"),
        ({"nonfinite": "ignore"}, InputError, r"nonfinite: expected 'raise' or 'keep'"),
    ],
)
def test_euler_maruyama_refuses_bad_input(kwargs, error, message):
    arguments = {"x0": torch.ones(3, dtype=DTYPE), "n_steps": 5, "dt": 0.01, "noise": 1.0} | kwargs
    with pytest.raises(error, match=message):
        euler_maruyama(geonn.Lorenz63(), arguments.pop("x0"), arguments.pop("n_steps"), arguments.pop("dt"),
                       arguments.pop("noise"), **arguments)


def test_a_diverging_path_names_its_first_bad_step():
    with pytest.raises(NonFiniteError, match=r"non-finite at step \d+") as caught:
        euler_maruyama(geonn.Lorenz63(), torch.tensor([1e10, 1e10, 1e10], dtype=DTYPE), 200, 0.1, 1.0)
    assert caught.value.step >= 1
    kept = euler_maruyama(geonn.Lorenz63(), torch.tensor([1e10, 1e10, 1e10], dtype=DTYPE), 200, 0.1, 1.0, nonfinite="keep")
    assert not bool(torch.isfinite(kept[-1]).all())


def test_simulate_stochastic_refuses_a_model_that_is_not_a_reference_model():
    with pytest.raises(InputError, match=r"model: expected a geonn.dynamics model"):
        simulate_stochastic(lambda t, x: x, 5, 0.01, 1.0)


# --- the case --------------------------------------------------------------------------------------


def test_the_case_file_states_its_noise_and_targets():
    case = load_case("lorenz63-stochastic")
    assert case.kind == "stochastic" and case.data.noise_std > 0 and case.model.scheme == "euler"
    assert case.expected.noise_level_rel_error_max == 0.10 and case.expected.coverage90_abs_error_max == 0.05
    assert case.metrics.crps_leads == [1, 10, 50]


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.noise_std=0", r"data\.noise_std: expected a noise level > 0"),
        ("training.refine=lbfgs", r"training\.refine: the likelihood training runs Adam only"),
        ("training.unroll=2", r"training\.unroll: the likelihood is of one-step transitions"),
        ("model.covariance=spherical", r"model\.covariance: expected 'diagonal' or 'full'"),
        ("model.operator=conv1d", r"model\.operator: expected 'bilinear' or 'mlp'"),
        ("metrics.members=1", r"metrics\.members: expected at least 2"),
        ("metrics.coverage_levels=[0.5]", r"metrics\.coverage_levels: expected .* including 0\.9"),
        ("metrics.crps_leads=[0]", r"metrics\.crps_leads: expected lead times >= 1"),
        ("data.spinup=3", r"unknown key data\.spinup"),
    ],
)
def test_bad_config_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_case("lorenz63-stochastic", [override])


def test_a_lead_longer_than_the_test_path_is_refused(tmp_path):
    case = load_case("lorenz63-stochastic", [*SMALL, "data.n_test=20", "metrics.curve_leads=[1,50]"])
    with pytest.raises(ConfigError, match=r"data\.n_test: expected more than the longest lead \(50 steps\)"):
        run_case(case, tmp_path / "run", progress=False)


@pytest.fixture(scope="module")
def stochastic_run(tmp_path_factory, one_torch_thread):
    case = load_case("lorenz63-stochastic", SMALL)
    out = tmp_path_factory.mktemp("runs") / "stochastic"
    return case, out, run_case(case, out, progress=False)


@pytest.mark.slow
def test_reduced_run_writes_its_folder(stochastic_run):
    case, out, metrics = stochastic_run
    assert {p.name for p in out.iterdir()} == {"checkpoints", "config.toml", "figures", "forecast.nc", "metrics.json"}
    assert read_metrics(out) == metrics
    for key in ("coverage90", "noise_level_learned", "noise_level_rel_error", "crps_lead1", "crps_lead1_deterministic",
                "crps_lead10", "crps_lead10_deterministic", "nll_test", "train_seconds"):
        assert math.isfinite(metrics[key]), key
    assert 0 <= metrics["coverage90"] <= 1 and metrics["noise_level_true"] == 2.0
    assert metrics["n_params"] == 57 + 6  # BiNN(3, 3, 3) + a full 3x3 Cholesky factor
    for name in ("reliability.png", "crps_by_lead.png", "ensemble_forecast.png"):
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert {p.name for p in (out / "checkpoints").rglob("*.pt")} == {"likelihood.pt", "checkpoint.pt"}
    rows = check_expected(case, metrics)
    assert [row[0] for row in rows] == ["|coverage90 - 0.90|", "noise_level_rel_error", "crps_lead1 / crps_lead1_deterministic",
                                        "crps_lead10 / crps_lead10_deterministic"]


@pytest.mark.slow
def test_reduced_run_writes_a_cf_netcdf(stochastic_run):
    _, out, metrics = stochastic_run
    with xr.open_dataset(out / "forecast.nc") as ds:
        ds = ds.load()
    assert ds.attrs["Conventions"] == "CF-1.8" and ds.attrs["noise_std"] == 2.0
    assert ds["ensemble"].dims == ("time", "member", "component") and ds.sizes["member"] == 8
    assert ds.sizes["time"] == 41 and ds["truth"].dims == ("time", "component")
    for name in ("truth", "ensemble", "deterministic", "crps", "crps_deterministic", "coverage", "one_step_covariance"):
        assert ds[name].attrs["long_name"] and "units" in ds[name].attrs, name
    assert list(ds["lead"].values) == [1, 5, 10]
    assert float(ds["crps"].sel(lead=10)) == metrics["crps_lead10"]
    assert float(ds["coverage"].sel(nominal_level=0.9)) == metrics["coverage90"]
    covariance = ds["one_step_covariance"].values
    assert covariance.shape == (3, 3) and (abs(covariance - covariance.T) < 1e-12).all()


@pytest.mark.slow
def test_resuming_a_finished_run_reproduces_its_metrics(stochastic_run):
    case, out, metrics = stochastic_run
    again = run_case(case, out, resume=True, progress=False)
    ignore = {"case_seconds"}
    assert {k: v for k, v in again.items() if k not in ignore} == {k: v for k, v in metrics.items() if k not in ignore}
