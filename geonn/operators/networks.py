"""Learned tendencies F_theta with the signature ``f(t, x) -> dx/dt``.

Each operator maps a state ``x`` of shape ``(..., state_dim)`` to a tendency of the same shape,
so it drops into :func:`geonn.integrate`, a DA method or a case wherever a true model does.
They are autonomous (``t`` is accepted and ignored).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


def mlp_layers(widths: list[int], activation: str) -> nn.Sequential:
    """Linear layers ``widths[0] -> ... -> widths[-1]`` with ``activation`` between them (none after the last)."""
    if activation not in ACTIVATIONS:
        raise InputError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(w_in, w_out))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class Operator(nn.Module):
    """Base of learned tendencies: checks the state's last dimension."""

    state_dim: int | None = None
    autonomous = True  # f does not depend on t

    def _check(self, x: torch.Tensor) -> None:
        if self.state_dim is not None and x.shape[-1] != self.state_dim:
            raise InputError(f"x: expected last dimension {self.state_dim} for {type(self).__name__}, got shape {tuple(x.shape)}")


class MLP(Operator):
    """A multilayer perceptron tendency: ``state_dim -> hidden... -> state_dim``.

    Args:
        state_dim: size of the state.
        hidden: widths of the hidden layers (default ``(64, 64)``: the 3-64-64-3 baseline).
        activation: ``"tanh"``, ``"relu"``, ``"gelu"`` or ``"silu"``.
    """

    def __init__(self, state_dim: int, hidden: tuple[int, ...] = (64, 64), activation: str = "tanh"):
        super().__init__()
        self.state_dim = _positive_int("state_dim", state_dim)
        self.net = mlp_layers([state_dim, *(_positive_int("hidden", int(h)) for h in hidden), state_dim], activation)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.net(x)


class BilinearResidual(Operator):
    """The bilinear network of fablet2018, the tendency inside a (residual) Runge-Kutta block.

    ``F(x) = W_out [ W_lin x + b_lin ,  (W_1 x + b_1) * (W_2 x + b_2) ] + b_out``

    a linear layer and ``n_bilinear`` products of pairs of linear units, then a linear transition
    layer. Any quadratic vector field (Lorenz-63, Lorenz-96) is exactly representable.

    Args:
        state_dim: size of the state.
        n_linear: number of linear units (default: ``state_dim``).
        n_bilinear: number of bilinear products (default: ``state_dim``).
    """

    def __init__(self, state_dim: int, n_linear: int | None = None, n_bilinear: int | None = None):
        super().__init__()
        self.state_dim = _positive_int("state_dim", state_dim)
        n_linear = _positive_int("n_linear", state_dim if n_linear is None else n_linear)
        n_bilinear = _positive_int("n_bilinear", state_dim if n_bilinear is None else n_bilinear)
        self.n_linear, self.n_bilinear = n_linear, n_bilinear
        self.inner = nn.Linear(state_dim, n_linear + 2 * n_bilinear)
        self.transition = nn.Linear(n_linear + n_bilinear, state_dim)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        z = self.inner(x)
        lin, u, v = z.split((self.n_linear, self.n_bilinear, self.n_bilinear), dim=-1)
        return self.transition(torch.cat((lin, u * v), dim=-1))


class PeriodicConv1d(Operator):
    """A translation-equivariant local stencil on a ring (Lorenz-96-like systems).

    A circular convolution of half-width ``radius`` gives ``n_linear`` linear and
    ``2 * n_bilinear`` channels; products of channel pairs are added, and a pointwise (1x1)
    convolution maps back to one value per site. With radius >= 2 the Lorenz-96 tendency is
    exactly representable. Works for any ring size (``state_dim`` is not fixed).

    Args:
        n_linear, n_bilinear: channel counts.
        radius: stencil half-width; the stencil covers sites ``i - radius .. i + radius``.
    """

    def __init__(self, n_linear: int = 4, n_bilinear: int = 4, radius: int = 2):
        super().__init__()
        self.n_linear = _positive_int("n_linear", n_linear)
        self.n_bilinear = _positive_int("n_bilinear", n_bilinear)
        self.radius = _positive_int("radius", radius)
        self.stencil = nn.Conv1d(1, n_linear + 2 * n_bilinear, kernel_size=2 * radius + 1)
        self.pointwise = nn.Conv1d(n_linear + n_bilinear, 1, kernel_size=1)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] <= self.radius:
            raise InputError(f"x: expected more than radius={self.radius} sites on the ring, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        h = x.reshape(-1, 1, x.shape[-1])
        h = F.pad(h, (self.radius, self.radius), mode="circular")
        z = self.stencil(h)
        lin, u, v = z.split((self.n_linear, self.n_bilinear, self.n_bilinear), dim=1)
        out = self.pointwise(torch.cat((lin, u * v), dim=1))
        return out.reshape(*lead, x.shape[-1])


class Standardised(nn.Module):
    """Run an operator on standardised states: ``f(t, x) = tendency_scale * op(t, (x - mean) / scale)``.

    The statistics are buffers, so they travel in checkpoints with the weights. ``mean`` and
    ``scale`` have shape ``(state_dim,)`` (state units); ``tendency_scale`` is in state units
    per model time unit.
    """

    def __init__(self, operator: nn.Module, mean: torch.Tensor, scale: torch.Tensor, tendency_scale: torch.Tensor):
        super().__init__()
        self.operator = operator
        self.state_dim = getattr(operator, "state_dim", None)
        self.autonomous = getattr(operator, "autonomous", False)
        self.register_buffer("mean", torch.as_tensor(mean).clone())
        self.register_buffer("scale", torch.as_tensor(scale).clone())
        self.register_buffer("tendency_scale", torch.as_tensor(tendency_scale).clone())

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        return self.tendency_scale * self.operator(t, (x - self.mean) / self.scale)
