"""fit / TrainConfig / make_windows: windows are right, bad input is refused, training converges,
runs are reproducible bit for bit, and an interrupted run (even one killed with SIGKILL) resumes
to exactly the weights of a run that was never interrupted."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import geonn
from geonn import InputError, InputTypeError
from geonn.metrics import forecast_rmse
from geonn.training import CHECKPOINT_NAME, TrainConfig, fit, make_windows

DTYPE = torch.float64
DT = 0.01


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- data and models shared by the tests (and by the subprocess of the SIGKILL test) -------------


@functools.cache
def lorenz_trajectory(n_steps: int, seed: int = 0) -> torch.Tensor:
    """Noise-free Lorenz-63 states (n_steps + 1, 3) on the attractor, dt = 0.01."""
    x0 = geonn.Lorenz63().default_initial_state() + torch.tensor([0.1 * seed, 0.0, 0.0], dtype=DTYPE)
    ds = geonn.simulate(geonn.Lorenz63(), n_steps, DT, x0=x0, spinup_steps=500)
    return torch.as_tensor(ds.state.values)


class QuadraticTendency(nn.Module):
    """``dx/dt = C [1, x, x_i x_j (i <= j)]``: linear in its 30 coefficients, Lorenz-63 exactly.

    Unlike BilinearResidual (whose weights have continuous symmetries, so its residual Jacobian is
    rank-deficient), the Jacobian here has full rank, which keeps Levenberg-Marquardt's steps
    well-determined; see test_resume_after_sigkill.
    """

    state_dim = 3

    def __init__(self):
        super().__init__()
        self.coef = nn.Parameter(0.1 * torch.randn(3, 10, dtype=DTYPE))
        i, j = torch.triu_indices(3, 3)
        self.register_buffer("i", i)
        self.register_buffer("j", j)

    def forward(self, t, x):
        features = torch.cat([torch.ones_like(x[..., :1]), x, x[..., self.i] * x[..., self.j]], dim=-1)
        return features @ self.coef.T


def standardised(operator: nn.Module, traj: torch.Tensor) -> geonn.Standardised:
    increments = (traj[1:] - traj[:-1]) / DT
    return geonn.Standardised(operator, traj.mean(0), traj.std(0), increments.std(0))


def bilinear_model(traj: torch.Tensor, seed: int = 0) -> geonn.Standardised:
    torch.manual_seed(seed)
    return standardised(geonn.BilinearResidual(3).to(DTYPE), traj)


# The three resume scenarios: interrupted during Adam (with a learnable scheme), during L-BFGS and during LM.
RESUME_RUNS = {
    "adam": {"config": TrainConfig(epochs=3, batch_size=64, learning_rate=1e-2, seed=5), "kill_at": 1},
    "lbfgs": {"config": TrainConfig(epochs=1, batch_size=64, refine="lbfgs", refine_epochs=2, refine_iterations=5), "kill_at": 2},
    "lm": {"config": TrainConfig(epochs=1, batch_size=64, refine="lm", refine_epochs=3, refine_iterations=2), "kill_at": 2},
}


def build_run(kind: str, traj: torch.Tensor) -> tuple[nn.Module, geonn.RungeKuttaStep]:
    """The freshly initialised model and scheme of a resume scenario (deterministic)."""
    torch.manual_seed(11)
    if kind == "lm":
        return standardised(QuadraticTendency(), traj), geonn.RungeKuttaStep("rk4")
    model = standardised(geonn.BilinearResidual(3).to(DTYPE), traj)
    return model, geonn.RungeKuttaStep("rk4", learnable=(kind == "adam"), learn_dt=(kind == "adam"))


def resume_trajectory() -> torch.Tensor:
    return lorenz_trajectory(300)


@functools.cache
def uninterrupted(kind: str) -> tuple[dict, list[dict]]:
    """State and history of the scenario run start to finish without a checkpoint."""
    traj = resume_trajectory()
    model, step = build_run(kind, traj)
    result = fit(model, traj, DT, step=step, config=RESUME_RUNS[kind]["config"], progress=False)
    return _state(model, step), result.history


def _state(model: nn.Module, step: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    state.update({f"step.{k}": v.detach().clone() for k, v in step.state_dict().items()})
    return state


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bit-for-bit equal: {different}"


def parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --- make_windows ----------------------------------------------------------------------------------


def test_make_windows_single_trajectory():
    traj = torch.arange(30, dtype=DTYPE).reshape(10, 3)  # row t is (3t, 3t+1, 3t+2)
    starts, targets = make_windows(traj, 1)
    assert starts.shape == (9, 3) and targets.shape == (9, 1, 3)
    assert torch.equal(starts, traj[:-1])
    assert torch.equal(targets[:, 0], traj[1:])
    assert starts.is_contiguous() and targets.is_contiguous()


def test_make_windows_unroll():
    traj = torch.arange(30, dtype=DTYPE).reshape(10, 3)
    starts, targets = make_windows(traj, 3)
    assert starts.shape == (7, 3) and targets.shape == (7, 3, 3)
    for s in range(7):
        assert torch.equal(starts[s], traj[s])
        for k in range(3):
            assert torch.equal(targets[s, k], traj[s + 1 + k])


def test_make_windows_several_trajectories():
    T, B, D, unroll = 6, 4, 2, 2
    traj = torch.randn(T, B, D, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    starts, targets = make_windows(traj, unroll)
    assert starts.shape == ((T - unroll) * B, D) and targets.shape == ((T - unroll) * B, unroll, D)
    # every window is a run of consecutive times of one trajectory, and every (start time, member) appears once
    expected = {(t, b) for t in range(T - unroll) for b in range(B)}
    found = set()
    for s in range(starts.shape[0]):
        ((t, b),) = [(t, b) for t in range(T) for b in range(B) if torch.equal(traj[t, b], starts[s])]
        found.add((t, b))
        for k in range(unroll):
            assert torch.equal(targets[s, k], traj[t + 1 + k, b])
    assert found == expected


def test_make_windows_extra_dimensions_are_trajectories():
    traj = torch.randn(5, 2, 3, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    starts, targets = make_windows(traj, 1)
    flat_starts, flat_targets = make_windows(traj.reshape(5, 6, 4), 1)
    assert starts.shape == (4 * 6, 4) and targets.shape == (4 * 6, 1, 4)
    assert torch.equal(starts, flat_starts) and torch.equal(targets, flat_targets)


def test_make_windows_minimum_length():
    traj = torch.zeros(3, 2, dtype=DTYPE)
    starts, targets = make_windows(traj, 2)
    assert starts.shape == (1, 2) and targets.shape == (1, 2, 2)
    with pytest.raises(InputError, match=r"trajectory.*unroll=3.*\(3, 2\)"):
        make_windows(traj, 3)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.tensor([[0.0, 1.0], [math.nan, 2.0], [1.0, 1.0]], dtype=DTYPE), "trajectory: expected finite"),
        (torch.tensor([[0.0, 1.0], [math.inf, 2.0], [1.0, 1.0]], dtype=DTYPE), "trajectory: expected finite"),
        (torch.zeros(1, 3, dtype=DTYPE), r"trajectory.*more than unroll=1"),
        (torch.zeros(5, dtype=DTYPE), r"trajectory.*\(time, \.\.\., state_dim\)"),
    ],
)
def test_make_windows_refuses_bad_trajectories(bad, message):
    with pytest.raises(InputError, match=message):
        make_windows(bad, 1)


@pytest.mark.parametrize("bad", [torch.arange(12).reshape(4, 3), [[0.0, 1.0], [1.0, 2.0]]])
def test_make_windows_refuses_non_float(bad):
    with pytest.raises(InputTypeError, match="trajectory: expected a floating-point tensor"):
        make_windows(bad, 1)


# --- TrainConfig -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", -1),
        ("epochs", 2.5),
        ("epochs", True),
        ("epochs", "10"),
        ("batch_size", 0),
        ("unroll", 0),
        ("refine_epochs", -1),
        ("refine_iterations", 0),
        ("seed", -3),
        ("learning_rate", -1e-3),
        ("learning_rate", math.nan),
        ("learning_rate", math.inf),
        ("learning_rate", True),
        ("final_lr_fraction", -0.1),
        ("weight_decay", "0.1"),
        ("schedule", "x"),
        ("refine", "x"),
        ("refine", None),
        ("gradient", "x"),
    ],
)
def test_train_config_refuses_bad_values(field, value):
    with pytest.raises(InputError, match=rf"^{field}: expected"):
        TrainConfig(**{field: value})


def test_train_config_accepts_the_documented_choices():
    for schedule in ("cosine", "constant"):
        for refine in ("none", "lbfgs", "lm"):
            for gradient in ("backprop", "checkpoint", "adjoint"):
                TrainConfig(schedule=schedule, refine=refine, gradient=gradient)
    TrainConfig(epochs=0, refine_epochs=0, learning_rate=0, weight_decay=0)


# --- fit: bad input ----------------------------------------------------------------------------------


def test_fit_refuses_bad_input():
    traj = lorenz_trajectory(50)
    model = bilinear_model(traj)
    config = TrainConfig(epochs=1)
    with pytest.raises(InputError, match=r"trajectory: expected last dimension 3.*\(51, 4\)"):
        fit(model, torch.cat([traj, traj[:, :1]], dim=1), DT, config=config, progress=False)
    bad = traj.clone()
    bad[7, 1] = math.nan
    with pytest.raises(InputError, match="trajectory: expected finite"):
        fit(model, bad, DT, config=config, progress=False)
    with pytest.raises(InputError, match="trajectory.*more than unroll=60"):
        fit(model, traj, DT, config=TrainConfig(epochs=1, unroll=60), progress=False)
    with pytest.raises(InputTypeError, match="model: expected a torch.nn.Module"):
        fit(geonn.Lorenz63().forward, traj, DT, config=config, progress=False)
    with pytest.raises(InputError, match="resume: resuming needs checkpoint_dir"):
        fit(model, traj, DT, config=config, resume=True, progress=False)


def test_lm_refuses_more_parameters_than_residuals():
    traj = lorenz_trajectory(20)  # 20 windows x 3 components = 60 residuals
    torch.manual_seed(0)
    model = geonn.MLP(3, hidden=(16,)).to(DTYPE)  # 115 parameters
    with pytest.raises(InputError, match=r"refine: 'lm' needs at least as many residuals \(60\) as parameters \(115\)"):
        fit(model, traj, DT, config=TrainConfig(epochs=0, refine="lm", refine_epochs=1), progress=False)


def test_fit_reports_divergence():
    traj = lorenz_trajectory(100)
    model = bilinear_model(traj)
    with pytest.raises(InputError, match="diverged|non-finite"):
        fit(model, traj, DT, config=TrainConfig(epochs=3, batch_size=16, learning_rate=1e6, schedule="constant"), progress=False)


# --- fit: training works ---------------------------------------------------------------------------


def test_fit_reduces_the_loss():
    traj = lorenz_trajectory(500)
    model = bilinear_model(traj)
    before = forecast_rmse(model, traj, DT, (1,))[1]
    result = fit(model, traj, DT, config=TrainConfig(epochs=5, batch_size=32, learning_rate=2e-2), progress=False)
    after = forecast_rmse(model, traj, DT, (1,))[1]
    losses = [h["loss"] for h in result.history]
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]
    assert all(h["phase"] == "adam" for h in result.history)
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.3 * losses[0]
    assert after < before / 3
    assert result.final_loss == losses[-1] and result.train_seconds > 0 and result.resumed_from_epoch == 0
    # the cosine schedule has decayed the learning rate, and not below its floor
    lrs = [h["lr"] for h in result.history]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(2e-2 * 1e-2)


def test_levenberg_marquardt_identifies_lorenz63_exactly():
    """BilinearResidual can represent Lorenz-63 exactly, so on noise-free data LM reaches round-off."""
    traj = lorenz_trajectory(500)
    model = bilinear_model(traj)
    config = TrainConfig(epochs=2, batch_size=64, refine="lm", refine_epochs=3, refine_iterations=25)
    result = fit(model, traj, DT, config=config, progress=False)
    assert [h["phase"] for h in result.history] == ["adam", "adam", "lm", "lm", "lm"]
    assert result.history[-1]["loss"] < 1e-18
    assert forecast_rmse(model, traj, DT, (1,))[1] < 1e-8
    # and it is the true tendency, not a fit to these states: a trajectory it never saw is forecast as well
    unseen = lorenz_trajectory(200, seed=7)
    assert not torch.equal(unseen[:10], traj[:10])
    assert forecast_rmse(model, unseen, DT, (1,))[1] < 1e-8
    torch.testing.assert_close(model(0.0, unseen), geonn.Lorenz63()(0.0, unseen), rtol=1e-6, atol=1e-6)


def test_lbfgs_refinement_improves_on_adam():
    traj = lorenz_trajectory(300)
    model = bilinear_model(traj)
    result = fit(
        model,
        traj,
        DT,
        config=TrainConfig(epochs=2, batch_size=64, refine="lbfgs", refine_epochs=2, refine_iterations=10),
        progress=False,
    )
    losses = [h["loss"] for h in result.history]
    assert [h["phase"] for h in result.history] == ["adam", "adam", "lbfgs", "lbfgs"]
    assert losses[3] <= losses[2] < 0.5 * losses[1]


def test_unrolled_loss_with_checkpointed_gradient_matches_backprop():
    traj = lorenz_trajectory(200)
    weights = []
    for gradient in ("backprop", "checkpoint"):
        model = bilinear_model(traj)
        fit(model, traj, DT, config=TrainConfig(epochs=1, batch_size=64, unroll=4, gradient=gradient), progress=False)
        weights.append(parameters(model))
    assert not torch.equal(weights[0], parameters(bilinear_model(traj)))  # it trained
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-10, atol=1e-12)


def test_learnable_scheme_trains():
    traj = lorenz_trajectory(200)
    model = bilinear_model(traj)
    step = geonn.RungeKuttaStep("rk4", learnable=True, learn_dt=True)
    before = {k: v.detach().clone() for k, v in step.named_parameters()}
    assert set(before) == {"a", "b", "c", "log_dt_scale"}
    fit(model, traj, DT, step=step, config=TrainConfig(epochs=2, batch_size=64, learning_rate=1e-2), progress=False)
    after = dict(step.named_parameters())
    for name in ("a", "b", "log_dt_scale"):
        assert not torch.equal(after[name].detach(), before[name]), f"{name} did not change"
    # the tendency is autonomous (t is ignored), so the nodes c get no gradient and stay put
    assert torch.equal(after["c"].detach(), before["c"])
    # the strictly upper triangle of a is masked out of the step, so it gets no gradient and keeps its values
    upper = ~torch.tril(torch.ones(4, 4, dtype=torch.bool), diagonal=-1)
    assert torch.equal(after["a"].detach()[upper], before["a"][upper])


def test_fixed_scheme_has_nothing_to_train():
    traj = lorenz_trajectory(100)
    step = geonn.RungeKuttaStep("rk4")
    fit(bilinear_model(traj), traj, DT, step=step, config=TrainConfig(epochs=1), progress=False)
    assert list(step.parameters()) == []


# --- reproducibility -------------------------------------------------------------------------------


def test_seeded_runs_are_bit_for_bit_reproducible():
    traj = lorenz_trajectory(300)
    config = TrainConfig(epochs=2, batch_size=32, refine="lbfgs", refine_epochs=1, refine_iterations=5, seed=3)
    runs = []
    for _ in range(2):
        model = bilinear_model(traj, seed=1)
        result = fit(model, traj, DT, config=config, progress=False)
        runs.append((parameters(model), [h["loss"] for h in result.history]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    # the seed is used: another batch order gives other weights
    model = bilinear_model(traj, seed=1)
    fit(model, traj, DT, config=dataclasses.replace(config, seed=4), progress=False)
    assert not torch.equal(parameters(model), runs[0][0])


def test_lm_refinement_is_reproducible_with_a_full_rank_jacobian():
    traj = resume_trajectory()
    weights = []
    for _ in range(2):
        model, step = build_run("lm", traj)
        fit(model, traj, DT, step=step, config=RESUME_RUNS["lm"]["config"], progress=False)
        weights.append(parameters(model))
    assert torch.equal(weights[0], weights[1])


# --- checkpoints and resume --------------------------------------------------------------------------


def test_checkpoint_format(tmp_path):
    traj = lorenz_trajectory(200)
    model = bilinear_model(traj)
    config = TrainConfig(epochs=2, batch_size=64, refine="lbfgs", refine_epochs=1, refine_iterations=3)
    result = fit(model, traj, DT, config=config, checkpoint_dir=tmp_path / "ck", progress=False)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [CHECKPOINT_NAME]  # no temp files left
    state = torch.load(tmp_path / "ck" / CHECKPOINT_NAME, weights_only=True)
    assert {"model", "step", "adam", "epoch", "config", "history", "scheduler", "lbfgs", "generator", "format"} <= set(state)
    assert state["epoch"] == 3
    assert state["config"] == dataclasses.asdict(config)
    assert state["history"] == result.history and [h["phase"] for h in state["history"]] == ["adam", "adam", "lbfgs"]
    assert state["model"].keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state["model"][key], value), key
    assert state["lbfgs"]["state"], "the L-BFGS history is saved during refinement"
    assert state["train_seconds"] == pytest.approx(result.train_seconds)


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, epoch: int) -> None:
    """Make fit stop (as if killed) right after it has written the checkpoint of ``epoch``."""
    from geonn import training

    real_save = training.save_checkpoint

    def save_then_stop(state, path):
        real_save(state, path)
        if state["epoch"] == epoch:
            raise Interrupted(epoch)

    monkeypatch.setattr(training, "save_checkpoint", save_then_stop)


@pytest.mark.parametrize("kind, epoch", [("adam", 1), ("adam", 2), ("lbfgs", 1), ("lbfgs", 2), ("lm", 1), ("lm", 2), ("lm", 3)])
def test_resume_in_process_matches_an_uninterrupted_run(tmp_path, monkeypatch, kind, epoch):
    traj = resume_trajectory()
    config = RESUME_RUNS[kind]["config"]
    model, step = build_run(kind, traj)
    interrupt_after(monkeypatch, epoch)
    with pytest.raises(Interrupted):
        fit(model, traj, DT, step=step, config=config, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.undo()
    model, step = build_run(kind, traj)
    result = fit(model, traj, DT, step=step, config=config, checkpoint_dir=tmp_path, resume=True, progress=False)
    expected_state, expected_history = uninterrupted(kind)
    assert result.resumed_from_epoch == epoch
    assert [h["loss"] for h in result.history] == [h["loss"] for h in expected_history]
    assert_same_weights(_state(model, step), expected_state)


# The subprocess: trains one resume scenario and, right after writing the checkpoint of epoch
# `kill_at`, waits to be killed. argv: tests folder, scenario, checkpoint folder, inputs file.
KILLED_SCRIPT = r"""
import sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
import geonn.training as training
from test_training import DT, RESUME_RUNS, build_run

