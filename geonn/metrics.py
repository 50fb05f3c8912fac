"""Scores of learned dynamics: forecast RMSE by lead time and the largest Lyapunov exponent."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import InputError, InputTypeError, describe
from .integrators import RungeKuttaStep, rollout


def forecast_rmse(
    f,
    truth: torch.Tensor,
    dt: float,
    leads: Sequence[int] = (1, 4, 8),
    scheme="rk4",
    *,
    batch_size: int = 4096,
) -> dict[int, float]:
    """RMSE of forecasts started from every true state, at each lead (in steps).

    The model is iterated from ``truth[i]`` and compared with ``truth[i + k]`` for every start ``i``
    with ``i + max(leads) < len(truth)``; the RMSE is over all starts and components.

    Args:
        f: a tendency ``f(t, x)`` (true or learned).
        truth: a trajectory ``(time, state_dim)`` on a grid of step ``dt``.
        dt: time step (model time units).
        leads: forecast lead times in steps, each >= 1.
        scheme: the scheme (name, tableau or step) that advances ``f``.

    Returns:
        ``{lead: rmse}`` in the units of the state.
    """
    if not isinstance(truth, torch.Tensor) or truth.dim() != 2:
        raise InputError(f"truth: expected a tensor of shape (time, state_dim), got {describe(truth)}")
    leads = [int(k) for k in leads]
    if not leads or min(leads) < 1:
        raise InputError(f"leads: expected lead times >= 1 step, got {leads}")
    horizon = max(leads)
    n_starts = truth.shape[0] - horizon
    if n_starts < 1:
        raise InputError(f"truth: expected more than {horizon} times for lead {horizon}, got {truth.shape[0]}")
    sq_err = {k: 0.0 for k in leads}
    with torch.no_grad():
        for begin in range(0, n_starts, batch_size):
            end = min(begin + batch_size, n_starts)
            forecast = rollout(f, truth[begin:end], horizon, dt, scheme, nonfinite="keep")  # (horizon+1, B, D)
            for k in leads:
                sq_err[k] += float((forecast[k] - truth[begin + k : end + k]).pow(2).sum())
    count = n_starts * truth.shape[1]
    return {k: math.sqrt(sq_err[k] / count) for k in leads}


def lyapunov_max(
    f,
    x0: torch.Tensor,
    dt: float,
    scheme="rk4",
    *,
    n_steps: int = 10000,
    spinup_steps: int = 1000,
    seed: int = 0,
) -> tuple[float, torch.Tensor]:
    """Largest Lyapunov exponent of the flow of ``f`` (per model time unit).

    Each trajectory has a twin a small distance ``eps`` away; after every step the separation's
    growth is logged and the twin is put back at distance ``eps`` along the new separation
    (Benettin's method with renormalisation every step; ``eps = sqrt(machine eps) * rms(x)``).
    The exponent is the time mean of the log growth; trajectories in a batch are averaged.

    Args:
        f: a tendency ``f(t, x)``.
        x0: starting states ``(state_dim,)`` or ``(n_trajectories, state_dim)``.
        dt: step size; n_steps: steps averaged over; spinup_steps: steps discarded first.

    Returns:
        ``(mean exponent, per-trajectory exponents)``.
    """
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise InputTypeError(f"x0: expected a floating-point tensor (..., state_dim), got {describe(x0)}")
    if n_steps < 1:
        raise InputError(f"n_steps: expected >= 1, got {n_steps}")
    step = scheme if isinstance(scheme, RungeKuttaStep) else RungeKuttaStep(scheme)
    with torch.no_grad():
        x = rollout(f, x0, spinup_steps, dt, step)[-1] if spinup_steps else x0
        generator = torch.Generator().manual_seed(seed)
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        v = v / v.norm(dim=-1, keepdim=True)
        t = torch.zeros((), dtype=x.dtype)
        eps = math.sqrt(torch.finfo(x.dtype).eps) * max(1.0, float(x.pow(2).mean().sqrt()))
        log_growth = torch.zeros(x.shape[:-1], dtype=torch.float64)
        for _ in range(n_steps):
            pair = step(f, t, torch.stack((x, x + eps * v)), dt)
            x, separation = pair[0], pair[1] - pair[0]
            norm = separation.norm(dim=-1, keepdim=True)
            log_growth += (norm.squeeze(-1) / eps).log().to(torch.float64)
            v = separation / norm
        if not bool(torch.isfinite(log_growth).all()):
            raise InputError("f: the Lyapunov estimate is not finite; the trajectory diverged")
    exponents = log_growth / (n_steps * dt)
    return float(exponents.mean()), exponents
