"""Ensemble Kalman smoothers: the EnKS (lagged ETKF transforms) and the iterative EnKS (IEnKS).

Both are dataclasses of their hyperparameters with the filters' ``assimilate(model, observations,
dt, ...)`` (docs/assimilation.md) and return a :class:`SmootherResult`: the filter's rows plus
``smoothed_mean`` / ``smoothed_spread``, the estimate of the state at each observation time
given the observations up to ``lag`` cycles later.

- :class:`EnKS` cycles the ETKF and applies each analysis' ensemble transform to the ensembles
  of the ``lag`` previous observation times too (evensen2000): one batched update of the
  ensembles stacked side by side, so no loop over lags.
- :class:`IEnKS` is the iterative ensemble Kalman smoother of bocquet2014 (single data
  assimilation, shift 1): a window of ``lag`` cycles whose initial ensemble is re-estimated by
  Gauss-Newton in ensemble space, linearising the model along the window with the ensemble
  itself (transform version) or with a small bundle around the iterate (finite differences).

Notation as in :mod:`geonn.assimilation.ensemble`: ``N`` members, anomalies ``X`` (N, state_dim),
whitened observed anomalies ``Y`` (N, p), whitened innovation ``d``, ``N1 = N - 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError, InputTypeError, describe
from .ensemble import (
    FilterResult,
    _check_int,
    _check_positive,
    _EnsembleFilter,
    _hyperprior,
    _spread,
    mean_preserving_rotation,
    sqrt_update,
)
from .forecast import propagate
from .observations import Observations


@dataclass(frozen=True)
class SmootherResult(FilterResult):
    """What a smoother returns: a :class:`FilterResult` plus the smoothed estimates.

    Attributes:
        smoothed_mean: ensemble mean at each observation time given the observations up to
            ``lag`` cycles later (the last ``lag`` rows: given all of them), ``(n_obs_times, state_dim)``.
        smoothed_spread: the matching ensemble standard deviation per component (same shape).
        iterations: Gauss-Newton iterations spent at each analysis ``(n_obs_times,)`` (IEnKS), else ``None``.
    """

    smoothed_mean: torch.Tensor | None = None
    smoothed_spread: torch.Tensor | None = None
    iterations: torch.Tensor | None = None


class _Smoother(_EnsembleFilter):
    """Input checks and the forecast shared by the smoothers."""

    @staticmethod
    def _forecast(run, members: torch.Tensor, start: int, stop: int, trajectory: bool = False) -> torch.Tensor:
        """Integrate ``members`` from model step ``start`` to ``stop``; returns the states at ``stop``
        (or every state from ``start`` on, with ``trajectory``)."""
        return propagate(run.model, members, stop - start, run.dt, run.step, t0=run.t0 + start * run.dt,
                         trajectory=trajectory, compile=run.compile)


@dataclass
class EnKS(_Smoother):
    """The ensemble Kalman smoother: the ETKF with its transforms applied to lagged ensembles (evensen2000).

    At each observation time the ETKF analysis (see :class:`~geonn.assimilation.ETKF`) maps the
    forecast ensemble ``E = x + X`` to ``x + (1 w^T + T) X``; the same ensemble-space map is
    applied to the ensembles kept at the ``lag`` previous observation times, which the new
    observation thereby updates through the ensemble's cross-time covariances. The current
    and lagged ensembles are stacked side by side along the state axis, so one
    :func:`~geonn.assimilation.sqrt_update` updates them all. Rotation (``rotate=True``)
    is applied to every kept ensemble, so members keep their identity across times; inflation
    only to the current one. With ``lag = 0`` it is the ETKF; on a linear Gaussian model with
    an exact prior and ``lag`` covering the whole record it is the Rauch-Tung-Striebel smoother.

    Args:
        members: ensemble size ``N`` (>= 2).
        lag: number of previous observation times updated by each analysis (>= 0).
        inflation: multiplicative inflation of the current analysis anomalies (1 = none).
        rotate: apply a random mean-preserving rotation after each analysis.
        seed: seed of the initial ensemble and the rotations.

    Example:
        >>> from geonn.assimilation import EnKS
        >>> EnKS(members=10, lag=4, inflation=1.02)
        EnKS(members=10, lag=4, inflation=1.02, rotate=False, seed=0)
    """

    members: int
    lag: int = 1
    inflation: float = 1.0
    rotate: bool = False
    seed: int = 0

    def __post_init__(self):
        self._check_common()
        _check_int("lag", self.lag, 0)

    def _update(self, ensemble, observation, operator, error, generator):
        mean, anomalies, _, whitened, innovation, _, _ = self._prepare(ensemble, observation, operator, error)
        increment, analysis = sqrt_update(anomalies, whitened, innovation)
        return mean + increment + analysis, None

    def assimilate(
        self,
        model,
        observations: Observations,
        dt: float,
        *,
        prior_mean: torch.Tensor | None = None,
        prior_spread=None,
        ensemble: torch.Tensor | None = None,
        t0: float = 0.0,
        scheme="rk4",
        compile: bool = False,
    ) -> SmootherResult:
        """Cycle forecasts and analyses, updating the ensembles of the last ``lag`` observation times too.

        Arguments (``compile`` too) as :meth:`geonn.assimilation.ETKF.assimilate`. Returns a :class:`SmootherResult`
        whose analysis rows are the ETKF's and whose ``smoothed_mean[k]`` is the estimate at
        observation ``k`` given the observations up to ``k + lag``.
        """
        run = self._start(model, observations, dt, prior_mean, prior_spread, ensemble, t0, scheme)
        run.compile = compile
        members = run.ensemble
        n_members, state_dim = members.shape
        n_times = len(run.steps)
        kept = members.new_empty((0, n_members, state_dim))  # analyses of the previous times, newest first
        smoothed_mean = members.new_empty((n_times, state_dim))
        smoothed_spread = members.new_empty((n_times, state_dim))
        rows = {key: [] for key in ("fm", "fs", "am", "as")}
        current = 0
        with torch.no_grad():
            for k, target in enumerate(run.steps):
                members = self._forecast(run, members, current, target)
                current = target
                rows["fm"].append(members.mean(0))
                rows["fs"].append(_spread(members))
                _, _, _, whitened, innovation, _, _ = self._prepare(members, run.values[k], run.operator, run.error)
                stack = torch.cat([members.unsqueeze(0), kept])  # (1 + l, N, m): times k, k - 1, ...
                stack_mean = stack.mean(1, keepdim=True)
                flat = (stack - stack_mean).transpose(0, 1).reshape(n_members, -1)  # (N, (1 + l) m)
                increment, analysis = sqrt_update(flat, whitened, innovation)
                updates = (increment + analysis).reshape(n_members, -1, state_dim).transpose(0, 1)  # (1 + l, N, m)
                stack = self._post_process_stack(stack_mean + updates, run.generator)
                members = stack[0]
                rows["am"].append(members.mean(0))
                rows["as"].append(_spread(members))
                times = torch.arange(k, k - stack.shape[0], -1)
                smoothed_mean[times] = stack.mean(1)
                smoothed_spread[times] = _spread(stack)
                kept = stack[: self.lag]
        return SmootherResult(
            times=observations.times.clone(),
            analysis_mean=torch.stack(rows["am"]),
            analysis_spread=torch.stack(rows["as"]),
            forecast_mean=torch.stack(rows["fm"]),
            forecast_spread=torch.stack(rows["fs"]),
            ensemble=members,
            smoothed_mean=smoothed_mean,
            smoothed_spread=smoothed_spread,
        )

    def _post_process_stack(self, analysed: torch.Tensor, generator) -> torch.Tensor:
        """The analysed ensembles ``(1 + l, N, m)`` after rotation (every time) and inflation (the
        current time, row 0, only); the rotation is drawn from ``generator`` exactly as the ETKF's."""
        if self.inflation == 1.0 and not self.rotate:
            return analysed
        means = analysed.mean(1, keepdim=True)
        centred = analysed - means
        if self.rotate:
            centred = mean_preserving_rotation(self.members, generator, analysed.dtype) @ centred
        if self.inflation != 1.0:
            centred = torch.cat([self.inflation * centred[:1], centred[1:]])
        return means + centred


