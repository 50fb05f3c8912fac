"""The continuous adjoint through ``torchdiffeq.odeint_adjoint``, on geonn's grid and tableau.

torchdiffeq picks fixed-grid solvers by name from its solver table; geonn adds one entry per
tableau (``"geonn-rk4"``, ...) so that both the forward pass and the backward integration of the
adjoint ODE use exactly the scheme and grid of :func:`geonn.integrate`. (torchdiffeq's own
``"rk4"`` is the 3/8 rule, geonn's ``"rk38"``.)
"""

from __future__ import annotations

import importlib

import torch
from torch import nn
from torchdiffeq import odeint_adjoint
from torchdiffeq._impl.solvers import FixedGridODESolver

from ..errors import InputError
from .step import RungeKuttaStep
from .tableaux import ButcherTableau


def torchdiffeq_method(tableau: ButcherTableau) -> str:
    """Register ``tableau`` as a torchdiffeq fixed-grid solver (once) and return its method name."""
    name = f"geonn-{tableau.name}"
    # the module, not the function of the same name that torchdiffeq._impl re-exports
    solvers = importlib.import_module("torchdiffeq._impl.odeint").SOLVERS
    if name not in solvers:
        a = [list(row[:i]) for i, row in enumerate(tableau.a)]
        b, c = list(tableau.b), list(tableau.c)

        def _step_func(self, func, t0, dt, t1, y0):
            # the same arithmetic as RungeKuttaStep._fixed_step, term for term
            ks = []
            for row, ci in zip(a, c):
                yi = y0
                for aij, kj in zip(row, ks):
                    if aij != 0.0:
                        yi = yi + (dt * aij) * kj
                ks.append(func(t0 if ci == 0.0 else t0 + ci * dt, yi))
            increment = None
            for bi, ki in zip(b, ks):
                if bi != 0.0:
                    term = bi * ki
                    increment = term if increment is None else increment + term
            return dt * increment, ks[0]

        solvers[name] = type(f"GeonnFixedGrid_{tableau.name}", (FixedGridODESolver,), {"order": tableau.order, "_step_func": _step_func})
    return name


class _AsModule(nn.Module):
    """Wrap a plain function ``f(t, x)`` so ``odeint_adjoint`` accepts it (it has no parameters)."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, t, x):
        return self.f(t, x)


def integrate_adjoint(f, step: RungeKuttaStep, x0: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Trajectory ``(n_steps + 1, *x0.shape)`` whose gradients come from the continuous adjoint."""
    if step.trainable:
        raise InputError(
            "gradient: 'adjoint' cannot train a learnable scheme (its coefficients are not in the continuous "
            f"ODE); got {step!r}: use gradient='backprop' or 'checkpoint'"
        )
    module = f if isinstance(f, nn.Module) else _AsModule(f)
    method = torchdiffeq_method(step.tableau)
    t = times.to(x0.dtype)
    return odeint_adjoint(module, x0, t, method=method, adjoint_params=tuple(module.parameters()))
