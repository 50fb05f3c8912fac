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


def map_panels(panels, titles, latitudes, longitudes, path: Path, *, units: str = "", cmap: str = "RdBu_r",
               shared: bool = True, ncols: int | None = None, suptitle: str | None = None) -> Path:
    """Maps side by side: ``panels`` is a list of ``(lat, lon)`` arrays (NaN drawn blank), latitude south to north.

    With ``shared`` all panels use one symmetric colour range (a diverging map centred on 0 for
    anomalies and errors); otherwise each panel has its own range and colour bar.
    """
    panels = [np.asarray(p, dtype=float) for p in panels]
    n = len(panels)
    ncols = ncols or min(n, 4)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False, constrained_layout=True)
    lat = np.asarray(latitudes, dtype=float) if latitudes is not None else np.arange(panels[0].shape[0])
    lon = np.asarray(longitudes, dtype=float) if longitudes is not None else np.arange(panels[0].shape[1])
    finite = np.concatenate([p[np.isfinite(p)] for p in panels]) if panels else np.zeros(1)
    if finite.size == 0:
        finite = np.zeros(1)
    symmetric = cmap in ("RdBu_r", "RdBu", "coolwarm", "seismic")
    bound = float(np.max(np.abs(finite))) or 1.0
    vmin, vmax = (-bound, bound) if symmetric else (float(finite.min()), float(finite.max()))
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.set_visible(False)
            continue
        p = panels[k]
        if not shared:
            own = p[np.isfinite(p)]
            own = own if own.size else np.zeros(1)
            b = float(np.max(np.abs(own))) or 1.0
            vmin, vmax = (-b, b) if symmetric else (float(own.min()), float(own.max()))
        image = ax.pcolormesh(lon, lat, np.ma.masked_invalid(p), cmap=cmap, vmin=vmin, vmax=vmax, shading="auto")
        ax.set_title(titles[k], fontsize=9)
        ax.set_aspect("auto")
        ax.tick_params(labelsize=7)
        if not shared:
            fig.colorbar(image, ax=ax, shrink=0.8, label=units)
    if shared and image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=units)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return write_figure(fig, path)


def spectra(wavenumbers, curves: dict, path: Path, *, xlabel: str = "wavenumber (cycles per domain)",
            ylabel: str = "power") -> Path:
    """Power spectra on log-log axes, one line per named curve."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, values in curves.items():
        ax.loglog(wavenumbers, values, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return write_figure(fig, path)
