"""Issue 6 for the ``geonn fields`` verbs: the emulator trains out of core (batches read a block of time
steps at a time from a multi-file collection, normalised on the fly) to the weights of the in-memory
run with the same sample order; ``--device`` selects cpu, cuda or auto (cuda without a GPU is a clear
error); and ``geonn fields emulate`` under ``torchrun --nproc-per-node 2`` (gloo) ends with the
weights and metrics of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import xarray as xr

from geonn.cli import main
from geonn.emulators.cnn import (
    CNNEmulator,
    EmulatorTraining,
    SeriesPairs,
    StreamedPairs,
    epoch_batches,
    fit_emulator,
)
from geonn.errors import InputError
from geonn.io import load_checkpoint
from geonn.pipelines import open_field, run_verb
from geonn.pipelines.emulate import Options
from geonn.pipelines.source import StreamedField

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK = 16
TINY = {"epochs": 2, "history": 2, "width": 4, "depth": 2, "batch_size": 8, "patience": None}


def write_collection(folder, n_files=3, steps=40, seed=0, freq="D"):
    """Yearly files of a travelling wave plus noise on an 8 x 16 global grid, a NaN point; the glob pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lat, lon = np.linspace(-60, 60, 8), np.arange(16) * 22.5
    for f in range(n_files):
        t = np.arange(f * steps, (f + 1) * steps)[:, None, None]
        values = 280 + 3 * np.cos(np.deg2rad(lon)[None, None] - 0.3 * t) * np.cos(np.deg2rad(lat))[None, :, None]
        values = (values + 0.3 * rng.standard_normal(values.shape)).astype(np.float32)
        values[:, 2, 3] = np.nan
        times = xr.date_range(f"{2000 + f}-01-01", periods=steps, freq=freq, calendar="noleap", use_cftime=True)
        da = xr.DataArray(values, dims=("time", "lat", "lon"), name="tas",
                          coords={"time": times, "lat": ("lat", lat, {"units": "degrees_north"}),
                                  "lon": ("lon", lon, {"units": "degrees_east"})},
                          attrs={"units": "K", "long_name": "air temperature"})
        da.to_dataset().to_netcdf(folder / f"tas_{2000 + f}.nc")
    return str(folder / "tas_*.nc")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return write_collection(tmp_path_factory.mktemp("collection"))


