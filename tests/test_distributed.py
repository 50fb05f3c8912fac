"""Data-parallel training under ``torchrun`` (gloo on CPU): two processes equal one with the same
global batch, rank 0 alone writes, and a run with one rank killed resumes to the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from geonn import distributed
from geonn.cases import load_case, run_case
from geonn.errors import InputError

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo, SIGKILL")]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
SMALL = ["data.n_train=600", "data.n_test=300", "data.spinup_steps=200", "training.epochs=3", "training.batch_size=64",
         'training.refine="lbfgs"', "training.refine_epochs=1", "training.refine_iterations=5",
         "metrics.lyapunov_steps=200", "metrics.lyapunov_trajectories=2", "metrics.forecast_steps=50"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env(), timeout=600)


def weights(folder: Path) -> dict:
    return torch.load(folder / "checkpoints" / "checkpoint.pt", weights_only=True)["model"]


def assert_close_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=1e-9, atol=1e-12, msg=key)


def test_outside_torchrun_this_is_rank_0_of_1():
    context = distributed.setup("cpu")
    assert (context.rank, context.world, context.is_main, context.distributed) == (0, 1, True, False)
    indices = torch.arange(10)
    assert torch.equal(distributed.shard(indices, distributed.Context(rank=1, world=3)), torch.tensor([1, 4, 7]))
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    with pytest.raises(InputError, match=r"device: expected one of \('auto', 'cpu', 'cuda'\), got 'tpu'"):
        distributed.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device: 'cuda' was asked for, but torch sees no CUDA GPU"):
            distributed.resolve_device("cuda")
        assert distributed.resolve_device("auto") == torch.device("cpu")


@pytest.mark.slow
def test_a_case_under_torchrun_equals_one_process(tmp_path):
    one = tmp_path / "one"
    metrics = run_case(load_case("lorenz63", SMALL), one, progress=False)
    two = tmp_path / "two"
    args = [arg for item in SMALL for arg in ("--set", item)]
    done = run([*TORCHRUN, "-m", "geonn", "case", "lorenz63", *args, "--out", str(two), "--quiet"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert_close_weights(weights(two), weights(one))
    import json

    found = json.loads((two / "metrics.json").read_text())
    assert found["rmse_lead1"] == pytest.approx(metrics["rmse_lead1"], rel=1e-6)
    assert found["final_loss"] == pytest.approx(metrics["final_loss"], rel=1e-9)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # one writer, one set of files
    assert done.stdout.count("outputs in") == 1  # rank 0 alone reports


# Trains a small Lorenz-63 model with fit under torchrun. With a kill epoch, rank 1 writes its pid
# and waits, after the barrier that follows that epoch's checkpoint, to be killed by the test.
DRIVER = r"""
import os, sys, time
import torch
torch.set_num_threads(1)
import geonn
from geonn import distributed
from geonn.operators import BilinearResidual, Standardised
from geonn.training import TrainConfig, fit

folder, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"
torch.manual_seed(0)
train = torch.as_tensor(geonn.simulate(geonn.Lorenz63(), 400, 0.01, spinup_steps=200).state.values)
model = Standardised(BilinearResidual(3).double(), train.mean(0), train.std(0), ((train[1:] - train[:-1]) / 0.01).std(0))
real_barrier, seen = distributed.barrier, [0]

def barrier():
    real_barrier()
    seen[0] += 1
    if kill_at and distributed.current().rank == 1 and seen[0] == kill_at:
        with open(os.path.join(folder, "victim.pid"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(300)

distributed.barrier = barrier
config = TrainConfig(epochs=6, batch_size=32, learning_rate=0.01, seed=3)
fit(model, train, 0.01, config=config, checkpoint_dir=folder, resume=resume, progress=False)
"""


@pytest.mark.slow
def test_killing_one_rank_then_resuming_loses_nothing(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    clean.mkdir()
    broken.mkdir()
    done = run([*TORCHRUN, str(script), str(clean), "0", "fresh"])
    assert done.returncode == 0, done.stdout + done.stderr

    killed = subprocess.Popen([*TORCHRUN, str(script), str(broken), "3", "fresh"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=env())
    victim = broken / "victim.pid"
    deadline = time.monotonic() + 300
    while not victim.is_file() or not victim.read_text():
        assert killed.poll() is None, killed.stdout.read().decode()
        assert time.monotonic() < deadline, "rank 1 never reached the kill point"
        time.sleep(0.05)
    os.kill(int(victim.read_text()), signal.SIGKILL)
    killed.wait(timeout=120)
    assert killed.returncode != 0  # torchrun stops the surviving rank and reports the failure
    assert int(torch.load(broken / "checkpoint.pt", weights_only=True)["epoch"]) == 3

    done = run([*TORCHRUN, str(script), str(broken), "0", "resume"])
    assert done.returncode == 0, done.stdout + done.stderr
    resumed = torch.load(broken / "checkpoint.pt", weights_only=True)
    expected = torch.load(clean / "checkpoint.pt", weights_only=True)
    assert resumed["epoch"] == expected["epoch"] == 6
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in expected["history"]], rel=1e-12)
    assert_close_weights(resumed["model"], expected["model"])
