"""The boundary between labelled data (xarray) and tensors; the rest of geonn works on tensors.

Trajectories ``(time, [member,] component)`` and gridded fields ``(time, channel, lat, lon)``
with a validity mask; the field helpers beside them (normalisation, area weights, the
time-ordered split, lazy batches, area-weighted scores) work on those tensors.
"""

from .grid import Grid, find_grid
from .normalise import Normaliser, calendar_groups
from .scores import anomaly_correlation, explained_variance, weighted_rmse
from .split import FieldBatch, FieldBatches, TimeSplit, time_split
from .statistics import power_spectrum, radial_wavenumbers, spectrum_error, wasserstein_pointwise
from .tensors import area_weights, field_array, from_tensor, to_tensor
from .trajectories import dataset_to_trajectory, trajectory_to_dataset

__all__ = [
    "FieldBatch", "FieldBatches", "Grid", "Normaliser", "TimeSplit", "anomaly_correlation", "area_weights", "calendar_groups",
    "dataset_to_trajectory", "explained_variance", "field_array", "find_grid", "from_tensor", "power_spectrum", "radial_wavenumbers",
    "spectrum_error", "time_split",
    "to_tensor", "trajectory_to_dataset", "wasserstein_pointwise", "weighted_rmse",
]
