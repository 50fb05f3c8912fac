"""The lorenz63-partial case: strict config, the latent initial guesses, and a reduced run (one dimension, one
seed) that writes its folder (metrics.json, netCDF with CF attributes, the latent-attractor figure)."""

from __future__ import annotations

import json

import pytest
import torch
import xarray as xr

from geonn import ConfigError
from geonn.cases import check_expected, load_case, run_case
from geonn.cases.partial import Embedding, PartialCase, initial_augmented

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = [
    "embedding.dimensions=[3]", "embedding.seeds=[0]",
    "data.n_train=600", "data.n_test=150", "data.spinup_steps=500",
    "pretraining.epochs=2", "joint.epochs_per_stage=1", "joint.iterations=8",
    "inference.iterations=3", "inference.every=10", "inference.window_steps=30",
    "metrics.lyapunov_steps=100", "metrics.lyapunov_trajectories=2",
]


def test_the_case_file_loads_the_full_grid():
    case = load_case("lorenz63-partial")
    assert isinstance(case, PartialCase) and case.kind == "partial"
    assert case.embedding.dimensions == [3, 4, 6] and case.embedding.seeds == [0, 1, 2, 3, 4]
    assert (case.data.n_train, case.data.n_test, case.data.dt, case.data.observed_component) == (4000, 1000, 0.01, 0)
    assert case.expected.max == {"dE3_rmse_lead1_median": 7.8e-5, "dE3_rmse_lead4_median": 8.5e-4}
    assert case.expected.published["dE3_lyapunov_max"] == 0.93


@pytest.mark.parametrize(
    "override, message",
    [
        ("embedding.dimensions=[1]", r"embedding\.dimensions: expected augmented dimensions >= 2"),
        ("embedding.features=['derivative', 'cube']", r"embedding\.features\[1\]: expected one of"),
        ("embedding.features=['lag0', 'lag1', 'lag2', 'lag3', 'lag4']", r"embedding\.features\[0\]"),
        ("embedding.features=['derivative']", r"embedding\.features: expected at least 5 features for dimension 6"),
        ("embedding.seeds=[]", r"embedding\.seeds: expected at least one seed"),
        ("inference.window_steps=0", r"inference\.window_steps: expected >= 1"),
        ("model.scheme=rk5", r"model\.scheme"),
        ("joint.train_model=1", r"joint\.train_model: expected true or false"),
    ],
)
def test_bad_config_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_case("lorenz63-partial", [override])


def test_initial_augmented_state_holds_the_observed_series_and_standardised_features():
    x = torch.sin(torch.linspace(0, 20, 400, dtype=torch.float64)) * 8 + 1
    embedding = Embedding(features=["derivative", "square_lag1", "lag2", "noise", "second_derivative"], latent_noise=0.0)
    augmented = initial_augmented(x, 6, embedding, 0.05, seed=0)
    assert augmented.shape == (400, 6) and torch.equal(augmented[:, 0], x)
    assert torch.allclose(augmented[:, 1:].std(0), torch.full((5,), float(x.std()), dtype=torch.float64), rtol=1e-2)
    assert torch.allclose(augmented[:, 1:].mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-9)
    # the derivative of a sine is a cosine: nearly uncorrelated with it, and proportional to it
    derivative = torch.cos(torch.linspace(0, 20, 400, dtype=torch.float64))
    assert abs(float(torch.corrcoef(torch.stack((augmented[:, 1], x)))[0, 1])) < 0.2
    assert float(torch.corrcoef(torch.stack((augmented[:, 1], derivative)))[0, 1]) > 0.999
    seeded = [initial_augmented(x, 3, Embedding(), 0.05, seed=s) for s in (0, 0, 1)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])


@pytest.mark.slow
def test_reduced_run_writes_its_folder(tmp_path):
    case = load_case("lorenz63-partial", SMALL)
    out = tmp_path / "partial"
    metrics = run_case(case, out, progress=False)
    for name in ("metrics.json", "config.toml", "runs.nc", "reconstruction.nc", "figures/latent_attractor.png",
                 "figures/rmse_by_dimension.png", "checkpoints/dE3_seed0/joint/joint.pt", "checkpoints/dE3_seed0/inference/joint.pt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()).keys() == metrics.keys()
    for key in ("dE3_rmse_lead1_median", "dE3_rmse_lead1_min", "dE3_rmse_lead1_max", "dE3_rmse_lead4_median",
                "dE3_lyapunov_max_median", "dE3_latent_affine_rmse_median", "dE3_train_seconds_median"):
        assert isinstance(metrics[key], float), key
    assert metrics["n_runs"] == 1 and metrics["dE3_rmse_lead1_min"] == metrics["dE3_rmse_lead1_max"]
    with xr.open_dataset(out / "runs.nc") as ds:
        assert ds.rmse.dims == ("dimension", "seed", "lead") and ds.rmse.shape == (1, 1, 2)
        assert ds.attrs["Conventions"] == "CF-1.8" and all(ds[v].attrs["units"] and ds[v].attrs["long_name"] for v in ds.data_vars)
    with xr.open_dataset(out / "reconstruction.nc") as ds:
        assert ds.augmented_dE3.shape == (601, 3)
        assert (ds.augmented_dE3.values[:, 0] == ds.truth.values[:, 0]).all()  # the observed component is held exactly
    rows = [name for name, *_ in check_expected(case, metrics)]
    assert rows == ["dE3_rmse_lead1_median", "dE3_rmse_lead4_median", "|dE3_lyapunov_max_median - 0.9|"]
    # resumed after completion, every stage loads its checkpoint and the metrics repeat exactly
    again = run_case(case, out, resume=True, progress=False)
    assert {k: v for k, v in again.items() if k != "case_seconds"} == {k: v for k, v in metrics.items() if k != "case_seconds"}
