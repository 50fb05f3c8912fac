"""Butcher tableaux, the Runge-Kutta step, and integration with a chosen gradient method."""

from .integrate import GRADIENTS, check_finite, diverged_members, divergence_steps, integrate, rollout
from .step import RungeKuttaStep
from .tableaux import EULER, HEUN, MIDPOINT, RK4, TABLEAUX, THREE_EIGHTHS, ButcherTableau, get_tableau

__all__ = [
    "EULER",
    "GRADIENTS",
    "HEUN",
    "MIDPOINT",
    "RK4",
    "TABLEAUX",
    "THREE_EIGHTHS",
    "ButcherTableau",
    "RungeKuttaStep",
    "check_finite",
    "diverged_members",
    "divergence_steps",
    "get_tableau",
    "integrate",
    "rollout",
]
