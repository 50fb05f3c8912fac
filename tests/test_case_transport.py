"""The lorenz63-ot case on a reduced setting (writes its folder, resumes, refuses bad config), the
attractor distance, and the objective loop it trains with (checkpoint every epoch, bit-for-bit resume)."""

from __future__ import annotations

import math

import pytest
import torch
import xarray as xr

from geonn import ConfigError, InputError
from geonn.cases import check_expected, load_case, read_metrics, run_case
from geonn.cases.objective_fit import fit_objective
from geonn.cases.transport import attractor_distance
from geonn.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DTYPE = torch.float64

SMALL = [
    "data.n_train=300",
    "data.n_test=200",
    "data.spinup_steps=100",
    "model.hidden=[16, 16]",
    "training.epochs=2",
    "training.batch_size=100",
    "transport.start_epoch=1",
    "transport.every=2",
    "transport.rollout_steps=10",
    "transport.rollout_starts=8",
    "transport.target_samples=64",
    "metrics.attractor_steps=300",
    "metrics.attractor_starts=2",
    "metrics.n_projections=32",
    "metrics.lyapunov_steps=100",
    "metrics.lyapunov_trajectories=2",
    "metrics.lyapunov_spinup=10",
]


def test_the_case_file_uses_the_same_budget_for_both_trainings():
    case = load_case("lorenz63-ot")
    assert case.kind == "transport" and case.data.obs_noise_std > 0
    assert 0 < case.transport.start_epoch < case.training.epochs and case.training.refine == "none"
    assert case.metrics.attractor_steps == 10000 and case.metrics.starts_from == "test"
    assert case.expected.attractor_ratio_max <= 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("transport.distance=energy", r"transport\.distance: expected one of \('sliced', 'sinkhorn'\)"),
        ("transport.weight=0", r"transport\.weight: expected a weight > 0"),
        ("transport.start_epoch=10", r"transport\.start_epoch: expected fewer than training\.epochs \(10\)"),
        ("transport.gradient=finite", r"transport\.gradient: expected one of"),
        ("transport.rollout_steps=0", r"transport\.rollout_steps: expected >= 1"),
        ("transport.clip_grad_norm=0", r"transport\.clip_grad_norm: expected a norm > 0"),
        ("transport.balance=1", r"transport\.balance: expected true or false"),
        ("training.refine=lbfgs", r"training\.refine, training\.unroll: the transport case trains with Adam"),
        ("data.obs_noise_std=-1", r"data\.obs_noise_std: expected a noise std >= 0"),
        ("metrics.starts_from=valid", r"metrics\.starts_from: expected 'test' or 'train'"),
        ("transport.blurr=0.1", r"unknown key transport\.blurr"),
    ],
)
def test_bad_config_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_case("lorenz63-ot", [override])


def test_attractor_distance_is_a_distance_and_skips_diverged_runs():
    generator = torch.Generator().manual_seed(0)
    runs = torch.randn(500, 3, 2, generator=generator, dtype=DTYPE)  # (time, runs, d)
    assert attractor_distance(runs, runs, 16, 0) == 0.0
    shifted = runs + torch.tensor([3.0, 0.0], dtype=DTYPE)
    # a shift by 3 along one axis: SW_2^2 = 9 E[theta_1^2] = 9 / 2 in 2-D (up to the projections' sampling)
    assert attractor_distance(shifted, runs, 500, 0) == pytest.approx(math.sqrt(4.5), rel=0.1)
    diverged = shifted.clone()
    diverged[100:, 1] = float("nan")
    assert math.isfinite(attractor_distance(diverged, runs, 16, 0))
    assert math.isnan(attractor_distance(torch.full((5, 1, 2), float("inf"), dtype=DTYPE), runs, 16, 0))


def _objective_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    inputs = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    targets = inputs.sum(-1, keepdim=True).sin()

    def loss(idx, step):  # a noisy objective: the noise is seeded by the step, as the rule says
        noise = torch.randn(len(idx), 1, generator=torch.Generator().manual_seed(step), dtype=DTYPE)
        return (model(inputs[idx]) - targets[idx] - 0.01 * noise).pow(2).mean()

    return model, loss


def test_fit_objective_resumes_bit_for_bit(tmp_path):
    config = TrainConfig(epochs=4, batch_size=16, learning_rate=1e-2)
    model, loss = _objective_setup()
    fit_objective({"model": model}, loss, 64, config, checkpoint_path=tmp_path / "full.pt", progress=False)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model, loss = _objective_setup()

    def crashing(idx, step):
        if step == 9:  # in the third epoch: the checkpoint holds two
            raise KeyboardInterrupt
        return loss(idx, step)

    with pytest.raises(KeyboardInterrupt):
        fit_objective({"model": model}, crashing, 64, config, checkpoint_path=tmp_path / "cut.pt", progress=False)
    model, loss = _objective_setup()  # a fresh process: fresh weights, read back from the checkpoint
    result = fit_objective({"model": model}, loss, 64, config, checkpoint_path=tmp_path / "cut.pt", resume=True, progress=False)
    assert result.resumed_from_epoch == 2 and len(result.history) == 4
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, model.parameters()))