@dataclass
class IEnKS(_Smoother):
    """The iterative ensemble Kalman smoother (bocquet2014), Gauss-Newton in ensemble space.

    The data-assimilation window spans ``lag`` observation cycles and slides by one cycle;
    each observation is assimilated once, when it is the newest of the window (single data
    assimilation). With the window-start ensemble ``x0 + X0`` and the control ``w`` (N,), the
    cost is::

        J(w) = N1/2 |w|^2 + 1/2 |R^{-1/2} (y - H(M(x0 + X0^T w)))|^2

    (``M`` the model over the window, ``y`` the newest observation). Each iteration integrates
    the ensemble ``x0 + (w + eps T)^T X0`` over the window, takes its observed anomalies
    divided by ``eps`` as ``Y`` (the sensitivities along ``T``), de-conditions them,
    ``Y0 = T^{-1} Y``, and makes a Gauss-Newton step::

        H_w = Y0 Y0^T + N1 I,   w <- w + H_w^{-1} (Y0 d - N1 w),
        T = sqrt(N1) H_w^{-1/2},   T^{-1} = H_w^{1/2} / sqrt(N1)

    ``eps = 1`` is the transform version (the ensemble itself, conditioned by ``T``, is the
    linearisation); ``bundle=True`` uses ``eps = epsilon`` (finite differences: a tight
    bundle around the iterate). At the end the window-start ensemble becomes
    ``x0 + (w + T)^T X0`` (the smoothed ensemble, inflated and rotated), and is integrated one
    cycle to start the next window. The analysis at the newest time is linearised from the
    last iterate (no extra model run): mean ``x_f + dw^T S``, anomalies ``T S`` with
    ``S = T_prev^{-1} X_f`` the forecast sensitivities; with ``lag = 1`` and one iteration it
    is exactly the ETKF analysis. On a linear model one iteration converges, and the smoothed
    means are those of the fixed-lag Kalman smoother.

    With ``xN`` the prior inflation is estimated as in the EnKF-N (bocquet2015): ``N1`` above
    becomes ``zeta = N1 c_L / (eps_N + |w|^2)`` with the constants of
    :func:`~geonn.assimilation.enkf_n_dual_cost` (DAPPER's ``iEnKS(..., xN=...)``).

    Args:
        members: ensemble size ``N`` (>= 2).
        lag: window length in observation cycles (>= 1; 1 is the iterative EnKF of sakov2012).
        inflation: multiplicative inflation of the smoothed (window-start) anomalies (1 = none).
        iterations: maximum Gauss-Newton iterations per window (>= 1).
        tolerance: stop iterating once ``|dw|^2 < tolerance * N`` (0: always ``iterations``).
        bundle: finite-difference (bundle) linearisation instead of the transform version.
        epsilon: the bundle scaling (``bundle=True`` only).
        xN: EnKF-N adaptive inflation with this hyperprior confidence, or ``None`` (off).
        rotate: apply a random mean-preserving rotation to the smoothed anomalies.
        seed: seed of the initial ensemble and the rotations.

    Example:
        >>> from geonn.assimilation import IEnKS
        >>> IEnKS(members=20, lag=4, xN=2.0)
        IEnKS(members=20, lag=4, inflation=1.0, iterations=10, tolerance=0.0, bundle=False, epsilon=0.0001, xN=2.0, rotate=False, seed=0)
    """

    members: int
    lag: int = 1
    inflation: float = 1.0
    iterations: int = 10
    tolerance: float = 0.0
    bundle: bool = False
    epsilon: float = 1e-4
    xN: float | None = None
    rotate: bool = False
    seed: int = 0

    def __post_init__(self):
        self._check_common()
        _check_int("lag", self.lag, 1)
        _check_int("iterations", self.iterations, 1)
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or not (self.tolerance >= 0):
            raise InputError(f"tolerance: expected a number >= 0, got {describe(self.tolerance)}")
        if not isinstance(self.bundle, bool):
            raise InputTypeError(f"bundle: expected True or False, got {describe(self.bundle)}")
        _check_positive("epsilon", self.epsilon)
        if self.xN is not None:
            _check_positive("xN", self.xN)

    def analyse(self, ensemble, observation, operator, error, generator=None):
        raise InputError("IEnKS.analyse: the IEnKS analyses a window of model integrations; use assimilate(...)")

    def assimilate(
        self,
        model,
        observations: Observations,
        dt: float,
        *,
        prior_mean: torch.Tensor | None = None,
        prior_spread=None,
        ensemble: torch.Tensor | None = None,
        t0: float = 0.0,
        scheme="rk4",
        compile: bool = False,
    ) -> SmootherResult:
        """Slide the window over every observation time.

        Arguments (``compile`` too) as :meth:`geonn.assimilation.ETKF.assimilate`. Returns a :class:`SmootherResult`:
        ``forecast_*`` from the first iterate, ``analysis_*`` at the newest time of each window,
        ``smoothed_*[k]`` given the observations up to ``k + lag``, ``iterations`` per window,
        ``inflation`` the EnKF-N factor ``sqrt(N1 / zeta)`` (with ``xN``), and ``ensemble`` the
        final smoothed ensemble integrated to the last observation time.
        """
        run = self._start(model, observations, dt, prior_mean, prior_spread, ensemble, t0, scheme)
        run.compile = compile
        window_start = run.ensemble
        n_members, state_dim = window_start.shape
        n1 = n_members - 1
        n_times = len(run.steps)
        edges = [0, *run.steps]  # edges[j + 1]: the step of observation j; edges[0]: t0
        eps = float(self.epsilon) if self.bundle else 1.0
        eye = torch.eye(n_members, dtype=window_start.dtype)
        rows = {key: [] for key in ("fm", "fs", "am", "as", "inflation", "iterations")}
        smoothed_mean = window_start.new_empty((n_times, state_dim))
        smoothed_spread = window_start.new_empty((n_times, state_dim))
        position = -1  # observation index of the window-start ensemble (-1: t0)
        with torch.no_grad():
            for newest in range(n_times):
                start, stop = edges[position + 1], run.steps[newest]
                observation = run.values[newest]
                present = ~torch.isnan(observation)
                masked = not bool(present.all())
                y = observation[present] if masked else observation
                error = run.error.restrict(present) if masked else run.error
                x0 = window_start.mean(0)
                X0 = window_start - x0
                w = torch.zeros(n_members, dtype=x0.dtype)
                T, T_inv = eye, eye
                # (eps = 1, the transform version, skips the multiplications and divisions by eps: the same numbers)
                for iteration in range(self.iterations):
                    members = x0 + (w + (T if eps == 1.0 else eps * T)) @ X0
                    forecast = self._forecast(run, members, start, stop)
                    observed = run.operator(forecast)
                    if masked:
                        observed = observed[:, present]
                    forecast_mean = forecast.mean(0)
                    observed_mean = observed.mean(0)
                    forecast_anomalies = forecast - forecast_mean
                    observed_anomalies = observed - observed_mean
                    if eps != 1.0:
                        forecast_anomalies, observed_anomalies = forecast_anomalies / eps, observed_anomalies / eps
                    if iteration == 0:
                        rows["fm"].append(forecast_mean)
                        rows["fs"].append(forecast_anomalies.std(0, correction=1))
                    Y0 = T_inv @ error.whiten(observed_anomalies)
                    d = error.whiten(y - observed_mean)
                    u, s, _ = torch.linalg.svd(Y0, full_matrices=False)
                    zeta = float(n1) if self.xN is None else self._zeta(s, w)
                    power = _hessian_powers(u, s, zeta, eye)
                    dw = power(-1.0) @ (Y0 @ d - zeta * w)
                    T_prev_inv = T_inv
                    T, T_inv = math.sqrt(n1) * power(-0.5), power(0.5) / math.sqrt(n1)
                    w = w + dw
                    if self.tolerance > 0 and float(dw @ dw) < self.tolerance * n_members:
                        break
                rows["iterations"].append(iteration + 1)
                rows["inflation"].append(math.sqrt(n1 / zeta))
                sensitivities = T_prev_inv @ forecast_anomalies
                analysis = forecast_mean + dw @ sensitivities + T @ sensitivities
                rows["am"].append(analysis.mean(0))
                rows["as"].append(_spread(analysis))

                window_start = self._post_process(x0 + (w + T) @ X0, run.generator)
                if position >= 0 and position == newest - self.lag:
                    smoothed_mean[position] = window_start.mean(0)
                    smoothed_spread[position] = _spread(window_start)
                if newest - self.lag + 1 >= 0:  # slide the window by one cycle
                    window_start = self._forecast(run, window_start, edges[position + 1], edges[position + 2])
                    position += 1

            # the last windows' smoothed ensemble, integrated through the times it has not yet reached
            start = edges[position + 1]
            first = max(position, 0)
            trajectory = self._forecast(run, window_start, start, run.steps[-1], trajectory=True)
            for j in range(first, n_times):
                states = trajectory[run.steps[j] - start]
                smoothed_mean[j] = states.mean(0)
                smoothed_spread[j] = _spread(states)
            final = trajectory[-1]
        inflation = torch.tensor(rows["inflation"], dtype=torch.float64) if self.xN is not None else None
        return SmootherResult(
            times=observations.times.clone(),
            analysis_mean=torch.stack(rows["am"]),
            analysis_spread=torch.stack(rows["as"]),
            forecast_mean=torch.stack(rows["fm"]),
            forecast_spread=torch.stack(rows["fs"]),
            ensemble=final,
            inflation=inflation,
            smoothed_mean=smoothed_mean,
            smoothed_spread=smoothed_spread,
            iterations=torch.tensor(rows["iterations"]),
        )

    def _zeta(self, s: torch.Tensor, w: torch.Tensor) -> float:
        """The EnKF-N ``zeta = N1 c_L / (eps_N + |w|^2)`` (DAPPER's ``zeta_a``)."""
        eps_n, c_l = _hyperprior(s.double().numpy(), self.members, float(self.xN), 0)
        return (self.members - 1) * c_l / (eps_n + float(w @ w))


def _hessian_powers(u: torch.Tensor, s: torch.Tensor, zeta: float, eye: torch.Tensor):
    """``p -> (Y0 Y0^T + zeta I)^p`` as ``(N, N)`` matrices, from the thin SVD ``Y0 = U diag(s) V^T``."""

    base = s**2 + zeta

    def power(p: float) -> torch.Tensor:
        return zeta**p * eye + (u * (base**p - zeta**p)) @ u.T

    return power
