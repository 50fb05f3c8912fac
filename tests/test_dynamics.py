"""Reference models: tendencies, analytic Jacobians, batching, dtypes; simulate() and its netCDF round trip."""

from __future__ import annotations

import pytest
import torch
import xarray as xr

import geonn
from geonn.dynamics import MODELS, Dynamics
from geonn.io import write_netcdf

DTYPE = torch.float64


def models():
    return [geonn.Lorenz63(), geonn.Lorenz96(n=4), geonn.Lorenz96(n=5), geonn.Lorenz96(n=40)]


def model_id(model):
    return f"{model.name}-{model.state_dim}"


def random_states(model, shape=(), seed=0, dtype=DTYPE):
    generator = torch.Generator().manual_seed(seed)
    scale = 8.0 if isinstance(model, geonn.Lorenz63) else 3.0
    centre = torch.tensor([0.0, 0.0, 25.0]) if isinstance(model, geonn.Lorenz63) else torch.full((model.state_dim,), 2.0)
    return (centre + scale * torch.randn((*shape, model.state_dim), generator=generator, dtype=torch.float64)).to(dtype)


# --- tendencies -----------------------------------------------------------------------------------


def test_lorenz63_tendency_by_hand():
    model = geonn.Lorenz63()
    x = torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE)
    expected = torch.tensor([10.0 * (2 - 1), 1 * (28 - 3) - 2, 1 * 2 - 8 / 3 * 3], dtype=DTYPE)
    torch.testing.assert_close(model(0.0, x), expected, rtol=0, atol=1e-15)
    other = geonn.Lorenz63(sigma=1.0, rho=2.0, beta=3.0)
    torch.testing.assert_close(other(0.0, x), torch.tensor([1.0, -3.0, -7.0], dtype=DTYPE), rtol=0, atol=0)


def test_lorenz96_tendency_by_hand():
    """dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F, written out site by site with modular indices."""
    n, forcing = 6, 8.0
    x = torch.tensor([1.0, -2.0, 3.5, 0.25, -1.0, 4.0], dtype=DTYPE)
    expected = torch.tensor([(x[(i + 1) % n] - x[(i - 2) % n]) * x[(i - 1) % n] - x[i] + forcing for i in range(n)], dtype=DTYPE)
    torch.testing.assert_close(geonn.Lorenz96(n=n, forcing=forcing)(0.0, x), expected, rtol=0, atol=1e-14)


def test_lorenz96_fixed_point():
    model = geonn.Lorenz96(n=10, forcing=5.0)
    assert torch.equal(model(0.0, torch.full((10,), 5.0, dtype=DTYPE)), torch.zeros(10, dtype=DTYPE))


def test_lorenz63_fixed_points():
    model = geonn.Lorenz63()
    r = (8 / 3 * 27) ** 0.5
    for point in ([0.0, 0.0, 0.0], [r, r, 27.0], [-r, -r, 27.0]):
        torch.testing.assert_close(model(0.0, torch.tensor(point, dtype=DTYPE)), torch.zeros(3, dtype=DTYPE), rtol=0, atol=1e-13)


def test_registry_and_metadata():
    assert MODELS == {"lorenz63": geonn.Lorenz63, "lorenz96": geonn.Lorenz96}
    l63, l96 = geonn.Lorenz63(), geonn.Lorenz96(n=5, forcing=10.0)
    assert isinstance(l63, Dynamics) and isinstance(l96, Dynamics)
    assert l63.component_names() == ["x", "y", "z"]
    assert l96.component_names() == ["x0", "x1", "x2", "x3", "x4"]
    assert l63.parameters_dict() == pytest.approx({"sigma": 10.0, "rho": 28.0, "beta": 8 / 3})
    assert l96.parameters_dict() == {"forcing": 10.0, "n": 5}
    assert l96.default_initial_state().shape == (5,)
    assert list(l63.parameters()) == []  # reference models have no trainable parameters
    assert "forcing=10" in repr(l96)


