"""geonn: deep learning for the geosciences, built around learned dynamics.

The public surface: reference models and learned operators share the tendency signature
``f(t, x) -> dx/dt``; :func:`integrate` runs any of them inside a (fixed or learnable)
Runge-Kutta scheme with the gradient method as an argument; :func:`fit` trains a learned
tendency on trajectories; :mod:`geonn.metrics` scores it.
"""

__version__ = "0.1.0"

from .dynamics import Lorenz63, Lorenz96, simulate
from .errors import ConfigError, GeonnError, InputError, InputTypeError, NonFiniteError, NotFittedError
from .integrators import ButcherTableau, RungeKuttaStep, diverged_members, get_tableau, integrate, rollout
from .operators import MLP, BilinearResidual, PeriodicConv1d, Standardised

__all__ = [
    "MLP", "BilinearResidual", "ButcherTableau", "ConfigError", "GeonnError", "InputError", "InputTypeError",
    "Lorenz63", "Lorenz96", "NonFiniteError", "NotFittedError", "PeriodicConv1d", "RungeKuttaStep", "Standardised",
    "__version__", "diverged_members", "get_tableau", "integrate", "rollout", "simulate",
]
