"""Simulate a reference model into a labelled, CF-annotated ``xarray.Dataset``."""

from __future__ import annotations

import math

import torch

from .. import __version__
from ..errors import InputError, describe
from ..fields import trajectory_to_dataset
from ..integrators import RungeKuttaStep, rollout
from .lorenz import Dynamics


def simulate(
    model: Dynamics,
    n_steps: int,
    dt: float,
    *,
    x0: torch.Tensor | None = None,
    members: int | None = None,
    spinup_steps: int = 0,
    perturbation: float = 1.0,
    scheme: str = "rk4",
    seed: int = 0,
    dtype=torch.float64,
    compile: bool = False,
):
    """Integrate ``model`` and return the trajectory as an ``xarray.Dataset``.

    Args:
        model: a reference model from :mod:`geonn.dynamics` (tendency with metadata).
        n_steps: number of steps kept after spin-up; the result has ``n_steps + 1`` times.
        dt: step size (model time units).
        x0: initial state ``(state_dim,)`` or ``(members, state_dim)``; default: the model's
            default state, plus Gaussian perturbations of std ``perturbation`` when ``members``
            is given.
        members: number of ensemble members (adds a ``member`` dimension).
        spinup_steps: steps integrated and discarded first, so the kept part is on the attractor.
        scheme: integration scheme name.
        seed: seed of the member perturbations.

    Returns:
        Dataset with ``state(time, [member,] component)``; ``time`` starts at 0 after spin-up.
        Attributes record the model, its parameters, ``dt``, the scheme and the spin-up.

    Example:
        >>> import geonn
        >>> ds = geonn.simulate(geonn.Lorenz63(), n_steps=100, dt=0.01, spinup_steps=500)
        >>> ds.state.dims
        ('time', 'component')
    """
    if not isinstance(model, Dynamics):
        raise InputError(f"model: expected a geonn.dynamics model (Lorenz63, Lorenz96), got {describe(model)}")
    if isinstance(spinup_steps, bool) or not isinstance(spinup_steps, int) or spinup_steps < 0:
        raise InputError(f"spinup_steps: expected an integer >= 0, got {describe(spinup_steps)}")
    if members is not None and (isinstance(members, bool) or not isinstance(members, int) or not 1 <= members <= 2**24):
        raise InputError(f"members: expected an integer in [1, 2**24] or None, got {describe(members)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype: expected a floating torch dtype such as torch.float64, got {describe(dtype)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise InputError(f"seed: expected a 64-bit integer, got {describe(seed)}")
    if isinstance(perturbation, bool) or not isinstance(perturbation, (int, float)) or not math.isfinite(perturbation):
        raise InputError(f"perturbation: expected a finite number (the std of the member perturbations), got {describe(perturbation)}")
    if x0 is None:
        x0 = model.default_initial_state(dtype)
        if members is not None:
            generator = torch.Generator().manual_seed(seed)
            x0 = x0 + perturbation * torch.randn((members, model.state_dim), generator=generator, dtype=dtype)
    else:
        if isinstance(x0, torch.Tensor) and (x0.is_complex() or x0.dtype == torch.bool):
            raise InputError(f"x0: expected real initial states, got {describe(x0)}")
        try:
            x0 = torch.as_tensor(x0, dtype=dtype)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"x0: expected initial states (state_dim,) or (members, state_dim), got {describe(x0)}") from None
        if members is not None and (x0.dim() != 2 or x0.shape[0] != members):
            raise InputError(f"x0: expected shape ({members}, {model.state_dim}) for members={members}, got {tuple(x0.shape)}")
    step = RungeKuttaStep(scheme)
    with torch.no_grad():
        if spinup_steps:
            x0 = rollout(model, x0, spinup_steps, dt, step, compile=compile)[-1]
        traj = rollout(model, x0, n_steps, dt, step, compile=compile)
    times = dt * torch.arange(n_steps + 1, dtype=torch.float64)
    params = {f"model_{k}": v for k, v in model.parameters_dict().items()}
    attrs = {
        "title": f"{model.name} simulation",
        "Conventions": "CF-1.8",
        "source": f"geonn {__version__}",
        "model": model.name,
        **params,
        "dt": float(dt),
        "scheme": step.tableau.name,
        "spinup_steps": spinup_steps,
        "seed": seed,
    }
    var_attrs = {"state": {"long_name": f"{model.name} state", "units": "1"}}
    return trajectory_to_dataset({"state": traj}, times, model.component_names(), variable_attrs=var_attrs, attrs=attrs)
