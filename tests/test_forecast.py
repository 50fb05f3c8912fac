"""The assimilation forecasts (geonn.assimilation.forecast): the same states as geonn.rollout, and the
compiled path of the filters and 4D-Var agreeing with the eager one."""

from __future__ import annotations

import math

import pytest
import torch

import geonn
from geonn.assimilation import ETKF, ObservationError, Subset, Var4D, read_observations, twin_experiment
from geonn.assimilation.forecast import propagate, step_jacobians
from geonn.errors import NonFiniteError
from geonn.integrators import RungeKuttaStep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ensemble(members: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.tensor([1.0, 2.0, 20.0], dtype=torch.float64) + torch.randn(members, 3, generator=generator, dtype=torch.float64)


def test_propagate_is_rollout_bit_for_bit():
    model, step = geonn.Lorenz63(), RungeKuttaStep("rk4")
    x = _ensemble()
    reference = geonn.rollout(model, x, 37, 0.01, step, t0=0.25)
    assert torch.equal(propagate(model, x, 37, 0.01, step, t0=0.25), reference[-1])
    assert torch.equal(propagate(model, x, 37, 0.01, step, t0=0.25, trajectory=True), reference)
    assert propagate(model, x, 0, 0.01, step) is x
    assert torch.equal(propagate(model, x, 0, 0.01, step, trajectory=True), x.unsqueeze(0))


def test_propagate_passes_the_times_of_rollout_to_a_time_dependent_tendency():
    def forced(t, x):  # not autonomous: the stage times matter
        return -x + torch.sin(3.0 * t)

    step = RungeKuttaStep("rk4")
    x = _ensemble(3)
    assert torch.equal(propagate(forced, x, 20, 0.03, step, t0=1.1), geonn.rollout(forced, x, 20, 0.03, step, t0=1.1)[-1])


def test_propagate_names_the_step_where_the_forecast_diverges():
    model, step = geonn.Lorenz63(), RungeKuttaStep("rk4")
    x = torch.full((2, 3), 1e200, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match="non-finite"):
        propagate(model, x, 10, 0.01, step)


def test_step_jacobians_are_each_steps_own():
    model, step = geonn.Lorenz63(), RungeKuttaStep("rk4")
    states = _ensemble(4).reshape(2, 2, 3)
    times = torch.zeros(2, 2, 1, dtype=torch.float64)
    jac = step_jacobians(model, step, times, states, 0.01).permute(1, 2, 0, 3)  # (b, L, m, m)
    for k in range(2):
        for j in range(2):
            expected = torch.func.jacrev(lambda s: step(model, 0.0, s, 0.01))(states[k, j])
            torch.testing.assert_close(jac[k, j], expected, rtol=0, atol=1e-13)


@pytest.mark.slow
def test_compiled_forecasts_agree_with_the_eager_ones():
    """compile=True (torch.compile of the forecasts and of 4D-Var's step Jacobians) changes round-off only.

    Three compilations (the ETKF's forecast, 4D-Var's window trajectory and step Jacobians): tens of
    seconds on a cold inductor cache, a few on a warm one. The smoothers share the filters' path."""
    model = geonn.Lorenz63().double()
    ds = twin_experiment(model, 0.01, 10 * 6, Subset.all(3), ObservationError(std=math.sqrt(2.0)), every=10, seed=3)
    observations = read_observations(ds)
    kwargs = {"prior_mean": torch.as_tensor(ds.initial_truth.values), "prior_spread": math.sqrt(2.0)}
    for method in (ETKF(4, inflation=1.02, rotate=True), Var4D(window=1, background_std=1.0, optimizer="gauss-newton", iterations=3)):
        eager = method.assimilate(model, observations, 0.01, **kwargs)
        fused = method.assimilate(model, observations, 0.01, compile=True, **kwargs)
        torch.testing.assert_close(fused.analysis_mean, eager.analysis_mean, rtol=0, atol=1e-9)
        torch.testing.assert_close(fused.forecast_mean, eager.forecast_mean, rtol=0, atol=1e-9)
