"""``geonn fields generate``: train a WGAN-GP generator of fields and score its samples' statistics.

The GAN (:class:`geonn.emulators.FieldGAN`) and the EOF-Gaussian sampler baseline
(:class:`geonn.emulators.EOFGaussianSampler`) are fitted on the training anomalies (training
climatology removed, one global scale). Each draws ``samples`` fields; sample ``i`` is tied to
held-out step ``test[i mod n_test]``: a conditional GAN (``condition = "previous"``) generates it
from the data at the step before, and every sample gets that step's calendar-group climatology
back. Both sets are scored against the held-out fields, in the variable's units
(:mod:`geonn.fields.statistics`): the spectrum error of the radially averaged power spectrum of
the anomalies (masked points filled with 0, the climatology) and the area-weighted mean of the
per-point Wasserstein distance ``W1`` of the values. Two references are scored the same way:
the training fields themselves (``..._training_data``: how far the held-out climate lies from the
training one) and persistence (``..._persistence``: sample ``i`` is the data one step before its
held-out step, the condition of a conditional GAN). The scores compare pooled value distributions,
not each sample with its own step: the fields one step before the held-out steps are almost the
same set as the held-out fields, so persistence scores near 0 and a conditional generator is
helped by its condition as much as by its skill; the unconditional EOF-Gaussian sampler has no
such help.

Outputs: ``samples.nc`` (the variable's dims with ``sample`` in place of time; with a
``time(sample)`` coordinate giving the held-out step each sample is for when the GAN is
conditional or the data have several calendar groups), ``model.pt`` (GAN, EOF-Gaussian sampler
and normaliser state, weights-only), ``figures/``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .. import distributed, plotting
from ..emulators.gan import CONDITIONS, FieldGAN, GANConfig
from ..emulators.sampler import EOFGaussianSampler
from ..errors import InputError
from ..fields import from_tensor
from ..fields.statistics import power_spectrum, radial_wavenumbers, spectrum_error, wasserstein_pointwise
from ..io import save_checkpoint, write_netcdf
from .source import FieldData

DEFAULT_EPOCHS = GANConfig.epochs


def _int(name: str, value, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"--{name.replace('_', '-')}: expected an int >= {minimum}{' or None' if optional else ''}, got {value!r}")


@dataclass
class Options:
    """Settings of ``geonn fields generate``.

    Args:
        samples: N, the number of fields each generator draws (>= 1).
        epochs: GAN training epochs (``None``: 32); an epoch is ``steps_per_epoch`` generator updates.
        condition: ``"previous"`` (each field generated given the field one step before) or ``"none"``.
        noise_dim, width, steps_per_epoch, critic_steps, batch_size, learning_rate, gp_weight, ema:
            the GAN's hyperparameters (:class:`geonn.emulators.GANConfig`, whose defaults these are).
        eof_modes: EOFs kept by the EOF-Gaussian sampler (``None``: all, ``min(train - 1, points)``).
        eof_residual: add the sampler's point-wise residual noise (nothing to add with all modes).
    """

    samples: int
    epochs: int | None = None
    condition: str = "previous"
    noise_dim: int = GANConfig.noise_dim
    width: int = GANConfig.width
    steps_per_epoch: int = GANConfig.steps_per_epoch
    critic_steps: int = GANConfig.critic_steps
    batch_size: int = GANConfig.batch_size
    learning_rate: float = GANConfig.learning_rate
    gp_weight: float = GANConfig.gp_weight
    ema: float = GANConfig.ema
    eof_modes: int | None = None
    eof_residual: bool = True

    def __post_init__(self):
        _int("samples", self.samples, 1)
        _int("epochs", self.epochs, 1, optional=True)
        _int("eof_modes", self.eof_modes, 1, optional=True)
        if self.condition not in CONDITIONS:
            raise InputError(f"condition: expected one of {CONDITIONS}, got {self.condition!r}")
        if not isinstance(self.eof_residual, bool):
            raise InputError(f"eof_residual: expected true or false, got {self.eof_residual!r}")
        self.gan_config(0)  # checks the GAN's hyperparameters now, before any data is read

    def gan_config(self, seed: int) -> GANConfig:
        return GANConfig(condition=self.condition, noise_dim=self.noise_dim, width=self.width,
                         epochs=self.epochs if self.epochs is not None else DEFAULT_EPOCHS,
                         steps_per_epoch=self.steps_per_epoch, critic_steps=self.critic_steps, batch_size=self.batch_size,
                         learning_rate=self.learning_rate, gp_weight=self.gp_weight, ema=self.ema, seed=seed)


def sample_steps(n: int, data: FieldData) -> torch.Tensor:
    """The held-out step each of ``n`` samples is tied to: ``test.start + i mod n_test``."""
    return data.split.test.start + torch.arange(n) % data.n_test


def _scale(data: FieldData) -> torch.Tensor:
    return data.normaliser.std.to(torch.float32)


def scores(anomalies: torch.Tensor, data: FieldData, mask: torch.Tensor | None = None,
           groups: torch.Tensor | None = None) -> dict[str, float]:
    """Spectrum error and point-wise W1 of normalised anomalies ``(n, channel, lat, lon)`` vs the held-out steps.

    Both in the variable's units: spectra of ``anomalies * scale`` against the held-out anomalies
    from the training climatology, W1 of the fields with their climatology against the held-out
    values. NaN or ``mask`` False counts as missing. ``groups``: the calendar group of each field
    (default: that of the held-out step each sample is tied to, :func:`sample_steps`).
    """
    test = data.split.test
    valid = torch.isfinite(anomalies) if mask is None else mask & torch.isfinite(anomalies)
    anomalies = torch.where(valid, anomalies, 0.0)
    groups = data.groups[sample_steps(anomalies.shape[0], data)] if groups is None else groups
    fields = data.normaliser.inverse(anomalies, valid, groups)
    heldout_anomalies = data.anomalies[test] * _scale(data)
    spectrum = power_spectrum(anomalies * _scale(data), valid)
    reference = power_spectrum(heldout_anomalies, data.mask[test])
    return {
        "spectrum_error": float(spectrum_error(spectrum, reference)),
        "wasserstein_pointwise": float(wasserstein_pointwise(fields, data.values[test], data.weights, valid, data.mask[test])),
    }


def _condition_fields(n: int, data: FieldData) -> torch.Tensor:
    previous = sample_steps(n, data) - 1
    return torch.where(data.mask[previous], data.anomalies[previous], 0.0)


def samples_dataset(anomalies: torch.Tensor, data: FieldData, options: Options, used: torch.Tensor) -> xr.Dataset:
    """The generated fields in the variable's units and layout, ``sample`` in place of time."""
    n = anomalies.shape[0]
    steps = sample_steps(n, data)
    valid = used & torch.isfinite(anomalies)
    fields = data.normaliser.inverse(torch.where(valid, anomalies, 0.0), valid, data.groups[steps])
    time = data.grid.time
    like = data.da.isel({time: steps.numpy()})
    da = from_tensor(fields, like=like, grid=data.grid, mask=valid)
    along_time = [name for name, coord in da.coords.items() if time in coord.dims]
    times = da[time] if time in da.coords else None
    da = da.drop_vars(along_time).rename({time: "sample"})
    da = da.assign_coords(sample=("sample", np.arange(n, dtype=np.int32), {"long_name": "generated sample number", "units": "1"}))
    da.encoding = {k: v for k, v in da.encoding.items() if k in ("dtype", "_FillValue", "zlib", "complevel", "shuffle")}
    tied = options.condition == "previous" or int(data.groups.max()) > 0
    if tied and times is not None:
        coord = xr.Variable(("sample",), times.values, {k: v for k, v in times.attrs.items() if k != "bounds"})
        coord.attrs["long_name"] = ("held-out time each sample is generated for (given the field one step before)"
                                    if options.condition == "previous" else "held-out time whose climatology each sample has")
        coord.encoding = {k: v for k, v in times.encoding.items() if k in ("units", "calendar", "dtype")}
        da = da.assign_coords({time: coord})
    ds = da.to_dataset(name=data.var)
    ds.attrs = {"title": f"geonn fields generate: {n} WGAN-GP samples of {data.var}",
                "source_file": str(data.path.resolve()), "condition": options.condition,
                "train_steps": data.n_train, "test_steps": data.n_test, "Conventions": "CF-1.8",
                "comment": "fields generated from the training anomalies, with the training climatology added back"}
    return ds


