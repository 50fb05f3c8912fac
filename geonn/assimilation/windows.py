"""Independent observation windows as one batch: cutting, observing, a first guess, 4D-Var and the EnKS.

The learned variational solver (:mod:`geonn.assimilation.learned`) is trained and scored on many
short windows, each assimilated on its own (no background from a previous window), as in
fablet2021. This module holds what such a window set needs, every function batched over windows
(a tensor dimension, never a Python loop over windows):

- :func:`cut_windows` slices trajectories into windows ``(windows, steps, state_dim)``;
- :func:`observe_windows` masks and perturbs them: observations every ``every`` steps from the
  window start, none in the first and last ``edge`` steps, Gaussian noise; NaN where unobserved;
- :func:`interpolate_observations`: the linear interpolation of the observations in time (held
  constant before the first and after the last), the first guess of fablet2021's solvers;
- :class:`WindowVar4D`: strong-constraint 4D-Var over each window, the state at the window's
  first step as the control, Levenberg-Marquardt with a damping per window (optionally
  quasi-static: the observations enter a few at a time, pires1996);
- :class:`WindowEnKS`: the ensemble Kalman smoother over each window (evensen2000) from a
  climatological ensemble, every step of the window smoothed by the ETKF transforms of the
  later analyses.

Layout: windows first, ``(windows, steps, state_dim)``, as the training windows of
:func:`geonn.training.make_windows`; step ``k`` of a window is time ``k dt`` from its start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError, InputTypeError, describe
from ..integrators import RungeKuttaStep
from .ensemble import sqrt_update


def _check_windows(name: str, values, allow_nan: bool = False) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or not values.is_floating_point() or values.dim() != 3:
        raise InputTypeError(f"{name}: expected a floating-point tensor (windows, steps, state_dim), got {describe(values)}")
    if values.shape[1] < 2 or values.shape[0] < 1:
        raise InputError(f"{name}: expected at least one window of at least 2 steps, got shape {tuple(values.shape)}")
    bad = torch.isinf(values).any() if allow_nan else ~torch.isfinite(values).all()
    if bool(bad):
        raise InputError(f"{name}: expected finite values{' (NaN where unobserved)' if allow_nan else ''}, got inf or NaN")
    return values


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {describe(value)}")
    return value


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{name}: expected a positive finite number, got {describe(value)}")
    return float(value)


# --- windows and their observations ------------------------------------------------------------------


def cut_windows(trajectory: torch.Tensor, length: int, stride: int) -> torch.Tensor:
    """Windows of ``length`` steps, starting every ``stride`` steps, of trajectories ``(time, ..., state_dim)``.

    Returns:
        ``(windows, length, state_dim)``: the windows of the first trajectory in time order, then
        those of the next (extra dimensions of ``trajectory`` are independent runs).
    """
    _check_int("length", length, 2)
    _check_int("stride", stride, 1)
    if not isinstance(trajectory, torch.Tensor) or trajectory.dim() < 2 or trajectory.shape[0] < length:
        raise InputError(f"trajectory: expected (time >= {length}, ..., state_dim), got {describe(trajectory)}")
    runs = trajectory.reshape(trajectory.shape[0], -1, trajectory.shape[-1])  # (time, runs, D)
    windows = runs.unfold(0, length, stride)  # (starts, runs, D, length)
    return windows.permute(1, 0, 3, 2).reshape(-1, length, trajectory.shape[-1]).contiguous()


def observation_mask(steps: int, state_dim: int, every: int, edge: int) -> torch.Tensor:
    """Boolean ``(steps, state_dim)``: every component observed at steps ``k every`` with ``edge <= k every < steps - edge``."""
    _check_int("every", every, 1)
    _check_int("edge", edge, 0)
    index = torch.arange(steps)
    observed = (index % every == 0) & (index >= edge) & (index < steps - edge)
    if not bool(observed.any()):
        raise InputError(f"every, edge: no observation left in a window of {steps} steps (every={every}, edge={edge})")
    return observed.unsqueeze(-1).expand(steps, state_dim).clone()


def observe_windows(truth: torch.Tensor, every: int, edge: int, error_std: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Noisy observations of ``truth`` ``(windows, steps, D)``: NaN where unobserved (see :func:`observation_mask`).

    The noise is ``N(0, error_std^2)``, drawn independently for every window (overlapping windows
    get their own draws), in ``truth``'s units.
    """
    _check_windows("truth", truth)
    _check_positive("error_std", error_std)
    mask = observation_mask(truth.shape[1], truth.shape[2], every, edge)
    noise = torch.randn(truth.shape, generator=generator, dtype=torch.float64).to(truth.dtype)
    values = truth + error_std * noise
    return torch.where(mask, values, torch.full_like(values, math.nan))