# --- Jacobians -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", models(), ids=model_id)
def test_jacobian_matches_autograd(model):
    x = random_states(model)
    autograd = torch.autograd.functional.jacobian(lambda state: model(0.0, state), x)
    analytic = model.jacobian(x)
    assert analytic.shape == (model.state_dim, model.state_dim)
    torch.testing.assert_close(analytic, autograd, rtol=0, atol=1e-13)


@pytest.mark.parametrize("model", models(), ids=model_id)
def test_jacobian_matches_central_differences(model):
    x = random_states(model, seed=1)
    eps = 1e-6
    columns = []
    for j in range(model.state_dim):
        bump = torch.zeros_like(x)
        bump[j] = eps
        columns.append((model(0.0, x + bump) - model(0.0, x - bump)) / (2 * eps))
    numeric = torch.stack(columns, dim=-1)  # column j = d f / d x_j
    # the models are quadratic, so central differences are exact up to rounding
    torch.testing.assert_close(model.jacobian(x), numeric, rtol=1e-8, atol=1e-7)


@pytest.mark.parametrize("model", models(), ids=model_id)
def test_jacobian_batched(model):
    x = random_states(model, shape=(2, 5), seed=2)
    jac = model.jacobian(x)
    assert jac.shape == (2, 5, model.state_dim, model.state_dim)
    for i in range(2):
        for k in range(5):
            torch.testing.assert_close(jac[i, k], model.jacobian(x[i, k]), rtol=0, atol=0)


def test_lorenz96_jacobian_sparsity():
    """Row i has exactly the four entries i-2, i-1, i, i+1 (a ring stencil); the diagonal is -1."""
    model = geonn.Lorenz96(n=40)
    jac = model.jacobian(random_states(model, seed=3))
    assert torch.equal(torch.diagonal(jac), torch.full((40,), -1.0, dtype=DTYPE))
    nonzero = jac != 0
    assert int(nonzero.sum()) == 4 * 40
    for i in (0, 1, 20, 39):
        assert sorted(nonzero[i].nonzero().flatten().tolist()) == sorted({(i - 2) % 40, (i - 1) % 40, i, (i + 1) % 40})


