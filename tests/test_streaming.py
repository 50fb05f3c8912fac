"""Out of core: the streamed normaliser, the randomised EOF over time blocks and the streamed
``fields reduce`` agree with their in-memory versions, and never read more than a block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from geonn.emulators import EOFReducer
from geonn.emulators.eof import fit_eof_blocks
from geonn.errors import InputError
from geonn.fields import Normaliser, calendar_groups, find_grid, to_tensor
from geonn.fields import blocks as blocks_module
from geonn.fields.blocks import fit_normaliser, time_blocks
from geonn.pipelines import open_field, run_verb
from geonn.pipelines.verbs import make_options

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def monthly_field(n_times=40, seed=0):
    rng = np.random.default_rng(seed)
    times = xr.date_range("2000-01-01", periods=n_times, freq="MS", calendar="360_day", use_cftime=True)
    lat, lon = np.linspace(50, -50, 6), np.linspace(0, 330, 12)
    season = 5 * np.cos(2 * np.pi * np.arange(n_times) / 12)[:, None, None]
    y, x = np.meshgrid(np.linspace(-1, 1, 6), np.linspace(-1, 1, 12), indexing="ij")
    patterns = np.stack([np.cos(np.pi * x), np.sin(np.pi * y), x * y])  # three strong modes over weak noise
    amplitudes = rng.standard_normal((n_times, 3)) * np.array([4.0, 2.5, 1.5])
    noise = rng.standard_normal((n_times, 6, 12)) * np.linspace(0.1, 0.4, 12)
    values = (280 + season + np.einsum("tk,kyx->tyx", amplitudes, patterns) + noise).astype(np.float32)
    values[:, 1, 2:4] = np.nan
    values[3, 4, 5] = np.nan  # a gap in time
    return xr.DataArray(values, dims=("time", "lat", "lon"), name="ts",
                        coords={"time": times, "lat": ("lat", lat, {"units": "degrees_north"}),
                                "lon": ("lon", lon, {"units": "degrees_east"})}, attrs={"units": "K"})


@pytest.mark.parametrize("scale", ["global", "channel", "point", None])
def test_streamed_normaliser_equals_the_in_memory_fit(scale):
    da = monthly_field()
    values, mask, grid = to_tensor(da, dtype=torch.float64)
    groups = calendar_groups(da)
    train = slice(0, 30)
    expected = Normaliser(scale=scale).fit(values, mask, train, groups)
    found = fit_normaliser(Normaliser(scale=scale), da, grid, train, groups, block=7)
    torch.testing.assert_close(found.climatology.double(), expected.climatology, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(found.std.double(), expected.std, rtol=1e-5, atol=1e-6)
    assert torch.equal(found.counts, expected.counts)


def test_time_blocks_read_only_their_steps(monkeypatch):
    da = monthly_field()
    seen = []
    real = blocks_module.field_array

    def spy(block, grid):
        seen.append(block.sizes["time"])
        return real(block, grid)

    monkeypatch.setattr(blocks_module, "field_array", spy)
    steps = [s for s, _, _ in time_blocks(da, find_grid(da), slice(3, 40), 8)]
    assert seen == [8, 8, 8, 8, 5] and steps[0] == slice(3, 11) and steps[-1] == slice(35, 40)
    with pytest.raises(InputError, match="block: expected an int >= 1, got 0"):
        next(time_blocks(da, find_grid(da), slice(0, 4), 0))


def test_randomised_eof_over_blocks_matches_the_exact_svd():
    generator = torch.Generator().manual_seed(1)
    n_times, shape = 200, (1, 10, 15)
    spectrum = 0.7 ** torch.arange(30, dtype=torch.float64)
    left = torch.linalg.qr(torch.randn(n_times, 30, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(150, 30, generator=generator, dtype=torch.float64))[0]
    data = (left * spectrum) @ right.T * 10 + 1e-3 * torch.randn(n_times, 150, generator=generator, dtype=torch.float64)
    data = (data - data.mean(0)).reshape(n_times, *shape)
    weights = torch.cos(torch.deg2rad(torch.linspace(-60, 60, 10)))[:, None].expand(10, 15) / 100
    exact = EOFReducer(5).fit(data, None, weights)

    def blocks():
        for start in range(0, n_times, 32):
            yield slice(start, start + 32), data[start:start + 32], None

    streamed = fit_eof_blocks(blocks, 5, weights, torch.ones(shape, dtype=torch.bool), power_iterations=3)
    torch.testing.assert_close(streamed.explained_variance_ratio, exact.explained_variance_ratio, rtol=1e-8, atol=0)
    torch.testing.assert_close(streamed.patterns, exact.patterns, rtol=0, atol=1e-8)
    torch.testing.assert_close(streamed.decode(streamed.encode(data)), exact.decode(exact.encode(data)), rtol=0, atol=1e-8)


def test_streamed_reduce_over_many_files_equals_in_memory(tmp_path):
    da = monthly_field(n_times=48)
    for year in range(4):
        da.isel(time=slice(12 * year, 12 * (year + 1))).to_dataset().to_netcdf(tmp_path / f"ts_{year}.nc")
    pattern = str(tmp_path / "ts_*.nc")
    streamed = open_field(pattern, "ts", 0.75, stream=True, block=5)
    assert type(streamed).__name__ == "StreamedField" and streamed.n_train == 36
    options = make_options("reduce", modes=3)
    a = run_verb("reduce", pattern, "ts", options, tmp_path / "memory", train_fraction=0.75, progress=False)
    b = run_verb("reduce", pattern, "ts", options, tmp_path / "streamed", train_fraction=0.75, progress=False, stream=True)
    assert b["streamed"] is True
    for key in ("rmse_test", "explained_variance_test", "rmse_train"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
    decode = xr.coders.CFDatetimeCoder(use_cftime=True)
    with xr.open_dataset(tmp_path / "memory" / "reconstruction.nc", decode_times=decode) as m, \
            xr.open_dataset(tmp_path / "streamed" / "reconstruction.nc", decode_times=decode) as s:
        xr.testing.assert_identical(s["ts"].coords.to_dataset(), m["ts"].coords.to_dataset())
        assert s["ts"].attrs == m["ts"].attrs
        np.testing.assert_array_equal(np.isnan(s["ts"].values), np.isnan(da.values))
        np.testing.assert_allclose(s["ts"].values, m["ts"].values, atol=1e-3, equal_nan=True)


def test_verbs_without_an_out_of_core_path_refuse_streaming(tmp_path):
    monthly_field().to_dataset().to_netcdf(tmp_path / "in.nc")
    with pytest.raises(InputError, match=r"--stream: generate needs the variable in memory"):
        run_verb("generate", tmp_path / "in.nc", "ts", None, tmp_path / "out", stream=True)
    with pytest.raises(InputError, match=r"--method: 'autoencoder' needs the variable in memory"):
        run_verb("reduce", tmp_path / "in.nc", "ts", make_options("reduce", modes=2, method="autoencoder"), tmp_path / "out",
                 stream=True, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match=r"IN.nc: expected netCDF files matching .*nothing_\*.nc'?, got none"):
        run_verb("reduce", tmp_path / "nothing_*.nc", "ts", make_options("reduce", modes=2), tmp_path / "out")
