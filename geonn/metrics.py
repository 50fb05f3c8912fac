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


# --- probabilistic forecasts: CRPS and the coverage of predicted regions (issue 3) -------------------


def crps_ensemble(ensemble: torch.Tensor, observation: torch.Tensor, *, fair: bool = True) -> torch.Tensor:
    """Continuous ranked probability score of an ensemble forecast, per forecast element.

    ``CRPS = E|X - y| - 1/2 E|X - X'|`` (gneiting2007) with ``X, X'`` independent members of the
    ensemble. With ``fair=True`` (default) the second expectation is the unbiased mean over the
    ``m (m - 1)`` pairs of distinct members (ferro2014): its expected value for an ensemble drawn
    from a distribution ``P`` is the CRPS of ``P`` itself, whatever ``m``. With ``fair=False`` it is
    the mean over all ``m^2`` pairs (the CRPS of the ensemble's empirical distribution, as in
    ``properscoring.crps_ensemble``), which is larger by ``E|X - X'| / (2 m)`` on average. A
    one-member ensemble with ``fair=False`` gives the absolute error of a point forecast.

    Vectorised: the pair sum is ``sum_i (2 i - m - 1) x_(i)`` over the sorted members (O(m log m)).

    Args:
        ensemble: members first, ``(m, ...)``; ``m >= 2`` when ``fair``, ``m >= 1`` otherwise.
        observation: the verifying values, shape ``...`` (the ensemble's shape without its first axis),
            same units.

    Returns:
        The CRPS of each element, shape ``...``, in the units of the observation; average it
        yourself (e.g. over starts and components).

    Raises:
        InputTypeError: not floating-point tensors.
        InputError: mismatched shapes, too few members, NaN/inf.

    Example:
        >>> ensemble = torch.tensor([[0.0], [1.0]]); observation = torch.tensor([0.0])
        >>> crps_ensemble(ensemble, observation)  # E|X - y| = 0.5, E|X - X'| over distinct pairs = 1
        tensor([0.])
    """
    for name, value in (("ensemble", ensemble), ("observation", observation)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise InputTypeError(f"{name}: expected a floating-point torch.Tensor, got {describe(value)}")
    if ensemble.dim() < 1 or ensemble.shape[1:] != observation.shape:
        raise InputError(
            f"ensemble: expected shape (members, *observation.shape) = (m, {', '.join(map(str, observation.shape))}), "
            f"got {tuple(ensemble.shape)}"
        )
    m = ensemble.shape[0]
    if m < (2 if fair else 1):
        raise InputError(f"ensemble: expected at least {2 if fair else 1} members for fair={fair}, got {m}")
    for name, value in (("ensemble", ensemble), ("observation", observation)):
        if not bool(torch.isfinite(value).all()):
            raise InputError(f"{name}: expected finite values, got NaN or inf")
    skill = (ensemble - observation).abs().mean(0)
    ranked = ensemble.sort(dim=0).values
    weights = 2 * torch.arange(1, m + 1, dtype=ensemble.dtype, device=ensemble.device) - m - 1
    pair_sum = 2 * torch.tensordot(weights, ranked, dims=([0], [0]))  # sum over all ordered pairs of |x_i - x_j|
    spread = pair_sum / (m * (m - 1) if fair else m * m)
    return skill - 0.5 * spread


def crps_gaussian(mean: torch.Tensor, std: torch.Tensor, observation: torch.Tensor) -> torch.Tensor:
    """The CRPS of a Gaussian forecast ``N(mean, std^2)``, in closed form (gneiting2005).

    ``CRPS = std [ z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi) ]``, ``z = (y - mean) / std``.

    Args:
        mean, std, observation: broadcastable floating-point tensors, same units; ``std > 0``.

    Returns:
        The CRPS per element (the broadcast shape), in the units of the observation.
    """
    for name, value in (("mean", mean), ("std", std), ("observation", observation)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise InputTypeError(f"{name}: expected a floating-point torch.Tensor, got {describe(value)}")
    if not bool((std > 0).all()):
        raise InputError(f"std: expected values > 0, got a minimum of {float(std.min())}")
    normal = torch.distributions.Normal(torch.zeros((), dtype=std.dtype), torch.ones((), dtype=std.dtype))
    z = (observation - mean) / std
    return std * (z * (2 * normal.cdf(z) - 1) + 2 * normal.log_prob(z).exp() - 1 / math.sqrt(math.pi))


def gaussian_coverage(residual: torch.Tensor, scale_tril: torch.Tensor, levels: Sequence[float] = (0.9,)) -> dict[float, float]:
    """Fraction of residuals inside the central regions of ``N(0, L L^T)`` of the given probabilities.

    A residual ``r`` lies inside the region of probability ``q`` when its squared Mahalanobis
    distance ``|L^-1 r|^2`` is at most the ``q`` quantile of the chi-square distribution with ``d``
    degrees of freedom. For a calibrated Gaussian forecast the fraction is ``q`` (a reliability
    diagram plots one against the other).

    Args:
        residual: ``observation - predicted mean``, shape ``(..., d)``.
        scale_tril: the predicted Cholesky factor ``(d, d)`` or ``(..., d, d)`` (batch dimensions
            broadcastable with the residual's), positive diagonal.
        levels: nominal probabilities, each in (0, 1).

    Returns:
        ``{level: observed fraction}``.
    """
    from scipy.stats import chi2

    from .losses.likelihood import check_scale_tril

    if not isinstance(residual, torch.Tensor) or not residual.is_floating_point() or residual.dim() < 1:
        raise InputTypeError(f"residual: expected a floating-point tensor (..., d), got {describe(residual)}")
    if residual.shape[:-1].numel() == 0:
        raise InputError(f"residual: expected at least one sample, got shape {tuple(residual.shape)}")
    if not bool(torch.isfinite(residual).all()):
        raise InputError("residual: expected finite values, got NaN or inf")
    d = residual.shape[-1]
    factor = check_scale_tril(scale_tril, d)
    levels = [float(q) for q in levels]
    if not levels or not all(0 < q < 1 for q in levels):
        raise InputError(f"levels: expected probabilities in (0, 1), got {levels}")
    try:
        batch = torch.broadcast_shapes(factor.shape[:-2], residual.shape[:-1])
    except RuntimeError:
        raise InputError(f"scale_tril: expected batch dimensions broadcastable with the residual's "
                         f"{tuple(residual.shape[:-1])}, got {tuple(factor.shape[:-2])}") from None
    whitened = torch.linalg.solve_triangular(factor.expand(*batch, d, d), residual.expand(*batch, d).unsqueeze(-1),
                                             upper=False).squeeze(-1)
    distance = whitened.pow(2).sum(-1)
    return {q: float((distance <= chi2.ppf(q, d)).to(torch.float64).mean()) for q in levels}
