"""Integrate a tendency ``f(t, x)`` over a fixed time grid with a chosen gradient method."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence

import torch

from ..errors import InputError, InputTypeError, NonFiniteError, describe
from .step import RungeKuttaStep
from .tableaux import ButcherTableau

GRADIENTS = ("backprop", "checkpoint", "adjoint")
_COMPILE_CHUNK = 10  # steps fused into one compiled call


def rollout(f, x0: torch.Tensor, n_steps: int, dt: float, scheme="rk4", *, t0: float = 0.0, **kwargs) -> torch.Tensor:
    """Integrate ``n_steps`` steps of size ``dt`` from ``x0``; see :func:`integrate` for the options.

    Returns the trajectory of shape ``(n_steps + 1, *x0.shape)``, starting with ``x0``.
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or not 0 <= n_steps < 2**31:
        raise InputError(f"n_steps: expected an integer in [0, 2**31), got {describe(n_steps)}")
    dt = _check_dt(dt)
    if isinstance(t0, bool) or not isinstance(t0, (int, float)) or not math.isfinite(t0):
        raise InputError(f"t0: expected a finite start time, got {describe(t0)}")
    if isinstance(x0, torch.Tensor):
        _check_memory("n_steps", n_steps + 1, x0)
    times = t0 + dt * torch.arange(n_steps + 1, dtype=torch.float64)
    return integrate(f, x0, times, scheme, **kwargs)


def integrate(
    f: Callable,
    x0: torch.Tensor,
    times,
    scheme: str | ButcherTableau | RungeKuttaStep = "rk4",
    *,
    gradient: str = "backprop",
    segments: int | None = None,
    nonfinite: str = "raise",
    compile: bool = False,
) -> torch.Tensor:
    """Integrate ``dx/dt = f(t, x)`` from ``x0`` over the grid ``times``, one scheme step per interval.

    Args:
        f: the tendency ``f(t, x) -> dx/dt``, ``x`` of shape ``(..., state_dim)``: a true model from
            :mod:`geonn.dynamics` or a learned operator from :mod:`geonn.operators`.
        x0: initial state, shape ``(..., state_dim)``, floating point, finite.
        times: 1-D, strictly increasing grid of ``n_steps + 1`` times (model time units) whose first
            entry is the time of ``x0``.
        scheme: a tableau name, a :class:`ButcherTableau`, or a (possibly learnable)
            :class:`RungeKuttaStep`.
        gradient: how gradients flow back through the rollout:
            ``"backprop"`` (the discrete adjoint: autograd through every stage; memory ~ n_steps),
            ``"checkpoint"`` (keep only the first state of each of ``segments`` segments and
            recompute each segment on the backward pass; memory ~ sqrt(n_steps)), or
            ``"adjoint"`` (the continuous adjoint: the adjoint ODE integrated backward on the same
            grid by ``torchdiffeq.odeint_adjoint`` with the same tableau; memory flat in n_steps).
        segments: number of checkpoint segments (default ``ceil(sqrt(n_steps))``).
        nonfinite: ``"raise"`` (default) raises :class:`~geonn.errors.NonFiniteError` naming the first
            step whose state is NaN or infinite (its ``step`` and ``time`` attributes); ``"keep"``
            returns the trajectory as it is, and :func:`diverged_members` / :func:`divergence_steps`
            flag the members (leading dimensions of ``x0``) that diverged and when.
        compile: fuse steps with ``torch.compile`` when no gradient is needed (fast long rollouts;
            the first call compiles for a few seconds).

    Returns:
        The trajectory, shape ``(n_steps + 1, *x0.shape)``, with ``x0`` first.

    Example:
        >>> import torch, geonn
        >>> x0 = torch.tensor([1.0, 1.0, 20.0], dtype=torch.float64)
        >>> traj = geonn.integrate(geonn.Lorenz63(), x0, torch.linspace(0, 1, 101), "rk4")
        >>> traj.shape
        torch.Size([101, 3])
    """
    if not callable(f):
        raise InputTypeError(f"f: expected a tendency f(t, x), got {describe(f)}")
    step = scheme if isinstance(scheme, RungeKuttaStep) else RungeKuttaStep(scheme)
    x0 = _check_state(f, x0)
    times = _check_times(times)
    if gradient not in GRADIENTS:
        raise InputError(f"gradient: expected one of {GRADIENTS}, got {gradient!r}")
    if nonfinite not in ("raise", "keep"):
        raise InputError(f"nonfinite: expected 'raise' or 'keep', got {nonfinite!r}")
    if segments is not None and (isinstance(segments, bool) or not isinstance(segments, int) or segments < 1):
        raise InputError(f"segments: expected an integer >= 1 or None, got {describe(segments)}")
    n_steps = times.numel() - 1
    if n_steps == 0:
        return x0.unsqueeze(0).clone()
    _check_memory("times", n_steps + 1, x0)

    needs_grad = torch.is_grad_enabled() and (
        x0.requires_grad or any(p.requires_grad for p in _parameters(f)) or any(p.requires_grad for p in step.parameters())
    )
    if not needs_grad:
        traj = _integrate_no_grad(f, step, x0, times, compile)
    elif gradient == "backprop":
        traj = _integrate_backprop(f, step, x0, times, 0, n_steps)
    elif gradient == "checkpoint":
        traj = _integrate_checkpoint(f, step, x0, times, segments)
    else:
        from .adjoint import integrate_adjoint

        traj = integrate_adjoint(f, step, x0, times)
    if nonfinite == "raise":
        check_finite(traj, times)
    return traj


