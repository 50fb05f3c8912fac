"""Variational data assimilation: 3D-Var, strong-constraint 4D-Var, weak-constraint 4D-Var.

Each method is a dataclass of its hyperparameters with the ``assimilate(model, observations, dt,
*, prior_mean, prior_spread | ensemble, t0, scheme)`` of the ensemble filters, and returns a
:class:`VariationalResult` (a :class:`~geonn.assimilation.FilterResult` plus the smoothed
trajectory), so every method can stand in for any other in a case.

Notation (docs/assimilation.md): background ``x_b`` with covariance ``B = L_B L_B^T`` (the control
of the strong-constraint methods is whitened, ``x_0 = x_b + L_B w``), observations ``y_k`` at model
step ``s_k`` of the window with operator ``H`` and error ``R``, the model step ``M`` (one
Runge-Kutta step of ``dt``) and ``M_k`` (the flow from the window start to ``s_k``)::

    3D-Var:      J(x)   = 1/2 |x - x_b|^2_{B^-1} + 1/2 |y - H(x)|^2_{R^-1}
    4D-Var:      J(x_0) = 1/2 |x_0 - x_b|^2_{B^-1} + 1/2 sum_k |y_k - H(M_k(x_0))|^2_{R^-1}
    weak 4D-Var: J(x_0..x_L) = 1/2 |x_0 - x_b|^2_{B^-1} + 1/2 sum_k |y_k - H(x_{s_k})|^2_{R^-1}
                               + 1/2 sum_j |x_{j+1} - M(x_j)|^2_{Q^-1}

Windows hold ``window`` consecutive observation times, each window adding ``shift`` new ones
(default ``shift = window``: side by side), and start at the observation time before their first
(the first windows at ``t0``); cycled, the background of a window is the previous analysis at
that time. ``analysis_mean`` at an observation time comes from the window that added it.
References: dapper (Var3D, Var4D), sakov2012 (the Lorenz-63 setup).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import InputError, InputTypeError, describe
from ..integrators import RungeKuttaStep, rollout
from ..integrators.integrate import GRADIENTS
from .ensemble import FilterResult, _check_int, _check_positive, _real_tensor
from .forecast import propagate, step_jacobians
from .observations import ObservationError, ObservationOperator, Observations

OPTIMIZERS = ("lbfgs", "gauss-newton")


@dataclass(frozen=True)
class VariationalResult(FilterResult):
    """A :class:`FilterResult` (one row per observation time) with what a variational method adds.

    ``analysis_mean`` is the analysis at each observation time (for 4D-Var the trajectory of the
    window's optimised initial state); ``forecast_mean`` the background there (the forecast of the
    previous analysis). The spreads are the square roots of the diagonals of the linearised
    covariances (analysis: the inverse Gauss-Newton Hessian carried along the window; forecast:
    ``B`` carried along the window, plus ``Q`` for the weak constraint), or ``None`` with
    ``spread=False``. ``ensemble`` is the last analysis as one member ``(1, state_dim)``.

    Attributes:
        smoothed_mean: the estimate at each observation time from the last window that covers it
            (so given that window's later observations; at a window's start, its optimised initial
            state), ``(n_obs_times, state_dim)`` as the smoothers' ``SmootherResult``; ``None`` for 3D-Var.
        smoothed_spread: its linearised standard deviation (same shape), or ``None``.
        smoothed: the window trajectory estimate at every model step from ``t0`` to the last
            observation ``(n_steps + 1, state_dim)``: each window's trajectory, a window's start
            being its own optimised state; ``None`` for 3D-Var.
        smoothed_times: the times of ``smoothed`` ``(n_steps + 1,)``.
        iterations: iterations used by the analysis (window) of each observation time ``(n_obs_times,)``.
        cost: the cost at the end of that analysis ``(n_obs_times,)``.
    """

    smoothed_mean: torch.Tensor | None = None
    smoothed_spread: torch.Tensor | None = None
    smoothed: torch.Tensor | None = None
    smoothed_times: torch.Tensor | None = None
    iterations: torch.Tensor | None = None
    cost: torch.Tensor | None = None


@dataclass
class _Solved:
    """What solving a batch of ``b`` windows gives (``W`` observation times, ``L`` steps at most)."""

    trajectory: torch.Tensor  # (b, L + 1, m) the analysis at every step
    analysis: torch.Tensor  # (b, W, m) at the observation times
    forecast: torch.Tensor  # (b, W, m) the background there
    analysis_var: torch.Tensor | None  # (b, W, m) linearised variances
    forecast_var: torch.Tensor | None  # (b, W, m)
    start_var: torch.Tensor | None  # (b, m) of the window's initial state
    iterations: list[int]  # per window
    cost: torch.Tensor  # (b,)


def climatology(model, x0, dt: float, *, members: int = 32, spinup_steps: int = 1000, n_steps: int = 4000,
                every: int = 5, seed: int = 0, scheme="rk4", compile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(state_dim,)`` and covariance ``(state_dim, state_dim)`` of the model's attractor.

    ``members`` free runs start at ``x0 + N(0, I)``, are spun up for ``spinup_steps`` steps, then
    sampled every ``every`` steps for ``n_steps`` steps (one batched rollout). A fraction of it is
    the usual static background covariance of 3D-Var and 4D-Var (DAPPER's ``B='clim'``, taken
    there from the truth; here from the model alone). ``compile`` fuses the run's steps
    (:func:`geonn.assimilation.forecast.propagate`; the same covariance to round-off).

    Example:
        >>> import torch, geonn
        >>> from geonn.assimilation import climatology
        >>> mean, cov = climatology(geonn.Lorenz63(), torch.tensor([1.0, 1.0, 20.0], dtype=torch.float64), 0.01, n_steps=500)
        >>> cov.shape
        torch.Size([3, 3])
    """
    for name, value, low in (("members", members, 2), ("spinup_steps", spinup_steps, 0), ("n_steps", n_steps, 1),
                             ("every", every, 1), ("seed", seed, 0)):
        _check_int(name, value, low)
    start = _state("x0", x0)
    noise = torch.randn(members, start.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    step = scheme if isinstance(scheme, RungeKuttaStep) else RungeKuttaStep(scheme)
    traj = propagate(model, start + noise.to(start.dtype), spinup_steps + n_steps, dt, step, trajectory=True, compile=compile)
    samples = traj[spinup_steps::every].reshape(-1, start.numel())
    return samples.mean(0), torch.cov(samples.T).reshape(start.numel(), start.numel())


# --- checks and small helpers ---------------------------------------------------------------------


def _state(name: str, value) -> torch.Tensor:
    x = _real_tensor(name, value, "a state (state_dim,)")
    if x.dim() != 1 or x.numel() == 0 or not bool(torch.isfinite(x).all()):
        raise InputError(f"{name}: expected a finite 1-D state (state_dim,), got {describe(value)}")
    return x


def _std_factor(name: str, std, m: int, dtype) -> torch.Tensor:
    """``diag(std)`` from a positive scalar or ``(m,)`` standard deviations."""
    s = _real_tensor(name, std, f"a positive scalar or ({m},) standard deviations", dtype)
    if s.dim() > 1 or (s.dim() == 1 and s.numel() != m) or not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise InputError(f"{name}: expected a positive finite scalar or ({m},) standard deviations in {dtype}, got {describe(std)}")
    return torch.diag(s.expand(m).clone())


def _cov_factor(name: str, cov, m: int, dtype) -> torch.Tensor:
    """The lower Cholesky factor of a symmetric positive-definite ``(m, m)`` covariance."""
    c = _real_tensor(name, cov, f"a symmetric positive-definite ({m}, {m}) covariance", dtype)
    if c.shape != (m, m) or not bool(torch.isfinite(c).all()) or not torch.allclose(c, c.T, rtol=1e-10, atol=1e-12):
        raise InputError(f"{name}: expected a finite symmetric ({m}, {m}) covariance, got {describe(cov)}")
    factor, info = torch.linalg.cholesky_ex(0.5 * (c + c.T))
    if int(info) != 0 or not bool(torch.isfinite(factor).all()):
        raise InputError(f"{name}: expected a positive-definite covariance; the Cholesky factorisation failed")
    return factor


def _check_std_or_matrix(std_name: str, std, matrix_name: str, matrix, allow_climatology: bool) -> None:
    if (std is None) == (matrix is None):
        state = "both" if std is not None else "neither"
        raise InputError(f"{std_name}, {matrix_name}: expected exactly one of {std_name}= and {matrix_name}=, got {state}")
    if std is not None:
        if isinstance(std, bool) or not isinstance(std, (int, float, torch.Tensor)):
            raise InputTypeError(f"{std_name}: expected a positive number or a 1-D tensor, got {describe(std)}")
        s = _real_tensor(std_name, std, "a positive number or a 1-D tensor", torch.float64)
        if s.dim() > 1 or s.numel() == 0 or not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise InputError(f"{std_name}: expected positive finite standard deviations (scalar or 1-D), got {describe(std)}")
    elif isinstance(matrix, str):
        if not (allow_climatology and matrix == "climatology"):
            raise InputError(f"{matrix_name}: expected a covariance matrix{' or ' + repr('climatology') if allow_climatology else ''}, "
                             f"got {matrix!r}")
    elif not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise InputError(f"{matrix_name}: expected a square covariance matrix (state_dim, state_dim), got {describe(matrix)}")
    else:
        _cov_factor(matrix_name, matrix, matrix.shape[0], torch.float64)


def _weights(values: torch.Tensor, error: ObservationError, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Observations with missing entries set to 0 ``(n, p)`` and per-time whitening ``(n, p, p)``:
    ``R^{-1/2}`` over the present observations, zero rows and columns for the missing ones."""
    values = values.to(dtype)
    present = ~torch.isnan(values)
    n, p = values.shape
    if error.is_diagonal:
        weights = torch.diag_embed(present.to(dtype) / error.std.to(dtype).expand(p))
    else:
        weights = error.inverse_sqrt(p).to(dtype).expand(n, p, p).clone()
        for k in (~present.all(1)).nonzero().flatten().tolist():
            idx = present[k].nonzero().flatten()
            weights[k] = 0.0
            weights[k, idx.unsqueeze(1), idx] = error.restrict(present[k]).inverse_sqrt().to(dtype)
    return values.nan_to_num(0.0), weights


def _whiten(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (weights @ v.unsqueeze(-1)).squeeze(-1)


def _gauss_newton_step(w: torch.Tensor, residual: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The step minimising ``1/2 |w + d|^2 + 1/2 |residual - G d|^2``: ``(I + G^T G) d = G^T residual - w``.

    Batched: ``w (b, m)``, ``residual (b, q)``, ``G (b, q, m)``. Returns ``(d, I + G^T G)``."""
    hessian = torch.eye(w.shape[-1], dtype=w.dtype) + G.transpose(-1, -2) @ G
    rhs = (G.transpose(-1, -2) @ residual.unsqueeze(-1)).squeeze(-1) - w
    chol = torch.linalg.cholesky(hessian)
    return torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1), hessian


def _damped(cost, control: torch.Tensor, delta: torch.Tensor, current: torch.Tensor, halvings: int = 10):
    """``control + a delta`` with each window's ``a`` halved from 1 until its cost does not increase
    (0 if it still does after ``halvings``): a backtracking line search on the Gauss-Newton step.

    ``cost`` maps controls ``(b, ...)`` to ``(b,)``; returns the new control and its step."""
    shape = (-1,) + (1,) * (control.dim() - 1)
    length = torch.ones(control.shape[0], dtype=control.dtype)
    with torch.no_grad():
        for _ in range(halvings):
            worse = cost(control + length.reshape(shape) * delta) > current + 1e-12 * current.abs()
            if not bool(worse.any()):
                break
            length = torch.where(worse, 0.5 * length, length)
        else:
            length = torch.where(cost(control + length.reshape(shape) * delta) > current + 1e-12 * current.abs(), 0.0, length)
    step = length.reshape(shape) * delta
    return control + step, step


def _lbfgs(control: torch.Tensor, cost, iterations: int, tolerance: float, history: int) -> tuple[torch.Tensor, int]:
    """Minimise ``cost(control).sum()`` with ``torch.optim.LBFGS`` (strong Wolfe line search)."""
    control = control.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([control], lr=1.0, max_iter=iterations, max_eval=2 * iterations + 10, history_size=history,
                                  tolerance_grad=tolerance, tolerance_change=1e-3 * tolerance**2, line_search_fn="strong_wolfe")

    def closure():
        value = cost(control).sum()
        (control.grad,) = torch.autograd.grad(value, control)  # not .backward(): the model's parameters stay untouched
        return value.detach()

    with torch.enable_grad():
        optimizer.step(closure)
    return control.detach(), int(optimizer.state[control].get("n_iter", 0))


# --- the base shared by the methods ----------------------------------------------------------------------


class _Variational:
    background_std: float | torch.Tensor | None
    B: torch.Tensor | str | None
    scale: float
    iterations: int
    tolerance: float
    spread: bool

    def _check_common(self) -> None:
        _check_std_or_matrix("background_std", self.background_std, "B", self.B, allow_climatology=True)
        _check_positive("scale", self.scale)
        _check_int("iterations", self.iterations, 1)
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or not self.tolerance >= 0:
            raise InputError(f"tolerance: expected a number >= 0, got {describe(self.tolerance)}")
        if not isinstance(self.spread, bool):
            raise InputTypeError(f"spread: expected True or False, got {describe(self.spread)}")

    def background_factor(self, m: int, dtype=torch.float64, *, model=None, x0=None, dt: float | None = None,
                          scheme="rk4", compile: bool = False) -> torch.Tensor:
        """``L_B (m, m)`` with ``L_B L_B^T = scale * B``; ``B='climatology'`` needs ``model``, ``x0``, ``dt``."""
        if self.background_std is not None:
            return math.sqrt(self.scale) * _std_factor("background_std", self.background_std, m, dtype)
        if isinstance(self.B, str):
            if model is None or x0 is None or dt is None:
                raise InputError("B: 'climatology' is computed from a free run of the model; use assimilate(...) or give B as a matrix")
            _, cov = climatology(model, x0, dt, scheme=scheme, compile=compile)
            return math.sqrt(self.scale) * _cov_factor("B", cov.to(dtype), m, dtype)
        return math.sqrt(self.scale) * _cov_factor("B", self.B, m, dtype)

    def _setup(self, model, observations, dt, prior_mean, prior_spread, ensemble, t0, scheme, compile=False):
        if not callable(model):
            raise InputTypeError(f"model: expected a tendency f(t, x), got {describe(model)}")
        if not isinstance(observations, Observations):
            raise InputTypeError(f"observations: expected geonn.assimilation.Observations, got {describe(observations)}")
        if observations.operator is None:
            raise InputError("observations.operator: expected an observation operator; pass operator= to read_observations")
        steps = observations.steps(dt, t0)
        if ensemble is not None:
            if prior_mean is not None or prior_spread is not None:
                raise InputError("ensemble: give either ensemble= or prior_mean= (with prior_spread=), not both")
            if not isinstance(ensemble, torch.Tensor) or ensemble.dim() != 2 or ensemble.shape[0] < 2:
                raise InputError(f"ensemble: expected a tensor (members >= 2, state_dim), got {describe(ensemble)}")
            prior_mean, prior_spread = ensemble.mean(0), ensemble.std(0)
        if prior_mean is None:
            raise InputError("prior_mean: expected the background state at t0 (state_dim,) (or an ensemble=), got None")
        prior = _state("prior_mean", prior_mean).detach()
        m, dtype = prior.numel(), prior.dtype
        step = scheme if isinstance(scheme, RungeKuttaStep) else RungeKuttaStep(scheme)
        factor = self.background_factor(m, dtype, model=model, x0=prior, dt=dt, scheme=step, compile=compile)
        first = factor if prior_spread is None else _std_factor("prior_spread", prior_spread, m, dtype)
        values, weights = _weights(observations.values, observations.error, dtype)
        return steps, step, prior, first, factor, values, weights


def _plain(model, shifts: torch.Tensor | None = None):
    """``model`` as a plain function (its parameters stay out of the rollout's gradients); with
    ``shifts (b, 1)`` batch member ``i`` runs at time ``t + shifts[i]`` (windows at different times)."""
    if shifts is None:
        return lambda t, x: model(t, x)
    return lambda t, x: model(t + shifts.to(x.dtype), x)


# --- 3D-Var --------------------------------------------------------------------------------------------


@dataclass
class Var3D(_Variational):
    """3D-Var: at each observation time the analysis minimises ``J(x)`` with a static ``B`` (dapper's Var3D).

    For a linear ``H`` the minimiser is the Kalman update with ``B`` for the forecast covariance,
    ``x_a = x_b + B H^T (H B H^T + R)^{-1} (y - H x_b)``, reached in one Gauss-Newton step; for a
    nonlinear ``H`` Gauss-Newton iterates in ``w`` (``x = x_b + L_B w``) with ``H`` relinearised.
    The background is the forecast of the previous analysis.

    Args:
        background_std: ``B = diag(background_std^2)``, a scalar or ``(state_dim,)`` (state units).
        B: instead, a covariance ``(state_dim, state_dim)``, or ``'climatology'`` (from free runs
            of the model, :func:`climatology`).
        scale: factor on the covariance (DAPPER's ``xB``).
        iterations: most Gauss-Newton iterations (one suffices for a linear ``H``).
        tolerance: stop when the largest step in ``w`` is below it.
        spread: report the linearised analysis and background standard deviations.

    Example:
        >>> from geonn.assimilation import Var3D
        >>> Var3D(B="climatology", scale=0.1)
        Var3D(background_std=None, B='climatology', scale=0.1, iterations=10, tolerance=1e-10, spread=True)
    """

    background_std: float | torch.Tensor | None = None
    B: torch.Tensor | str | None = None
    scale: float = 1.0
    iterations: int = 10
    tolerance: float = 1e-10
    spread: bool = True

    def __post_init__(self):
        self._check_common()

    def assimilate(self, model, observations: Observations, dt: float, *, prior_mean=None, prior_spread=None,
                   ensemble=None, t0: float = 0.0, scheme="rk4", compile: bool = False) -> VariationalResult:
        """Cycle forecasts and 3D-Var analyses over every observation time.

        Same arguments (``compile`` too) as :meth:`geonn.assimilation.ETKF.assimilate`; the background at ``t0`` is
        ``prior_mean`` (or the mean of ``ensemble``); every analysis uses ``B`` (``prior_spread``
        is accepted for a uniform call but unused).
        """
        steps, step, x, _, factor, values, weights = self._setup(model, observations, dt, prior_mean, prior_spread,
                                                                 ensemble, t0, scheme, compile)
        operator = observations.operator
        rows = {key: [] for key in ("fm", "am", "as", "it", "cost")}
        current = 0
        with torch.no_grad():
            for k, target in enumerate(steps):
                if target > current:
                    x = propagate(model, x, target - current, dt, step, t0=t0 + current * dt, compile=compile)
                    current = target
                rows["fm"].append(x)
                x, covariance, used, cost = self._analyse(x, values[k], weights[k], operator, factor)
                rows["am"].append(x)
                rows["as"].append(torch.diagonal(covariance).clamp(min=0).sqrt())
                rows["it"].append(used)
                rows["cost"].append(cost)
        background_std = (factor**2).sum(1).sqrt().expand(len(steps), -1)
        return VariationalResult(
            times=observations.times.clone(), analysis_mean=torch.stack(rows["am"]),
            analysis_spread=torch.stack(rows["as"]) if self.spread else None, forecast_mean=torch.stack(rows["fm"]),
            forecast_spread=background_std.clone() if self.spread else None, ensemble=x.unsqueeze(0).clone(),
            iterations=torch.tensor(rows["it"]), cost=torch.tensor(rows["cost"], dtype=torch.float64))

    def analyse(self, background: torch.Tensor, observation: torch.Tensor, operator: ObservationOperator,
                error: ObservationError) -> torch.Tensor:
        """One analysis: the minimiser of ``J(x)`` for ``background (state_dim,)`` and ``observation (obs_dim,)``
        (NaN entries missing)."""
        background = _state("background", background)
        if not isinstance(operator, ObservationOperator):
            raise InputTypeError(f"operator: expected an ObservationOperator, got {describe(operator)}")
        if not isinstance(error, ObservationError):
            raise InputTypeError(f"error: expected an ObservationError, got {describe(error)}")
        if not isinstance(observation, torch.Tensor) or observation.dim() != 1 or observation.numel() != operator.obs_dim:
            raise InputError(f"observation: expected a 1-D tensor of {operator.obs_dim} values, got {describe(observation)}")
        values, weights = _weights(observation.unsqueeze(0), error, background.dtype)
        factor = self.background_factor(background.numel(), background.dtype)
        with torch.no_grad():
            return self._analyse(background, values[0], weights[0], operator, factor)[0]

    def _analyse(self, background, value, weight, operator, factor):
        def cost(w):  # (1, m) -> (1,)
            return 0.5 * (w**2).sum(-1) + 0.5 * (_whiten(weight, value - operator(background + w @ factor.T)) ** 2).sum(-1)

        w = torch.zeros_like(background).unsqueeze(0)
        for used in range(1, self.iterations + 1):
            x = background + factor @ w[0]
            G = (weight @ operator.linearise(x) @ factor).unsqueeze(0)
            delta, hessian = _gauss_newton_step(w, _whiten(weight, value - operator(x)).unsqueeze(0), G)
            if operator.is_linear:  # the exact minimiser: no line search
                w = w + delta
                break
            w, delta = _damped(cost, w, delta, cost(w))
            if float(delta.abs().max()) <= self.tolerance:
                break
        covariance = factor @ torch.cholesky_inverse(torch.linalg.cholesky(hessian[0])) @ factor.T
        return background + factor @ w[0], covariance, used, float(cost(w)[0])


# --- windows: the cycle shared by the 4D-Vars ----------------------------------------------------------------


@dataclass
class _Windows:
    """A batch of ``b`` assimilation windows of at most ``W`` observation times each."""

    length: int  # steps of the longest window
    offsets: torch.Tensor  # (b, W) steps from the window start (0 where padded)
    values: torch.Tensor  # (b, W, p), 0 where missing or padded
    weights: torch.Tensor  # (b, W, p, p), 0 where missing or padded
    times: torch.Tensor  # (b,) start times
    compile: bool = False  # fuse the no-gradient rollouts (geonn.assimilation.forecast.propagate)
    memo: list = field(default_factory=list)  # the last no-gradient trajectories, as (x0, trajectory)

    def gather(self, trajectory: torch.Tensor) -> torch.Tensor:
        """The states at the observation offsets ``(b, W, m)`` of trajectories ``(b, L + 1, m)``."""
        index = self.offsets.expand(trajectory.shape[0], -1).unsqueeze(-1).expand(-1, -1, trajectory.shape[-1])
        return torch.gather(trajectory, 1, index)

    def step_times(self, dt: float, dtype) -> torch.Tensor:
        """The time of every model step of each window ``(b, L, 1)``, broadcastable against states ``(b, L, m)``."""
        steps = dt * torch.arange(self.length, dtype=torch.float64)
        return (self.times.unsqueeze(-1) + steps).unsqueeze(-1).to(dtype)

    def tendency(self, model):
        shifts = self.times - self.times[0]
        return _plain(model, None if not bool(shifts.any()) else shifts.unsqueeze(-1))

    def free_run(self, model, step, x0: torch.Tensor, dt: float) -> torch.Tensor:
        """The trajectories ``(b, L + 1, m)`` from ``x0 (b, m)`` without gradients.

        The Gauss-Newton iterations integrate the same initial states more than once (the line
        search's accepted step is the next linearisation point; the first linearisation point
        is the background, whose run is the forecast): the first and the last two are kept and
        returned again, bit for bit the same."""
        for start, trajectory in self.memo:
            if start.shape == x0.shape and torch.equal(start, x0):
                return trajectory
        shifted = bool((self.times != self.times[0]).any())
        f = self.tendency(model) if shifted else model  # the model itself: one compiled entry for every window
        trajectory = propagate(f, x0, self.length, dt, step, t0=float(self.times[0]), trajectory=True,
                               compile=self.compile).transpose(0, 1)
        self.memo = [*self.memo[:1], *self.memo[1:][-1:], (x0, trajectory)]
        return trajectory


def _make_windows(rows: list[list[int]], starts: list[int], steps, values, weights, t0: float, dt: float) -> _Windows:
    b, width = len(rows), max(len(r) for r in rows)
    offsets = torch.zeros(b, width, dtype=torch.long)
    vals = torch.zeros(b, width, values.shape[1], dtype=values.dtype)
    wts = torch.zeros(b, width, *weights.shape[1:], dtype=weights.dtype)
    for i, (r, s) in enumerate(zip(rows, starts)):
        offsets[i, : len(r)] = torch.tensor([steps[k] - s for k in r])
        vals[i, : len(r)], wts[i, : len(r)] = values[r], weights[r]
    length = max(steps[r[-1]] - s for r, s in zip(rows, starts))
    times = torch.tensor([t0 + s * dt for s in starts], dtype=torch.float64)
    return _Windows(length, offsets, vals, wts, times)


class _Windowed(_Variational):
    window: int
    shift: int | None
    cycle: bool
    optimizer: str

    def _check_windowed(self) -> None:
        _check_int("window", self.window, 1)
        if self.shift is not None:
            _check_int("shift", self.shift, 1)
            if self.shift > self.window:
                raise InputError(f"shift: expected at most window={self.window} observation times, got {self.shift}")
        if not isinstance(self.cycle, bool):
            raise InputTypeError(f"cycle: expected True or False, got {describe(self.cycle)}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")

    def assimilate(self, model, observations: Observations, dt: float, *, prior_mean=None, prior_spread=None,
                   ensemble=None, t0: float = 0.0, scheme="rk4", compile: bool = False) -> VariationalResult:
        """Analyse window after window of ``window`` observation times.

        Same arguments as :meth:`geonn.assimilation.ETKF.assimilate` (``compile`` fuses the
        rollouts and step Jacobians that need no gradient: the Gauss-Newton iterations', the
        climatology's, not L-BFGS's). The first background is ``prior_mean`` at ``t0`` (or the mean of ``ensemble``) with standard deviation
        ``prior_spread`` if given (else ``B``). With ``cycle=True`` each later window's background
        is the previous analysis at its start, with ``B``; with ``cycle=False`` every window is
        analysed from ``prior_mean`` independently, all as one batch.
        """
        steps, step, prior, first, factor, values, weights = self._setup(model, observations, dt, prior_mean, prior_spread,
                                                                         ensemble, t0, scheme, compile)
        m, n = prior.numel(), len(steps)
        shift = self.window if self.shift is None else self.shift
        firsts = list(range(0, n, shift))  # window j assimilates rows firsts[j] .. ends[j] - 1 first
        ends = [min(first + shift, n) for first in firsts]
        rows = [list(range(max(0, end - self.window), end)) for end in ends]
        starts = [0 if r[0] == 0 else steps[r[0] - 1] for r in rows]
        out = {key: torch.full((n, m), math.nan, dtype=prior.dtype) for key in ("am", "av", "fm", "fv", "sv")}
        smoothed = torch.empty(steps[-1] + 1, m, dtype=prior.dtype)
        iterations, costs = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.float64)
        batches = [[j] for j in range(len(rows))] if self.cycle else [list(range(len(rows)))]
        background, previous_start, solved = prior.unsqueeze(0), 0, None
        for j, batch in enumerate(batches):
            windows = _make_windows([rows[i] for i in batch], [starts[i] for i in batch], steps, values, weights, t0, dt)
            windows.compile = compile
            if self.cycle and j > 0:  # the previous analysis at this window's start
                background = solved.trajectory[:, starts[batch[0]] - previous_start]
            elif not self.cycle:
                background = prior.expand(len(batch), m)
            solved = self._solve(model, step, windows, background, first if j == 0 or not self.cycle else factor,
                                 observations.operator, dt)
            previous_start = starts[batch[-1]]
            for i, window in enumerate(batch):
                r, start, new = rows[window], starts[window], slice(firsts[window], ends[window])
                fresh = [k - r[0] for k in range(firsts[window], ends[window])]
                smoothed[start : steps[r[-1]] + 1] = solved.trajectory[i, : steps[r[-1]] - start + 1]
                out["am"][new], out["fm"][new] = solved.analysis[i, fresh], solved.forecast[i, fresh]
                iterations[new], costs[new] = solved.iterations[i], float(solved.cost[i])
                if self.spread:
                    out["av"][new], out["fv"][new] = solved.analysis_var[i, fresh], solved.forecast_var[i, fresh]
                    out["sv"][r] = solved.analysis_var[i, : len(r)]
                    if r[0] > 0:  # the observation time at this window's start
                        out["sv"][r[0] - 1] = solved.start_var[i]
        spreads = {key: out[key].sqrt() if self.spread else None for key in ("av", "fv", "sv")}
        return VariationalResult(
            times=observations.times.clone(), analysis_mean=out["am"], analysis_spread=spreads["av"],
            forecast_mean=out["fm"], forecast_spread=spreads["fv"], ensemble=out["am"][-1:].clone(),
            smoothed_mean=smoothed[steps].clone(), smoothed_spread=spreads["sv"], smoothed=smoothed,
            smoothed_times=t0 + dt * torch.arange(steps[-1] + 1, dtype=torch.float64), iterations=iterations, cost=costs)

    def _one_window(self, model, observations, dt, background, t0, scheme):
        """The windows, step and background factor for a cost over all ``observations`` as one window."""
        if not isinstance(observations, Observations) or observations.operator is None:
            raise InputTypeError(f"observations: expected Observations with an operator, got {describe(observations)}")
        background = _state("background", background)
        steps = observations.steps(dt, t0)
        values, weights = _weights(observations.values, observations.error, background.dtype)
        step = scheme if isinstance(scheme, RungeKuttaStep) else RungeKuttaStep(scheme)
        factor = self.background_factor(background.numel(), background.dtype, model=model, x0=background, dt=dt, scheme=step)
        return _make_windows([list(range(len(steps)))], [0], steps, values, weights, t0, dt), step, background, factor