kind, checkpoint_dir, inputs = sys.argv[2], sys.argv[3], sys.argv[4]
saved = torch.load(inputs, weights_only=True)
model, step = build_run(kind, saved["trajectory"])
model.load_state_dict(saved["model"])
step.load_state_dict(saved["step"])
real_save = training.save_checkpoint

def save_then_wait(state, path):
    real_save(state, path)
    if state["epoch"] == RESUME_RUNS[kind]["kill_at"]:
        time.sleep(300)  # the test kills this process with SIGKILL here

training.save_checkpoint = save_then_wait
training.fit(model, saved["trajectory"], DT, step=step, config=RESUME_RUNS[kind]["config"],
             checkpoint_dir=checkpoint_dir, progress=False)
print("finished without being killed")
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("kind", ["adam", "lbfgs", "lm"])
def test_resume_after_sigkill(tmp_path, kind):
    """A real process is killed with SIGKILL after a checkpoint; the run resumed from it ends with exactly
    the weights of an uninterrupted run: during Adam (with a learnable scheme), L-BFGS and LM.

    The LM scenario uses a model whose residual Jacobian has full rank. BilinearResidual's is
    rank-deficient (its weights have continuous symmetries), and there scipy's MINPACK (seen with
    scipy 1.17.1) reads one element past the end of the Jacobian when qrfac recomputes a collapsed
    column norm (valgrind: invalid read in enorm <- qrfac <- lmder), so its LM steps depend on heap
    contents and differ from run to run even within one process: no bit-for-bit resume can hold.
    """
    traj = resume_trajectory()
    kill_at = RESUME_RUNS[kind]["kill_at"]
    model, step = build_run(kind, traj)
    inputs = tmp_path / "inputs.pt"
    torch.save({"trajectory": traj, "model": model.state_dict(), "step": step.state_dict()}, inputs)
    checkpoint_dir = tmp_path / "checkpoints"
    checkpoint = checkpoint_dir / CHECKPOINT_NAME
    log = tmp_path / "child.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", KILLED_SCRIPT, str(Path(__file__).parent), kind, str(checkpoint_dir), str(inputs)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + 240
            epoch = 0
            while epoch != kill_at:
                assert child.poll() is None, f"the child exited early:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"no checkpoint of epoch {kill_at} in time:\n{log.read_text()}"
                if checkpoint.is_file():  # written atomically, so it is always whole
                    epoch = int(torch.load(checkpoint, weights_only=True)["epoch"])
                    assert epoch <= kill_at
                time.sleep(0.05)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == [CHECKPOINT_NAME]

    model, step = build_run(kind, traj)
    result = fit(
        model, traj, DT, step=step, config=RESUME_RUNS[kind]["config"], checkpoint_dir=checkpoint_dir, resume=True, progress=False
    )
    expected_state, expected_history = uninterrupted(kind)
    assert result.resumed_from_epoch == kill_at
    assert len(result.history) == len(expected_history) > kill_at
    assert [h["loss"] for h in result.history] == [h["loss"] for h in expected_history]
    assert_same_weights(_state(model, step), expected_state)
    assert int(torch.load(checkpoint, weights_only=True)["epoch"]) == len(expected_history)