def check_finite(traj: torch.Tensor, times: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` naming the first step of ``traj`` (time-first) that is not finite."""
    with torch.no_grad():
        # A Runge-Kutta update x + h * (...) never turns a NaN or inf entry finite again, so the
        # last state tells whether any step failed; only then is the whole trajectory searched.
        if bool(torch.isfinite(traj[-1]).all()):
            return
        finite = torch.isfinite(traj)
        bad_steps = (~finite.reshape(traj.shape[0], -1).all(dim=1)).nonzero()
        k = int(bad_steps[0])
    t = float(times[k])
    raise NonFiniteError(
        f"trajectory became non-finite (NaN or inf) at step {k} (t = {t:g}): the model diverged; "
        "reduce dt, check the model, or pass nonfinite='keep' to get the trajectory anyway",
        step=k,
        time=t,
    )


def diverged_members(trajectory: torch.Tensor) -> torch.Tensor:
    """Which members of a rollout kept with ``nonfinite="keep"`` diverged (became NaN or infinite).

    Args:
        trajectory: time first, shape ``(time, *members, state_dim)``, as :func:`integrate` and
            :func:`rollout` return it (``members`` are the leading dimensions of ``x0``).

    Returns:
        A boolean tensor of shape ``members`` (0-d for a single state): True where any state of that
        member, at any time, has a NaN or infinite component. Use it to drop or report those members.

    Example:
        >>> import torch, geonn
        >>> x0 = torch.tensor([[1.0, 1.0, 20.0], [1e30, 1e30, 1e30]], dtype=torch.float64)
        >>> traj = geonn.rollout(geonn.Lorenz63(), x0, 50, 0.01, nonfinite="keep")
        >>> geonn.integrators.diverged_members(traj)
        tensor([False,  True])
    """
    _check_trajectory(trajectory)
    with torch.no_grad():
        finite = torch.isfinite(trajectory).all(dim=-1).all(dim=0)
    return ~finite


def divergence_steps(trajectory: torch.Tensor) -> torch.Tensor:
    """The first step at which each member of a rollout became NaN or infinite, -1 where it never did.

    Args:
        trajectory: shape ``(time, *members, state_dim)`` (see :func:`diverged_members`).

    Returns:
        A long tensor of shape ``members``: the index along time of the first non-finite state, or -1.
    """
    _check_trajectory(trajectory)
    with torch.no_grad():
        bad = ~torch.isfinite(trajectory).all(dim=-1)  # (time, *members)
        first = torch.where(bad.any(dim=0), bad.to(torch.int8).argmax(dim=0), -1)
    return first.to(torch.long)


def _check_trajectory(trajectory) -> None:
    if not isinstance(trajectory, torch.Tensor) or not trajectory.is_floating_point():
        raise InputTypeError(f"trajectory: expected a floating-point tensor (time, ..., state_dim), got {describe(trajectory)}")
    if trajectory.dim() < 2 or trajectory.shape[0] == 0 or trajectory.shape[-1] == 0:
        raise InputError(f"trajectory: expected shape (time, ..., state_dim) with time, state_dim >= 1, got {tuple(trajectory.shape)}")


# --- checks -------------------------------------------------------------------------------


def _physical_memory() -> int | None:
    """This machine's physical memory in bytes, where the system says (Linux, macOS), else None."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_memory(name: str, n_states: int, x0: torch.Tensor) -> None:
    """Refuse a trajectory of ``n_states`` states like ``x0`` (and its times) larger than physical memory:
    better an error now than the machine swapping or the process killed when it fills."""
    size = n_states * (x0.numel() * x0.element_size() + 8)
    memory = _physical_memory()
    if memory is not None and size > memory:
        raise InputError(
            f"{name}: a trajectory of {n_states} states of shape {tuple(x0.shape)} takes {size / 2**30:.3g} GiB, more "
            f"than this machine's {memory / 2**30:.3g} GiB of memory; integrate in pieces"
        )


def _parameters(f):
    return f.parameters() if isinstance(f, torch.nn.Module) else ()


def _check_dt(dt) -> float:
    if isinstance(dt, torch.Tensor):
        if dt.numel() != 1:
            raise InputError(f"dt: expected a positive scalar, got {describe(dt)}")
        dt = float(dt)
    if isinstance(dt, bool) or not isinstance(dt, (int, float)):
        raise InputTypeError(f"dt: expected a positive number, got {describe(dt)}")
    if not math.isfinite(dt) or dt <= 0:
        raise InputError(f"dt: expected a positive finite step size, got {dt!r}")
    return float(dt)


def _check_state(f, x0) -> torch.Tensor:
    if not isinstance(x0, torch.Tensor):
        raise InputTypeError(f"x0: expected a torch.Tensor of shape (..., state_dim), got {describe(x0)}")
    if not x0.is_floating_point():
        raise InputTypeError(f"x0: expected a floating-point tensor, got dtype {x0.dtype}")
    if x0.dim() == 0 or x0.shape[-1] == 0 or x0.numel() == 0:
        raise InputError(f"x0: expected a non-empty state of shape (..., state_dim), got shape {tuple(x0.shape)}")
    state_dim = getattr(f, "state_dim", None)
    if state_dim is not None and x0.shape[-1] != state_dim:
        raise InputError(
            f"x0: expected last dimension {state_dim} (the state dimension of {type(f).__name__}), "
            f"got shape {tuple(x0.shape)}"
        )
    with torch.no_grad():
        if not bool(torch.isfinite(x0).all()):
            raise InputError(f"x0: expected a finite initial state, got {int((~torch.isfinite(x0)).sum())} NaN or inf entries")
    return x0


def _check_times(times) -> torch.Tensor:
    if isinstance(times, torch.Tensor):
        t = times.detach().to(torch.float64)
    elif isinstance(times, Sequence) or hasattr(times, "__array__"):
        try:
            t = torch.as_tensor(times, dtype=torch.float64)
        except (TypeError, ValueError) as err:
            raise InputTypeError(f"times: expected a 1-D sequence of numbers, got {describe(times)}") from err
    else:
        raise InputTypeError(f"times: expected a 1-D tensor of increasing times, got {describe(times)}")
    if t.dim() != 1 or t.numel() == 0:
        raise InputError(f"times: expected a non-empty 1-D grid, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise InputError("times: expected finite times, got NaN or inf")
    steps = torch.diff(t)
    if steps.numel() and not bool((steps > 0).all()):
        k = int((steps <= 0).nonzero()[0])
        raise InputError(
            f"times: expected a strictly increasing grid (every dt > 0), got dt = {float(steps[k]):g} "
            f"between times[{k}] = {float(t[k]):g} and times[{k + 1}] = {float(t[k + 1]):g}"
        )
    return t


# --- gradient methods ---------------------------------------------------------------------------


def _grid(times: torch.Tensor, dtype) -> tuple[list, list[float]]:
    """Times as 0-d tensors in the state dtype, and step sizes as Python floats."""
    t_list = list(times.to(dtype).unbind())
    values = times.tolist()
    dts = [b - a for a, b in itertools.pairwise(values)]
    return t_list, dts


def _integrate_backprop(f, step, x0, times, start: int, stop: int) -> torch.Tensor:
    """Steps ``start .. stop-1`` with autograd recording everything; returns the states at
    ``times[start] .. times[stop]`` (shape ``(stop - start + 1, ...)``, ``x0`` first)."""
    t_list, dts = _grid(times[start : stop + 1], x0.dtype)
    states = [x0]
    x = x0
    for t, dt in zip(t_list, dts):
        x = step(f, t, x, dt)
        states.append(x)
    return torch.stack(states)


class _Segment(torch.autograd.Function):
    """A checkpointed segment: the forward pass keeps only its first state; the backward pass
    recomputes the segment with autograd and returns the vector-Jacobian products.

    (torch.utils.checkpoint's non-reentrant mode keeps every node's bookkeeping alive until the
    backward pass, so its memory still grows linearly in n; this keeps ~sqrt(n).)
    """

    @staticmethod
    def forward(ctx, f, step, times, start, stop, x, *params):
        ctx.run = (f, step, times, start, stop)
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return _integrate_backprop(f, step, x, times, start, stop)[1:]

    @staticmethod
    def backward(ctx, grad_states):
        f, step, times, start, stop = ctx.run
        x, *params = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[5])
        with torch.enable_grad():
            states = _integrate_backprop(f, step, x, times, start, stop)[1:]
        inputs = [x] if x.requires_grad else []
        inputs += params
        grads = torch.autograd.grad(states, inputs, grad_states, allow_unused=True)
        grad_x = grads[0] if x.requires_grad else None
        grad_params = grads[1:] if x.requires_grad else grads
        return (None, None, None, None, None, grad_x, *grad_params)


def _integrate_checkpoint(f, step, x0, times, segments) -> torch.Tensor:
    n_steps = times.numel() - 1
    if segments is None:
        segments = max(1, math.ceil(math.sqrt(n_steps)))
    bounds = [round(k * n_steps / segments) for k in range(segments + 1)]
    params = [p for p in [*_parameters(f), *step.parameters()] if p.requires_grad]
    pieces = [x0.unsqueeze(0)]
    x = x0
    for start, stop in itertools.pairwise(bounds):
        if stop == start:
            continue
        seg = _Segment.apply(f, step, times, start, stop, x, *params)
        pieces.append(seg)
        x = seg[-1]
    return torch.cat(pieces)


@torch.no_grad()
def _integrate_no_grad(f, step, x0, times, compile: bool) -> torch.Tensor:
    n_steps = times.numel() - 1
    values = times.tolist()
    dts = [b - a for a, b in itertools.pairwise(values)]
    grid = times.to(x0.dtype)
    out = torch.empty((n_steps + 1, *x0.shape), dtype=x0.dtype, device=x0.device)
    out[0] = x0
    x = x0
    i = 0
    if compile and n_steps >= _COMPILE_CHUNK and _uniform(dts):
        chunk = _compiled_chunk()
        h = dts[0]
        while i + _COMPILE_CHUNK <= n_steps:
            x = chunk(f, step, grid[i], x, h, out[i + 1 : i + 1 + _COMPILE_CHUNK])
            i += _COMPILE_CHUNK
    if i < n_steps:
        t_list = list(grid[i:].unbind())
        for k in range(n_steps - i):
            x = step(f, t_list[k], x, dts[i + k])
            out[i + k + 1] = x
    return out


def _uniform(dts: list[float]) -> bool:
    return max(dts) - min(dts) <= 1e-12 * max(abs(dts[0]), 1.0)


def _chunk(f, step, t, x, h: float, out):
    for k in range(out.shape[0]):
        x = step(f, t + k * h, x, h)
        out[k].copy_(x)
    return x


_COMPILED = None


def _compiled_chunk():
    global _COMPILED
    if _COMPILED is None:
        # One thread: the fused loops are far too small to split, and OpenMP regions on a busy
        # machine wait for descheduled threads (measured 10-80x slower with 2 threads). The C++
        # wrapper drops the per-call Python overhead (~15% of a 10-step chunk; docs/benchmarks.md).
        _COMPILED = torch.compile(_chunk, dynamic=False, options={"cpp.threads": 1, "cpp_wrapper": True})
    return _COMPILED
