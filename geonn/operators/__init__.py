"""Learned tendencies F_theta: same signature ``f(t, x)`` as the true models."""

from .networks import MLP, BilinearResidual, Operator, PeriodicConv1d, Standardised

OPERATORS = {"mlp": MLP, "bilinear": BilinearResidual, "conv1d": PeriodicConv1d}

__all__ = ["MLP", "OPERATORS", "BilinearResidual", "Operator", "PeriodicConv1d", "Standardised"]
