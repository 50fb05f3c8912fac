"""Stochastic reference dynamics: additive noise in the tendency, integrated by Euler-Maruyama.

The stochastic differential equation ``dX = f(X) dt + G dW`` (``W`` a standard Wiener process,
``G`` a constant diffusion factor) is advanced on a grid of step ``dt`` by Euler-Maruyama
(kloeden1992):

    x_{t+1} = x_t + dt f(x_t) + sqrt(dt) G xi_t,    xi_t ~ N(0, I) independent,

so each one-step increment, given ``x_t``, is Gaussian with mean ``dt f(x_t)`` and covariance
``dt G G^T``. For additive noise Euler-Maruyama is of strong order 1 (it is the Milstein scheme).
``G`` is a scalar ``s`` (``G = s I``: isotropic noise of level ``s``), a vector ``(d,)`` (a
diagonal ``G``) or a lower-triangular matrix ``(d, d)``; its units are state units per square
root of a model time unit.
"""

from __future__ import annotations

import math

import torch

from .. import __version__
from ..errors import InputError, InputTypeError, NonFiniteError, describe
from ..fields import trajectory_to_dataset
from .lorenz import Dynamics


def diffusion_factor(noise, state_dim: int, dtype=torch.float64) -> torch.Tensor:
    """The diffusion factor ``G`` as a ``(d, d)`` lower-triangular matrix.

    Args:
        noise: a number ``s >= 0`` (``G = s I``), a sequence or tensor ``(d,)`` of non-negative
            levels (``G = diag(noise)``), or a lower-triangular ``(d, d)`` tensor.
        state_dim: ``d``.

    Raises:
        InputError: a negative, NaN or infinite level, a wrong shape, or entries above the diagonal.
    """
    if isinstance(noise, bool):
        raise InputTypeError(f"noise: expected a number, a (d,) or a (d, d) tensor, got {describe(noise)}")
    if isinstance(noise, (int, float)):
        if not math.isfinite(noise) or noise < 0:
            raise InputError(f"noise: expected a finite level >= 0, got {noise!r}")
        return float(noise) * torch.eye(state_dim, dtype=dtype)
    try:
        factor = torch.as_tensor(noise, dtype=dtype)
    except (TypeError, ValueError, RuntimeError):
        raise InputTypeError(f"noise: expected a number, a (d,) or a (d, d) tensor, got {describe(noise)}") from None
    if not bool(torch.isfinite(factor).all()):
        raise InputError("noise: expected finite values, got NaN or inf")
    if factor.shape == (state_dim,):
        if bool((factor < 0).any()):
            raise InputError(f"noise: expected levels >= 0, got a minimum of {float(factor.min())}")
        return torch.diag(factor)
    if factor.shape == (state_dim, state_dim):
        if bool((torch.triu(factor, diagonal=1) != 0).any()):
            raise InputError("noise: expected a lower-triangular (d, d) factor, got non-zero entries above the diagonal")
        return factor
    raise InputError(f"noise: expected a number, shape ({state_dim},) or ({state_dim}, {state_dim}), got shape {tuple(factor.shape)}")


def euler_maruyama(
    f,
    x0: torch.Tensor,
    n_steps: int,
    dt: float,
    noise,
    *,
    generator: torch.Generator | None = None,
    nonfinite: str = "raise",
) -> torch.Tensor:
    """Integrate ``dX = f(X) dt + G dW`` by Euler-Maruyama; returns ``(n_steps + 1, *x0.shape)``.

    ``x_{t+1} = x_t + dt f(t, x_t) + sqrt(dt) G xi_t`` with ``xi_t ~ N(0, I)``, drawn from
    ``generator`` (one ``(*x0.shape)`` draw per step, in order, so a seeded generator repeats the
    path exactly). Leading dimensions of ``x0`` (members, batch) get independent noise.

    Args:
        f: the drift, a tendency ``f(t, x) -> dx/dt`` (true or learned), ``x`` of shape ``(..., d)``.
        x0: initial state ``(..., d)``, floating point, finite.
        n_steps: number of steps, >= 0.
        dt: step size (model time units), > 0.
        noise: the diffusion factor ``G``: a number, ``(d,)`` or lower-triangular ``(d, d)``
            (see :func:`diffusion_factor`), in state units per sqrt(model time unit).
        generator: the source of the noise (default: torch's global generator).
        nonfinite: ``"raise"`` (:class:`~geonn.errors.NonFiniteError` naming the first bad step) or ``"keep"``.

    Example:
        >>> import torch, geonn
        >>> from geonn.dynamics import euler_maruyama
        >>> path = euler_maruyama(geonn.Lorenz63(), torch.tensor([1.0, 1.0, 20.0], dtype=torch.float64), 100, 0.01,
        ...                       noise=1.0, generator=torch.Generator().manual_seed(0))
        >>> path.shape
        torch.Size([101, 3])
    """
    if not callable(f):
        raise InputTypeError(f"f: expected a drift f(t, x), got {describe(f)}")
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() < 1:
        raise InputTypeError(f"x0: expected a floating-point tensor (..., state_dim), got {describe(x0)}")
    if not bool(torch.isfinite(x0).all()):
        raise InputError("x0: expected finite values, got NaN or inf")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise InputError(f"n_steps: expected an integer >= 0, got {describe(n_steps)}")
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
        raise InputError(f"dt: expected a finite step > 0, got {describe(dt)}")
    if nonfinite not in ("raise", "keep"):
        raise InputError(f"nonfinite: expected 'raise' or 'keep', got {nonfinite!r}")
    state_dim = getattr(f, "state_dim", None)
    if state_dim is not None and x0.shape[-1] != state_dim:
        raise InputError(f"x0: expected last dimension {state_dim} for the drift, got shape {tuple(x0.shape)}")
    factor = diffusion_factor(noise, x0.shape[-1], x0.dtype).to(x0.device) * math.sqrt(dt)  # one-step Cholesky factor
    states = [x0]
    x = x0
    for k in range(n_steps):
        xi = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x = x + dt * f(torch.as_tensor(k * dt, dtype=x0.dtype), x) + xi @ factor.T
        states.append(x)
    path = torch.stack(states)
    if nonfinite == "raise":
        bad = ~torch.isfinite(path.reshape(n_steps + 1, -1)).all(dim=1)
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise NonFiniteError(f"the Euler-Maruyama path became non-finite at step {first} (t = {first * dt:g})",
                                 step=first, time=first * dt)
    return path


