"""Ensemble Kalman filters: EnKF (perturbed observations), ETKF, finite-size EnKF-N, LETKF.

Each method is a dataclass of its hyperparameters with one ``assimilate(...)`` that cycles
forecast and analysis, and an ``analyse(...)`` for one analysis step. The forecast integrates the
whole ensemble as one tensor ``(members, state_dim)`` with :func:`geonn.rollout`; the analyses
are matrix algebra over members (no loop over members, and for the LETKF none over grid points).

Notation (docs/assimilation.md): ``N`` members, anomalies ``A = E - mean(E)`` (N, state_dim),
observed anomalies ``Y = H(E) - mean(H(E))`` (N, p), whitened by ``R^{-1/2}``; the innovation is
``d = y - mean(H(E))``. References: evensen1994, burgers1998, hunt2007, bocquet2011,
bocquet2015, sakov2012, gaspari1999 (docs/references.md).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from ..errors import InputError, InputTypeError, describe
from ..integrators import RungeKuttaStep
from .forecast import propagate
from .localisation import gaspari_cohn, ring_distance
from .observations import ObservationError, ObservationOperator, Observations


@dataclass(frozen=True)
class FilterResult:
    """What a filter returns; one row per observation time.

    Attributes:
        times: the observation (analysis) times ``(n_obs_times,)``, model time units.
        analysis_mean: ensemble mean after each analysis ``(n_obs_times, state_dim)``.
        analysis_spread: ensemble standard deviation per component after each analysis (same shape).
        forecast_mean: ensemble mean just before each analysis (same shape).
        forecast_spread: ensemble standard deviation per component just before each analysis.
        ensemble: the last analysis ensemble ``(members, state_dim)``, to continue the cycle.
        inflation: the adaptive inflation factor of each analysis ``(n_obs_times,)`` (EnKF-N), else ``None``.
    """

    times: torch.Tensor
    analysis_mean: torch.Tensor
    analysis_spread: torch.Tensor
    forecast_mean: torch.Tensor
    forecast_spread: torch.Tensor
    ensemble: torch.Tensor
    inflation: torch.Tensor | None = None


# --- shared checks and helpers ----------------------------------------------------------------------


def _check_int(name: str, value, minimum: int, maximum: int = 2**63 - 1) -> None:
    """An ``int`` (not a bool) in ``[minimum, maximum]``; the default maximum is int64's (torch's seeds and sizes)."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        bound = f"in [{minimum}, {maximum}]" if maximum < 2**63 - 1 else f">= {minimum} (and < 2**63)"
        raise InputError(f"{name}: expected an integer {bound}, got {describe(value)}")


MAX_MEMBERS = 2**24  # an ensemble larger than this is a mistake (16.7 million members, as geonn.simulate's limit)


