"""The boundary between labelled data (xarray) and tensors; the rest of geonn works on tensors."""

from .trajectories import dataset_to_trajectory, trajectory_to_dataset

__all__ = ["dataset_to_trajectory", "trajectory_to_dataset"]