# --- batching and dtypes ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", models(), ids=model_id)
def test_batching_over_leading_dimensions(model):
    x = random_states(model, shape=(2, 5), seed=4)
    out = model(0.0, x)
    assert out.shape == (2, 5, model.state_dim)
    for i in range(2):
        for k in range(5):
            torch.testing.assert_close(out[i, k], model(0.0, x[i, k]), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("model", models(), ids=model_id)
def test_dtype_is_kept(model, dtype):
    x = random_states(model, shape=(3,), dtype=dtype)
    assert model(0.0, x).dtype == dtype
    assert model.jacobian(x).dtype == dtype
    torch.testing.assert_close(model(0.0, x).double(), model(0.0, x.double()), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [3, 2, 0, -5, 4.0, True])
def test_lorenz96_needs_four_sites(n):
    with pytest.raises(geonn.InputError, match="n:") as info:
        geonn.Lorenz96(n=n)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("model", models(), ids=model_id)
def test_wrong_state_dimension(model):
    x = torch.zeros(model.state_dim + 1, dtype=DTYPE)
    with pytest.raises(geonn.InputError, match=r"^x: expected last dimension"):
        model(0.0, x)
    with pytest.raises(geonn.InputError, match=r"^x:"):
        model.jacobian(x)


# --- simulate -----------------------------------------------------------------------------------------


def test_simulate_single_trajectory():
    ds = geonn.simulate(geonn.Lorenz63(), n_steps=50, dt=0.01, spinup_steps=10)
    assert ds.state.dims == ("time", "component")
    assert ds.state.shape == (51, 3)
    assert list(ds.component.values) == ["x", "y", "z"]
    assert ds.time.values[0] == 0.0 and ds.time.values[-1] == pytest.approx(0.5)
    assert ds.time.attrs["units"] == "model time units"
    for key, value in {"model": "lorenz63", "dt": 0.01, "scheme": "rk4", "Conventions": "CF-1.8", "spinup_steps": 10}.items():
        assert ds.attrs[key] == value, key
    assert ds.attrs["model_sigma"] == 10.0 and ds.attrs["model_rho"] == 28.0
    # the data is the model's trajectory: spin-up then the kept part
    x0 = geonn.Lorenz63().default_initial_state()
    expected = geonn.rollout(geonn.Lorenz63(), x0, 60, 0.01)[10:]
    torch.testing.assert_close(torch.as_tensor(ds.state.values), expected, rtol=0, atol=1e-12)


def test_simulate_ensemble():
    model = geonn.Lorenz96(n=5)
    ds = geonn.simulate(model, n_steps=20, dt=0.05, members=4, scheme="heun", seed=3)
    assert ds.state.dims == ("time", "member", "component")
    assert ds.state.shape == (21, 4, 5)
    assert list(ds.member.values) == [0, 1, 2, 3]
    assert ds.attrs["scheme"] == "heun" and ds.attrs["model_n"] == 5 and ds.attrs["seed"] == 3
    initial = torch.as_tensor(ds.state.isel(time=0).values)
    assert len({tuple(row.tolist()) for row in initial}) == 4  # members are perturbed differently
    same = geonn.simulate(model, n_steps=20, dt=0.05, members=4, scheme="heun", seed=3)
    xr.testing.assert_identical(ds, same)  # the seed makes it reproducible
    other = geonn.simulate(model, n_steps=20, dt=0.05, members=4, scheme="heun", seed=4)
    assert not bool((other.state == ds.state).all())


def test_simulate_with_given_members():
    model = geonn.Lorenz63()
    x0 = torch.tensor([[1.0, 1.0, 20.0], [-1.0, -1.0, 20.0]], dtype=DTYPE)
    ds = geonn.simulate(model, n_steps=5, dt=0.01, x0=x0, members=2)
    torch.testing.assert_close(torch.as_tensor(ds.state.values), geonn.rollout(model, x0, 5, 0.01), rtol=0, atol=0)
    with pytest.raises(geonn.InputError, match="x0"):
        geonn.simulate(model, n_steps=5, dt=0.01, x0=x0, members=3)


def test_simulate_bad_arguments():
    with pytest.raises(geonn.InputError, match="model"):
        geonn.simulate(lambda t, x: x, n_steps=5, dt=0.01)
    with pytest.raises(geonn.InputError, match="members"):
        geonn.simulate(geonn.Lorenz63(), n_steps=5, dt=0.01, members=0)
    with pytest.raises(geonn.InputError, match="spinup_steps"):
        geonn.simulate(geonn.Lorenz63(), n_steps=5, dt=0.01, spinup_steps=-1)
    with pytest.raises(geonn.InputError, match="dt"):
        geonn.simulate(geonn.Lorenz63(), n_steps=5, dt=0.0)


@pytest.mark.parametrize("members", [None, 3])
def test_netcdf_round_trip_is_identical(tmp_path, members):
    ds = geonn.simulate(geonn.Lorenz96(n=6), n_steps=12, dt=0.05, members=members, spinup_steps=5)
    path = write_netcdf(ds, tmp_path / "sub" / "trajectory.nc")
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["trajectory.nc"]  # no temp files left
    with xr.open_dataset(path) as opened:
        back = opened.load()
    xr.testing.assert_identical(back, ds)
    assert back.attrs["Conventions"] == "CF-1.8"


def test_lorenz63_stays_on_the_attractor():
    """20 members x 50 time units: bounded, and the time-mean of z is close to its climatological ~23.5."""
    ds = geonn.simulate(geonn.Lorenz63(), n_steps=5000, dt=0.01, members=20, spinup_steps=500)
    state = torch.as_tensor(ds.state.values)
    assert bool(torch.isfinite(state).all())
    x, y, z = state.unbind(-1)
    assert float(x.abs().max()) < 25 and float(y.abs().max()) < 35
    assert 0 < float(z.min()) and float(z.max()) < 55
    assert float(z.mean()) == pytest.approx(23.5, abs=1.0)
    assert abs(float(x.mean())) < 2.0  # the two wings are visited about equally
    assert 7.0 < float(x.std()) < 9.0
