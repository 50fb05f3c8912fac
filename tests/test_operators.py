"""Learned operators: shapes, input checks, exact representation of the Lorenz models, equivariance, Standardised."""

from __future__ import annotations

import pytest
import torch

import geonn
from geonn.operators import OPERATORS

DTYPE = torch.float64
BATCHES = [(), (4,), (2, 5)]


def random_state(shape, seed=0, dtype=DTYPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def bilinear_lorenz63(sigma=10.0, rho=28.0, beta=8.0 / 3.0) -> geonn.BilinearResidual:
    """BilinearResidual(3) with weights set by hand so that F(x) = Lorenz-63 tendency.

    linear units: (sigma (y - x), rho x - y, -beta z); products: x * z, x * y (third unused);
    transition: identity on the linear units, -xz into dy/dt, +xy into dz/dt.
    """
    op = geonn.BilinearResidual(3).to(DTYPE)
    inner = torch.zeros(3 + 2 * 3, 3, dtype=DTYPE)
    inner[0:3] = torch.tensor([[-sigma, sigma, 0.0], [rho, -1.0, 0.0], [0.0, 0.0, -beta]], dtype=DTYPE)
    inner[3, 0] = 1.0  # u_0 = x
    inner[4, 0] = 1.0  # u_1 = x
    inner[6, 2] = 1.0  # v_0 = z
    inner[7, 1] = 1.0  # v_1 = y
    transition = torch.zeros(3, 3 + 3, dtype=DTYPE)
    transition[:, :3] = torch.eye(3)
    transition[1, 3] = -1.0
    transition[2, 4] = 1.0
    with torch.no_grad():
        op.inner.weight.copy_(inner)
        op.inner.bias.zero_()
        op.transition.weight.copy_(transition)
        op.transition.bias.zero_()
    return op


def bilinear_lorenz96(n: int, forcing: float = 8.0) -> geonn.BilinearResidual:
    """BilinearResidual(n, n_bilinear=2n): products x_{i+1} x_{i-1} and x_{i-2} x_{i-1} for every site."""
    op = geonn.BilinearResidual(n, n_linear=n, n_bilinear=2 * n).to(DTYPE)
    inner = torch.zeros(n + 4 * n, n, dtype=DTYPE)
    transition = torch.zeros(n, n + 2 * n, dtype=DTYPE)
    inner[:n] = -torch.eye(n)
    for i in range(n):
        inner[n + i, (i + 1) % n] = 1.0  # u_i = x_{i+1}
        inner[n + n + i, (i - 2) % n] = 1.0  # u_{n+i} = x_{i-2}
        inner[3 * n + i, (i - 1) % n] = 1.0  # v_i = x_{i-1}
        inner[3 * n + n + i, (i - 1) % n] = 1.0  # v_{n+i} = x_{i-1}
        transition[i, i] = 1.0
        transition[i, n + i] = 1.0
        transition[i, 2 * n + i] = -1.0
    with torch.no_grad():
        op.inner.weight.copy_(inner)
        op.inner.bias.zero_()
        op.transition.weight.copy_(transition)
        op.transition.bias.fill_(forcing)
    return op


def conv_lorenz96(forcing: float = 8.0) -> geonn.PeriodicConv1d:
    """PeriodicConv1d(radius=2) set by hand to the Lorenz-96 stencil.

    Stencil tap k reads site i - 2 + k. Channels: lin = x_i; u_0 = x_{i+1}, u_1 = x_{i-2};
    v_0 = v_1 = x_{i-1}; pointwise: -lin + u_0 v_0 - u_1 v_1 + F.
    """
    op = geonn.PeriodicConv1d(n_linear=1, n_bilinear=2, radius=2).to(DTYPE)
    stencil = torch.zeros(1 + 2 * 2, 1, 5, dtype=DTYPE)
    stencil[0, 0, 2] = 1.0  # x_i
    stencil[1, 0, 3] = 1.0  # x_{i+1}
    stencil[2, 0, 0] = 1.0  # x_{i-2}
    stencil[3, 0, 1] = 1.0  # x_{i-1}
    stencil[4, 0, 1] = 1.0  # x_{i-1}
    with torch.no_grad():
        op.stencil.weight.copy_(stencil)
        op.stencil.bias.zero_()
        op.pointwise.weight.copy_(torch.tensor([-1.0, 1.0, -1.0], dtype=DTYPE).reshape(1, 3, 1))
        op.pointwise.bias.fill_(forcing)
    return op


# --- shapes and input checks -----------------------------------------------------------------------


def test_registry():
    assert OPERATORS == {"mlp": geonn.MLP, "bilinear": geonn.BilinearResidual, "conv1d": geonn.PeriodicConv1d}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(
    "make",
    [lambda: geonn.MLP(5, hidden=(8, 8)), lambda: geonn.BilinearResidual(5), lambda: geonn.PeriodicConv1d()],
    ids=["mlp", "bilinear", "conv1d"],
)
def test_shape_is_kept_and_members_are_independent(make, batch):
    torch.manual_seed(0)
    op = make().to(DTYPE)
    x = random_state((*batch, 5))
    out = op(0.0, x)
    assert out.shape == x.shape and out.dtype == DTYPE
    if batch:
        # every member is mapped on its own (no mixing across the batch)
        flat_in, flat_out = x.reshape(-1, 5), out.reshape(-1, 5)
        for k in range(flat_in.shape[0]):
            torch.testing.assert_close(flat_out[k], op(0.0, flat_in[k]), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("make", [lambda: geonn.MLP(5, hidden=(8,)), lambda: geonn.BilinearResidual(5)], ids=["mlp", "bilinear"])
def test_wrong_last_dimension(make):
    op = make()
    with pytest.raises(geonn.InputError, match=r"^x: expected last dimension 5") as info:
        op(0.0, torch.zeros(2, 4))
    assert isinstance(info.value, ValueError)
    assert "(2, 4)" in str(info.value)


def test_conv_needs_more_sites_than_its_radius():
    op = geonn.PeriodicConv1d(radius=2)
    with pytest.raises(geonn.InputError, match=r"^x: expected more than radius=2"):
        op(0.0, torch.zeros(3, 2))
    assert op(0.0, torch.zeros(3, 3)).shape == (3, 3)


def test_operators_reject_bad_construction():
    with pytest.raises(geonn.InputError, match="state_dim"):
        geonn.MLP(0)
    with pytest.raises(geonn.InputError, match="hidden"):
        geonn.MLP(3, hidden=(8, 0))
    with pytest.raises(geonn.InputError, match="activation"):
        geonn.MLP(3, activation="sigmoid")
    with pytest.raises(geonn.InputError, match="n_bilinear"):
        geonn.BilinearResidual(3, n_bilinear=0)
    with pytest.raises(geonn.InputError, match="radius"):
        geonn.PeriodicConv1d(radius=0)


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu", "silu"])
def test_mlp_layers(activation):
    op = geonn.MLP(3, hidden=(64, 64), activation=activation)
    linears = [m for m in op.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3, 64), (64, 64), (64, 3)]
    assert len(op.net) == 5  # no activation after the output layer
    assert op.state_dim == 3


def test_operators_ignore_time():
    torch.manual_seed(0)
    for op in (geonn.MLP(3).double(), geonn.BilinearResidual(3).double(), geonn.PeriodicConv1d().double()):
        x = random_state((4, 3))
        assert torch.equal(op(0.0, x), op(torch.tensor(7.5, dtype=DTYPE), x))


# --- exact representation of the Lorenz models ---------------------------------------------------------


def test_bilinear_represents_lorenz63_exactly():
    op, model = bilinear_lorenz63(), geonn.Lorenz63()
    x = 10.0 * random_state((2, 5, 3), seed=1)
    torch.testing.assert_close(op(0.0, x), model(0.0, x), rtol=0, atol=1e-12)
    # and other parameters too
    op2, model2 = bilinear_lorenz63(sigma=4.0, rho=13.0, beta=1.5), geonn.Lorenz63(sigma=4.0, rho=13.0, beta=1.5)
    torch.testing.assert_close(op2(0.0, x), model2(0.0, x), rtol=0, atol=1e-12)
    # so it integrates to the same trajectory
    x0 = torch.tensor([1.509, -1.531, 25.46], dtype=DTYPE)
    torch.testing.assert_close(geonn.rollout(op, x0, 100, 0.01), geonn.rollout(model, x0, 100, 0.01), rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [4, 7])
def test_bilinear_represents_lorenz96_exactly(n):
    op, model = bilinear_lorenz96(n), geonn.Lorenz96(n=n)
    x = 4.0 * random_state((3, n), seed=2)
    torch.testing.assert_close(op(0.0, x), model(0.0, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [5, 40])
def test_conv_represents_lorenz96_exactly(n):
    op, model = conv_lorenz96(forcing=8.0), geonn.Lorenz96(n=n, forcing=8.0)
    x = 4.0 * random_state((2, 3, n), seed=3)
    torch.testing.assert_close(op(0.0, x), model(0.0, x), rtol=0, atol=1e-12)
    x0 = model.default_initial_state()
    torch.testing.assert_close(geonn.rollout(op, x0, 20, 0.01), geonn.rollout(model, x0, 20, 0.01), rtol=0, atol=1e-10)


@pytest.mark.parametrize("shift", [1, 3, -2])
@pytest.mark.parametrize("n", [6, 11])
def test_conv_is_translation_equivariant(n, shift):
    torch.manual_seed(5)
    op = geonn.PeriodicConv1d(n_linear=3, n_bilinear=2, radius=2).to(DTYPE)
    x = random_state((4, n), seed=6)
    out = op(0.0, x)
    torch.testing.assert_close(op(0.0, torch.roll(x, shift, -1)), torch.roll(out, shift, -1), rtol=1e-13, atol=1e-13)
    # it is local: perturbing one site changes only the sites within the radius
    bumped = x.clone()
    bumped[:, 0] += 1.0
    changed = (op(0.0, bumped) != out).any(dim=0).nonzero().flatten().tolist()
    assert set(changed) <= {(k % n) for k in range(-2, 3)}


# --- Standardised -----------------------------------------------------------------------------------


def test_standardised_math():
    torch.manual_seed(0)
    inner = geonn.MLP(3, hidden=(8,)).double()
    mean = torch.tensor([0.5, -1.0, 20.0], dtype=DTYPE)
    scale = torch.tensor([8.0, 9.0, 7.5], dtype=DTYPE)
    tendency_scale = torch.tensor([80.0, 100.0, 90.0], dtype=DTYPE)
    op = geonn.Standardised(inner, mean, scale, tendency_scale)
    x = 10.0 * random_state((2, 4, 3), seed=7)
    expected = tendency_scale * inner(0.0, (x - mean) / scale)
    torch.testing.assert_close(op(0.0, x), expected, rtol=0, atol=0)
    assert op.state_dim == 3
    # the statistics are buffers: copied (not aliased), in the state dict, not trainable
    mean[0] = 123.0
    assert float(op.mean[0]) == 0.5
    state = op.state_dict()
    assert {"mean", "scale", "tendency_scale"} <= set(state)
    assert {name for name, _ in op.named_parameters()} == {f"operator.{n}" for n, _ in inner.named_parameters()}
    clone = geonn.Standardised(geonn.MLP(3, hidden=(8,)).double(), torch.zeros(3), torch.ones(3), torch.ones(3))
    clone.load_state_dict(state)
    torch.testing.assert_close(clone(0.0, x), expected, rtol=0, atol=0)


def test_standardised_undoes_a_change_of_units():
    """Lorenz-63 written in standardised units, wrapped back, is Lorenz-63 again."""
    model = geonn.Lorenz63()
    mean = torch.tensor([0.0, 0.0, 23.5], dtype=DTYPE)
    scale = torch.tensor([8.0, 9.0, 8.5], dtype=DTYPE)

    class InStandardUnits(torch.nn.Module):
        state_dim = 3

        def forward(self, t, z):
            return model(t, z * scale + mean) / scale

    op = geonn.Standardised(InStandardUnits(), mean, scale, scale)
    x = 10.0 * random_state((5, 3), seed=8)
    torch.testing.assert_close(op(0.0, x), model(0.0, x), rtol=1e-13, atol=1e-12)
    with pytest.raises(geonn.InputError, match="x0"):  # state_dim travels with the wrapper to integrate's checks
        geonn.rollout(op, torch.zeros(4, dtype=DTYPE), 2, 0.01)
