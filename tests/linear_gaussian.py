"""The linear Gaussian test model shared by the assimilation tests, where the Kalman filter is exact."""

import numpy as np
import torch

import geonn

A_LINEAR = torch.tensor([[-0.1, 1.0, 0.0], [-1.0, -0.1, 0.0], [0.0, 0.0, -0.2]], dtype=torch.float64)


def linear_model(t, x):
    """dx/dt = A x: a damped rotation in (x0, x1) and a decay in x2."""
    return x @ A_LINEAR.T


def rk4_step_matrix(dt: float) -> np.ndarray:
    """The exact linear map of one classic RK4 step of ``linear_model`` (the step applied to the identity's columns)."""
    return geonn.RungeKuttaStep("rk4")(linear_model, 0.0, torch.eye(3, dtype=torch.float64), dt).T.numpy()
