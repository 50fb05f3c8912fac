"""Observation operators ``H``, the observation error ``R``, and observations held as tensors.

An observation operator maps states ``(..., state_dim)`` to observations ``(..., obs_dim)``:

- :class:`Subset` picks components (the operator of most twin experiments; linear),
- :class:`Linear` applies a matrix ``H`` (obs_dim, state_dim),
- :class:`Function` wraps any differentiable function; it is linearised by ``torch.func.jacrev``.

Every operator has ``linearise(x) -> (..., obs_dim, state_dim)``; the linear ones also have
``matrix``. An operator may carry ``positions`` (obs_dim,), the location of each observation in
the units of the state's grid index, for localisation (:class:`~geonn.assimilation.LETKF`).

:class:`ObservationError` is the zero-mean Gaussian error ``N(0, R)``: a standard deviation
(scalar or per observation) or a full covariance. :class:`Observations` holds what the filters
consume: observation times, values (NaN where missing), the error and the operator.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError, InputTypeError, describe

# --- operators -------------------------------------------------------------------------------------


class ObservationOperator:
    """Base of the observation operators: ``operator(x) -> y`` over ``(..., state_dim) -> (..., obs_dim)``.

    Attributes:
        obs_dim: number of observations per time.
        state_dim: number of state components it reads, or ``None`` when any width is accepted.
        positions: location of each observation ``(obs_dim,)`` in state-index units, or ``None``.
        is_linear: whether ``linearise`` is independent of the state.
        indices: for :class:`Subset`, the observed components; ``None`` otherwise.
    """

    obs_dim: int
    state_dim: int | None = None
    positions: torch.Tensor | None = None
    is_linear: bool = False
    indices: tuple[int, ...] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check_state(x)
        y = self._apply(x)
        if y.shape[-1] != self.obs_dim:
            raise InputError(
                f"{type(self).__name__}: expected an output of last dimension obs_dim={self.obs_dim}, got shape {tuple(y.shape)}"
            )
        return y

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def linearise(self, x: torch.Tensor) -> torch.Tensor:
        """The Jacobian ``dH/dx`` at ``x`` (..., state_dim): shape ``(..., obs_dim, state_dim)``."""
        raise NotImplementedError

    def _check_state(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputTypeError(f"x: expected a torch.Tensor of shape (..., state_dim), got {describe(x)}")
        if not x.is_floating_point():
            raise InputTypeError(f"x: expected a floating-point state (..., state_dim), got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] == 0:
            raise InputError(f"x: expected a state of shape (..., state_dim) with state_dim >= 1, got shape {tuple(x.shape)}")
        if self.state_dim is not None and x.shape[-1] != self.state_dim:
            raise InputError(
                f"x: expected last dimension state_dim={self.state_dim} for {type(self).__name__}, got shape {tuple(x.shape)}"
            )


def _check_positions(positions, obs_dim: int) -> torch.Tensor | None:
    if positions is None:
        return None
    try:
        pos = torch.as_tensor(positions, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"positions: expected {obs_dim} finite locations (one per observation), got {describe(positions)}") from None
    if pos.shape != (obs_dim,) or not bool(torch.isfinite(pos).all()):
        raise InputError(f"positions: expected {obs_dim} finite locations (one per observation), got {describe(positions)}")
    return pos


class Subset(ObservationOperator):
    """Observe the components ``indices`` of a state of ``state_dim`` components: ``y = x[..., indices]``.

    Args:
        indices: distinct component indices, each in ``[0, state_dim)``; the order sets the order
            of the observations.
        state_dim: width of the state.
        positions: observation locations for localisation (default: the indices themselves).

    Example:
        >>> import torch
        >>> from geonn.assimilation import Subset
        >>> Subset([0, 2], state_dim=3)(torch.tensor([1.0, 2.0, 3.0]))
        tensor([1., 3.])
    """

    is_linear = True

    def __init__(self, indices: Sequence[int], state_dim: int, positions=None):
        if isinstance(state_dim, bool) or not isinstance(state_dim, int) or state_dim < 1:
            raise InputError(f"state_dim: expected an integer >= 1, got {describe(state_dim)}")
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        try:
            idx = tuple(int(i) for i in indices)
            if any(int(i) != i for i in indices):
                raise ValueError
        except (TypeError, ValueError):
            raise InputTypeError(f"indices: expected a sequence of integers, got {describe(indices)}") from None
        if not idx:
            raise InputError("indices: expected at least one observed component, got an empty sequence")
        if len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= state_dim:
            raise InputError(f"indices: expected distinct integers in [0, {state_dim}), got {list(idx)}")
        self.indices = idx
        self.state_dim = state_dim
        self.obs_dim = len(idx)
        self.positions = _check_positions(idx if positions is None else positions, self.obs_dim)
        self._index = torch.tensor(idx, dtype=torch.long)

    @classmethod
    def all(cls, state_dim: int) -> Subset:
        """The identity: every component observed, in order."""
        return cls(range(state_dim), state_dim)

    def __repr__(self) -> str:
        return f"Subset(indices={list(self.indices)}, state_dim={self.state_dim})"

    def _apply(self, x):
        return x.index_select(-1, self._index.to(x.device))

    @property
    def matrix(self) -> torch.Tensor:
        """``H`` as a 0/1 matrix, shape ``(obs_dim, state_dim)``, float64."""
        return torch.eye(self.state_dim, dtype=torch.float64)[self._index]

    def linearise(self, x):
        self._check_state(x)
        return self.matrix.to(dtype=x.dtype, device=x.device).expand(*x.shape[:-1], self.obs_dim, self.state_dim)


class Linear(ObservationOperator):
    """A linear operator ``y = H x``.

    Args:
        H: matrix of shape ``(obs_dim, state_dim)``.
        positions: optional observation locations ``(obs_dim,)`` (state-index units) for localisation.
    """

    is_linear = True

    def __init__(self, H, positions=None):
        if not isinstance(H, torch.Tensor):
            try:
                H = torch.as_tensor(H, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise InputTypeError(f"H: expected a matrix (obs_dim, state_dim), got {describe(H)}") from None
        if H.dim() != 2 or H.numel() == 0 or not H.is_floating_point() or not bool(torch.isfinite(H).all()):
            raise InputError(f"H: expected a finite floating-point matrix of shape (obs_dim, state_dim), got {describe(H)}")
        self.H = H
        self.obs_dim, self.state_dim = H.shape
        self.positions = _check_positions(positions, self.obs_dim)

    def __repr__(self) -> str:
        return f"Linear(H of shape {tuple(self.H.shape)})"

    def _apply(self, x):
        return x @ self.H.to(dtype=x.dtype, device=x.device).T

    @property
    def matrix(self) -> torch.Tensor:
        """``H``, shape ``(obs_dim, state_dim)``."""
        return self.H

    def linearise(self, x):
        self._check_state(x)
        return self.H.to(dtype=x.dtype, device=x.device).expand(*x.shape[:-1], self.obs_dim, self.state_dim)


class Function(ObservationOperator):
    """Any differentiable operator ``y = fn(x)``; linearised with ``torch.func.jacrev``.

    Args:
        fn: maps ``(..., state_dim)`` to ``(..., obs_dim)`` with torch operations (it must also
            accept a single state ``(state_dim,)``, as ``jacrev`` calls it on one state at a time).
        obs_dim: width of the output.
        state_dim: expected width of the input, or ``None`` to accept any.
        positions: optional observation locations ``(obs_dim,)`` for localisation.

    Example:
        >>> import torch
        >>> from geonn.assimilation import Function
        >>> H = Function(lambda x: x[..., :2] ** 2, obs_dim=2)
        >>> H.linearise(torch.tensor([1.0, 3.0, 5.0]))
        tensor([[2., 0., 0.],
                [0., 6., 0.]])
    """

    def __init__(self, fn: Callable, obs_dim: int, state_dim: int | None = None, positions=None):
        if not callable(fn):
            raise InputTypeError(f"fn: expected a function of the state, got {describe(fn)}")
        if isinstance(obs_dim, bool) or not isinstance(obs_dim, int) or obs_dim < 1:
            raise InputError(f"obs_dim: expected an integer >= 1, got {describe(obs_dim)}")
        if state_dim is not None and (isinstance(state_dim, bool) or not isinstance(state_dim, int) or state_dim < 1):
            raise InputError(f"state_dim: expected an integer >= 1 or None, got {describe(state_dim)}")
        self.fn = fn
        self.obs_dim = obs_dim
        self.state_dim = state_dim
        self.positions = _check_positions(positions, obs_dim)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        return f"Function({name}, obs_dim={self.obs_dim})"

    def _apply(self, x):
        return self.fn(x)

    def linearise(self, x):
        self._check_state(x)
        if not x.is_floating_point():
            raise InputTypeError(f"x: expected a floating-point state to differentiate fn at, got dtype {x.dtype}")
        jac = torch.func.jacrev(self.fn)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.func.vmap(jac)(flat)
        if out.shape[1:] != (self.obs_dim, x.shape[-1]):
            raise InputError(f"fn: expected a Jacobian of shape ({self.obs_dim}, {x.shape[-1]}), got {tuple(out.shape[1:])}")
        return out.reshape(*x.shape[:-1], self.obs_dim, x.shape[-1])


# --- observation error -----------------------------------------------------------------------------


class ObservationError:
    """Gaussian observation error ``N(0, R)``, by standard deviation or by full covariance.

    Give exactly one of ``std`` and ``covariance``:

    Args:
        std: a positive scalar (the same for every observation; ``R = std**2 I`` of any width) or a
            1-D tensor ``(obs_dim,)`` (``R = diag(std**2)``), in the units of the observations.
        covariance: a symmetric positive-definite ``R`` of shape ``(obs_dim, obs_dim)``.

    Attributes:
        dim: ``obs_dim``, or ``None`` for a scalar ``std`` (it fits any number of observations).
        is_diagonal: whether ``R`` is diagonal.

    Example:
        >>> import torch
        >>> from geonn.assimilation import ObservationError
        >>> error = ObservationError(std=2 ** 0.5)
        >>> error.sample((4, 3), torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3])
    """

    def __init__(self, std=None, *, covariance=None):
        if (std is None) == (covariance is None):
            raise InputError("ObservationError: expected exactly one of std= and covariance=, got "
                             f"{'both' if std is not None else 'neither'}")
        self._covariance = None
        self._std = None
        if std is not None:
            if isinstance(std, (bool, complex)) or (isinstance(std, torch.Tensor) and (std.is_complex() or std.dtype == torch.bool)):
                raise InputTypeError(f"std: expected a positive number or a 1-D tensor, got {describe(std)}")
            try:
                s = torch.as_tensor(std, dtype=torch.float64).detach().clone()
            except (TypeError, ValueError, RuntimeError):
                raise InputTypeError(f"std: expected a positive number or a 1-D tensor, got {describe(std)}") from None
            if s.dim() > 1 or s.numel() == 0:
                raise InputError(f"std: expected a scalar or a 1-D tensor (obs_dim,), got shape {tuple(s.shape)}")
            if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
                raise InputError(f"std: expected positive finite standard deviations, got {s.tolist()}")
            self._std = s
        else:
            if isinstance(covariance, torch.Tensor) and (covariance.is_complex() or covariance.dtype == torch.bool):
                raise InputTypeError(f"covariance: expected a real matrix (obs_dim, obs_dim), got {describe(covariance)}")
            try:
                c = torch.as_tensor(covariance, dtype=torch.float64).detach().clone()
            except (TypeError, ValueError, RuntimeError):
                raise InputTypeError(f"covariance: expected a matrix (obs_dim, obs_dim), got {describe(covariance)}") from None
            if c.dim() != 2 or c.shape[0] != c.shape[1] or c.numel() == 0:
                raise InputError(f"covariance: expected a square matrix (obs_dim, obs_dim), got shape {tuple(c.shape)}")
            if not bool(torch.isfinite(c).all()) or not torch.allclose(c, c.T, rtol=1e-10, atol=1e-12):
                raise InputError("covariance: expected a finite symmetric matrix")
            c = 0.5 * (c + c.T)
            factor, info = torch.linalg.cholesky_ex(c)
            if int(info) != 0:
                raise InputError("covariance: expected a positive-definite matrix; the Cholesky factorisation failed")
            self._covariance = c
            self._cholesky = factor

    @property
    def dim(self) -> int | None:
        if self._covariance is not None:
            return self._covariance.shape[0]
        return None if self._std.dim() == 0 else self._std.numel()

    @property
    def is_diagonal(self) -> bool:
        if self._std is not None:
            return True
        off = self._covariance - torch.diag(torch.diagonal(self._covariance))
        return not bool(off.any())

    @property
    def std(self) -> torch.Tensor:
        """The standard deviations: a 0-d tensor for a scalar error, else ``(obs_dim,)`` (sqrt of diag R)."""
        if self._std is not None:
            return self._std
        return torch.diagonal(self._covariance).sqrt()

    def __repr__(self) -> str:
        if self._std is not None:
            value = f"{float(self._std):g}" if self._std.dim() == 0 else f"tensor of shape ({self._std.numel()},)"
            return f"ObservationError(std={value})"
        return f"ObservationError(covariance of shape {tuple(self._covariance.shape)})"

    def _width(self, dim: int | None) -> int:
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise InputError(f"dim: expected a number of observations >= 1, got {describe(dim)}")
        if self.dim is None:
            if dim is None:
                raise InputError("dim: a scalar-std ObservationError fits any width; pass the number of observations")
            return dim
        if dim is not None and dim != self.dim:
            raise InputError(f"dim: expected {self.dim} observations for this ObservationError, got {dim}")
        return self.dim

    def covariance(self, dim: int | None = None) -> torch.Tensor:
        """``R``, shape ``(obs_dim, obs_dim)``, float64 (``dim`` is needed only for a scalar std)."""
        n = self._width(dim)
        if self._covariance is not None:
            return self._covariance
        return torch.diag((self._std**2).expand(n).clone())

    def inverse_sqrt(self, dim: int | None = None) -> torch.Tensor:
        """The symmetric ``R^{-1/2}``, shape ``(obs_dim, obs_dim)``: ``R^{-1/2} R R^{-1/2} = I``."""
        n = self._width(dim)
        if self._covariance is None:
            return torch.diag((1.0 / self._std).expand(n).clone())
        values, vectors = torch.linalg.eigh(self._covariance)
        return (vectors * values.rsqrt()) @ vectors.T

    def whiten(self, v: torch.Tensor) -> torch.Tensor:
        """``R^{-1/2} v`` for ``v`` of shape ``(..., obs_dim)``: whitened values have identity covariance."""
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() == 0:
            raise InputTypeError(f"v: expected a floating-point tensor (..., obs_dim), got {describe(v)}")
        n = self._width(v.shape[-1])
        if self._covariance is None:
            return v / self._std.to(dtype=v.dtype, device=v.device).expand(n)
        return v @ self.inverse_sqrt().to(dtype=v.dtype, device=v.device).T

    def sample(self, shape: Sequence[int], generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
        """Draws of the error, a tensor of ``shape`` whose last entry is ``obs_dim``.

        Args:
            shape: e.g. ``(n_times, obs_dim)`` or ``(members, obs_dim)``.
            generator: a seeded ``torch.Generator`` for reproducible draws.
        """
        if isinstance(shape, torch.Size):
            shape = tuple(shape)
        if not isinstance(shape, (tuple, list)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise InputError(f"shape: expected a sequence of sizes >= 0 whose last entry is obs_dim, got {describe(shape)}")
        shape = tuple(shape)
        if not shape:
            raise InputError("shape: expected a shape whose last entry is obs_dim, got ()")
        n = self._width(shape[-1])
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
        if self._covariance is None:
            noise = z * self._std.expand(n)
        else:
            noise = z @ self._cholesky.T
        return noise.to(dtype)

    def restrict(self, keep: torch.Tensor) -> ObservationError:
        """The error of the observations selected by ``keep`` (a boolean mask or indices over obs_dim)."""
        if self._std is not None and self._std.dim() == 0:
            return self
        if self._std is not None:
            return ObservationError(std=self._std[keep])
        idx = keep.nonzero().squeeze(-1) if keep.dtype == torch.bool else keep
        return ObservationError(covariance=self._covariance[idx][:, idx])


# --- observations as tensors -------------------------------------------------------------------------


@dataclass(frozen=True)
class Observations:
    """Observations ready for a filter: what :func:`~geonn.assimilation.read_observations` returns.

    Attributes:
        times: observation times ``(n_times,)``, strictly increasing, model time units.
        values: ``(n_times, obs_dim)``; NaN where an observation is missing at that time.
        error: the observation error (``dim`` either ``None`` or ``obs_dim``).
        operator: the observation operator (``obs_dim`` outputs), or ``None`` when the file did not
            say (observations of a non-subset operator): pass one to ``read_observations``.
        model: name of the model that made the twin experiment, if recorded.
        dt: the model step (model time units), if recorded.
    """

    times: torch.Tensor
    values: torch.Tensor
    error: ObservationError
    operator: ObservationOperator | None = None
    model: str | None = None
    dt: float | None = None

    def __post_init__(self):
        if not isinstance(self.times, torch.Tensor) or self.times.dim() != 1 or self.times.numel() == 0 or (
            not self.times.is_floating_point() and self.times.dtype not in (torch.int32, torch.int64)
        ):
            raise InputError(f"times: expected a non-empty 1-D tensor of observation times, got {describe(self.times)}")
        if not isinstance(self.values, torch.Tensor) or self.values.dim() != 2 or self.values.shape[0] != self.times.numel() or (
            not self.values.is_floating_point()
        ):
            raise InputError(
                f"values: expected a tensor (n_times={self.times.numel()}, obs_dim), got {describe(self.values)}"
            )
        if not bool(torch.isfinite(self.times).all()) or not bool((torch.diff(self.times) > 0).all()):
            raise InputError("times: expected finite, strictly increasing observation times")
        if bool(torch.isinf(self.values).any()):
            raise InputError("values: expected finite observations or NaN for missing ones, got inf")
        empty = torch.isnan(self.values).all(dim=1)
        if bool(empty.any()):
            k = int(empty.nonzero()[0])
            raise InputError(f"values: row {k} (time {float(self.times[k]):g}) has no observation (all NaN)")
        if not isinstance(self.error, ObservationError):
            raise InputTypeError(f"error: expected an ObservationError, got {describe(self.error)}")
        if self.error.dim is not None and self.error.dim != self.obs_dim:
            raise InputError(f"error: expected an error over obs_dim={self.obs_dim} observations, got dim {self.error.dim}")
        if self.operator is not None:
            if not isinstance(self.operator, ObservationOperator):
                raise InputTypeError(f"operator: expected an ObservationOperator, got {describe(self.operator)}")
            if self.operator.obs_dim != self.obs_dim:
                raise InputError(
                    f"operator: expected obs_dim={self.obs_dim} outputs (the width of values), got {self.operator.obs_dim}"
                )

    @property
    def obs_dim(self) -> int:
        return self.values.shape[1]

    def __len__(self) -> int:
        return self.times.numel()

    def steps(self, dt: float, t0: float = 0.0) -> list[int]:
        """The model step of each observation time, ``(times - t0) / dt``, checked to be whole and >= 0."""
        if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
            raise InputError(f"dt: expected a positive finite step size, got {describe(dt)}")
        if isinstance(t0, bool) or not isinstance(t0, (int, float)) or not math.isfinite(t0):
            raise InputError(f"t0: expected a finite start time, got {describe(t0)}")
        ratio = (self.times.double() - float(t0)) / float(dt)
        steps = torch.round(ratio)
        bad = (ratio - steps).abs() > 1e-6 * torch.clamp(ratio.abs(), min=1.0)
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            raise InputError(
                f"observations.times: expected multiples of dt={dt:g} after t0={t0:g}, got time {float(self.times[k]):g} "
                f"(row {k}), which is {float(ratio[k]):g} steps"
            )
        if bool((steps < 0).any()):
            raise InputError(f"observations.times: expected times >= t0={t0:g}, got {float(self.times[0]):g}")
        if bool((steps >= 2**31).any()):
            raise InputError(
                f"observations.times: expected fewer than 2**31 model steps of dt={dt:g} after t0={t0:g}, got "
                f"{float(steps.max()):.3g} steps to time {float(self.times[-1]):g}"
            )
        return [int(s) for s in steps.tolist()]


# --- schedules -----------------------------------------------------------------------------------------


class Schedule:
    """The model steps at which observations are taken.

    Args:
        steps: distinct step indices (>= 0) in increasing order; step ``k`` is time ``t0 + k dt``.

    Build one with :meth:`every` (regular), :meth:`from_mask` (a boolean mask over steps, e.g.
    regular with gaps), or directly from an irregular list.

    Example:
        >>> from geonn.assimilation import Schedule
        >>> Schedule.every(25, n_steps=100).steps
        (25, 50, 75, 100)
    """

    def __init__(self, steps: Sequence[int]):
        if isinstance(steps, torch.Tensor):
            steps = steps.tolist()
        try:
            values = tuple(int(s) for s in steps)
            if any(isinstance(s, bool) or int(s) != s for s in steps):
                raise ValueError
        except (TypeError, ValueError):
            raise InputTypeError(f"steps: expected a sequence of integer steps, got {describe(steps)}") from None
        if not values:
            raise InputError("steps: expected at least one observation step, got none")
        if values[0] < 0 or any(b <= a for a, b in itertools.pairwise(values)):
            raise InputError(f"steps: expected strictly increasing steps >= 0, got {list(values)[:10]}")
        self.steps = values

    @classmethod
    def every(cls, k: int, n_steps: int, start: int | None = None) -> Schedule:
        """Every ``k`` steps from ``start`` (default ``k``) up to ``n_steps`` inclusive."""
        for name, value in (("k", k), ("n_steps", n_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
                raise InputError(f"{name}: expected an integer in [1, 2**31), got {describe(value)}")
        start = k if start is None else start
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise InputError(f"start: expected an integer >= 0, got {describe(start)}")
        if start > n_steps:
            raise InputError(f"start: expected a first observation step <= n_steps={n_steps}, got {start}")
        return cls(range(start, n_steps + 1, k))

    @classmethod
    def from_mask(cls, mask) -> Schedule:
        """The steps where ``mask`` (1-D booleans over steps ``0 .. len(mask) - 1``) is true."""
        m = torch.as_tensor(mask)
        if m.dtype != torch.bool or m.dim() != 1:
            raise InputError(f"mask: expected a 1-D boolean mask over steps, got {describe(mask)}")
        return cls(m.nonzero().squeeze(-1).tolist())

    def mask(self, n_steps: int) -> torch.Tensor:
        """Boolean mask over steps ``0 .. n_steps`` (length ``n_steps + 1``)."""
        if self.steps[-1] > n_steps:
            raise InputError(f"n_steps: expected >= the last observation step {self.steps[-1]}, got {n_steps}")
        m = torch.zeros(n_steps + 1, dtype=torch.bool)
        m[list(self.steps)] = True
        return m

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        head = ", ".join(str(s) for s in self.steps[:6])
        return f"Schedule(steps=[{head}{', ...' if len(self.steps) > 6 else ''}], n={len(self.steps)})"