def _figures(folder: Path, data: FieldData, gan_samples: torch.Tensor, eof_samples: torch.Tensor, spectra: dict,
             conditional: bool) -> None:
    lat = data.grid.latitudes
    lon = data.da[data.grid.lon].values if data.grid.lon in data.da.coords else None
    scale = _scale(data)
    test = data.split.test
    k = min(4, data.n_test, gan_samples.shape[0])
    heldout = torch.where(data.mask[test][:k], data.anomalies[test][:k] * scale, float("nan"))
    times = data.da[data.grid.time].values[test][:k] if data.grid.time in data.da.coords else range(k)
    panels = [heldout[i, 0].numpy() for i in range(k)]
    titles = [f"held-out {str(t)[:10]}" for t in times]
    panels += [(gan_samples[:k] * scale)[i, 0].numpy() for i in range(k)]
    titles += [f"GAN for {str(t)[:10]}" if conditional else f"GAN sample {i}" for i, t in enumerate(times)]
    panels += [(eof_samples[:k] * scale)[i, 0].numpy() for i in range(k)]
    titles += [f"EOF-Gaussian sample {i}" for i in range(k)]
    plotting.map_panels(panels, titles, lat, lon, folder / "figures" / "samples_vs_heldout.png", units=data.units,
                        ncols=k, suptitle=f"{data.var}: anomalies from the training climatology")
    longest = max(data.values.shape[-2:])
    k_axis = (radial_wavenumbers(*data.values.shape[-2:])[1:] * longest).numpy()
    plotting.spectra(k_axis, {name: s[1:].numpy() for name, s in spectra.items()}, folder / "figures" / "spectra.png",
                     xlabel=f"wavenumber (cycles per {longest} grid steps)", ylabel=f"power ({data.units}$^2$)" if data.units else "power")