def simulate_stochastic(
    model: Dynamics,
    n_steps: int,
    dt: float,
    noise,
    *,
    x0: torch.Tensor | None = None,
    members: int | None = None,
    spinup_steps: int = 0,
    perturbation: float = 1.0,
    seed: int = 0,
    dtype=torch.float64,
):
    """Simulate ``model`` with additive noise (Euler-Maruyama) into an ``xarray.Dataset``.

    ``x_{t+1} = x_t + dt f(x_t) + sqrt(dt) G xi_t`` (see :func:`euler_maruyama`): with a scalar
    ``noise = s`` each one-step increment has covariance ``s^2 dt I`` around ``dt f(x_t)``.

    Args:
        model: a reference model from :mod:`geonn.dynamics` (the drift).
        n_steps: steps kept after spin-up; the result has ``n_steps + 1`` times.
        dt: step size (model time units).
        noise: the diffusion factor ``G`` (a level ``s``, ``(d,)`` or ``(d, d)``), state units per
            sqrt(model time unit).
        x0: initial state ``(d,)`` or ``(members, d)``; default the model's default state (plus
            Gaussian perturbations of std ``perturbation`` when ``members`` is given).
        members: number of independent realisations (adds a ``member`` dimension).
        spinup_steps: stochastic steps integrated and discarded first.
        seed: seeds the noise (and the member perturbations): the same seed gives the same path.

    Returns:
        Dataset with ``state(time, [member,] component)``; ``time`` starts at 0 after spin-up.
        Attributes record the model, ``dt``, the scheme (``"euler-maruyama"``), the noise and the seed.

    Example:
        >>> import geonn
        >>> from geonn.dynamics import simulate_stochastic
        >>> ds = simulate_stochastic(geonn.Lorenz63(), n_steps=100, dt=0.01, noise=1.0, spinup_steps=500)
        >>> ds.state.dims
        ('time', 'component')
    """
    if not isinstance(model, Dynamics):
        raise InputError(f"model: expected a geonn.dynamics model (Lorenz63, Lorenz96), got {describe(model)}")
    if isinstance(spinup_steps, bool) or not isinstance(spinup_steps, int) or spinup_steps < 0:
        raise InputError(f"spinup_steps: expected an integer >= 0, got {describe(spinup_steps)}")
    if members is not None and (isinstance(members, bool) or not isinstance(members, int) or members < 1):
        raise InputError(f"members: expected an integer >= 1 or None, got {describe(members)}")
    factor = diffusion_factor(noise, model.state_dim, dtype)
    generator = torch.Generator().manual_seed(seed)
    if x0 is None:
        x0 = model.default_initial_state(dtype)
        if members is not None:
            x0 = x0 + perturbation * torch.randn((members, model.state_dim), generator=generator, dtype=dtype)
    else:
        x0 = torch.as_tensor(x0, dtype=dtype)
        if members is not None and (x0.dim() != 2 or x0.shape[0] != members):
            raise InputError(f"x0: expected shape ({members}, {model.state_dim}) for members={members}, got {tuple(x0.shape)}")
    with torch.no_grad():
        if spinup_steps:
            x0 = euler_maruyama(model, x0, spinup_steps, dt, factor, generator=generator)[-1]
        path = euler_maruyama(model, x0, n_steps, dt, factor, generator=generator)
    times = dt * torch.arange(n_steps + 1, dtype=torch.float64)
    levels = torch.diagonal(factor).tolist()
    attrs = {
        "title": f"stochastic {model.name} simulation",
        "Conventions": "CF-1.8",
        "source": f"geonn {__version__}",
        "model": model.name,
        **{f"model_{k}": v for k, v in model.parameters_dict().items()},
        "dt": float(dt),
        "scheme": "euler-maruyama",
        "noise_std": levels,
        "noise_comment": "x_{t+1} = x_t + dt f(x_t) + sqrt(dt) G xi_t, xi_t ~ N(0, I); noise_std is diag(G), "
                         "state units per sqrt(model time unit)",
        "spinup_steps": spinup_steps,
        "seed": seed,
    }
    var_attrs = {"state": {"long_name": f"{model.name} state with additive noise in the dynamics", "units": "1"}}
    return trajectory_to_dataset({"state": path}, times, model.component_names(), variable_attrs=var_attrs, attrs=attrs)