def test_a_balanced_auxiliary_term_pulls_with_the_given_ratio():
    from geonn.cases.objective_fit import _backward

    weights = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=DTYPE))
    main = (weights**2).sum()  # gradient (2, 4), norm sqrt(20)
    auxiliary = 1000 * weights[0]  # gradient (1000, 0): its scale must not matter
    value = _backward((main, auxiliary, 0.5), [weights])
    assert value == 5.0
    expected = torch.tensor([2.0, 4.0], dtype=DTYPE) + 0.5 * math.sqrt(20) * torch.tensor([1.0, 0.0], dtype=DTYPE)
    assert torch.allclose(weights.grad, expected, rtol=1e-12)
    weights.grad = None
    assert _backward((weights**2).sum(), [weights]) == 5.0 and torch.equal(weights.grad, torch.tensor([2.0, 4.0], dtype=DTYPE))


def test_fit_objective_refuses_a_checkpoint_of_another_config(tmp_path):
    model, loss = _objective_setup()
    fit_objective({"model": model}, loss, 64, TrainConfig(epochs=1, batch_size=16), checkpoint_path=tmp_path / "c.pt", progress=False)
    with pytest.raises(InputError, match=r"resume: .* was written by a different training config"):
        fit_objective({"model": model}, loss, 64, TrainConfig(epochs=2, batch_size=16), checkpoint_path=tmp_path / "c.pt",
                      resume=True, progress=False)
    with pytest.raises(InputError, match=r"training\.refine: this objective trains with Adam only"):
        fit_objective({"model": model}, loss, 64, TrainConfig(refine="lbfgs", refine_epochs=1))
    with pytest.raises(InputError, match=r"n_samples: expected an integer >= 1, got 0"):
        fit_objective({"model": model}, loss, 0, TrainConfig())
    with pytest.raises(InputError, match=r"max_grad_norm: expected a norm > 0 or None, got 0"):
        fit_objective({"model": model}, loss, 64, TrainConfig(), max_grad_norm=0)


@pytest.fixture(scope="module")
def transport_run(tmp_path_factory, one_torch_thread):
    case = load_case("lorenz63-ot", SMALL)
    out = tmp_path_factory.mktemp("runs") / "ot"
    return case, out, run_case(case, out, progress=False)


@pytest.mark.slow
def test_reduced_run_writes_its_folder(transport_run):
    case, out, metrics = transport_run
    assert {p.name for p in out.iterdir()} == {"checkpoints", "config.toml", "figures", "attractor.nc", "metrics.json"}
    assert read_metrics(out) == metrics
    for label in ("pointwise", "ot"):
        for key in (f"sliced_w_attractor_{label}", f"rmse_lead1_{label}", f"train_seconds_{label}", f"final_loss_{label}"):
            assert math.isfinite(metrics[key]), key
        assert f"lyapunov_max_{label}" in metrics and metrics[f"diverged_runs_{label}"] in (0, 1, 2)
    assert math.isfinite(metrics["sliced_w_attractor_floor"]) and math.isfinite(metrics["lyapunov_max_true"])
    assert metrics["attractor_improvement"] == pytest.approx(1 - metrics["sliced_w_attractor_ot"] / metrics["sliced_w_attractor_pointwise"])
    assert (out / "figures" / "attractors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"pointwise.pt", "ot.pt"}
    (row,) = check_expected(case, metrics)
    assert row[0] == "sliced_w_attractor_ot / sliced_w_attractor_pointwise" and row[2] == case.expected.attractor_ratio_max
    with xr.open_dataset(out / "attractor.nc") as ds:
        ds = ds.load()
    assert ds.attrs["Conventions"] == "CF-1.8" and ds.sizes["time"] == 301
    for name in ("truth", "pointwise", "ot"):
        assert ds[name].dims == ("time", "component") and ds[name].attrs["long_name"] and ds[name].attrs["units"] == "1"
    assert ds.attrs["sliced_w_attractor_ot"] == metrics["sliced_w_attractor_ot"]


@pytest.mark.slow
def test_the_two_trainings_share_the_point_wise_epochs(transport_run):
    _, out, metrics = transport_run
    from geonn.io import load_checkpoint

    pointwise, ot = load_checkpoint(out / "checkpoints" / "pointwise.pt"), load_checkpoint(out / "checkpoints" / "ot.pt")
    # identical before start_epoch (same seed, batches and loss), different after the transport term starts
    assert pointwise["history"][0] == ot["history"][0]
    assert pointwise["history"][1]["loss"] != ot["history"][1]["loss"]
    assert metrics["final_loss_ot"] == ot["history"][-1]["loss"]


@pytest.mark.slow
def test_resuming_a_finished_run_reproduces_its_metrics(transport_run):
    case, out, metrics = transport_run
    again = run_case(case, out, resume=True, progress=False)
    ignore = {"case_seconds"}
    assert {k: v for k, v in again.items() if k not in ignore} == {k: v for k, v in metrics.items() if k not in ignore}
