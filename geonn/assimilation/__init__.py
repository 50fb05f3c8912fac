"""Data assimilation: observation operators, twin experiments, ensemble Kalman filters, scores.

Every method is a dataclass of its hyperparameters with one ``assimilate(model, observations, dt,
...)``; forecasts integrate the whole ensemble as one tensor with :func:`geonn.rollout`. See
docs/assimilation.md for the observation file format and the equations.
"""

from .ensemble import (
    ETKF,
    LETKF,
    EnKF,
    EnKFN,
    FilterResult,
    enkf_n_dual_cost,
    enkf_n_inflation,
    mean_preserving_rotation,
    sqrt_update,
)
from .learned import DynamicalPrior, GradientLSTM, LearnedSolver, SolverTrainConfig
from .localisation import gaspari_cohn, ring_distance
from .observations import Function, Linear, ObservationError, ObservationOperator, Observations, Schedule, Subset
from .scores import rmse_time_mean
from .smoothers import EnKS, IEnKS, SmootherResult
from .twin import read_observations, twin_experiment
from .variational import Var3D, Var4D, VariationalResult, WeakVar4D, climatology
from .windows import WindowEnKS, WindowVar4D

__all__ = [
    "ETKF",
    "LETKF",
    "DynamicalPrior",
    "EnKF",
    "EnKFN",
    "EnKS",
    "FilterResult",
    "Function",
    "GradientLSTM",
    "IEnKS",
    "LearnedSolver",
    "Linear",
    "ObservationError",
    "ObservationOperator",
    "Observations",
    "Schedule",
    "SmootherResult",
    "SolverTrainConfig",
    "Subset",
    "Var3D",
    "Var4D",
    "VariationalResult",
    "WeakVar4D",
    "WindowEnKS",
    "WindowVar4D",
    "climatology",
    "enkf_n_dual_cost",
    "enkf_n_inflation",
    "gaspari_cohn",
    "mean_preserving_rotation",
    "read_observations",
    "ring_distance",
    "rmse_time_mean",
    "sqrt_update",
    "twin_experiment",
]