# --- strong-constraint 4D-Var ----------------------------------------------------------------------------


@dataclass
class Var4D(_Windowed):
    """Strong-constraint 4D-Var over windows of observation times; the control is the window's initial state.

    The trajectory is :func:`geonn.rollout` of the model with the chosen ``gradient`` method.
    ``optimizer='lbfgs'`` minimises ``J`` over ``w`` (``x_0 = x_b + L_B w``) with
    ``torch.optim.LBFGS`` and a strong Wolfe line search, the gradient flowing back through the
    rollout by ``gradient``; ``'gauss-newton'`` linearises the window's map ``x_0 -> (M_k(x_0))_k``
    (the Jacobians of all the window's steps from one batched ``torch.func.jacrev``, chained by a
    parallel prefix product; ``gradient`` plays no part) and solves the normal equations
    ``(I + G^T G) dw = G^T d - w``, ``G = R^{-1/2} H'_k M'_k L_B`` (dapper's Var4D), a few
    outer iterations. On a linear model one Gauss-Newton step is the exact minimiser, the
    Kalman smoother's estimate of ``x_0``.

    Args:
        window: observation times per window (1: each window spans one observation interval).
        shift: observation times a window slides by (default ``window``: windows side by side). With
            ``shift < window`` windows overlap, as DAPPER's (``shift=1``): each adds ``shift`` new
            observation times, starts from the previous analysis inside the previous window and so
            starts close to the minimum, which keeps long windows out of the wrong minima; earlier
            times are reused (the cost is ``window / shift`` times larger).
        background_std, B, scale: the background covariance, as in :class:`Var3D`.
        gradient: ``'backprop'``, ``'checkpoint'`` or ``'adjoint'`` (see :func:`geonn.integrate`).
        optimizer: ``'lbfgs'`` or ``'gauss-newton'``.
        iterations: most L-BFGS iterations, or Gauss-Newton steps, per window.
        tolerance: stop when the largest gradient entry (L-BFGS) or step (Gauss-Newton) in ``w`` is below it.
        cycle: background of a window = the previous analysis at its start (else ``prior_mean``, batched).
        spread: report the linearised analysis and background standard deviations (one Jacobian of
            the window more per window for L-BFGS).

    Example:
        >>> from geonn.assimilation import Var4D
        >>> Var4D(window=4, shift=2, B="climatology", scale=0.01, optimizer="gauss-newton")  # doctest: +ELLIPSIS
        Var4D(window=4, shift=2, background_std=None, B='climatology', scale=0.01, gradient='backprop', optimizer='gauss-newton', ...)
    """

    window: int = 1
    shift: int | None = None
    background_std: float | torch.Tensor | None = None
    B: torch.Tensor | str | None = None
    scale: float = 1.0
    gradient: str = "backprop"
    optimizer: str = "lbfgs"
    iterations: int = 50
    tolerance: float = 1e-8
    cycle: bool = True
    spread: bool = True

    def __post_init__(self):
        self._check_common()
        self._check_windowed()
        if self.gradient not in GRADIENTS:
            raise InputError(f"gradient: expected one of {GRADIENTS}, got {self.gradient!r}")

    def cost(self, model, x0: torch.Tensor, observations: Observations, dt: float, *, background, t0: float = 0.0,
             scheme="rk4") -> torch.Tensor:
        """``J(x0)`` for ``x0 (..., state_dim)`` over all ``observations`` as one window from ``t0``; shape ``x0.shape[:-1]``.

        Differentiable: the gradient flows through :func:`geonn.rollout` by ``gradient``.
        """
        windows, step, background, factor = self._one_window(model, observations, dt, background, t0, scheme)
        if not isinstance(x0, torch.Tensor) or x0.dim() == 0 or x0.shape[-1] != background.numel():
            raise InputError(f"x0: expected a tensor (..., {background.numel()}), got {describe(x0)}")
        flat = x0.reshape(-1, x0.shape[-1])
        w = torch.linalg.solve_triangular(factor, (flat - background).T, upper=False).T
        cost = self._cost(model, step, windows, background, factor, observations.operator, dt, w, flat)
        return cost.reshape(x0.shape[:-1])

    def _trajectory(self, model, step, windows, x0, dt, gradient):
        if not torch.is_grad_enabled():
            return windows.free_run(model, step, x0, dt)
        traj = rollout(windows.tendency(model), x0, windows.length, dt, step, t0=float(windows.times[0]), gradient=gradient)
        return traj.transpose(0, 1)  # (b, L + 1, m)

    def _cost(self, model, step, windows, background, factor, operator, dt, w, x0=None):
        x0 = background + w @ factor.T if x0 is None else x0
        states = windows.gather(self._trajectory(model, step, windows, x0, dt, self.gradient))
        residual = _whiten(windows.weights, windows.values - operator(states))
        return 0.5 * (w**2).sum(-1) + 0.5 * (residual**2).sum((-1, -2))

    def _linearise(self, model, step, windows, x0, dt):
        """States at the observation offsets ``(b, W, m)`` and their Jacobians ``(b, W, m, m)`` w.r.t. ``x0``.

        The Jacobian of every step along the trajectory comes from one batched ``torch.func.jacrev``
        of the Runge-Kutta step (``m`` outputs), and their running products ``M'_k = J_{k-1} .. J_0``
        from a parallel prefix product in ``log2(L)`` batched matrix products."""
        with torch.no_grad():
            trajectory = self._trajectory(model, step, windows, x0, dt, "backprop")
        b, m, length = x0.shape[0], x0.shape[-1], windows.length
        flows = torch.eye(m, dtype=x0.dtype).expand(b, 1, m, m)
        if length > 0:
            times, states = windows.step_times(dt, x0.dtype), trajectory[:, :-1]
            products = step_jacobians(model, step, times, states, dt, compile=windows.compile).permute(1, 2, 0, 3)
            shift = 1
            while shift < length:  # products[:, j] becomes J_j .. J_0 (a Hillis-Steele scan)
                products = torch.cat((products[:, :shift], products[:, shift:] @ products[:, :-shift]), dim=1)
                shift *= 2
            flows = torch.cat((flows, products), dim=1)  # (b, L + 1, m, m)
        index = windows.offsets.expand(b, -1)
        return windows.gather(trajectory), flows[torch.arange(b).unsqueeze(-1), index]

    def _solve(self, model, step, windows, background, factor, operator, dt):
        b, m = background.shape
        hessian, jac, used = None, None, 0
        if self.optimizer == "gauss-newton":
            w = torch.zeros_like(background)
            for used in range(1, self.iterations + 1):
                states, jac = self._linearise(model, step, windows, background + w @ factor.T, dt)
                residual = _whiten(windows.weights, windows.values - operator(states)).reshape(b, -1)
                G = (windows.weights @ operator.linearise(states) @ jac @ factor).reshape(b, -1, m)
                delta, hessian = _gauss_newton_step(w, residual, G)
                current = 0.5 * (w**2).sum(-1) + 0.5 * (residual**2).sum(-1)
                w, delta = _damped(lambda c: self._cost(model, step, windows, background, factor, operator, dt, c), w, delta, current)
                if float(delta.abs().max()) <= self.tolerance:
                    break
        else:
            w, used = _lbfgs(torch.zeros_like(background),
                             lambda c: self._cost(model, step, windows, background, factor, operator, dt, c),
                             self.iterations, self.tolerance, history=20)
        with torch.no_grad():
            x0 = background + w @ factor.T
            trajectory = self._trajectory(model, step, windows, x0, dt, self.gradient)
            background_states = windows.gather(self._trajectory(model, step, windows, background, dt, self.gradient))
            cost = self._cost(model, step, windows, background, factor, operator, dt, w)
        analysis_var = forecast_var = start_var = None
        if self.spread:
            if hessian is None:  # L-BFGS: linearise once at the analysis
                states, jac = self._linearise(model, step, windows, x0, dt)
                G = (windows.weights @ operator.linearise(states) @ jac @ factor).reshape(b, -1, m)
                _, hessian = _gauss_newton_step(w, torch.zeros(b, G.shape[1], dtype=w.dtype), G)
            carried = jac @ factor  # M'_k L_B: (b, W, m, m)
            inverse_root = torch.linalg.solve_triangular(torch.linalg.cholesky(hessian), torch.eye(m, dtype=w.dtype), upper=False)
            posterior_root = factor @ inverse_root.transpose(-1, -2)  # (b, m, m): P_0 = root root^T
            start_var = (posterior_root**2).sum(-1)
            analysis_var = ((jac @ posterior_root.unsqueeze(1)) ** 2).sum(-1)
            forecast_var = (carried**2).sum(-1)
        return _Solved(trajectory, windows.gather(trajectory), background_states, analysis_var, forecast_var, start_var,
                       [used] * b, cost)


