"""Reference models with the tendency signature ``f(t, x)``, and their simulation."""

from .lorenz import Dynamics, Lorenz63, Lorenz96
from .simulate import simulate
from .stochastic import euler_maruyama, simulate_stochastic

MODELS = {"lorenz63": Lorenz63, "lorenz96": Lorenz96}

__all__ = ["MODELS", "Dynamics", "Lorenz63", "Lorenz96", "euler_maruyama", "simulate", "simulate_stochastic"]