def test_resume_with_another_config_is_refused(tmp_path):
    traj = lorenz_trajectory(100)
    config = TrainConfig(epochs=2, batch_size=64)
    fit(bilinear_model(traj), traj, DT, config=config, checkpoint_dir=tmp_path, progress=False)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(InputError, match=r"resume: .*another training config \(epochs: 2 -> 3\)"):
        fit(
            bilinear_model(traj),
            traj,
            DT,
            config=dataclasses.replace(config, epochs=3),
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )
    with pytest.raises(InputError, match=r"learning_rate: 0\.01 -> 0\.02, seed: 0 -> 1"):
        fit(
            bilinear_model(traj),
            traj,
            DT,
            config=dataclasses.replace(config, learning_rate=0.02, seed=1),
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before  # the refused resume touched nothing


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    traj = lorenz_trajectory(100)
    config = TrainConfig(epochs=2, batch_size=64)
    model = bilinear_model(traj)
    first = fit(model, traj, DT, config=config, checkpoint_dir=tmp_path, progress=False)
    trained = parameters(model)
    again = bilinear_model(traj, seed=9)
    result = fit(again, traj, DT, config=config, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert result.resumed_from_epoch == 2 and result.history == first.history
    assert torch.equal(parameters(again), trained)


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    traj = lorenz_trajectory(100)
    config = TrainConfig(epochs=2, batch_size=64)
    plain = bilinear_model(traj)
    fit(plain, traj, DT, config=config, progress=False)
    resumed = bilinear_model(traj)
    result = fit(resumed, traj, DT, config=config, checkpoint_dir=tmp_path / "new", resume=True, progress=False)
    assert result.resumed_from_epoch == 0
    assert torch.equal(parameters(resumed), parameters(plain))


def test_resume_from_a_damaged_checkpoint_is_refused(tmp_path):
    traj = lorenz_trajectory(100)
    config = TrainConfig(epochs=1)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"checkpoint .*checkpoint\.pt"):
        fit(bilinear_model(traj), traj, DT, config=config, checkpoint_dir=tmp_path, resume=True, progress=False)
    fit(bilinear_model(traj), traj, DT, config=config, checkpoint_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    torch.save({**state, "format": 99}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(InputError, match="checkpoint .*format 99 is not 1"):
        fit(bilinear_model(traj), traj, DT, config=config, checkpoint_dir=tmp_path, resume=True, progress=False)