def run(data: FieldData, options: Options, folder: Path, *, seed: int = 0, progress: bool = True,
        checkpoints: Path | None = None, resume: bool = False, device: str | torch.device = "cpu") -> dict:
    """Train the GAN, fit the EOF-Gaussian sampler, write the outputs into ``folder``, return the metrics.

    The GAN's training checkpoint (``gan.pt``, written every epoch) goes to ``checkpoints``
    (default ``folder/checkpoints``, removed at the end); ``resume`` continues from it. The GAN
    trains and samples on ``device``; under ``torchrun`` its training is data-parallel
    (:meth:`geonn.emulators.FieldGAN.fit`) and rank 0 alone samples, scores and writes.
    """
    torch.manual_seed(seed)
    train = data.split.train
    if options.condition == "previous" and data.n_train < 3:
        raise InputError(f"condition: 'previous' needs at least 3 training steps, got {data.n_train}")
    own = checkpoints is None
    checkpoints = folder / "checkpoints" if own else checkpoints
    gan = FieldGAN(options.gan_config(seed)).fit(data.anomalies[train], data.mask[train], checkpoint_dir=checkpoints,
                                                 resume=resume, progress=progress, device=device)
    if own:
        shutil.rmtree(checkpoints, ignore_errors=True)
    if not distributed.current().is_main:
        return {"condition": options.condition, "samples": options.samples, "epochs": gan.config.epochs}
    draws = torch.Generator().manual_seed(seed + 1)
    n = options.samples
    previous = _condition_fields(n, data) if options.condition == "previous" else None
    gan_samples = gan.sample(n, previous, generator=draws)
    sampler = EOFGaussianSampler(options.eof_modes, residual=options.eof_residual)
    sampler.fit(data.anomalies[train], data.mask[train], data.weights)
    eof_samples = sampler.sample(n, generator=draws)

    found = scores(gan_samples, data)
    baseline = scores(eof_samples, data)
    training = scores(data.anomalies[train], data, data.mask[train], data.groups[train])
    persistence = scores(_condition_fields(n, data), data)
    write_netcdf(samples_dataset(gan_samples, data, options, gan.used), folder / "samples.nc")
    save_checkpoint({"var": data.var, "gan": gan.state_dict(), "eof_gaussian": sampler.state_dict(),
                     "normaliser": data.normaliser.state_dict()}, folder / "model.pt")
    scale = _scale(data)
    test = data.split.test
    spectra = {
        "held-out data": power_spectrum(data.anomalies[test] * scale, data.mask[test]),
        "training data": power_spectrum(data.anomalies[train] * scale, data.mask[train]),
        "GAN": power_spectrum(gan_samples * scale),
        "EOF-Gaussian": power_spectrum(eof_samples * scale),
    }
    _figures(folder, data, gan_samples, eof_samples, spectra, gan.conditional)
    last = gan.history.epochs[-1]
    return {
        "condition": options.condition, "samples": n, "epochs": gan.config.epochs,
        **found,
        "spectrum_error_eof_gaussian": baseline["spectrum_error"],
        "wasserstein_pointwise_eof_gaussian": baseline["wasserstein_pointwise"],
        "spectrum_error_training_data": training["spectrum_error"],
        "wasserstein_pointwise_training_data": training["wasserstein_pointwise"],
        "spectrum_error_persistence": persistence["spectrum_error"],
        "wasserstein_pointwise_persistence": persistence["wasserstein_pointwise"],
        "spectrum_error_ratio_to_eof_gaussian": found["spectrum_error"] / baseline["spectrum_error"],
        "wasserstein_ratio_to_eof_gaussian": found["wasserstein_pointwise"] / baseline["wasserstein_pointwise"],
        "eof_gaussian_modes": sampler.reducer.modes,
        "gan_critic_loss": last["critic_loss"], "gan_wasserstein_estimate": last["wasserstein"],
        "gan_train_seconds": gan.history.train_seconds,
    }
