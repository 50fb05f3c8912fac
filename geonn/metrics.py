"""Scores of learned dynamics: forecast RMSE by lead time and the largest Lyapunov exponent."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .errors import InputError, InputTypeError, NonFiniteError, describe
from .integrators import RungeKuttaStep, rollout
from .integrators.integrate import _check_dt, _check_state, divergence_steps


def _check_count(name: str, value, minimum: int, what: str = "") -> int:
    """An integer (not a bool) in ``[minimum, 2**31)``: a step count or a lead (``what`` it is, for the message)."""
    expected = f"{name}: expected {what + ' ' if what else ''}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputTypeError(f"{expected}>= {minimum} (an integer), got {describe(value)}")
    if value < minimum:
        raise InputError(f"{expected}>= {minimum}, got {value!r}")
    if value >= 2**31:
        raise InputError(f"{expected}below 2**31, got {value!r}")
    return int(value)


def _check_leads(leads) -> list[int]:
    """``leads`` as a non-empty list of integers >= 1 (a sequence of lead times in steps)."""
    if isinstance(leads, (str, bytes)) or not isinstance(leads, (Sequence, torch.Tensor, np.ndarray)):
        raise InputTypeError(f"leads: expected a sequence of lead times >= 1 step (integers), e.g. (1, 4, 8), got {describe(leads)}")
    if isinstance(leads, (torch.Tensor, np.ndarray)):
        if leads.dtype in (torch.bool, np.bool_) or leads.ndim != 1:
            raise InputTypeError(f"leads: expected a 1-D sequence of lead times >= 1 step (integers), got {describe(leads)}")
        leads = leads.tolist()
    if len(leads) == 0:
        raise InputError("leads: expected lead times >= 1 step, got none")
    return [_check_count("leads", k, 1, "lead times") for k in leads]


def forecast_rmse(
    f,
    truth: torch.Tensor,
    dt: float,
    leads: Sequence[int] = (1, 4, 8),
    scheme="rk4",
    *,
    batch_size: int = 4096,
    nonfinite: str = "raise",
) -> dict[int, float]:
    """RMSE of forecasts started from every true state, at each lead (in steps).

    The model is iterated from ``truth[i]`` and compared with ``truth[i + k]`` for every start ``i``
    with ``i + max(leads) < len(truth)``; the RMSE is over all starts and components.

    Args:
        f: a tendency ``f(t, x)`` (true or learned).
        truth: a trajectory ``(time, state_dim)`` on a grid of step ``dt``, floating point, finite.
        dt: time step (model time units).
        leads: forecast lead times in steps, each >= 1.
        scheme: the scheme (name, tableau or step) that advances ``f``.
        batch_size: starts forecast together.
        nonfinite: ``"raise"`` (default): a forecast that diverges raises :class:`NonFiniteError`;
            ``"keep"``: the RMSE of a lead at which some forecast diverged is ``math.inf`` (a flag
            for a model compared with others; the other leads are scored as usual).

    Returns:
        ``{lead: rmse}`` in the units of the state.

    Raises:
        InputTypeError, InputError: an argument of the wrong type or value (named in the message).
        NonFiniteError: a forecast diverged (NaN or inf, or errors too large to square in float64):
            the message names the start ``truth[i]`` and the step (lead) where it happened;
            ``step`` and ``time`` (after the start) are set. A diverged model has no finite RMSE.
    """
    if not isinstance(truth, torch.Tensor) or truth.dim() != 2 or not truth.is_floating_point():
        raise InputError(f"truth: expected a tensor of shape (time, state_dim), floating point, got {describe(truth)}")
    if truth.shape[1] == 0:
        raise InputError(f"truth: expected at least one state component, got shape {tuple(truth.shape)}")
    if not bool(torch.isfinite(truth).all()):
        raise InputError(f"truth: expected finite values, got {int((~torch.isfinite(truth)).sum())} NaN or inf entries")
    dt = _check_dt(dt)
    leads = _check_leads(leads)
    batch_size = _check_count("batch_size", batch_size, 1)
    if nonfinite not in ("raise", "keep"):
        raise InputError(f"nonfinite: expected 'raise' or 'keep', got {describe(nonfinite)}")
    horizon = max(leads)
    n_starts = truth.shape[0] - horizon
    if n_starts < 1:
        raise InputError(f"truth: expected more than {horizon} times for lead {horizon}, got {truth.shape[0]}")
    sq_err = {k: 0.0 for k in leads}
    with torch.no_grad():
        for begin in range(0, n_starts, batch_size):
            end = min(begin + batch_size, n_starts)
            forecast = rollout(f, truth[begin:end], horizon, dt, scheme, nonfinite="keep")  # (horizon+1, B, D)
            if nonfinite == "raise":
                _check_forecast(forecast, begin, dt)
            for k in leads:
                error = (forecast[k] - truth[begin + k : end + k]).to(torch.float64)
                sq_err[k] += float(error.pow(2).sum())
                if nonfinite == "keep" and not math.isfinite(sq_err[k]):
                    sq_err[k] = math.inf  # NaN (a diverged forecast) or overflow: flagged as inf
                elif not math.isfinite(sq_err[k]):
                    raise NonFiniteError(
                        f"f: the squared forecast errors at lead {k} overflow float64 (largest error "
                        f"{float(error.abs().max()):.3g}): the model diverged", step=k, time=k * dt)
    count = n_starts * truth.shape[1]
    return {k: math.sqrt(sq_err[k] / count) for k in leads}


def _check_forecast(forecast: torch.Tensor, begin: int, dt: float) -> None:
    """Raise :class:`NonFiniteError` naming the first start and step of ``forecast (time, B, D)`` that diverged."""
    steps = divergence_steps(forecast)  # (B,)
    diverged = steps >= 0
    if not bool(diverged.any()):
        return
    step = int(steps[diverged].min())
    start = begin + int(((steps == step) & diverged).nonzero()[0])
    raise NonFiniteError(
        f"f: the forecast from truth[{start}] became non-finite (NaN or inf) at step {step} (lead {step}, "
        f"t = {step * dt:g} after its start); the model diverged ({int(diverged.sum())} of {forecast.shape[1]} starts)",
        step=step, time=step * dt)


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
        x0: starting states ``(state_dim,)`` or ``(n_trajectories, state_dim)``, floating point, finite.
        dt: step size; n_steps: steps averaged over (>= 1); spinup_steps: steps discarded first (>= 0).
        seed: seed of the initial separation directions (drawn on the CPU, then moved to ``x0``'s device).

    Returns:
        ``(mean exponent, per-trajectory exponents)``; the exponents are float64 on ``x0``'s device.

    Raises:
        InputTypeError, InputError: an argument of the wrong type or value (named in the message).
        NonFiniteError: the trajectory or its twin diverged (NaN, inf or overflow) at the step named.
    """
    if not callable(f):
        raise InputTypeError(f"f: expected a tendency f(t, x), got {describe(f)}")
    x0 = _check_state(f, x0)
    dt = _check_dt(dt)
    n_steps = _check_count("n_steps", n_steps, 1)
    spinup_steps = _check_count("spinup_steps", spinup_steps, 0)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise InputError(f"seed: expected an integer in [0, 2**63), got {describe(seed)}")
    step = scheme if isinstance(scheme, RungeKuttaStep) else RungeKuttaStep(scheme)
    with torch.no_grad():
        x = rollout(f, x0, spinup_steps, dt, step)[-1] if spinup_steps else x0
        generator = torch.Generator().manual_seed(int(seed))  # on the CPU: the same directions on every device
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        v = v / v.norm(dim=-1, keepdim=True)
        t = torch.zeros((), dtype=x.dtype, device=x.device)
        size = float(x.to(torch.float64).pow(2).mean().sqrt())
        eps = math.sqrt(torch.finfo(x.dtype).eps) * max(1.0, size)
        if not math.isfinite(eps) or not bool(torch.isfinite(x + eps * v).all()):
            raise NonFiniteError(f"x0: the states are too large to perturb in {x.dtype} (rms {size:.3g})"
                                 f"{f' after {spinup_steps} spin-up steps' if spinup_steps else ''}", step=spinup_steps,
                                 time=spinup_steps * dt)
        log_growth = torch.zeros(x.shape[:-1], dtype=torch.float64, device=x.device)
        first_bad = torch.full(x.shape[:-1], -1, dtype=torch.long, device=x.device)  # no synchronisation per step
        for k in range(n_steps):
            pair = step(f, t, torch.stack((x, x + eps * v)), dt)
            x, separation = pair[0], pair[1] - pair[0]
            norm = separation.norm(dim=-1, keepdim=True)
            log_growth += (norm.squeeze(-1) / eps).log().to(torch.float64)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(log_growth), k + 1, first_bad)
            v = separation / norm
        if bool((first_bad >= 0).any()):
            k = int(first_bad[first_bad >= 0].min())
            raise NonFiniteError(
                f"f: the Lyapunov estimate is not finite: the trajectory or its twin diverged (NaN or inf, or a separation "
                f"of 0) at step {k} after the spin-up (t = {(spinup_steps + k) * dt:g})",
                step=spinup_steps + k, time=(spinup_steps + k) * dt)
    exponents = log_growth / (n_steps * dt)
    if not bool(torch.isfinite(exponents).all()):
        raise NonFiniteError(f"dt: the exponents overflow: log growth {float(log_growth.abs().max()):.3g} over "
                             f"n_steps * dt = {n_steps * dt:g}", step=spinup_steps + n_steps, time=(spinup_steps + n_steps) * dt)
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
    normal = torch.distributions.Normal(torch.zeros((), dtype=std.dtype, device=std.device),
                                        torch.ones((), dtype=std.dtype, device=std.device))
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