# --- weak-constraint 4D-Var --------------------------------------------------------------------------------


@dataclass
class WeakVar4D(_Windowed):
    """Weak-constraint 4D-Var: the control is the state at every model step of the window.

    The model-error term ``1/2 sum_j |x_{j+1} - M(x_j)|^2_{Q^-1}`` is evaluated for all steps
    of all windows at once (one batched Runge-Kutta step, so ``f`` receives ``t`` as a tensor
    ``(b, L, 1)`` broadcastable against the states). ``optimizer='lbfgs'`` minimises over the
    trajectory scaled by the background standard deviations, starting from the background's free
    run; ``'gauss-newton'`` solves the dense normal equations of the whole trajectory (exact in one
    step for a linear model; memory ``((L + 1) state_dim)^2`` per window). As ``Q -> 0`` the
    solution tends to strong-constraint :class:`Var4D`'s, but the state formulation grows
    ill-conditioned (``~B / Q``): L-BFGS then needs many iterations; on a nonlinear model the
    Gauss-Newton line search then takes short steps over long windows (give it 30 iterations).

    Args:
        window: observation times per window.
        shift: observation times a window slides by (default ``window``), as in :class:`Var4D`.
        model_error_std: ``Q = diag(model_error_std^2)`` per model step, a scalar or ``(state_dim,)``.
        Q: instead, the model-error covariance per step ``(state_dim, state_dim)``.
        background_std, B, scale: the background covariance, as in :class:`Var3D`.
        optimizer: ``'lbfgs'`` or ``'gauss-newton'``.
        iterations: most L-BFGS iterations, or Gauss-Newton steps, per window.
        tolerance: stop when the largest gradient entry (L-BFGS) or step (Gauss-Newton) is below it.
        cycle, spread: as in :class:`Var4D`.

    Example:
        >>> from geonn.assimilation import WeakVar4D
        >>> WeakVar4D(window=2, model_error_std=0.01, B="climatology", scale=0.01)  # doctest: +ELLIPSIS
        WeakVar4D(window=2, shift=None, model_error_std=0.01, Q=None, background_std=None, B='climatology', ...)
    """

    window: int = 1
    shift: int | None = None
    model_error_std: float | torch.Tensor | None = None
    Q: torch.Tensor | None = None
    background_std: float | torch.Tensor | None = None
    B: torch.Tensor | str | None = None
    scale: float = 1.0
    optimizer: str = "lbfgs"
    iterations: int = 500
    tolerance: float = 1e-8
    cycle: bool = True
    spread: bool = True

    def __post_init__(self):
        self._check_common()
        self._check_windowed()
        _check_std_or_matrix("model_error_std", self.model_error_std, "Q", self.Q, allow_climatology=False)

    def cost(self, model, trajectory: torch.Tensor, observations: Observations, dt: float, *, background,
             t0: float = 0.0, scheme="rk4") -> torch.Tensor:
        """``J`` of trajectories ``(..., L + 1, state_dim)`` from ``t0`` to the last observation time; shape ``(...)``."""
        windows, step, background, factor = self._one_window(model, observations, dt, background, t0, scheme)
        m = background.numel()
        if not isinstance(trajectory, torch.Tensor) or trajectory.dim() < 2 or trajectory.shape[-2:] != (windows.length + 1, m):
            raise InputError(f"trajectory: expected a tensor (..., {windows.length + 1}, {m}), got {describe(trajectory)}")
        flat = trajectory.reshape(-1, windows.length + 1, m)
        model_factor = self._model_error_factor(m, flat.dtype)
        cost = 0.5 * (self._residuals(model, step, windows, background, factor, model_factor, observations.operator, dt, flat) ** 2).sum(-1)
        return cost.reshape(trajectory.shape[:-2])

    def _model_error_factor(self, m, dtype):
        if self.model_error_std is not None:
            return _std_factor("model_error_std", self.model_error_std, m, dtype)
        return _cov_factor("Q", self.Q, m, dtype)

    def _residuals(self, model, step, windows, background, factor, model_factor, operator, dt, X):
        """Whitened residuals ``(b, m + L m + W p)``: background, model error, observations."""
        b, times = X.shape[0], windows.step_times(dt, X.dtype)
        r_b = torch.linalg.solve_triangular(factor, (X[:, 0] - background).T, upper=False).T
        predicted = step(model, times, X[:, :-1], dt)
        r_q = torch.linalg.solve_triangular(model_factor, (X[:, 1:] - predicted).reshape(-1, X.shape[-1]).T, upper=False)
        r_o = _whiten(windows.weights, windows.values - operator(windows.gather(X)))
        return torch.cat((r_b, r_q.T.reshape(b, -1), r_o.reshape(b, -1)), dim=1)

    def _solve(self, model, step, windows, background, factor, operator, dt):
        b, m = background.shape
        model_factor = self._model_error_factor(m, background.dtype)

        def residuals(X):
            return self._residuals(model, step, windows, background, factor, model_factor, operator, dt, X)

        with torch.no_grad():  # the background's free run: the forecast, and where the optimisation starts
            free = windows.free_run(model, step, background, dt)
        X, used = free, 0
        if self.optimizer == "gauss-newton":
            for used in range(1, self.iterations + 1):
                jac, r = self._jacobian(residuals, X)
                normal = jac.transpose(-1, -2) @ jac
                delta = torch.cholesky_solve(-(jac.transpose(-1, -2) @ r.unsqueeze(-1)), torch.linalg.cholesky(normal))
                X, delta = _damped(lambda c: 0.5 * (residuals(c) ** 2).sum(-1), X, delta.reshape(X.shape), 0.5 * (r**2).sum(-1))
                if float(delta.abs().max()) <= self.tolerance:
                    break
        else:
            scale = (factor**2).sum(1).sqrt()  # the background standard deviations
            start = X
            Z, used = _lbfgs(torch.zeros_like(X), lambda z: 0.5 * (residuals(start + z * scale) ** 2).sum(-1),
                             self.iterations, self.tolerance, history=50)
            X = start + Z * scale
        with torch.no_grad():
            cost = 0.5 * (residuals(X) ** 2).sum(-1)
        forecast = windows.gather(free)
        analysis_var = forecast_var = start_var = None
        if self.spread:
            jac, _ = self._jacobian(residuals, X)
            prior_rows = m + windows.length * m  # background and model-error rows: the prior of the trajectory
            variances = self._variances(jac, m)
            analysis_var, start_var = windows.gather(variances), variances[:, 0]
            forecast_var = windows.gather(self._variances(jac[:, :prior_rows], m))
        return _Solved(X, windows.gather(X), forecast, analysis_var, forecast_var, start_var, [used] * b, cost)

    @staticmethod
    def _jacobian(residuals, X):
        """Jacobian ``(b, rows, (L + 1) m)`` of each window's residuals w.r.t. its trajectory (forward mode,
        one tangent per trajectory entry, shared by the independent windows), and the residuals."""
        jac, r = torch.func.jacfwd(lambda v: (residuals(X + v),) * 2, has_aux=True)(torch.zeros_like(X[0]))
        return jac.reshape(*r.shape, -1), r.detach()

    @staticmethod
    def _variances(jac, m):
        """Diagonal of ``(J^T J)^{-1}`` over the trajectory ``(b, L + 1, m)``."""
        covariance = torch.cholesky_inverse(torch.linalg.cholesky(jac.transpose(-1, -2) @ jac))
        return torch.diagonal(covariance, dim1=-2, dim2=-1).reshape(jac.shape[0], -1, m)
