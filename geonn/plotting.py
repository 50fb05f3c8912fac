"""Figures the cases write (PNG, via matplotlib's Agg backend; written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from .io import write_figure


def attractor(truth: np.ndarray, learned: np.ndarray, path: Path, labels=("x", "y", "z")) -> Path:
    """True vs learned attractor: 3-D view and two planar projections of trajectories ``(time, 3+)``."""
    fig = plt.figure(figsize=(13, 4.2))
    ax = fig.add_subplot(1, 3, 1, projection="3d")
    ax.plot(*truth[:, :3].T, lw=0.4, color="k", label="true")
    ax.plot(*learned[:, :3].T, lw=0.4, color="tab:red", alpha=0.8, label="learned")
    ax.set_xlabel(labels[0]), ax.set_ylabel(labels[1]), ax.set_zlabel(labels[2])
    ax.legend(loc="upper left")
    for k, (i, j) in enumerate(((0, 2), (0, 1)), start=2):
        ax2 = fig.add_subplot(1, 3, k)
        ax2.plot(truth[:, i], truth[:, j], lw=0.4, color="k", label="true")
        ax2.plot(learned[:, i], learned[:, j], lw=0.4, color="tab:red", alpha=0.8, label="learned")
        ax2.set_xlabel(labels[i]), ax2.set_ylabel(labels[j])
    fig.suptitle("Attractor: true model vs learned model (free runs from the same state)")
    return write_figure(fig, path)


def rmse_by_lead(leads, rmse, dt: float, path: Path) -> Path:
    """Forecast RMSE against lead time, log-log."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.loglog(np.asarray(leads) * dt, rmse, "o-", color="tab:red")
    ax.set_xlabel("lead time (model time units)")
    ax.set_ylabel("RMSE")
    ax.set_title("Forecast RMSE of the learned model on the test trajectory")
    ax.grid(True, which="both", alpha=0.3)
    return write_figure(fig, path)


def forecast_series(times, truth, forecast, path: Path, labels=("x", "y", "z")) -> Path:
    """A free forecast against the truth, one panel per component (first three)."""
    n = min(3, truth.shape[-1])
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.2 * n), sharex=True)
    for i, ax in enumerate(np.atleast_1d(axes)):
        ax.plot(times, truth[:, i], color="k", lw=1, label="truth")
        ax.plot(times, forecast[:, i], color="tab:red", lw=1, ls="--", label="learned forecast")
        ax.set_ylabel(labels[i])
    np.atleast_1d(axes)[0].legend(loc="upper right")
    np.atleast_1d(axes)[-1].set_xlabel("time (model time units)")
    return write_figure(fig, path)