def test_epoch_batches_visit_every_target_once_a_block_at_a_time():
    targets = torch.arange(5, 70)
    batches = epoch_batches(targets, 8, torch.Generator().manual_seed(0), block=16)
    assert torch.equal(torch.sort(torch.cat(batches)).values, targets)
    assert all(len(set((b // 16).tolist())) == 1 and b.numel() <= 8 for b in batches)
    order = [int(b[0]) // 16 for b in batches]
    assert order != sorted(order)  # the blocks come in a shuffled order
    again = epoch_batches(targets, 8, torch.Generator().manual_seed(0), block=16)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    whole = epoch_batches(targets, 8, torch.Generator().manual_seed(0))  # the in-memory default: one permutation
    assert torch.equal(torch.cat(whole), targets[torch.randperm(65, generator=torch.Generator().manual_seed(0))])


@pytest.mark.slow
def test_a_streamed_epoch_equals_the_in_memory_one_with_the_same_sample_order(collection):
    memory = open_field(collection, "tas", stream=False)
    streamed = open_field(collection, "tas", stream=True, block=BLOCK)
    assert isinstance(streamed, StreamedField) and streamed.da.chunks is not None
    train = memory.split.train
    torch.testing.assert_close(streamed.normaliser.climatology, memory.normaliser.climatology)
    reads = []

    def read(steps):
        reads.append(steps.stop - steps.start)
        return streamed.read(steps)

    config = EmulatorTraining(epochs=2, batch_size=8, learning_rate=1e-2, patience=None, refit=True, seed=1)
    models, fits = [], []
    for source in (SeriesPairs(memory.anomalies[train], memory.mask[train], block=BLOCK),
                   StreamedPairs(read, memory.n_train, 1, block=BLOCK)):
        torch.manual_seed(0)
        model = CNNEmulator(1, 2, width=4, depth=2, padding="periodic")
        fits.append(fit_emulator(model, source, None, memory.weights, config, progress=False))
        models.append(model)
    for name, value in models[0].state_dict().items():
        torch.testing.assert_close(models[1].state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert [h["loss"] for h in fits[1].history] == pytest.approx([h["loss"] for h in fits[0].history], rel=1e-5)
    assert fits[1].best_epoch == fits[0].best_epoch
    # never more than a block of targets and its history in memory, never the held-out part
    assert max(reads) <= BLOCK + 2 and len(reads) > 6
    with pytest.raises(InputError, match=r"index: expected targets in \[2, 96\)"):
        StreamedPairs(read, memory.n_train, 1, block=BLOCK).pairs(torch.tensor([95, 96]), 2)


@pytest.mark.slow
def test_fields_emulate_streamed_writes_what_it_scores(collection, tmp_path):
    options = Options(**TINY)
    streamed = run_verb("emulate", collection, "tas", options, tmp_path / "streamed", progress=False, stream=True, device="cpu")
    memory = run_verb("emulate", collection, "tas", options, tmp_path / "memory", progress=False, device="cpu")
    assert streamed["streamed"] is True and streamed["best_baseline"] == "persistence"
    assert streamed["rmse_lead1_persistence"] == pytest.approx(memory["rmse_lead1_persistence"], rel=1e-6)
    assert streamed["acc_lead1_persistence"] == pytest.approx(memory["acc_lead1_persistence"], rel=1e-6)
    assert streamed["rmse_rollout_persistence"] == pytest.approx(memory["rmse_rollout_persistence"], rel=1e-6)
    assert streamed["rmse_lead1"] == pytest.approx(memory["rmse_lead1"], rel=0.1)  # another sample order
    with xr.open_dataset(tmp_path / "streamed" / "forecast.nc", decode_times=xr.coders.CFDatetimeCoder(use_cftime=True)) as ds, \
            xr.open_mfdataset(collection, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True)) as truth, \
            xr.open_dataset(tmp_path / "memory" / "forecast.nc", decode_times=xr.coders.CFDatetimeCoder(use_cftime=True)) as other:
        assert set(ds.data_vars) == {"tas", "tas_rollout"} and ds.tas.dims == other.tas.dims
        assert ds.tas.attrs["units"] == "K" and ds.tas_rollout.attrs["long_name"].endswith("from the last training steps")
        np.testing.assert_array_equal(ds.time.values, other.time.values)
        assert bool(ds.tas.isel(lat=2, lon=3).isnull().all()) and int(ds.tas.isnull().sum()) == ds.sizes["time"]
        held_out = truth.tas.sel(time=ds.time)
        weights = np.cos(np.deg2rad(ds.lat))
        for name, key in (("tas", "rmse_lead1"), ("tas_rollout", "rmse_rollout")):
            squared = ((ds[name] - held_out) ** 2).weighted(weights.where(held_out.notnull(), 0)).mean(("lat", "lon"))
            assert float(np.sqrt(squared).mean()) == pytest.approx(streamed[key], rel=1e-4), name
    saved = load_checkpoint(tmp_path / "streamed" / "model.pt")
    assert set(saved) >= {"emulator", "normaliser", "padding", "options"} and saved["padding"] == "periodic"
    assert sorted(p.name for p in (tmp_path / "streamed" / "figures").iterdir()) == [
        "error_difference.png", "error_maps.png", "forecast_heldout.png"]


def test_device_on_the_command_line_and_in_the_api(collection, tmp_path, capsys):
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device: 'cuda' was asked for, but torch sees no CUDA GPU"):
            run_verb("emulate", collection, "tas", Options(**TINY), tmp_path / "cuda", progress=False, device="cuda")
        assert not (tmp_path / "cuda").exists()
        code = main(["fields", "emulate", collection, "--var", "tas", "--out", str(tmp_path / "cli"), "--device", "cuda"])
        assert code == 2 and "device: 'cuda' was asked for" in capsys.readouterr().err
        code = main(["case", "lorenz63", "--out", str(tmp_path / "case"), "--device", "cuda"])
        assert code == 2 and "device: 'cuda' was asked for" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fields", "emulate", collection, "--var", "tas", "--out", str(tmp_path / "tpu"), "--device", "tpu"])
    with pytest.raises(InputError, match=r"device: expected one of \('auto', 'cpu', 'cuda'\), got 'tpu'"):
        run_verb("emulate", collection, "tas", Options(**TINY), tmp_path / "api", progress=False, device="tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stream", [False, True])
def test_emulate_on_cuda_matches_the_cpu(collection, tmp_path, stream):
    cpu = run_verb("emulate", collection, "tas", Options(**TINY), tmp_path / "cpu", progress=False, stream=stream, device="cpu")
    gpu = run_verb("emulate", collection, "tas", Options(**TINY), tmp_path / "gpu", progress=False, stream=stream, device="cuda")
    assert gpu["rmse_lead1"] == pytest.approx(cpu["rmse_lead1"], rel=1e-3)
    assert load_checkpoint(tmp_path / "gpu" / "model.pt")["emulator"]["lag_weights"].device.type == "cpu"


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_fields_emulate_under_torchrun_equals_one_process(tmp_path):
    data = write_collection(tmp_path / "data", n_files=1, steps=72, freq="YS")
    command = ["fields", "emulate", data, "--var", "tas", "--epochs", "2", "--quiet", "--device", "cpu"]
    assert main([*command, "--out", str(tmp_path / "one")]) == 0
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([*TORCHRUN, "-m", "geonn", *command, "--out", str(tmp_path / "two")], capture_output=True,
                          text=True, env=environment, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("outputs in") == 1  # rank 0 alone reports
    one, two = (load_checkpoint(tmp_path / name / "model.pt")["emulator"] for name in ("one", "two"))
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-5, atol=1e-6, msg=name)
    first, second = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two"))
    for key in ("rmse_lead1", "acc_lead1", "rmse_validation", "rmse_rollout", "best_epoch", "rmse_lead1_ridge"):
        assert second[key] == pytest.approx(first[key], rel=1e-4), key
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert not list(tmp_path.glob(".*checkpoints"))