def _real_tensor(name: str, value, expected: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` as a real tensor: of ``dtype`` when given (numbers converted straight to it), else its own
    floating dtype (integers become float64); a geonn error naming ``name`` for anything else."""
    if isinstance(value, (str, bytes)):
        raise InputTypeError(f"{name}: expected {expected}, got {describe(value)}")
    try:
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise InputTypeError(f"{name}: expected {expected}, got {describe(value)}") from None
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise InputTypeError(f"{name}: expected {expected} (real numbers), got {describe(value)}")
    if dtype is not None:
        return tensor.to(dtype) if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=dtype)
    return tensor if tensor.is_floating_point() else tensor.double()


def _check_positive(name: str, value, allow_inf: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise InputError(f"{name}: expected a positive number, got {describe(value)}")
    if math.isinf(value) and not allow_inf:
        raise InputError(f"{name}: expected a finite positive number, got {value!r}")


def _spread(ensemble: torch.Tensor) -> torch.Tensor:
    return ensemble.std(dim=-2, correction=1)


def mean_preserving_rotation(members: int, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
    """A random orthogonal ``(members, members)`` matrix ``Q`` with ``Q 1 = 1``.

    Applied to anomalies (``Q @ A``) it keeps their mean at zero and their covariance, and spreads
    the analysis over the members (DAPPER's ``rot=True``). ``Q = 1 1^T / N + B O B^T`` with ``B``
    the Helmert basis of the complement of ``1`` and ``O`` Haar-distributed (the orthogonal polar
    factor of a Gaussian matrix).
    """
    _check_int("members", members, 2, MAX_MEMBERS)
    gauss = torch.randn(members - 1, members - 1, generator=generator, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(gauss)
    helmert = _helmert(members)
    rotation = torch.full((members, members), 1.0 / members, dtype=torch.float64) + helmert @ (u @ vh) @ helmert.T
    return rotation.to(dtype)


@functools.lru_cache(maxsize=32)
def _helmert(members: int) -> torch.Tensor:
    """Orthonormal basis ``(N, N - 1)`` of the vectors orthogonal to ``1``: column k is
    ``(1, .., 1, -k, 0, .., 0) / sqrt(k (k + 1))`` with k ones."""
    k = torch.arange(1, members, dtype=torch.float64)
    rows = torch.arange(members, dtype=torch.float64).unsqueeze(1)
    basis = torch.where(rows < k, 1.0, torch.where(rows == k, -k, 0.0))
    return basis / torch.sqrt(k * (k + 1))


def sqrt_update(anomalies: torch.Tensor, observed: torch.Tensor, innovation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric square-root (ETKF) update in ensemble space, batched over leading dimensions.

    With whitened observed anomalies ``Y = U diag(s) V^T`` (thin SVD) and ``N1 = N - 1``::

        w = U diag(s / (s^2 + N1)) V^T d                      (mean weights; hunt2007)
        T = (I + Y Y^T / N1)^{-1/2} = I + U diag(sqrt(N1 / (s^2 + N1)) - 1) U^T

    Never forms an ``N x N`` matrix, so thousands of members cost little.

    Args:
        anomalies: state anomalies ``(..., N, m)``.
        observed: whitened observed anomalies ``(..., N, p)``.
        innovation: whitened innovation ``(..., p)``.

    Returns:
        ``(mean_increment (..., m), analysis_anomalies (..., N, m))``.
    """
    n1 = observed.shape[-2] - 1
    u, s, vh = torch.linalg.svd(observed, full_matrices=False)
    projected = (vh @ innovation.unsqueeze(-1)).squeeze(-1)  # (..., r)
    weights = (u @ (projected * s / (s**2 + n1)).unsqueeze(-1)).squeeze(-1)  # (..., N)
    mean_increment = (weights.unsqueeze(-2) @ anomalies).squeeze(-2)
    shrink = torch.sqrt(n1 / (s**2 + n1)) - 1.0
    analysis = anomalies + u @ (shrink.unsqueeze(-1) * (u.transpose(-1, -2) @ anomalies))
    return mean_increment, analysis


# --- the cycle shared by every ensemble filter ---------------------------------------------------------


class _EnsembleFilter:
    """Forecast-analysis cycling; subclasses implement ``_update``."""

    members: int
    inflation: float
    rotate: bool
    seed: int

    def _check_common(self) -> None:
        _check_int("members", self.members, 2, MAX_MEMBERS)
        _check_positive("inflation", self.inflation)
        if not isinstance(self.rotate, bool):
            raise InputTypeError(f"rotate: expected True or False, got {describe(self.rotate)}")
        _check_int("seed", self.seed, 0)

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
    ) -> FilterResult:
        """Cycle forecasts and analyses over every observation time.

        Give either an initial ``ensemble`` or ``prior_mean`` and ``prior_spread`` (the initial
        ensemble is then ``prior_mean + prior_spread * z``, ``z`` standard normal, drawn from
        ``seed``).

        Args:
            model: the tendency ``f(t, x)`` of the forecast (a true model or a learned one).
            observations: times (multiples of ``dt`` after ``t0``), values, error and operator, as
                returned by :func:`~geonn.assimilation.read_observations`.
            dt: model step (model time units).
            prior_mean: initial mean ``(state_dim,)``.
            prior_spread: initial standard deviation, a scalar or ``(state_dim,)`` (state units).
            ensemble: initial ensemble ``(members, state_dim)`` at ``t0`` instead of the prior.
            t0: time of the initial ensemble.
            scheme: the Runge-Kutta scheme of the forecast (name, tableau or step).
            compile: fuse the forecast steps with ``torch.compile``
                (:func:`geonn.assimilation.forecast.propagate`): several times faster for small
                states once compiled, a few seconds of compiling per ensemble shape; the results
                agree with the eager ones to round-off.

        Returns:
            A :class:`FilterResult` with one row per observation time.
        """
        run = self._start(model, observations, dt, prior_mean, prior_spread, ensemble, t0, scheme)
        steps, generator, members, step = run.steps, run.generator, run.ensemble, run.step
        operator, error, values = run.operator, run.error, run.values

        rows = {key: [] for key in ("fm", "fs", "am", "as", "inflation")}
        current = 0
        with torch.no_grad():
            for k, target in enumerate(steps):
                if target > current:
                    members = propagate(model, members, target - current, dt, step, t0=t0 + current * dt, compile=compile)
                    current = target
                rows["fm"].append(members.mean(0))
                rows["fs"].append(_spread(members))
                members, factor = self._update(members, values[k], operator, error, generator)
                members = self._post_process(members, generator)
                rows["am"].append(members.mean(0))
                rows["as"].append(_spread(members))
                rows["inflation"].append(factor)
        inflation = None if rows["inflation"][0] is None else torch.tensor(rows["inflation"], dtype=torch.float64)
        return FilterResult(
            times=observations.times.clone(),
            analysis_mean=torch.stack(rows["am"]),
            analysis_spread=torch.stack(rows["as"]),
            forecast_mean=torch.stack(rows["fm"]),
            forecast_spread=torch.stack(rows["fs"]),
            ensemble=members,
            inflation=inflation,
        )

    def analyse(
        self,
        ensemble: torch.Tensor,
        observation: torch.Tensor,
        operator: ObservationOperator,
        error: ObservationError,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One analysis: update ``ensemble`` (members, state_dim) with ``observation`` (obs_dim,).

        NaN entries of ``observation`` are missing and left out. Inflation and rotation (the
        method's post-processing) are applied too. ``generator`` seeds the random parts
        (perturbed observations, rotation).
        """
        if not isinstance(ensemble, torch.Tensor) or ensemble.dim() != 2 or ensemble.shape[0] != self.members:
            raise InputError(f"ensemble: expected a tensor ({self.members}, state_dim), got {describe(ensemble)}")
        if not isinstance(observation, torch.Tensor) or observation.dim() != 1 or observation.numel() != operator.obs_dim:
            raise InputError(f"observation: expected a 1-D tensor of {operator.obs_dim} values, got {describe(observation)}")
        if bool(torch.isnan(observation).all()):
            return ensemble.clone()  # nothing observed: no analysis
        with torch.no_grad():
            updated, _ = self._update(ensemble, observation.to(ensemble.dtype), operator, error, generator)
            return self._post_process(updated, generator)

    # --- pieces -----------------------------------------------------------------------------------

    def _start(self, model, observations, dt, prior_mean, prior_spread, ensemble, t0, scheme) -> SimpleNamespace:
        """Check the inputs and set up a run: observation steps, seeded generator, first ensemble, scheme."""
        if not callable(model):
            raise InputTypeError(f"model: expected a tendency f(t, x), got {describe(model)}")
        if not isinstance(observations, Observations):
            raise InputTypeError(f"observations: expected geonn.assimilation.Observations, got {describe(observations)}")
        if observations.operator is None:
            raise InputError(
                "observations.operator: expected an observation operator; these observations are of a non-subset "
                "operator (an 'obs' dimension): pass operator= to read_observations"
            )
        steps = observations.steps(dt, t0)
        generator = torch.Generator().manual_seed(self.seed)
        members = self._initial_ensemble(model, prior_mean, prior_spread, ensemble, generator)
        step = scheme if isinstance(scheme, RungeKuttaStep) else RungeKuttaStep(scheme)
        return SimpleNamespace(
            model=model, dt=float(dt), t0=float(t0), steps=steps, generator=generator, ensemble=members, step=step,
            operator=observations.operator, error=observations.error, values=observations.values.to(members.dtype),
        )

    def _initial_ensemble(self, model, prior_mean, prior_spread, ensemble, generator) -> torch.Tensor:
        if ensemble is not None:
            if prior_mean is not None or prior_spread is not None:
                raise InputError("ensemble: give either ensemble= or prior_mean= with prior_spread=, not both")
            if not isinstance(ensemble, torch.Tensor) or ensemble.dim() != 2 or ensemble.shape[0] != self.members:
                raise InputError(f"ensemble: expected a tensor ({self.members}, state_dim), got {describe(ensemble)}")
            if not ensemble.is_floating_point() or not bool(torch.isfinite(ensemble).all()):
                raise InputError("ensemble: expected finite floating-point values")
            return ensemble.detach().clone()
        if prior_mean is None or prior_spread is None:
            raise InputError("prior_mean, prior_spread: expected both (or an initial ensemble=), got "
                             f"prior_mean={describe(prior_mean)}, prior_spread={describe(prior_spread)}")
        mean = _real_tensor("prior_mean", prior_mean, "a finite 1-D state (state_dim,)")
        if mean.dim() != 1 or mean.numel() == 0 or not bool(torch.isfinite(mean).all()):
            raise InputError(f"prior_mean: expected a finite 1-D state (state_dim,), got {describe(prior_mean)}")
        spread = _real_tensor("prior_spread", prior_spread, f"a scalar or ({mean.numel()},) standard deviations", mean.dtype)
        if (spread.dim() > 1 or (spread.dim() == 1 and spread.numel() != mean.numel()) or not bool(torch.isfinite(spread).all())
                or not bool((spread >= 0).all())):
            raise InputError(
                f"prior_spread: expected a finite non-negative scalar or ({mean.numel()},) standard deviations, "
                f"got {describe(prior_spread)}"
            )
        z = torch.randn(self.members, mean.numel(), generator=generator, dtype=torch.float64).to(mean.dtype)
        members = mean + spread * z
        if not bool(torch.isfinite(members).all()):
            raise InputError(f"prior_mean, prior_spread: the initial members prior_mean + prior_spread * z overflow {mean.dtype} "
                             f"(largest |prior_mean| {float(mean.abs().max()):.3g}, prior_spread {float(spread.abs().max()):.3g})")
        return members

    def _post_process(self, ensemble: torch.Tensor, generator) -> torch.Tensor:
        if self.inflation == 1.0 and not self.rotate:
            return ensemble
        mean = ensemble.mean(0)
        anomalies = ensemble - mean
        if self.rotate:
            anomalies = mean_preserving_rotation(self.members, generator, ensemble.dtype) @ anomalies
        return mean + self.inflation * anomalies

    @staticmethod
    def _prepare(ensemble, observation, operator, error):
        """Anomalies, whitened observed anomalies and whitened innovation over the present observations."""
        if not isinstance(operator, ObservationOperator):
            raise InputTypeError(f"operator: expected an ObservationOperator, got {describe(operator)}")
        present = ~torch.isnan(observation)
        observed = operator(ensemble)
        if bool(present.all()):  # the usual case: no masking, the same error
            values = observation
        else:
            observed, values, error = observed[:, present], observation[present], error.restrict(present)
        mean = ensemble.mean(0)
        anomalies = ensemble - mean
        observed_mean = observed.mean(0)
        whitened = error.whiten(observed - observed_mean)
        innovation = error.whiten(values - observed_mean)
        return mean, anomalies, observed, whitened, innovation, error, present

    def _update(self, ensemble, observation, operator, error, generator):
        raise NotImplementedError


# --- the methods -------------------------------------------------------------------------------------


@dataclass
class EnKF(_EnsembleFilter):
    """The stochastic ensemble Kalman filter with perturbed observations (evensen1994, burgers1998).

    Each member is updated with its own perturbed observation ``y + e_i``, ``e_i ~ N(0, R)``
    (centred over members so the mean update is the Kalman one)::

        K = A^T Y (Y^T Y + (N - 1) R)^{-1},    x_i^a = x_i + K (y + e_i - H(x_i))

    Args:
        members: ensemble size ``N`` (>= 2).
        inflation: multiplicative inflation of the analysis anomalies (1 = none).
        rotate: apply a random mean-preserving rotation to the analysis anomalies.
        seed: seed of the initial ensemble, the perturbations and the rotations.

    Example:
        >>> from geonn.assimilation import EnKF
        >>> EnKF(members=20, inflation=1.04)
        EnKF(members=20, inflation=1.04, rotate=False, seed=0)
    """

    members: int
    inflation: float = 1.0
    rotate: bool = False
    seed: int = 0

    def __post_init__(self):
        self._check_common()

    def _update(self, ensemble, observation, operator, error, generator):
        _, anomalies, observed, _, _, error, present = self._prepare(ensemble, observation, operator, error)
        n1 = self.members - 1
        p = observed.shape[1]
        obs_anomalies = observed - observed.mean(0)
        covariance = error.covariance(p).to(ensemble.dtype)
        total = obs_anomalies.T @ obs_anomalies + n1 * covariance
        perturbations = error.sample((self.members, p), generator, dtype=ensemble.dtype)
        perturbations = perturbations - perturbations.mean(0)
        innovations = observation[present] + perturbations - observed  # (N, p)
        gain_rows = torch.linalg.solve(total, obs_anomalies.T @ anomalies)  # C^{-1} Y^T A: (p, m)
        return ensemble + innovations @ gain_rows, None


@dataclass
class ETKF(_EnsembleFilter):
    """The ensemble transform Kalman filter with the symmetric square root (hunt2007, sakov2008).

    In ensemble space, with whitened ``Y`` and ``d`` (see :func:`sqrt_update`)::

        w = (Y Y^T + (N - 1) I)^{-1} Y d,    T = sqrt(N - 1) (Y Y^T + (N - 1) I)^{-1/2}
        x^a = mean + A^T w,                  A^a = T A

    The analysis mean and covariance of the ensemble are exactly the Kalman update of the
    ensemble's own mean and covariance.

    Args:
        members: ensemble size ``N`` (>= 2).
        inflation: multiplicative inflation of the analysis anomalies (1 = none).
        rotate: apply a random mean-preserving rotation to the analysis anomalies.
        seed: seed of the initial ensemble and the rotations.
    """

    members: int
    inflation: float = 1.0
    rotate: bool = False
    seed: int = 0

    def __post_init__(self):
        self._check_common()

    def _update(self, ensemble, observation, operator, error, generator):
        mean, anomalies, _, whitened, innovation, _, _ = self._prepare(ensemble, observation, operator, error)
        increment, analysis = sqrt_update(anomalies, whitened, innovation)
        return mean + increment + analysis, None


@dataclass
class EnKFN(_EnsembleFilter):
    """The finite-size ensemble Kalman filter EnKF-N, dual form (bocquet2011, bocquet2015).

    The prior anomalies are inflated by ``l = sqrt((N - 1) / zeta)``, where ``zeta`` minimises
    the one-dimensional dual cost (whitened ``Y = U diag(s) V^T``, ``u = V^T d``)::

        D(zeta) = sum_i u_i^2 zeta / (zeta + s_i^2) + eps_N zeta + (N - 1) c_L ln((N - 1) / zeta)

    with the hyperprior constants ``eps_N = (N + 1) / N`` and ``c_L = (N + g) / (N - 1)``, both
    mode-corrected as in bocquet2015 (eq. 36, as DAPPER's ``EnKF_N``) and scaled by ``xN``; the
    ETKF update then follows with the inflated anomalies. No inflation should need tuning.

    Args:
        members: ensemble size ``N`` (>= 2).
        xN: confidence in the hyperprior (1: fully agnostic; 2 or more for more linear systems).
        g: nullity correction of the hyperprior (0 as in DAPPER's default).
        inflation: extra post-analysis inflation (1 = none).
        rotate: apply a random mean-preserving rotation to the analysis anomalies.
        seed: seed of the initial ensemble and the rotations.
    """

    members: int
    xN: float = 1.0
    g: int = 0
    inflation: float = 1.0
    rotate: bool = False
    seed: int = 0

    def __post_init__(self):
        self._check_common()
        _check_positive("xN", self.xN)
        _check_int("g", self.g, 0)

    def _update(self, ensemble, observation, operator, error, generator):
        mean, anomalies, _, whitened, innovation, _, _ = self._prepare(ensemble, observation, operator, error)
        _, s, vh = torch.linalg.svd(whitened, full_matrices=False)
        projected = vh @ innovation
        factor = enkf_n_inflation(s.double().numpy(), projected.double().numpy(), self.members, self.xN, self.g)
        increment, analysis = sqrt_update(factor * anomalies, factor * whitened, innovation)
        return mean + increment + analysis, factor


def _hyperprior(s: np.ndarray, members: int, xN: float, g: int) -> tuple[float, float]:
    """Mode-corrected hyperprior constants ``(eps_N, c_L)`` of the EnKF-N (bocquet2015, eq. 36)."""
    n1 = members - 1
    eps_n = (members + 1) / members
    c_l = (members + g) / n1
    prior_mode = eps_n / c_l
    diagonal = np.full(members, float(n1))
    diagonal[: s.size] += s**2
    prior_weight = n1 * np.mean(1.0 / diagonal)  # ~ 1 / (1 + HBH^T / R): how little the data say
    correction = math.sqrt(prior_mode**prior_weight)
    return xN * eps_n / correction, xN * c_l * correction


def enkf_n_dual_cost(zeta, s: np.ndarray, projected: np.ndarray, members: int, xN: float = 1.0, g: int = 0):
    """The EnKF-N dual cost ``D(zeta)`` (up to a constant); ``zeta`` scalar or array."""
    eps_n, c_l = _hyperprior(s, members, xN, g)
    z = np.asarray(zeta, dtype=np.float64)[..., None]
    fit = np.sum(projected**2 * z / (z + s**2), axis=-1)
    n1 = members - 1
    return fit + eps_n * z[..., 0] + n1 * c_l * np.log(n1 / z[..., 0])


def enkf_n_inflation(s: np.ndarray, projected: np.ndarray, members: int, xN: float = 1.0, g: int = 0) -> float:
    """The EnKF-N prior inflation ``l = sqrt((N - 1) / zeta*)``, ``zeta*`` the minimiser of the dual cost.

    Args:
        s: singular values of the whitened observed anomalies ``(r,)``.
        projected: the whitened innovation on the matching right singular vectors ``(r,)``.
        members: ensemble size ``N``.

    The minimiser lies in ``(0, (N - 1) c_L / eps_N]`` (where the derivative turns non-negative):
    a log-spaced grid brackets the global minimum, then a bounded Brent search refines it.
    """
    eps_n, c_l = _hyperprior(s, members, xN, g)
    n1 = members - 1
    upper = n1 * c_l / eps_n
    grid = upper * np.logspace(-8.0, 0.0, 161)
    costs = enkf_n_dual_cost(grid, s, projected, members, xN, g)
    k = int(np.argmin(costs))
    lo, hi = np.log(grid[max(k - 1, 0)]), np.log(grid[min(k + 1, grid.size - 1)])
    if hi > lo:
        best = minimize_scalar(
            lambda u: float(enkf_n_dual_cost(np.exp(u), s, projected, members, xN, g)),
            bounds=(lo, hi),
            method="bounded",
            options={"xatol": 1e-10},
        )
        zeta = float(np.exp(best.x)) if best.fun <= costs[k] else float(grid[k])
    else:
        zeta = float(grid[k])
    return math.sqrt(n1 / zeta)


@dataclass
class LETKF(_EnsembleFilter):
    """The local ETKF (hunt2007) with Gaspari-Cohn localisation on a ring (periodic distance).

    Every state component ``j`` gets its own ETKF analysis, with the whitened observed anomalies
    and innovation of observation ``i`` multiplied by ``sqrt(rho_ij)``,
    ``rho_ij = gaspari_cohn(dist(j, position_i), radius)`` (R-localisation, i.e. ``R_i / rho_ij``).
    All local analyses run as one batched computation (memory ~ state_dim x N x obs_dim numbers;
    a large grid would batch the components).

    Args:
        members: ensemble size ``N`` (>= 2).
        radius: Gaspari-Cohn half-width ``c`` in grid units (support ``2c``; ``math.inf`` = no
            localisation, the ETKF). DAPPER's ``loc_rad`` corresponds to ``radius = 1.82 loc_rad``.
        inflation: multiplicative inflation of the analysis anomalies (1 = none).
        rotate: apply a random mean-preserving rotation to the analysis anomalies.
        seed: seed of the initial ensemble and the rotations.
        domain: circumference of the ring in grid units (default: ``state_dim``, as Lorenz-96).

    The observation operator must carry ``positions`` (a :class:`Subset` does: its indices).
    """

    members: int
    radius: float
    inflation: float = 1.0
    rotate: bool = False
    seed: int = 0
    domain: float | None = None

    def __post_init__(self):
        self._check_common()
        _check_positive("radius", self.radius, allow_inf=True)
        if self.domain is not None:
            _check_positive("domain", self.domain)

    def _update(self, ensemble, observation, operator, error, generator):
        if operator.positions is None:
            raise InputError(f"operator: the LETKF needs observation positions; {operator!r} has positions=None")
        mean, anomalies, _, whitened, innovation, _, present = self._prepare(ensemble, observation, operator, error)
        state_dim = ensemble.shape[1]
        length = float(self.domain) if self.domain is not None else float(state_dim)
        grid = torch.arange(state_dim, dtype=torch.float64)
        distance = ring_distance(grid, operator.positions[present], length)
        taper = gaspari_cohn(distance, self.radius).sqrt().to(ensemble.dtype)  # (m, p)
        local_observed = whitened.unsqueeze(0) * taper.unsqueeze(1)  # (m, N, p)
        local_innovation = innovation.unsqueeze(0) * taper  # (m, p)
        local_anomalies = anomalies.T.unsqueeze(-1)  # (m, N, 1)
        increment, analysis = sqrt_update(local_anomalies, local_observed, local_innovation)
        return mean + increment.squeeze(-1) + analysis.squeeze(-1).T, None
