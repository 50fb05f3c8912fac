"""``geonn fields reduce --method autoencoder`` and ``geonn fields generate`` under ``torchrun
--nproc-per-node 2`` (gloo, CPU) end with the weights and metrics of one process with the same
global batch: each rank takes ``batch[rank::world]`` of the same draws (batch order, input noise,
dropout masks; the GAN's indices, noise and gradient-penalty interpolation weights) and the
gradients are summed over ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import xarray as xr

from geonn.emulators.autoencoder import BatchDropout
from geonn.errors import InputError
from geonn.io import load_checkpoint
from geonn.losses import critic_loss, gradient_penalty
from geonn.pipelines import run_verb
from geonn.pipelines.generate import Options as GenerateOptions
from geonn.pipelines.reduce import Options as ReduceOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# tiny settings; odd global batches, so the ranks' shares differ and a last batch of one leaves rank 1 nothing
REDUCE = {"modes": 3, "method": "autoencoder", "epochs": 2, "hidden": 4, "depth": 2, "batch_size": 5, "noise": 0.1,
          "residual": False, "learning_rate": 0.01, "dropout": 0.2,
          "patience": 0}
GENERATE = {"samples": 6, "epochs": 2, "steps_per_epoch": 2, "critic_steps": 2, "batch_size": 5, "noise_dim": 8, "width": 4}

SCRIPT = """
import sys
from geonn.pipelines import run_verb
from geonn.pipelines.generate import Options as GenerateOptions
from geonn.pipelines.reduce import Options as ReduceOptions

data, out = sys.argv[1], sys.argv[2]
run_verb("reduce", data, "tas", ReduceOptions(**{reduce}), out + "/reduce", progress=False, device="cpu")
run_verb("generate", data, "tas", GenerateOptions(**{generate}), out + "/generate", progress=False, device="cpu")
"""


def write_field(path, steps=72, seed=0):
    """A yearly travelling wave plus noise on an 8 x 16 global grid with one NaN point (as tests/test_pipelines_scaling.py)."""
    rng = np.random.default_rng(seed)
    lat, lon = np.linspace(-60, 60, 8), np.arange(16) * 22.5
    t = np.arange(steps)[:, None, None]
    values = 280 + 3 * np.cos(np.deg2rad(lon)[None, None] - 0.3 * t) * np.cos(np.deg2rad(lat))[None, :, None]
    values = (values + 0.3 * rng.standard_normal(values.shape)).astype(np.float32)
    values[:, 2, 3] = np.nan
    times = xr.date_range("2000-01-01", periods=steps, freq="YS", calendar="noleap", use_cftime=True)
    da = xr.DataArray(values, dims=("time", "lat", "lon"), name="tas",
                      coords={"time": times, "lat": ("lat", lat, {"units": "degrees_north"}),
                              "lon": ("lon", lon, {"units": "degrees_east"})},
                      attrs={"units": "K", "long_name": "air temperature"})
    path.parent.mkdir(parents=True, exist_ok=True)
    da.to_dataset().to_netcdf(path)
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two verbs in one process and under torchrun with 2 processes (one launch for both)."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_field(root / "data" / "tas.nc")
    for verb, options in (("reduce", ReduceOptions(**REDUCE)), ("generate", GenerateOptions(**GENERATE))):
        run_verb(verb, data, "tas", options, root / "one" / verb, progress=False, device="cpu")
    script = root / "both.py"
    script.write_text(textwrap.dedent(SCRIPT.format(reduce=REDUCE, generate=GENERATE)))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([*TORCHRUN, str(script), data, str(root / "two")], capture_output=True, text=True,
                          env=environment, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def _metrics(root, run, verb):
    return json.loads((root / run / verb / "metrics.json").read_text())


def _assert_same_outputs(root, verb):
    one, two = root / "one" / verb, root / "two" / verb
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert not list(root.glob(".*checkpoints")) and not list((root / "two").glob(".*checkpoints"))


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_reduce_autoencoder_under_torchrun_equals_one_process(runs):
    _assert_same_outputs(runs, "reduce")
    one, two = (load_checkpoint(runs / name / "reduce" / "model.pt")["reducer"] for name in ("one", "two"))
    assert set(two) == set(one)
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-5, atol=1e-6, msg=name)
    first, second = _metrics(runs, "one", "reduce"), _metrics(runs, "two", "reduce")
    assert second["best_epoch"] == first["best_epoch"] and first["best_epoch"] >= 1  # the refit stage ran too
    for key in ("rmse_test", "rmse_train", "explained_variance_test", "validation_rmse", "rmse_ratio_to_eof"):
        assert second[key] == pytest.approx(first[key], rel=1e-5), key


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_generate_under_torchrun_equals_one_process(runs):
    _assert_same_outputs(runs, "generate")
    one, two = (load_checkpoint(runs / name / "generate" / "model.pt")["gan"] for name in ("one", "two"))
    for part in ("generator", "critic"):
        for name, value in one[part].items():
            torch.testing.assert_close(two[part][name], value, rtol=1e-4, atol=1e-5, msg=f"{part}.{name}")
    first, second = _metrics(runs, "one", "generate"), _metrics(runs, "two", "generate")
    for key in ("gan_critic_loss", "gan_wasserstein_estimate", "spectrum_error", "wasserstein_pointwise"):
        assert second[key] == pytest.approx(first[key], rel=1e-4, abs=1e-6), key


def test_batch_dropout_draws_the_global_mask_and_keeps_its_rows():
    x = torch.randn(7, 12)
    layer = BatchDropout(0.5).train()
    torch.manual_seed(3)
    plain = layer(x)  # no shard: nn.Dropout
    torch.manual_seed(3)
    layer.shard = (0, 1, 7)
    assert torch.equal(layer(x), plain)  # one process: the same draws as nn.Dropout
    for rank in (0, 1):
        torch.manual_seed(3)
        layer.shard = (rank, 2, 7)
        assert torch.equal(layer(x[rank::2]), plain[rank::2])


def test_critic_loss_with_pre_drawn_interpolation_weights():
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1))
    real, fake = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    drawn = critic_loss(critic, real, fake, generator=torch.Generator().manual_seed(0))
    weights = torch.rand((5, 1, 1), generator=torch.Generator().manual_seed(0))
    assert torch.equal(critic_loss(critic, real, fake, interpolation=weights), drawn)
    # shards weighted by their share of the batch add up to the whole batch's loss
    shards = sum(critic_loss(critic, real[r::2], fake[r::2], interpolation=weights[r::2]) * len(range(5)[r::2]) / 5
                 for r in (0, 1))
    torch.testing.assert_close(shards, drawn)
    with pytest.raises(InputError, match="weights: expected 5 interpolation weights"):
        gradient_penalty(critic, real, fake, weights=torch.rand(4))
    with pytest.raises(InputError, match=r"weights: expected interpolation weights in \[0, 1\]"):
        gradient_penalty(critic, real, fake, weights=torch.full((5,), 1.5))
