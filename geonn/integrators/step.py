"""One explicit Runge-Kutta step for any tableau, fixed or learnable."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputTypeError, describe
from .tableaux import ButcherTableau, get_tableau


class RungeKuttaStep(nn.Module):
    """Advance ``x`` by one step of an explicit Runge-Kutta scheme.

    Args:
        scheme: a tableau name (``"euler"``, ``"heun"``, ``"midpoint"``, ``"rk4"``, ``"rk38"``)
            or a :class:`ButcherTableau`.
        learnable: make the tableau's coefficients ``a`` (lower triangle), ``b`` and ``c``
            trainable parameters, initialised from the tableau. At initialisation the step
            equals the fixed scheme exactly.
        learn_dt: also learn a positive factor on the step size, initialised to 1 (so the
            effective step is ``dt * dt_scale``).

    Call: ``step(f, t, x, dt) -> x_next`` with ``f(t, x) -> dx/dt``, ``x`` of shape
    ``(..., state_dim)``, ``t`` a float or 0-d tensor (model time units) and ``dt`` the step size.
    A tendency with the attribute ``autonomous = True`` (the Lorenz models and geonn's operators)
    gets ``t`` unchanged at every stage, which saves the stage-time arithmetic.

    Example:
        >>> import torch, geonn
        >>> step = geonn.RungeKuttaStep("rk4")
        >>> x1 = step(geonn.Lorenz63(), 0.0, torch.ones(3, dtype=torch.float64), 0.01)
    """

    def __init__(self, scheme: str | ButcherTableau = "rk4", learnable: bool = False, learn_dt: bool = False):
        super().__init__()
        self.tableau = get_tableau(scheme)
        for name, value in (("learnable", learnable), ("learn_dt", learn_dt)):
            if not isinstance(value, bool):
                raise InputTypeError(f"{name}: expected True or False, got {describe(value)}")
        self.learnable = learnable
        self.learn_dt = learn_dt
        tab = self.tableau
        # Python floats for the fixed path: zero entries are skipped and no tensor ops are spent on coefficients.
        self._a = [list(row[:i]) for i, row in enumerate(tab.a)]
        self._b = list(tab.b)
        self._c = list(tab.c)
        if self.learnable:
            s = tab.stages
            self.a = nn.Parameter(torch.tensor(tab.a, dtype=torch.float64))
            self.b = nn.Parameter(torch.tensor(tab.b, dtype=torch.float64))
            self.c = nn.Parameter(torch.tensor(tab.c, dtype=torch.float64))
            self.register_buffer("a_mask", torch.tril(torch.ones(s, s, dtype=torch.float64), diagonal=-1))
        if self.learn_dt:
            self.log_dt_scale = nn.Parameter(torch.zeros((), dtype=torch.float64))

    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def trainable(self) -> bool:
        """Whether the step itself has parameters (learnable tableau or dt)."""
        return self.learnable or self.learn_dt

    def extra_repr(self) -> str:
        return f"scheme={self.tableau.name!r}, learnable={self.learnable}, learn_dt={self.learn_dt}"

    def forward(self, f, t, x: torch.Tensor, dt):
        if not callable(f):
            raise InputTypeError(f"f: expected a tendency f(t, x), got {describe(f)}")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputTypeError(f"x: expected a floating-point tensor (..., state_dim), got {describe(x)}")
        for name, value in (("t", t), ("dt", dt)):  # t may be a tensor of times, one per state; dt is one step
            if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)) or (
                name == "dt" and isinstance(value, torch.Tensor) and value.numel() != 1
            ):
                raise InputTypeError(f"{name}: expected a number or a 0-d tensor (model time units), got {describe(value)}")
        h = dt
        if self.learn_dt:
            h = dt * torch.exp(self.log_dt_scale).to(x.dtype)
        if self.learnable:
            return self._learnable_step(f, t, x, h)
        return self._fixed_step(f, t, x, h)

    def _fixed_step(self, f, t, x, h):
        # Separate multiplies and adds (not torch.add with alpha, which may fuse into an FMA and
        # round differently), so a learnable step at initialisation equals this bit for bit.
        autonomous = getattr(f, "autonomous", False)
        ks = []
        for row, ci in zip(self._a, self._c):
            xi = x
            for aij, kj in zip(row, ks):
                if aij != 0.0:
                    xi = xi + (h * aij) * kj
            ti = t if (ci == 0.0 or autonomous) else t + ci * h
            ks.append(f(ti, xi))
        increment = None
        for bi, ki in zip(self._b, ks):
            if bi != 0.0:
                term = bi * ki
                increment = term if increment is None else increment + term
        if increment is None:  # every weight b_i is 0: the scheme does not move
            return x + 0.0 * ks[0]
        return x + h * increment

    def _learnable_step(self, f, t, x, h):
        a = (self.a * self.a_mask).to(x.dtype)
        b = self.b.to(x.dtype)
        c = self.c.to(x.dtype)
        ks = []
        for i in range(self.tableau.stages):
            xi = x
            for j in range(i):
                xi = xi + h * a[i, j] * ks[j]
            ks.append(f(t + c[i] * h, xi))
        increment = sum(b[i] * ks[i] for i in range(self.tableau.stages))
        return x + h * increment
