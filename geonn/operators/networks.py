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

from ..errors import InputError, InputTypeError, describe

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


MAX_WIDTH = 2**20  # a layer wider than this would not fit in memory with its neighbours
MAX_PARAMETERS = 2**30  # 4 GiB of float32 weights


def _check_size(names: str, widths: list[tuple[int, int]]) -> None:
    """Refuse layers ``(in, out)`` whose weights together would not fit in memory."""
    total = sum(w_in * w_out + w_out for w_in, w_out in widths)
    if total > MAX_PARAMETERS:
        raise InputError(f"{names}: expected layers of at most {MAX_PARAMETERS} parameters in all, got {total} for these sizes")


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WIDTH:
        raise InputError(f"{name}: expected an integer in [1, {MAX_WIDTH}], got {describe(value)}")
    return value


def mlp_layers(widths: list[int], activation: str) -> nn.Sequential:
    """Linear layers ``widths[0] -> ... -> widths[-1]`` with ``activation`` between them (none after the last)."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise InputError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(w_in, w_out))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def _check_input(module: nn.Module, x) -> None:
    """``x`` a floating tensor ``(..., sites)`` of the dtype of ``module``'s weights."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InputTypeError(f"x: expected a floating-point tensor (..., state_dim), got {describe(x)}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise InputError(f"x: expected a state of shape (..., state_dim), got shape {tuple(x.shape)}")
    weight = next(module.parameters(), None)
    if weight is not None and weight.dtype != x.dtype:
        raise InputTypeError(
            f"x: expected dtype {weight.dtype} (that of the {type(module).__name__} weights; convert one with "
            f".to(dtype)), got {x.dtype}"
        )


class Operator(nn.Module):
    """Base of learned tendencies: checks the state's last dimension."""

    state_dim: int | None = None
    autonomous = True  # f does not depend on t

    def _check(self, x: torch.Tensor) -> None:
        _check_input(self, x)
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
        if isinstance(hidden, int) or not isinstance(hidden, (tuple, list)):
            raise InputError(f"hidden: expected a sequence of layer widths such as (64, 64), got {describe(hidden)}")
        widths = [state_dim, *(_positive_int("hidden", h) for h in hidden), state_dim]
        _check_size("state_dim, hidden", list(itertools.pairwise(widths)))
        self.net = mlp_layers(widths, activation)

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
        _check_size("state_dim, n_linear, n_bilinear",
                    [(state_dim, n_linear + 2 * n_bilinear), (n_linear + n_bilinear, state_dim)])
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
        _check_size("n_linear, n_bilinear, radius", [(2 * radius + 1, n_linear + 2 * n_bilinear), (n_linear + n_bilinear, 1)])
        self.stencil = nn.Conv1d(1, n_linear + 2 * n_bilinear, kernel_size=2 * radius + 1)
        self.pointwise = nn.Conv1d(n_linear + n_bilinear, 1, kernel_size=1)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        if x.shape[-1] <= self.radius:
            raise InputError(f"x: expected more than radius={self.radius} sites on the ring, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        h = x.reshape(-1, 1, x.shape[-1])
        h = F.pad(h, (self.radius, self.radius), mode="circular")
        z = self.stencil(h)
        lin, u, v = z.split((self.n_linear, self.n_bilinear, self.n_bilinear), dim=1)
        out = self.pointwise(torch.cat((lin, u * v), dim=1))
        return out.reshape(*lead, x.shape[-1])


def _statistic(name: str, value, state_dim: int | None, positive: bool) -> torch.Tensor:
    """A finite floating tensor ``()`` or ``(state_dim,)``, positive when ``positive``."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise InputTypeError(f"{name}: expected a floating-point tensor of shape (state_dim,), got {describe(value)}")
    if value.dim() > 1 or (state_dim is not None and value.dim() == 1 and value.shape[0] != state_dim):
        raise InputError(f"{name}: expected shape ({state_dim if state_dim is not None else 'state_dim'},), got {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()) or (positive and not bool((value > 0).all())):
        kind = "positive finite" if positive else "finite"
        raise InputError(f"{name}: expected {kind} values, got {value.tolist()}")
    return value.detach().clone()


class Standardised(nn.Module):
    """Run an operator on standardised states: ``f(t, x) = tendency_scale * op(t, (x - mean) / scale)``.

    The statistics are buffers, so they travel in checkpoints with the weights. ``mean`` and
    ``scale`` have shape ``(state_dim,)`` (state units); ``tendency_scale`` is in state units
    per model time unit.
    """

    def __init__(self, operator: nn.Module, mean: torch.Tensor, scale: torch.Tensor, tendency_scale: torch.Tensor):
        super().__init__()
        if not isinstance(operator, nn.Module):
            raise InputTypeError(f"operator: expected a torch.nn.Module tendency, got {describe(operator)}")
        self.operator = operator
        self.state_dim = getattr(operator, "state_dim", None)
        self.autonomous = getattr(operator, "autonomous", False)
        for name, value, positive in (("mean", mean, False), ("scale", scale, True), ("tendency_scale", tendency_scale, True)):
            self.register_buffer(name, _statistic(name, value, self.state_dim, positive))

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
            raise InputTypeError(f"x: expected a floating-point tensor (..., state_dim), got {describe(x)}")
        if self.mean.dim() == 1 and x.shape[-1] != self.mean.shape[0]:
            raise InputError(f"x: expected last dimension {self.mean.shape[0]} (that of the statistics), got shape {tuple(x.shape)}")
        return self.tendency_scale * self.operator(t, (x - self.mean) / self.scale)
