"""``geonn fields generate`` and the distribution scores it reports (spectra, point-wise Wasserstein)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import xarray as xr
from scipy.stats import wasserstein_distance

from geonn import InputError
from geonn.cli import main
from geonn.fields import power_spectrum, radial_wavenumbers, spectrum_error, wasserstein_pointwise
from geonn.io import load_checkpoint
from geonn.pipelines import run_verb
from geonn.pipelines.generate import Options

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- power spectra


def ring_count(n_lat, n_lon, k):
    """How many 2-D FFT frequencies fall in radial bin ``k`` (cycles per grid step times max(n_lat, n_lon))."""
    ky, kx = np.meshgrid(np.fft.fftfreq(n_lat), np.fft.fftfreq(n_lon), indexing="ij")
    return int((np.rint(np.hypot(ky, kx) * max(n_lat, n_lon)) == k).sum())


@pytest.mark.parametrize("axis", ["lon", "lat"])
def test_spectrum_of_a_sine_field_is_one_spike(axis):
    n_lat, n_lon, cycles = 37, 49, 5
    i = torch.arange(n_lat if axis == "lat" else n_lon, dtype=torch.float64)
    n = len(i)
    wave = 2.0 * torch.sin(2 * math.pi * cycles * i / n)
    field = wave[:, None].expand(n_lat, n_lon) if axis == "lat" else wave[None, :].expand(n_lat, n_lon)
    spectrum = power_spectrum(field.reshape(1, 1, n_lat, n_lon))
    # the wave's frequency, cycles / n per grid step, sits in bin round(cycles / n * max(n_lat, n_lon))
    k = round(cycles / n * max(n_lat, n_lon))
    total = float(field.pow(2).sum())  # Parseval: all the power, amplitude^2 / 2 per point
    assert spectrum.shape == (25,) and torch.allclose(radial_wavenumbers(n_lat, n_lon)[k], torch.tensor(k / 49, dtype=torch.float64))
    assert spectrum[k] == pytest.approx(total / ring_count(n_lat, n_lon, k), rel=1e-12)
    others = torch.cat((spectrum[:k], spectrum[k + 1 :]))
    assert float(others.abs().max()) < 1e-20 * total


def test_spectrum_averages_samples_and_fills_masked_points():
    g = torch.Generator().manual_seed(0)
    fields = torch.randn(6, 2, 8, 10, generator=g, dtype=torch.float64)
    each = torch.stack([power_spectrum(fields[i : i + 1, c : c + 1]) for i in range(6) for c in range(2)])
    torch.testing.assert_close(power_spectrum(fields), each.mean(0))
    # a constant field with a masked corner: filled with its mean it has no power beyond k = 0;
    # filled with 0 (the default, for anomalies) the hole shows up at all wavenumbers
    constant = torch.full((1, 1, 8, 10), 3.0, dtype=torch.float64)
    mask = torch.ones(constant.shape, dtype=torch.bool)
    mask[..., :3, :3] = False
    assert float(power_spectrum(constant, mask, fill="mean")[1:].abs().max()) < 1e-25
    assert float(power_spectrum(constant, mask, fill="zero")[1:].min()) > 0.01
    nan_masked = torch.where(mask, constant, float("nan"))
    torch.testing.assert_close(power_spectrum(nan_masked), power_spectrum(constant, mask))
    with pytest.raises(InputError, match="fill: expected one of"):
        power_spectrum(constant, fill="nearest")


def test_spectrum_error_is_the_mean_absolute_log_ratio():
    reference = torch.tensor([100.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    assert float(spectrum_error(reference, reference)) == 0.0
    assert float(spectrum_error(2 * reference, reference)) == pytest.approx(math.log10(2))
    mixed = reference * torch.tensor([1e6, 10.0, 0.1, 1.0], dtype=torch.float64)  # bin 0 (the domain mean) is not scored
    assert float(spectrum_error(mixed, reference)) == pytest.approx(2 / 3)
    with pytest.raises(InputError, match="spectrum: expected the shape of reference"):
        spectrum_error(reference[:3], reference)


# ---------------------------------------------------------------- point-wise Wasserstein


def test_wasserstein_pointwise_matches_scipy_at_each_point():
    g = torch.Generator().manual_seed(1)
    samples = 2 * torch.randn(40, 2, 3, 4, generator=g, dtype=torch.float64) + 1
    reference = torch.randn(17, 2, 3, 4, generator=g, dtype=torch.float64).pow(3)
    samples[3, 0, 1, 1] = float("nan")  # missing in one sample only
    reference[:, 1, 2, 3] = float("nan")  # never valid in the reference: not scored
    reference_mask = torch.ones(reference.shape, dtype=torch.bool)
    reference_mask[:4, 0, 0, 2] = False
    found = wasserstein_pointwise(samples, reference, reference_mask=reference_mask, per_point=True)
    expected = np.full((2, 3, 4), np.nan)
    for index in np.ndindex(2, 3, 4):
        a = samples[(slice(None), *index)].numpy()
        b = reference[(slice(None), *index)].numpy()[reference_mask[(slice(None), *index)].numpy()]
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if b.size:
            expected[index] = wasserstein_distance(a, b)
    np.testing.assert_allclose(found.numpy(), expected, rtol=1e-12, atol=1e-14)
    # the scalar: area-weighted mean over the scored points, channels pooled
    weights = torch.linspace(0.5, 1.0, 3, dtype=torch.float64)[:, None].expand(3, 4)
    scored = np.isfinite(expected)
    w = np.broadcast_to(weights.numpy(), expected.shape) * scored
    mean = wasserstein_pointwise(samples, reference, weights, reference_mask=reference_mask)
    assert float(mean) == pytest.approx(float((w * np.nan_to_num(expected)).sum() / w.sum()), rel=1e-12)


def test_wasserstein_pointwise_of_a_shift_is_the_shift():
    g = torch.Generator().manual_seed(2)
    reference = torch.randn(30, 1, 4, 5, generator=g)
    assert float(wasserstein_pointwise(reference + 0.7, reference)) == pytest.approx(0.7, rel=1e-6)
    assert float(wasserstein_pointwise(reference, reference)) == 0.0
    with pytest.raises(InputError, match="samples: expected fields of the reference's shape"):
        wasserstein_pointwise(reference[:, :, :3], reference)


# ---------------------------------------------------------------- the verb


def synthetic_file(path, n_times=30):
    """Annual fields on a 360-day calendar, dims (t, latitude, longitude), latitude north to south, NaN land."""
    rng = np.random.default_rng(0)
    lat = np.linspace(60.0, 20.0, 9)
    lon = np.linspace(230.0, 290.0, 11)
    times = xr.date_range("1900-01-01", periods=n_times, freq="YS", calendar="360_day", use_cftime=True)
    pattern = np.sin(np.deg2rad(lon))[None, :] * np.cos(np.deg2rad(lat))[:, None]
    amplitude = np.cumsum(rng.standard_normal(n_times)) * 0.3
    values = 280 + amplitude[:, None, None] * pattern + 0.5 * rng.standard_normal((n_times, 9, 11))
    values[:, 6:, :3] = np.nan  # land
    da = xr.DataArray(
        values.astype(np.float32), dims=("t", "latitude", "longitude"),
        coords={"t": ("t", times, {"standard_name": "time"}), "latitude": ("latitude", lat, {"units": "degrees_north"}),
                "longitude": ("longitude", lon, {"units": "degrees_east"})},
        name="tas", attrs={"units": "K", "long_name": "near-surface air temperature", "standard_name": "air_temperature"},
    )
    da.to_dataset().to_netcdf(path)
    return da


def open_nc(path):
    return xr.open_dataset(path, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))


@pytest.mark.slow
def test_cli_generate_writes_samples_and_metrics(tmp_path, capsys):
    source = synthetic_file(tmp_path / "in.nc")
    out = tmp_path / "out"
    code = main(["fields", "generate", str(tmp_path / "in.nc"), "--var", "tas", "--samples", "9", "--epochs", "1",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"samples.nc", "model.pt", "config.toml", "metrics.json", "figures"}
    assert {p.name for p in (out / "figures").iterdir()} == {"samples_vs_heldout.png", "spectra.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("spectrum_error", "wasserstein_pointwise", "spectrum_error_eof_gaussian", "wasserstein_pointwise_eof_gaussian"):
        assert math.isfinite(metrics[key]) and metrics[key] >= 0, key
    assert metrics["condition"] == "previous" and metrics["samples"] == 9
    with open_nc(out / "samples.nc") as ds:
        samples = ds["tas"].load()
    assert samples.dims == ("sample", "latitude", "longitude") and samples.sizes["sample"] == 9
    assert samples.attrs == source.attrs
    xr.testing.assert_identical(samples["latitude"], source["latitude"])  # still north to south
    xr.testing.assert_identical(samples["longitude"], source["longitude"])
    land = source.isnull().all("t").values
    assert np.isnan(samples.values[:, land]).all() and np.isfinite(samples.values[:, ~land]).all()
    # conditional: each sample is for a held-out year (the last 6 of 30), 360-day calendar kept
    heldout = source["t"].values[24:]
    assert list(samples["t"].values) == [heldout[i % 6] for i in range(9)]
    assert samples["t"].values[0].calendar == "360_day"
    state = load_checkpoint(out / "model.pt")
    assert {"gan", "eof_gaussian", "normaliser"} <= set(state)


def test_unconditional_run_has_a_plain_sample_dimension(tmp_path):
    synthetic_file(tmp_path / "in.nc")
    options = Options(samples=5, epochs=1, condition="none", steps_per_epoch=2, critic_steps=1, batch_size=4, width=4, noise_dim=4,
                      eof_modes=3)
    metrics = run_verb("generate", tmp_path / "in.nc", "tas", options, tmp_path / "out", progress=False)
    assert metrics["eof_gaussian_modes"] == 3 and math.isfinite(metrics["wasserstein_pointwise"])
    with open_nc(tmp_path / "out" / "samples.nc") as ds:
        assert ds["tas"].dims == ("sample", "latitude", "longitude") and "t" not in ds.coords


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--var", "tas", "--samples", "0"], "--samples: expected an int >= 1, got 0"),
        (["--var", "pr", "--samples", "3"], "--var: '{path}' has no variable 'pr'; its variables are ['tas']"),
    ],
)
def test_bad_inputs_fail_and_leave_nothing(argv, message, tmp_path, capsys):
    synthetic_file(tmp_path / "in.nc")
    out = tmp_path / "out"
    assert main(["fields", "generate", str(tmp_path / "in.nc"), *argv, "--out", str(out), "--quiet"]) == 2
    assert message.format(path=tmp_path / "in.nc") in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in.nc"]


def test_options_are_checked():
    with pytest.raises(InputError, match="condition: expected one of"):
        Options(samples=3, condition="coarse")
    with pytest.raises(InputError, match="--epochs: expected an int >= 1"):
        Options(samples=3, epochs=0)
    with pytest.raises(InputError, match="learning_rate"):
        Options(samples=3, learning_rate=-1.0)


@pytest.mark.slow
def test_verb_resumes_from_its_checkpoints(tmp_path):
    from geonn.io import save_checkpoint
    from geonn.pipelines import open_field
    from geonn.pipelines.generate import run

    synthetic_file(tmp_path / "in.nc")
    data = open_field(tmp_path / "in.nc", "tas")
    tiny = {"samples": 4, "steps_per_epoch": 2, "critic_steps": 1, "batch_size": 4, "width": 4, "noise_dim": 4}
    for name in ("whole", "cut", "resumed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "figures").mkdir()
    run(data, Options(epochs=2, **tiny), tmp_path / "whole", checkpoints=tmp_path / "ck-whole")
    run(data, Options(epochs=1, **tiny), tmp_path / "cut", checkpoints=tmp_path / "ck-cut")  # stopped after one epoch
    state = load_checkpoint(tmp_path / "ck-cut" / "gan.pt")
    state["config"]["epochs"] = 2
    save_checkpoint(state, tmp_path / "ck-cut" / "gan.pt")
    run(data, Options(epochs=2, **tiny), tmp_path / "resumed", checkpoints=tmp_path / "ck-cut", resume=True)
    whole, resumed = (load_checkpoint(tmp_path / name / "model.pt")["gan"]["generator"] for name in ("whole", "resumed"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    with open_nc(tmp_path / "whole" / "samples.nc") as a, open_nc(tmp_path / "resumed" / "samples.nc") as b:
        xr.testing.assert_identical(a, b)
