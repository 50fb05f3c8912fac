"""Lorenz-63 and Lorenz-96 as tendencies ``f(t, x) -> dx/dt`` with analytic Jacobians.

References: lorenz1963, lorenz1996 (docs/references.md). Time and state are nondimensional
("model time units"; one Lorenz-96 time unit is about five days in Lorenz's scaling).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InputError, InputTypeError, describe


def _finite(name: str, value) -> float:
    """A model parameter as a finite float (a real number, a 0-d tensor or a one-element array)."""
    if isinstance(value, bool):
        raise InputError(f"{name}: expected a finite number, got {describe(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{name}: expected a finite number, got {describe(value)}") from None
    if not math.isfinite(number):
        raise InputError(f"{name}: expected a finite number, got {number!r}")
    return number


class Dynamics(nn.Module):
    """Base of the reference models: a tendency ``f(t, x)`` with metadata for labelled outputs.

    Subclasses set ``state_dim``, ``name``, ``component_names`` and implement ``forward`` and
    ``jacobian``. Inputs may have any leading (batch, member) dimensions and any float dtype.
    """

    name: str = "dynamics"
    state_dim: int
    autonomous = True  # f does not depend on t

    def component_names(self) -> list[str]:
        return [f"x{i}" for i in range(self.state_dim)]

    def parameters_dict(self) -> dict[str, float]:
        """The model's physical parameters, for metadata."""
        return {}

    def default_initial_state(self, dtype=torch.float64) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputTypeError(f"x: expected a floating-point tensor (..., {self.state_dim}), got {describe(x)}")
        if x.dim() == 0 or x.shape[-1] != self.state_dim:
            raise InputError(f"x: expected last dimension {self.state_dim} for {self.name}, got shape {tuple(x.shape)}")


class Lorenz63(Dynamics):
    """The Lorenz (1963) convection model.

    dx/dt = sigma (y - x),  dy/dt = x (rho - z) - y,  dz/dt = x y - beta z

    Args:
        sigma, rho, beta: parameters (defaults 10, 28, 8/3: the chaotic regime, largest Lyapunov
            exponent about 0.905 per model time unit).

    Call: ``f(t, x)``, ``x`` of shape ``(..., 3)``; returns ``dx/dt`` of the same shape and dtype.
    """

    name = "lorenz63"
    state_dim = 3

    def __init__(self, sigma: float = 10.0, rho: float = 28.0, beta: float = 8.0 / 3.0):
        super().__init__()
        self.sigma, self.rho, self.beta = _finite("sigma", sigma), _finite("rho", rho), _finite("beta", beta)

    def component_names(self) -> list[str]:
        return ["x", "y", "z"]

    def parameters_dict(self) -> dict[str, float]:
        return {"sigma": self.sigma, "rho": self.rho, "beta": self.beta}

    def default_initial_state(self, dtype=torch.float64) -> torch.Tensor:
        return torch.tensor([1.509, -1.531, 25.46], dtype=dtype)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:g}, rho={self.rho:g}, beta={self.beta:g}"

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        a, b, c = x.unbind(-1)
        return torch.stack((self.sigma * (b - a), a * (self.rho - c) - b, a * b - self.beta * c), dim=-1)

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """d(dx/dt)/dx, shape ``(..., 3, 3)``; row i is the gradient of component i."""
        self._check(x)
        a, b, c = x.unbind(-1)
        zero, one = torch.zeros_like(a), torch.ones_like(a)
        rows = (
            torch.stack((-self.sigma * one, self.sigma * one, zero), -1),
            torch.stack((self.rho - c, -one, -a), -1),
            torch.stack((b, a, -self.beta * one), -1),
        )
        return torch.stack(rows, dim=-2)


class Lorenz96(Dynamics):
    """The Lorenz (1996) model on a ring of ``n`` variables.

    dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F,  indices modulo n.

    Args:
        n: number of variables, at least 4 (default 40).
        forcing: F (default 8: chaotic, largest Lyapunov exponent about 1.7 for n = 40).
    """

    name = "lorenz96"

    def __init__(self, n: int = 40, forcing: float = 8.0):
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or not 4 <= n <= 2**24:
            raise InputError(f"n: expected an integer in [4, 2**24] (the ring must hold i-2 .. i+1), got {n!r}")
        self.state_dim = n
        self.forcing = _finite("forcing", forcing)

    def parameters_dict(self) -> dict[str, float]:
        return {"forcing": self.forcing, "n": self.state_dim}

    def default_initial_state(self, dtype=torch.float64) -> torch.Tensor:
        x = torch.full((self.state_dim,), self.forcing, dtype=dtype)
        x[0] += 0.01
        return x

    def extra_repr(self) -> str:
        return f"n={self.state_dim}, forcing={self.forcing:g}"

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return (torch.roll(x, -1, -1) - torch.roll(x, 2, -1)) * torch.roll(x, 1, -1) - x + self.forcing

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """d(dx/dt)/dx, shape ``(..., n, n)``."""
        self._check(x)
        n = self.state_dim
        jac = torch.zeros((*x.shape, n), dtype=x.dtype, device=x.device)
        idx = torch.arange(n, device=x.device)
        xp1, xm2, xm1 = torch.roll(x, -1, -1), torch.roll(x, 2, -1), torch.roll(x, 1, -1)
        jac[..., idx, (idx + 1) % n] += xm1
        jac[..., idx, (idx - 2) % n] -= xm1
        jac[..., idx, (idx - 1) % n] += xp1 - xm2
        jac[..., idx, idx] -= 1.0
        return jac
