"""Ensemble forecasts for the assimilation methods: the model integrated between observation times.

The filters, smoothers and 4D-Var integrate small states (``(members, state_dim)`` of a few
hundred numbers) for a few to a hundred steps, thousands of times; each Runge-Kutta step is a few
dozen tensor operations of microseconds each, so the overhead around the steps matters as much
as the steps. :func:`propagate` is :func:`geonn.rollout` (the same step, the same time grid, bit
for bit the same states) without storing the states it is not asked for, and with an optional
compiled path: ``compile=True`` fuses runs of ``K`` steps (``K`` the largest divisor of the step
count up to 10) into one ``torch.compile`` kernel, three to ten times faster than the eager loop
on Lorenz-63/96 ensembles once compiled (the first call for a new shape, step count or model
compiles for a few seconds; inductor caches the code on disk for later processes).
:func:`step_jacobians` gives 4D-Var the Jacobian of every step of a window at once, by one
reverse-mode pass (``torch.func.jacrev``), compiled too with ``compile=True``.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings

import torch

from ..integrators import RungeKuttaStep, rollout

_MAX_CHUNK = 25  # steps per compiled call: a 25-step assimilation cycle is one call (dynamo's guards
# cost ~100 us a call, more than the fused kernel of a few steps; compiling 25 steps takes ~30 s cold)
_RECOMPILE_LIMIT = 64
# One thread: the fused loops are far too small to split (as geonn.integrators' compiled chunks); the
# C++ wrapper calls the kernels without Python, which halves the cost of a call (~50 us).
_OPTIONS = {"cpp.threads": 1, "cpp_wrapper": True}
_COMPILED = None
_COMPILED_JACOBIANS = None
_LIMITS = None


def propagate(model, x: torch.Tensor, n_steps: int, dt: float, step: RungeKuttaStep, *, t0: float = 0.0,
              trajectory: bool = False, compile: bool = False) -> torch.Tensor:
    """Integrate ``x (..., state_dim)`` for ``n_steps`` steps of ``dt`` from time ``t0``, without gradients.

    Args:
        model: the tendency ``f(t, x)``.
        x: the initial states.
        n_steps: number of steps (>= 0).
        dt: the step (model time units).
        step: the Runge-Kutta step.
        t0: the time of ``x``.
        trajectory: return every state ``(n_steps + 1, ..., state_dim)`` (``x`` first) instead of the last.
        compile: fuse runs of steps with ``torch.compile`` (see the module docstring).

    Returns:
        The state after ``n_steps`` steps (shape of ``x``), or the trajectory. Eager, the states
        are those of :func:`geonn.rollout` bit for bit; compiled, they agree to round-off.

    Raises:
        NonFiniteError: as :func:`geonn.rollout`, naming the first step whose state is NaN or infinite.
    """
    if n_steps == 0:
        return x.unsqueeze(0).clone() if trajectory else x
    times = t0 + dt * torch.arange(n_steps + 1, dtype=torch.float64)  # the grid of geonn.rollout
    grid = times.to(x.dtype)
    start = x
    states = [x]
    with torch.no_grad():
        if compile:  # runs of `chunk` steps of the nominal dt (one cache entry for every t0) from each run's start
            chunk = _largest_divisor(n_steps, _MAX_CHUNK)
            fused = _compiled()
            with _limits(), _quiet():  # one cache entry per shape, chunk and model
                for t in grid[:-1:chunk].unbind():
                    block = fused(model, step, t, x, float(dt), chunk, trajectory)
                    if trajectory:
                        states.extend(block.unbind(0))
                        x = block[-1]
                    else:
                        x = block
        else:  # the steps of geonn.rollout: the grid's own differences
            dts = [b - a for a, b in itertools.pairwise(times.tolist())]
            for t, h in zip(grid[:-1].unbind(), dts):
                x = step(model, t, x, h)
                if trajectory:
                    states.append(x)
    if not bool(torch.isfinite(x).all()):  # the eager rollout names the first bad step
        rollout(model, start, n_steps, dt, step, t0=t0)
    return torch.stack(states) if trajectory else x


def _largest_divisor(n: int, limit: int) -> int:
    return max(k for k in range(1, min(n, limit) + 1) if n % k == 0)


def _chunk(f, step, t, x, h: float, k: int, every: bool):
    """``k`` steps from ``x`` at time ``t``: every state ``(k, ...)``, or only the last."""
    out = []
    for i in range(k):
        x = step(f, t + i * h, x, h)
        out.append(x)
    return torch.stack(out) if every else x


def _limits():
    """A reusable context raising dynamo's recompile limit (8 by default) for these functions' calls."""
    global _LIMITS
    if _LIMITS is None:
        _LIMITS = torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT)
    return _LIMITS


@contextlib.contextmanager
def _quiet():
    """Silence the deprecation warnings torch's own compiler modules raise while compiling."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        yield


def _compiled():
    global _COMPILED
    if _COMPILED is None:
        with _quiet():
            _COMPILED = torch.compile(_chunk, dynamic=False, options=_OPTIONS)
    return _COMPILED


def step_jacobians(model, step: RungeKuttaStep, times: torch.Tensor, states: torch.Tensor, dt: float, *,
                   compile: bool = False) -> torch.Tensor:
    """The Jacobian of one step from each of ``states (b, L, m)`` at ``times (b, L, 1)``, as ``(m, b, L, m)``.

    Entry ``[i, k, j, l]`` is ``d step(states[k, j])_i / d states[k, j, l]``. The steps are
    independent, so the Jacobian of the output summed over ``(b, L)`` holds each step's own: one
    ``torch.func.jacrev`` with ``m`` output rows. ``compile=True`` runs it through ``torch.compile``
    (the same numbers; one compilation per window shape).
    """
    if not compile:
        return _jacobians(model, step, times, states, dt)
    global _COMPILED_JACOBIANS
    if _COMPILED_JACOBIANS is None:
        with _quiet():
            _COMPILED_JACOBIANS = torch.compile(_jacobians, dynamic=False, options=_OPTIONS)
    with _limits(), _quiet():
        return _COMPILED_JACOBIANS(model, step, times, states, dt)


def _jacobians(model, step, times, states, dt):
    return torch.func.jacrev(lambda s: step(model, times, s, dt).sum((0, 1)))(states)
