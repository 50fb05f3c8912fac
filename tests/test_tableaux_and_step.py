"""Butcher tableaux and the Runge-Kutta step: order of accuracy, consistency, learnable step."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torchdiffeq

import geonn
from geonn.integrators import EULER, HEUN, MIDPOINT, RK4, TABLEAUX, THREE_EIGHTHS, ButcherTableau, RungeKuttaStep, get_tableau

SCHEMES = sorted(TABLEAUX)


def loglog_slope(dts: list[float], errors: list[float]) -> float:
    """Least-squares slope of log(error) against log(dt)."""
    log_dt = torch.log(torch.tensor(dts, dtype=torch.float64))
    log_err = torch.log(torch.tensor(errors, dtype=torch.float64))
    centred = log_dt - log_dt.mean()
    return float((centred * (log_err - log_err.mean())).sum() / (centred**2).sum())


def nonautonomous(t, x):
    """dx/dt = (cos(t) x_0, -2 t x_1^2): nonlinear, time-dependent, with an exact solution."""
    return torch.stack((torch.cos(t) * x[..., 0], -2.0 * t * x[..., 1] ** 2), dim=-1)


def nonautonomous_exact(t0: float, x0: tuple[float, float], t: float) -> torch.Tensor:
    return torch.tensor(
        [x0[0] * math.exp(math.sin(t) - math.sin(t0)), 1.0 / (t * t - t0 * t0 + 1.0 / x0[1])], dtype=torch.float64
    )


# --- the tableaux as data ------------------------------------------------------------------------


def test_table_holds_the_five_schemes():
    assert set(TABLEAUX) == {"euler", "heun", "midpoint", "rk4", "rk38"}
    assert [TABLEAUX[name] for name in ("euler", "heun", "midpoint", "rk4", "rk38")] == [
        EULER,
        HEUN,
        MIDPOINT,
        RK4,
        THREE_EIGHTHS,
    ]
    assert {name: tab.order for name, tab in TABLEAUX.items()} == {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4, "rk38": 4}
    assert {name: tab.stages for name, tab in TABLEAUX.items()} == {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4, "rk38": 4}


@pytest.mark.parametrize("name", SCHEMES)
def test_tableau_is_consistent(name):
    tab = TABLEAUX[name]
    assert tab.name == name
    assert math.isclose(sum(tab.b), 1.0, rel_tol=0, abs_tol=1e-15)
    for i, (row, ci) in enumerate(zip(tab.a, tab.c)):
        assert math.isclose(sum(row), ci, rel_tol=0, abs_tol=1e-15), f"row {i}: c_i != sum_j a_ij"
        assert all(row[j] == 0.0 for j in range(i, tab.stages)), f"row {i} is not strictly lower triangular"


@pytest.mark.parametrize("name", SCHEMES)
def test_tableau_satisfies_order_conditions(name):
    """The classic order conditions up to the tableau's order (checked exactly in float64)."""
    tab = TABLEAUX[name]
    a = torch.tensor(tab.a, dtype=torch.float64)
    b = torch.tensor(tab.b, dtype=torch.float64)
    c = torch.tensor(tab.c, dtype=torch.float64)
    conditions = {
        1: [(b.sum(), 1.0)],
        2: [(b @ c, 1 / 2)],
        3: [(b @ c**2, 1 / 3), (b @ a @ c, 1 / 6)],
        4: [(b @ c**3, 1 / 4), (b @ (c * (a @ c)), 1 / 8), (b @ a @ c**2, 1 / 12), (b @ a @ a @ c, 1 / 24)],
    }
    for order in range(1, tab.order + 1):
        for value, expected in conditions[order]:
            assert float(value) == pytest.approx(expected, abs=1e-15)
    # and no more: the next order's first condition fails (the order is not understated)
    if tab.order < 4:
        assert any(abs(float(value) - expected) > 1e-3 for value, expected in conditions[tab.order + 1])


def test_get_tableau_by_name_and_passthrough():
    assert get_tableau("rk4") is RK4
    assert get_tableau("RK38") is THREE_EIGHTHS
    assert get_tableau(HEUN) is HEUN


def test_get_tableau_rejects_unknown_name_and_type():
    with pytest.raises(geonn.InputError, match="scheme") as info:
        get_tableau("rk5")
    assert isinstance(info.value, ValueError)
    assert "rk5" in str(info.value)
    with pytest.raises(geonn.InputTypeError, match="scheme") as info:
        get_tableau(4)
    assert isinstance(info.value, TypeError)


