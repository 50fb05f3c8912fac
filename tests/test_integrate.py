"""integrate / rollout: gradient methods agree, gradients are right, bad input is refused, divergence is reported."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import geonn
from geonn.integrators import GRADIENTS, RungeKuttaStep

DTYPE = torch.float64
L63_STATE = torch.tensor([1.509, -1.531, 25.46], dtype=DTYPE)


def make_operator(kind: str) -> torch.nn.Module:
    torch.manual_seed(1234)
    if kind == "mlp":
        return geonn.MLP(3, hidden=(16, 16), activation="tanh").to(DTYPE)
    return geonn.BilinearResidual(3).to(DTYPE)


def gradients(f, x0, scheme, gradient, weights, n_steps=50, dt=1e-3, **kwargs):
    """d(sum(weights * trajectory))/d(x0, parameters of f), flattened into one vector."""
    x = x0.detach().clone().requires_grad_(True)
    traj = geonn.rollout(f, x, n_steps, dt, scheme, gradient=gradient, **kwargs)
    loss = (weights * traj).sum()
    params = list(f.parameters()) if isinstance(f, torch.nn.Module) else []
    grads = torch.autograd.grad(loss, [x, *params])
    return traj.detach(), torch.cat([g.reshape(-1) for g in grads])


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def nonautonomous(t, x):
    return torch.stack((torch.cos(t) * x[..., 0] - x[..., 1], x[..., 0] * x[..., 1] - 0.5 * x[..., 1]), dim=-1)


# --- the three gradient methods agree ------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["rk4", "rk38"])
@pytest.mark.parametrize("kind", ["mlp", "bilinear"])
def test_gradient_methods_agree(kind, scheme):
    f = make_operator(kind)
    x0 = torch.tensor([[0.3, -0.8, 1.1], [1.0, 0.5, -0.2]], dtype=DTYPE)
    weights = torch.randn((51, *x0.shape), dtype=DTYPE, generator=torch.Generator().manual_seed(7))
    traj_bp, grad_bp = gradients(f, x0, scheme, "backprop", weights)
    traj_ck, grad_ck = gradients(f, x0, scheme, "checkpoint", weights)
    traj_adj, grad_adj = gradients(f, x0, scheme, "adjoint", weights)
    assert grad_bp.numel() == x0.numel() + sum(p.numel() for p in f.parameters())
    assert float(grad_bp.abs().min()) >= 0 and float(grad_bp.norm()) > 0
    assert torch.equal(traj_ck, traj_bp)
    torch.testing.assert_close(traj_adj, traj_bp, rtol=0, atol=1e-13)
    assert relative_difference(grad_ck, grad_bp) <= 1e-12
    assert relative_difference(grad_adj, grad_bp) <= 1e-8


def test_adjoint_of_euler_converges_to_backprop_at_first_order():
    """The continuous adjoint differs from the discrete one by O(dt) for Euler: halve dt, halve the gap."""
    f = make_operator("mlp")
    x0 = torch.tensor([0.3, -0.8, 1.1], dtype=DTYPE)
    gaps = []
    for n_steps in (25, 50):
        weights = torch.zeros((n_steps + 1, 3), dtype=DTYPE)
        weights[-1] = 1.0
        _, bp = gradients(f, x0, "euler", "backprop", weights, n_steps=n_steps, dt=0.2 / n_steps)
        _, adj = gradients(f, x0, "euler", "adjoint", weights, n_steps=n_steps, dt=0.2 / n_steps)
        gaps.append(relative_difference(adj, bp))
    assert 1e-9 < gaps[1] < 1e-2
    assert gaps[0] / gaps[1] == pytest.approx(2.0, rel=0.15)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_gradients_with_a_plain_function_and_nonzero_start(gradient):
    """A tendency that is a plain function (no parameters), time-dependent, started at t0 = 0.5."""
    x0 = torch.tensor([[0.4, 0.9], [1.2, -0.3]], dtype=DTYPE)
    weights = torch.linspace(-1, 1, 21 * 4, dtype=DTYPE).reshape(21, 2, 2)
    _, reference = gradients(nonautonomous, x0, "rk4", "backprop", weights, n_steps=20, dt=1e-2, t0=0.5)
    _, grad = gradients(nonautonomous, x0, "rk4", gradient, weights, n_steps=20, dt=1e-2, t0=0.5)
    assert relative_difference(grad, reference) <= 1e-8


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_gradcheck_wrt_initial_state(gradient):
    model = geonn.Lorenz63()
    times = torch.linspace(0.0, 0.05, 26, dtype=DTYPE)  # dt = 2e-3: the adjoint's O(dt^4) gap is ~1e-9

    def final_state(x0):
        return geonn.integrate(model, x0, times, "rk4", gradient=gradient)[-1]

    x0 = torch.tensor([[1.0, 2.0, 20.0], [-3.0, 0.5, 15.0]], dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(final_state, (x0,), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_gradcheck_through_a_network(gradient):
    f = make_operator("mlp")
    times = torch.linspace(0.0, 0.1, 6, dtype=DTYPE)

    def trajectory(x0):
        return geonn.integrate(f, x0, times, "rk4", gradient=gradient)

    x0 = torch.tensor([0.2, -0.4, 0.9], dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(trajectory, (x0,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_gradient_wrt_initial_state_matches_finite_differences(gradient):
    model = geonn.Lorenz63()
    n_steps, dt = 30, 5e-3

    def loss(x0):
        traj = geonn.rollout(model, x0, n_steps, dt, "rk4", gradient=gradient)
        return (traj[-1] ** 2).sum() + traj[:, 2].mean()

    x0 = L63_STATE.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(x0), x0)
    eps = 1e-6
    numeric = torch.empty(3, dtype=DTYPE)
    with torch.no_grad():
        for i in range(3):
            bump = torch.zeros(3, dtype=DTYPE)
            bump[i] = eps
            numeric[i] = (loss(L63_STATE + bump) - loss(L63_STATE - bump)) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-7, atol=1e-7)


def test_parameter_gradient_matches_finite_differences():
    """One weight of the MLP, central differences vs backprop and adjoint."""
    f = make_operator("mlp")
    x0 = torch.tensor([0.3, -0.8, 1.1], dtype=DTYPE)
    weight = f.net[0].weight

    def loss(gradient="backprop"):
        return (geonn.rollout(f, x0, 40, 5e-3, "rk4", gradient=gradient)[-1] ** 2).sum()

    grads = {}
    for gradient in ("backprop", "adjoint"):
        f.zero_grad()
        loss(gradient).backward()
        grads[gradient] = float(weight.grad[2, 1])
    eps = 1e-6
    with torch.no_grad():
        original = float(weight[2, 1])
        weight[2, 1] = original + eps
        up = float(loss())
        weight[2, 1] = original - eps
        down = float(loss())
        weight[2, 1] = original
    numeric = (up - down) / (2 * eps)
    assert abs(numeric) > 1e-4
    assert grads["backprop"] == pytest.approx(numeric, rel=1e-7)
    assert grads["adjoint"] == pytest.approx(numeric, rel=1e-7)


@pytest.mark.parametrize("segments", [None, 1, 2, 3, 7, 49, 50, 80])
def test_checkpoint_segments_give_the_same_gradient(segments):
    f = make_operator("bilinear")
    x0 = torch.tensor([0.3, -0.8, 1.1], dtype=DTYPE)
    weights = torch.randn((51, 3), dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    traj_bp, reference = gradients(f, x0, "heun", "backprop", weights)
    traj, grad = gradients(f, x0, "heun", "checkpoint", weights, segments=segments)
    assert traj.shape == (51, 3)
    assert torch.equal(traj, traj_bp)
    assert relative_difference(grad, reference) <= 1e-12


@pytest.mark.parametrize("segments", [0, -2, 1.5, True])
def test_checkpoint_rejects_bad_segments(segments):
    x0 = L63_STATE.clone().requires_grad_(True)
    with pytest.raises(geonn.InputError, match="segments"):
        geonn.rollout(geonn.Lorenz63(), x0, 10, 0.01, gradient="checkpoint", segments=segments)
    with pytest.raises(geonn.InputError, match="segments"):  # also when no gradient is needed
        geonn.rollout(geonn.Lorenz63(), L63_STATE, 10, 0.01, gradient="checkpoint", segments=segments)


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint"])
def test_learnable_step_trains_with_discrete_gradients(gradient):
    step = RungeKuttaStep("rk4", learnable=True, learn_dt=True)
    traj = geonn.rollout(geonn.Lorenz63(), L63_STATE, 10, 0.01, step, gradient=gradient)
    traj[-1].sum().backward()
    assert step.c.grad is None  # Lorenz-63 is autonomous: the nodes do not matter
    for p in (step.a, step.b, step.log_dt_scale):
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().max()) > 0


@pytest.mark.parametrize("requires_grad", [True, False])
def test_adjoint_refuses_a_learnable_step(requires_grad):
    step = RungeKuttaStep("rk4", learnable=True)
    x0 = L63_STATE.clone().requires_grad_(requires_grad)
    with pytest.raises(geonn.InputError, match="adjoint") as info:
        geonn.rollout(geonn.Lorenz63(), x0, 5, 0.01, step, gradient="adjoint")
    assert "gradient" in str(info.value)


def test_no_graph_when_no_gradient_is_needed():
    f = make_operator("mlp")
    for p in f.parameters():
        p.requires_grad_(False)
    traj = geonn.rollout(f, L63_STATE / 10, 10, 0.01, gradient="adjoint")
    assert traj.grad_fn is None and not traj.requires_grad
    for p in f.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        traj_no_grad = geonn.rollout(f, L63_STATE / 10, 10, 0.01)
    assert traj_no_grad.grad_fn is None
    torch.testing.assert_close(traj, traj_no_grad, rtol=0, atol=0)
    assert geonn.rollout(f, L63_STATE / 10, 10, 0.01).grad_fn is not None


# --- the trajectory -------------------------------------------------------------------------------


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("batch", [(), (4,), (2, 5)])
def test_shapes_are_preserved(batch, gradient):
    x0 = (L63_STATE + torch.randn((*batch, 3), dtype=DTYPE, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    traj = geonn.rollout(geonn.Lorenz63(), x0, 7, 0.01, gradient=gradient)
    assert traj.shape == (8, *batch, 3)
    assert traj.dtype == DTYPE
    assert torch.equal(traj[0], x0.detach())
    # each member evolves on its own: the batched rollout equals the one of a single member
    if batch:
        single = geonn.rollout(geonn.Lorenz63(), x0.detach()[(0,) * len(batch)], 7, 0.01)
        torch.testing.assert_close(traj[(slice(None), *(0,) * len(batch))].detach(), single, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_kept(dtype):
    traj = geonn.rollout(geonn.Lorenz96(n=8), torch.linspace(-1, 1, 8, dtype=dtype), 5, 0.01, "rk38")
    assert traj.dtype == dtype and traj.shape == (6, 8)


def test_zero_steps_returns_a_copy_of_x0():
    x0 = L63_STATE.clone()
    traj = geonn.rollout(geonn.Lorenz63(), x0, 0, 0.01)
    assert traj.shape == (1, 3) and torch.equal(traj[0], x0)
    traj[0, 0] = 99.0
    assert x0[0] != 99.0


def test_rollout_equals_repeated_steps_on_a_nonuniform_grid():
    times = [0.1, 0.11, 0.13, 0.16, 0.2]
    x0 = torch.tensor([0.5, 0.7], dtype=DTYPE)
    traj = geonn.integrate(nonautonomous, x0, times, "midpoint")
    step = RungeKuttaStep("midpoint")
    x = x0
    for k in range(4):
        x = step(nonautonomous, torch.tensor(times[k], dtype=DTYPE), x, times[k + 1] - times[k])
        torch.testing.assert_close(traj[k + 1], x, rtol=0, atol=1e-15)
    # times as numpy array and as tensor give the same trajectory
    torch.testing.assert_close(geonn.integrate(nonautonomous, x0, np.array(times), "midpoint"), traj, rtol=0, atol=0)
    torch.testing.assert_close(
        geonn.integrate(nonautonomous, x0, torch.tensor(times, dtype=DTYPE), "midpoint"), traj, rtol=0, atol=0
    )


def test_rollout_matches_integrate_on_the_same_grid():
    traj = geonn.rollout(geonn.Lorenz63(), L63_STATE, 20, 0.01, "rk4", t0=2.0)
    times = 2.0 + 0.01 * torch.arange(21, dtype=DTYPE)
    torch.testing.assert_close(geonn.integrate(geonn.Lorenz63(), L63_STATE, times, "rk4"), traj, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_rollout_matches_eager():
    x0 = torch.stack((L63_STATE, L63_STATE + 1.0))
    eager = geonn.rollout(geonn.Lorenz63(), x0, 25, 0.01, "rk4")
    compiled = geonn.rollout(geonn.Lorenz63(), x0, 25, 0.01, "rk4", compile=True)
    assert compiled.shape == eager.shape == (26, 2, 3)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    assert not torch.equal(compiled[-1], x0)


# --- bad input ------------------------------------------------------------------------------------


def assert_refused(error_type, argument, call):
    with pytest.raises(error_type) as info:
        call()
    message = str(info.value)
    assert message.startswith(argument) or f"{argument}:" in message, f"message does not name {argument!r}: {message}"
    return info.value


def test_x0_with_wrong_state_dimension():
    err = assert_refused(geonn.InputError, "x0", lambda: geonn.rollout(geonn.Lorenz63(), torch.zeros(4, dtype=DTYPE), 3, 0.01))
    assert isinstance(err, ValueError)
    assert "3" in str(err) and "(4,)" in str(err)
    assert_refused(geonn.InputError, "x0", lambda: geonn.rollout(geonn.Lorenz63(), torch.zeros(2, 5, dtype=DTYPE), 3, 0.01))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_x0_not_finite(bad):
    x0 = L63_STATE.clone()
    x0[1] = bad
    err = assert_refused(geonn.InputError, "x0", lambda: geonn.rollout(geonn.Lorenz63(), x0, 3, 0.01))
    assert isinstance(err, ValueError) and "finite" in str(err)


def test_x0_of_wrong_type():
    assert_refused(geonn.InputTypeError, "x0", lambda: geonn.rollout(geonn.Lorenz63(), [1.0, 2.0, 3.0], 3, 0.01))
    err = assert_refused(
        geonn.InputTypeError, "x0", lambda: geonn.rollout(geonn.Lorenz63(), torch.ones(3, dtype=torch.int64), 3, 0.01)
    )
    assert isinstance(err, TypeError)
    assert_refused(geonn.InputError, "x0", lambda: geonn.rollout(geonn.Lorenz63(), torch.tensor(1.0), 3, 0.01))


@pytest.mark.parametrize("dt", [0.0, -0.01, math.nan, math.inf, torch.tensor(-1.0)])
def test_dt_not_positive(dt):
    err = assert_refused(geonn.InputError, "dt", lambda: geonn.rollout(geonn.Lorenz63(), L63_STATE, 3, dt))
    assert isinstance(err, ValueError)


def test_dt_of_wrong_type():
    assert_refused(geonn.InputTypeError, "dt", lambda: geonn.rollout(geonn.Lorenz63(), L63_STATE, 3, "0.01"))
    assert_refused(geonn.InputTypeError, "dt", lambda: geonn.rollout(geonn.Lorenz63(), L63_STATE, 3, True))


@pytest.mark.parametrize("n_steps", [-1, 2.0, True])
def test_bad_n_steps(n_steps):
    assert_refused(geonn.InputError, "n_steps", lambda: geonn.rollout(geonn.Lorenz63(), L63_STATE, n_steps, 0.01))


@pytest.mark.parametrize(
    "times",
    [[0.0, 0.1, 0.1, 0.2], [0.0, 0.2, 0.1], [0.3, 0.2, 0.1], [[0.0, 0.1], [0.2, 0.3]], [], [0.0, math.nan, 0.2]],
    ids=["repeated", "decreasing", "reversed", "2-d", "empty", "nan"],
)
def test_times_not_strictly_increasing(times):
    err = assert_refused(geonn.InputError, "times", lambda: geonn.integrate(geonn.Lorenz63(), L63_STATE, times))
    assert isinstance(err, ValueError)


def test_times_message_names_the_offending_interval():
    with pytest.raises(geonn.InputError, match=r"times\[2\] = 0\.2 and times\[3\] = 0\.15"):
        geonn.integrate(geonn.Lorenz63(), L63_STATE, [0.0, 0.1, 0.2, 0.15])


def test_times_of_wrong_type():
    assert_refused(geonn.InputTypeError, "times", lambda: geonn.integrate(geonn.Lorenz63(), L63_STATE, 0.5))
    assert_refused(geonn.InputTypeError, "times", lambda: geonn.integrate(geonn.Lorenz63(), L63_STATE, ["a", "b"]))


def test_unknown_scheme():
    err = assert_refused(geonn.InputError, "scheme", lambda: geonn.rollout(geonn.Lorenz63(), L63_STATE, 3, 0.01, "rk45"))
    assert "rk45" in str(err) and "rk4" in str(err)


def test_unknown_gradient():
    err = assert_refused(
        geonn.InputError, "gradient", lambda: geonn.rollout(geonn.Lorenz63(), L63_STATE, 3, 0.01, gradient="reverse")
    )
    assert "reverse" in str(err) and "adjoint" in str(err)


def test_unknown_nonfinite_option():
    assert_refused(geonn.InputError, "nonfinite", lambda: geonn.rollout(geonn.Lorenz63(), L63_STATE, 3, 0.01, nonfinite="warn"))


def test_tendency_not_callable():
    err = assert_refused(geonn.InputTypeError, "f", lambda: geonn.rollout("lorenz63", L63_STATE, 3, 0.01))
    assert isinstance(err, TypeError)


# --- divergence -----------------------------------------------------------------------------------


def blow_up(t, x):
    return x**2


def first_overflow_step_of_euler(x: float, dt: float) -> int:
    """The first step k at which Euler on dx/dt = x^2 overflows float64, by the same arithmetic in Python."""
    k = 0
    while math.isfinite(x):
        x = x + dt * (x * x)
        k += 1
    return k


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_divergence_raises_nonfinite_error(gradient):
    t0, dt = 1.0, 0.5
    x0 = torch.tensor([0.1, 10.0, 0.2], dtype=DTYPE).unsqueeze(-1).requires_grad_(True)
    expected_step = first_overflow_step_of_euler(10.0, dt)
    assert 5 < expected_step < 20
    times = t0 + dt * torch.arange(20, dtype=DTYPE)
    with pytest.raises(geonn.NonFiniteError) as info:
        geonn.integrate(blow_up, x0, times, "euler", gradient=gradient)
    err = info.value
    assert isinstance(err, geonn.InputError) and isinstance(err, ValueError)
    assert err.step == expected_step
    assert err.time == pytest.approx(t0 + expected_step * dt, abs=1e-12)
    assert f"step {expected_step}" in str(err)
    assert f"t = {t0 + expected_step * dt:g}" in str(err)


@pytest.mark.parametrize("scheme", ["euler", "heun", "rk4"])
def test_nonfinite_keep_returns_the_trajectory(scheme):
    x0 = torch.tensor([[10.0], [0.1]], dtype=DTYPE)
    traj = geonn.rollout(blow_up, x0, 20, 0.5, scheme, nonfinite="keep")
    assert traj.shape == (21, 2, 1)
    finite_rows = torch.isfinite(traj).reshape(21, -1).all(dim=1)
    first_bad = int((~finite_rows).nonzero()[0])
    assert 1 < first_bad < 20
    assert bool(finite_rows[:first_bad].all())
    if scheme == "euler":
        assert first_bad == first_overflow_step_of_euler(10.0, 0.5)
        assert torch.isinf(traj[first_bad, 0, 0])
    # members are independent: the slow one stays finite throughout
    assert bool(torch.isfinite(traj[:, 1]).all())
    with pytest.raises(geonn.NonFiniteError) as info:
        geonn.rollout(blow_up, x0, 20, 0.5, scheme)
    assert info.value.step == first_bad
    assert info.value.time == pytest.approx(first_bad * 0.5)