def interpolate_observations(values: torch.Tensor, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Linear interpolation in time of each component of ``values`` ``(windows, steps, D)`` (NaN = missing).

    Held constant before the first and after the last observation of a component; ``fill``
    (a scalar or ``(D,)``) where a component of a window has no observation at all.
    """
    _check_windows("values", values, allow_nan=True)
    observed = ~torch.isnan(values)
    steps = values.shape[1]
    index = torch.arange(steps, device=values.device).view(1, -1, 1).expand_as(values)
    # the last observed step at or before k, and the first at or after k (-1 / steps when none)
    before = torch.where(observed, index, torch.full_like(index, -1)).cummax(dim=1).values
    after = torch.where(observed, index, torch.full_like(index, steps)).flip(1).cummin(dim=1).values.flip(1)
    has_before, has_after = before >= 0, after < steps
    left = torch.where(has_before, before, after).clamp(0, steps - 1)
    right = torch.where(has_after, after, before).clamp(0, steps - 1)
    filled = torch.nan_to_num(values)
    y_left, y_right = filled.gather(1, left), filled.gather(1, right)
    span = (right - left).to(values.dtype)
    weight = torch.where(span > 0, (index - left).to(values.dtype) / span.clamp(min=1), torch.zeros_like(span))
    out = y_left + weight * (y_right - y_left)
    fill = torch.as_tensor(fill, dtype=values.dtype, device=values.device).expand(values.shape[-1])
    none = ~(has_before | has_after)
    return torch.where(none, fill.expand_as(out), out)


def window_rmse(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """The reconstruction RMSE over every window, step and component (fablet2021's score), state units."""
    return float((estimate - truth).pow(2).mean().sqrt())


def _trajectory(model, step: RungeKuttaStep, x0: torch.Tensor, n_steps: int, dt: float) -> torch.Tensor:
    """``(..., n_steps + 1, D)`` from ``x0 (..., D)``, by plain step calls (forward-mode differentiable)."""
    states = [x0]
    t = torch.zeros((), dtype=x0.dtype)
    for _ in range(n_steps):
        states.append(step(model, t, states[-1], dt))
    return torch.stack(states, dim=-2)


# --- strong-constraint 4D-Var over each window ----------------------------------------------------------


@dataclass
class WindowVar4D:
    """Strong-constraint 4D-Var over independent windows, each from its own first guess, all as one batch.

    For window ``b`` with observations ``y_k`` at steps ``s_k`` (every present component), the
    control is its first state ``x_0`` and the cost

        ``J(x_0) = 1/2 |x_0 - x_b|^2_{B^-1}  +  1/2 sum_k |y_k - M_{s_k}(x_0)|^2 / sigma^2``

    with an optional background ``x_b``, ``B`` (for windows assimilated on their own, the
    climatology: without it nothing constrains the components of ``x_0`` that the model damps
    before the first observation, the stable direction of Lorenz-63). ``M_s`` is ``s`` steps of the scheme with the model. Levenberg-Marquardt
    (more1978) minimises it: the Jacobian of the trajectory w.r.t. ``x_0`` is the product of the
    Runge-Kutta steps' Jacobians (reverse mode through one step, all states at once, as
    :class:`~geonn.assimilation.Var4D`'s Gauss-Newton); each window solves its own damped normal equations
    ``(J^T J + mu diag(J^T J)) delta = -J^T r`` and keeps its own damping ``mu`` (divided by 3
    after a step that lowers its cost, multiplied by 4 and the step refused otherwise).

    With ``stages > 1`` (quasi-static 4D-Var, pires1996) the observations enter in ``stages``
    groups of consecutive times, each stage minimising from the previous stage's optimum:
    long windows of a chaotic model have many local minima, and lengthening the window step by
    step follows the one near the truth.

    Args:
        iterations: Levenberg-Marquardt iterations per stage.
        stages: number of quasi-static stages (1: all observations at once).
        damping: the initial ``mu``.
        tolerance: stop a stage once every window's step is below it (state units, largest entry).

    Example:
        >>> from geonn.assimilation.windows import WindowVar4D
        >>> WindowVar4D(iterations=20, stages=4)
        WindowVar4D(iterations=20, stages=4, damping=0.001, tolerance=1e-06)
    """

    iterations: int = 30
    stages: int = 1
    damping: float = 1e-3
    tolerance: float = 1e-6

    def __post_init__(self):
        _check_int("iterations", self.iterations, 1)
        _check_int("stages", self.stages, 1)
        _check_positive("damping", self.damping)
        _check_positive("tolerance", self.tolerance)

    def assimilate_windows(self, model, values: torch.Tensor, dt: float, error_std: float, *,
                           background_mean=None, background_covariance=None, first_guess: torch.Tensor | None = None,
                           scheme="rk4") -> torch.Tensor:
        """The 4D-Var trajectory of every window.

        Args:
            model: the tendency ``f(t, x)`` (a reference model or a learned one).
            values: observations ``(windows, steps, D)``, NaN where missing (state units).
            dt: the model step (model time units).
            error_std: the observation error standard deviation (state units).
            background_mean, background_covariance: ``x_b`` ``(D,)`` or ``(windows, D)`` and ``B``
                ``(D, D)``; both or neither (no background term).
            first_guess: the first iterate of ``x_0`` ``(windows, D)``; default the window's first
                row of :func:`interpolate_observations`.
            scheme: a tableau name or a :class:`~geonn.RungeKuttaStep`.

        Returns:
            The analysed trajectories ``(windows, steps, D)``.
        """
        _check_windows("values", values, allow_nan=True)
        _check_positive("dt", dt)
        sigma = _check_positive("error_std", error_std)
        step = scheme if isinstance(scheme, RungeKuttaStep) else RungeKuttaStep(scheme)
        n_windows, steps, dim = values.shape
        if first_guess is None:
            first_guess = interpolate_observations(values)[:, 0]
        elif not isinstance(first_guess, torch.Tensor) or first_guess.shape != (n_windows, dim):
            raise InputError(f"first_guess: expected a tensor ({n_windows}, {dim}), got {describe(first_guess)}")
        first_guess = first_guess.to(values.dtype)
        background = None
        if (background_mean is None) != (background_covariance is None):
            raise InputError("background_mean, background_covariance: expected both or neither, got one")
        if background_mean is not None:
            mean = torch.as_tensor(background_mean, dtype=values.dtype)
            covariance = torch.as_tensor(background_covariance, dtype=values.dtype)
            if mean.shape[-1:] != (dim,) or mean.dim() > 2 or covariance.shape != (dim, dim):
                raise InputError(f"background_mean, background_covariance: expected ({dim},) and ({dim}, {dim}), "
                                 f"got {describe(mean)} and {describe(covariance)}")
            factor, info = torch.linalg.cholesky_ex(covariance)
            if int(info) != 0:
                raise InputError("background_covariance: expected a symmetric positive-definite matrix")
            background = (mean.expand(n_windows, dim), torch.linalg.inv(factor))
        present = ~torch.isnan(values)
        observed_steps = present.any(-1).any(0).nonzero().squeeze(-1)
        if observed_steps.numel() == 0:
            raise InputError("values: expected at least one observation, got only NaN")
        filled = torch.nan_to_num(values)
        x0 = first_guess.clone()
        with torch.no_grad():
            groups = torch.tensor_split(observed_steps, min(self.stages, observed_steps.numel()))
            for group in groups:
                last = int(group[-1])
                weight = present[:, : last + 1].to(values.dtype) / sigma
                x0 = self._minimise(model, step, x0, background, filled[:, : last + 1], weight, dt)
            return _trajectory(model, step, x0, steps - 1, dt)

    def _minimise(self, model, step, x0, background, targets, weight, dt):
        n_windows, dim = x0.shape
        eye = torch.eye(dim, dtype=x0.dtype)

        def residuals(x, trajectory=None):
            if trajectory is None:
                trajectory = _trajectory(model, step, x, targets.shape[1] - 1, dt)
            r = (weight * (trajectory - targets)).flatten(1)
            if background is not None:
                r = torch.cat((r, (x - background[0]) @ background[1].T), dim=1)
            return r

        def linearise(x):
            trajectory = _trajectory(model, step, x, targets.shape[1] - 1, dt)
            flows = _flows(model, step, trajectory, dt)  # (windows, steps, D, D): d x_k / d x_0
            jac = (weight.unsqueeze(-1) * flows).flatten(1, 2)
            if background is not None:
                jac = torch.cat((jac, background[1].expand(n_windows, dim, dim)), dim=1)
            return residuals(x, trajectory), jac

        mu = torch.full((n_windows,), self.damping, dtype=x0.dtype)
        r, jac = linearise(x0)
        cost = 0.5 * (r**2).sum(-1)
        for _ in range(self.iterations):
            normal = jac.transpose(-1, -2) @ jac
            gradient = (jac.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
            scale = torch.diagonal(normal, dim1=-2, dim2=-1).clamp(min=1e-12)
            damped = normal + (mu.view(-1, 1) * scale).unsqueeze(-1) * eye
            delta = torch.linalg.solve(damped, gradient)
            if float(delta.abs().max()) <= self.tolerance:
                break
            trial = x0 - delta
            cost_trial = 0.5 * (residuals(trial) ** 2).sum(-1)
            better = torch.isfinite(cost_trial) & (cost_trial < cost)
            if bool(better.any()):
                x0 = torch.where(better.unsqueeze(-1), trial, x0)
                cost = torch.where(better, cost_trial, cost)
                r, jac = linearise(x0)
            mu = torch.where(better, (mu / 3).clamp(min=1e-12), (mu * 4).clamp(max=1e12))
        return x0


def _flows(model, step: RungeKuttaStep, trajectory: torch.Tensor, dt: float) -> torch.Tensor:
    """The tangent linear flows ``d x_k / d x_0`` ``(windows, steps, D, D)`` along trajectories ``(windows, steps, D)``.

    The Jacobian of every step comes from one reverse-mode ``torch.func.jacrev`` of a single
    Runge-Kutta step over all the states at once (the steps are independent, so the Jacobian of
    the summed output holds each one's own; ``D`` backward passes); the running products are a
    sequential scan of small batched matrix products."""
    windows, steps, dim = trajectory.shape
    t = torch.zeros((), dtype=trajectory.dtype)
    states = trajectory[:, :-1].detach()
    jacobians = torch.func.jacrev(lambda s: step(model, t, s, dt).sum((0, 1)))(states)  # (D, windows, steps - 1, D)
    jacobians = jacobians.permute(1, 2, 0, 3)
    flows = [torch.eye(dim, dtype=trajectory.dtype).expand(windows, dim, dim)]
    for k in range(steps - 1):
        flows.append(jacobians[:, k] @ flows[-1])
    return torch.stack(flows, dim=1)


# --- the ensemble Kalman smoother over each window -----------------------------------------------------


@dataclass
class WindowEnKS:
    """The ensemble Kalman smoother (evensen2000) over independent windows, every step smoothed, all as one batch.

    Each window starts from ``members`` draws of ``N(mean, std^2)`` (a climatology: no
    information from before the window), integrated step by step with the model. At each
    observation time the ETKF analysis (the symmetric square root of
    :func:`~geonn.assimilation.sqrt_update`) maps the forecast anomalies ``A`` to
    ``(1 w^T + T) A``; the same ensemble-space map is applied to the ensembles of every earlier
    step of the window, which makes the estimate at step ``k`` the smoother's given all the
    window's observations (the EnKS with a lag as long as the window). ``inflation`` multiplies
    the current anomalies after each analysis. Missing components are left out of the analysis
    by a zero weight on their whitened rows (the ETKF update does not change when a row of the
    whitened observed anomalies and innovation is zero).

    Args:
        members: ensemble size ``N`` (>= 2).
        inflation: multiplicative inflation of the analysis anomalies (1 = none).
        seed: seed of the initial ensembles.

    Example:
        >>> from geonn.assimilation.windows import WindowEnKS
        >>> WindowEnKS(members=20, inflation=1.02)
        WindowEnKS(members=20, inflation=1.02, seed=0)
    """

    members: int = 20
    inflation: float = 1.0
    seed: int = 0

    def __post_init__(self):
        _check_int("members", self.members, 2)
        _check_positive("inflation", self.inflation)
        _check_int("seed", self.seed, 0)

    def initial_ensembles(self, n_windows: int, mean: torch.Tensor, std: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """The windows' initial ensembles ``(windows, N, D)`` drawn from ``N(mean, std^2)`` with this seed."""
        generator = torch.Generator().manual_seed(self.seed)
        mean, std = torch.as_tensor(mean, dtype=dtype), torch.as_tensor(std, dtype=dtype)
        noise = torch.randn((n_windows, self.members, mean.numel()), generator=generator, dtype=torch.float64).to(dtype)
        return mean + std * noise

    def assimilate_windows(self, model, values: torch.Tensor, dt: float, error_std: float, *, mean=None, std=None,
                           ensembles: torch.Tensor | None = None, scheme="rk4") -> torch.Tensor:
        """The smoothed mean of every window at every step, ``(windows, steps, D)``.

        Args:
            model: the tendency ``f(t, x)``.
            values: observations ``(windows, steps, D)``, NaN where missing.
            dt: the model step; error_std: the observation error standard deviation.
            mean, std: the climatological mean and standard deviation ``(D,)`` of the initial
                ensembles (or give ``ensembles (windows, N, D)`` directly).
            scheme: a tableau name or a :class:`~geonn.RungeKuttaStep`.
        """
        _check_windows("values", values, allow_nan=True)
        _check_positive("dt", dt)
        sigma = _check_positive("error_std", error_std)
        step = scheme if isinstance(scheme, RungeKuttaStep) else RungeKuttaStep(scheme)
        n_windows, steps, dim = values.shape
        if ensembles is None:
            if mean is None or std is None:
                raise InputError("mean, std: expected the climatology of the initial ensembles (or ensembles=), got None")
            ensembles = self.initial_ensembles(n_windows, mean, std, values.dtype)
        elif not isinstance(ensembles, torch.Tensor) or ensembles.dim() != 3 or ensembles.shape[0] != n_windows \
                or ensembles.shape[2] != dim:
            raise InputError(f"ensembles: expected a tensor ({n_windows}, N, {dim}), got {describe(ensembles)}")
        present = ~torch.isnan(values)
        observed_steps = present.any(-1).any(0)
        t = torch.zeros((), dtype=values.dtype)
        with torch.no_grad():
            trajectory = ensembles.new_empty((n_windows, ensembles.shape[1], steps, dim))  # (windows, N, steps, D)
            trajectory[:, :, 0] = ensembles
            for k in range(steps):
                if k > 0:
                    trajectory[:, :, k] = step(model, t, trajectory[:, :, k - 1], dt)
                if not bool(observed_steps[k]):
                    continue
                weight = present[:, k].to(values.dtype) / sigma  # (windows, D): 0 where missing
                observed = trajectory[:, :, k] * weight.unsqueeze(1)
                innovation = torch.nan_to_num(values[:, k]) * weight - observed.mean(1)
                past = trajectory[:, :, : k + 1]
                means = past.mean(1, keepdim=True)
                increment, analysis = sqrt_update((past - means).flatten(2), observed - observed.mean(1, keepdim=True),
                                                  innovation)
                trajectory[:, :, : k + 1] = means + (increment.unsqueeze(1) + analysis).view_as(past)
                if self.inflation != 1.0:
                    current = trajectory[:, :, k]
                    centre = current.mean(1, keepdim=True)
                    trajectory[:, :, k] = centre + self.inflation * (current - centre)
            return trajectory.mean(1)