def test_tableau_validation():
    with pytest.raises(geonn.InputError, match="shape"):
        ButcherTableau("bad", a=((0.0,),), b=(0.5, 0.5), c=(0.0, 1.0), order=1)
    with pytest.raises(geonn.InputError, match="strictly lower triangular"):
        ButcherTableau("implicit", a=((0.5, 0.0), (0.5, 0.5)), b=(0.5, 0.5), c=(0.5, 1.0), order=2)


# --- order of accuracy from a log-log slope -------------------------------------------------------

LORENZ_STATES = torch.tensor([[-5.0, -7.0, 20.0], [8.0, 3.0, 30.0], [1.509, -1.531, 25.46]], dtype=torch.float64)
LORENZ_HORIZON = 0.25
STEP_COUNTS = [25, 50, 100, 200]


@pytest.fixture(scope="module")
def lorenz_reference():
    """Lorenz-63 at t = 0.25 from three states, by classic RK4 with dt = 1.5625e-4 (error ~1e-11)."""
    return geonn.rollout(geonn.Lorenz63(), LORENZ_STATES, 1600, LORENZ_HORIZON / 1600, "rk4")[-1]


@pytest.mark.parametrize("name", SCHEMES)
def test_order_of_accuracy_lorenz63(name, lorenz_reference):
    model = geonn.Lorenz63()
    dts = [LORENZ_HORIZON / n for n in STEP_COUNTS]
    errors = []
    for n, dt in zip(STEP_COUNTS, dts):
        final = geonn.rollout(model, LORENZ_STATES, n, dt, name)[-1]
        errors.append(float((final - lorenz_reference).norm(dim=-1).max()))
    assert all(e1 > e2 for e1, e2 in itertools.pairwise(errors)), errors
    slope = loglog_slope(dts, errors)
    assert abs(slope - TABLEAUX[name].order) <= 0.2, f"{name}: measured order {slope:.3f}, errors {errors}"


@pytest.mark.parametrize("name", SCHEMES)
def test_order_of_accuracy_nonautonomous(name):
    """Against an exact solution of a time-dependent ODE started at t0 != 0 (exercises the nodes c)."""
    t0, horizon, start = 0.3, 1.0, (1.5, 2.0)
    x0 = torch.tensor(start, dtype=torch.float64)
    exact = nonautonomous_exact(t0, start, t0 + horizon)
    dts = [horizon / n for n in STEP_COUNTS]
    errors = [float((geonn.rollout(nonautonomous, x0, n, dt, name, t0=t0)[-1] - exact).norm()) for n, dt in zip(STEP_COUNTS, dts)]
    slope = loglog_slope(dts, errors)
    assert abs(slope - TABLEAUX[name].order) <= 0.2, f"{name}: measured order {slope:.3f}, errors {errors}"


def test_one_step_by_hand():
    """Heun and midpoint on dx/dt = t + x, one step of size h from (t, x) = (1, 2), computed by hand."""

    def f(t, x):
        return t + x

    x = torch.tensor([2.0], dtype=torch.float64)
    t = torch.tensor(1.0, dtype=torch.float64)
    h = 0.1
    k1 = 1.0 + 2.0
    heun = 2.0 + h / 2 * (k1 + (1.0 + h + 2.0 + h * k1))
    midpoint = 2.0 + h * (1.0 + h / 2 + 2.0 + h / 2 * k1)
    assert float(RungeKuttaStep("heun")(f, t, x, h)) == pytest.approx(heun, abs=1e-15)
    assert float(RungeKuttaStep("midpoint")(f, t, x, h)) == pytest.approx(midpoint, abs=1e-15)
    assert float(RungeKuttaStep("euler")(f, t, x, h)) == pytest.approx(2.0 + h * k1, abs=1e-15)


def test_rk38_is_torchdiffeq_rk4():
    """torchdiffeq's 'rk4' is the 3/8 rule: it matches geonn's rk38 and not geonn's classic rk4."""
    model = geonn.Lorenz63()
    x0 = LORENZ_STATES[0]
    times = torch.linspace(0.0, 0.5, 51, dtype=torch.float64)
    ours_38 = geonn.integrate(model, x0, times, "rk38")
    ours_rk4 = geonn.integrate(model, x0, times, "rk4")
    theirs = torchdiffeq.odeint(model, x0, times, method="rk4")
    torch.testing.assert_close(ours_38, theirs, rtol=0, atol=1e-12)
    assert float((ours_rk4 - theirs).abs().max()) > 1e-9


# --- the learnable step ----------------------------------------------------------------------------

LEARNABLE_OPTIONS = [{"learnable": True}, {"learn_dt": True}, {"learnable": True, "learn_dt": True}]


@pytest.mark.parametrize("options", LEARNABLE_OPTIONS, ids=lambda o: "-".join(o))
@pytest.mark.parametrize("name", SCHEMES)
def test_learnable_step_equals_fixed_step_float64(name, options):
    fixed = RungeKuttaStep(name)
    learnable = RungeKuttaStep(name, **options)
    assert learnable.trainable and not fixed.trainable
    assert learnable.order == fixed.order == TABLEAUX[name].order
    x0 = LORENZ_STATES
    for f in (geonn.Lorenz63(), nonautonomous):
        x = x0 if f is not nonautonomous else x0[..., :2] / 10
        expected = geonn.rollout(f, x, 20, 0.01, fixed, t0=0.2)
        with torch.no_grad():
            got = geonn.rollout(f, x, 20, 0.01, learnable, t0=0.2)
        assert torch.equal(got, expected), float((got - expected).abs().max())


@pytest.mark.parametrize("options", LEARNABLE_OPTIONS, ids=lambda o: "-".join(o))
@pytest.mark.parametrize("name", SCHEMES)
def test_learnable_step_close_to_fixed_step_float32(name, options):
    x0 = LORENZ_STATES.to(torch.float32)
    expected = geonn.rollout(geonn.Lorenz63(), x0, 20, 0.01, RungeKuttaStep(name))
    with torch.no_grad():
        got = geonn.rollout(geonn.Lorenz63(), x0, 20, 0.01, RungeKuttaStep(name, **options))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SCHEMES)
def test_learnable_step_parameters_receive_gradients(name):
    step = RungeKuttaStep(name, learnable=True, learn_dt=True)
    assert {n for n, _ in step.named_parameters()} == {"a", "b", "c", "log_dt_scale"}
    assert all(p.dtype == torch.float64 for p in step.parameters())
    x0 = torch.tensor([[0.5, 1.2], [1.0, 0.8]], dtype=torch.float64)
    traj = geonn.rollout(nonautonomous, x0, 5, 0.1, step, t0=0.3)
    (traj[-1] ** 2).sum().backward()
    stages = step.tableau.stages
    lower = torch.tril(torch.ones(stages, stages, dtype=torch.bool), diagonal=-1)
    assert torch.all(step.b.grad != 0)
    assert torch.all(step.c.grad != 0)  # the tendency depends on t, so every node c_i (c_0 too) matters
    if stages == 1:  # Euler has no stage coupling: a is never used
        assert step.a.grad is None or torch.all(step.a.grad == 0)
    else:
        assert torch.all(step.a.grad[lower] != 0)
        assert torch.all(step.a.grad[~lower] == 0), "the mask must keep the scheme explicit"
    assert step.log_dt_scale.grad != 0
    assert torch.isfinite(step.log_dt_scale.grad)


def test_learnable_b_gradient_matches_finite_difference():
    """d(loss)/d(b) of a learnable Heun step, against central differences on the tableau entries."""
    x0 = torch.tensor([0.5, 1.2], dtype=torch.float64)

    def loss_for(b: tuple[float, float]) -> float:
        tab = ButcherTableau("probe", a=HEUN.a, b=b, c=HEUN.c, order=2)
        return float((geonn.rollout(nonautonomous, x0, 4, 0.1, tab, t0=0.3)[-1] ** 2).sum())

    step = RungeKuttaStep("heun", learnable=True)
    (geonn.rollout(nonautonomous, x0, 4, 0.1, step, t0=0.3)[-1] ** 2).sum().backward()
    eps = 1e-6
    numeric = [
        (loss_for((0.5 + eps, 0.5)) - loss_for((0.5 - eps, 0.5))) / (2 * eps),
        (loss_for((0.5, 0.5 + eps)) - loss_for((0.5, 0.5 - eps))) / (2 * eps),
    ]
    torch.testing.assert_close(step.b.grad, torch.tensor(numeric, dtype=torch.float64), rtol=1e-6, atol=1e-9)


def test_learn_dt_scales_the_step():
    """With log_dt_scale = log 2 a step of dt equals a fixed step of 2 dt."""
    step = RungeKuttaStep("rk4", learn_dt=True)
    with torch.no_grad():
        step.log_dt_scale.fill_(math.log(2.0))
    x0 = LORENZ_STATES[0]
    t = torch.tensor(0.0, dtype=torch.float64)
    with torch.no_grad():
        got = step(geonn.Lorenz63(), t, x0, 0.01)
    expected = RungeKuttaStep("rk4")(geonn.Lorenz63(), t, x0, 0.02)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-13)


def test_step_repr_names_the_configuration():
    text = repr(RungeKuttaStep("rk38", learnable=True))
    assert "rk38" in text and "learnable=True" in text and "learn_dt=False" in text
