"""Reliability: faults survived (SIGKILL at any moment, full disks), divergence flagged, untrusted files harmless.

docs/reliability.md lists each guarantee with the test here that proves it. The kill tests use
real child processes (forked from this one, so they start in milliseconds instead of re-importing
torch) and end them with SIGKILL: no handler, no cleanup, no flush.
"""

from __future__ import annotations

import ast
import errno
import functools
import json
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import geonn
import geonn.cases
from geonn import training
from geonn.assimilation import ObservationError, Subset, twin_experiment
from geonn.cli import main
from geonn.errors import GeonnError, InputError, NonFiniteError, WriteError
from geonn.integrators import diverged_members, divergence_steps
from geonn.io import (
    atomic_path,
    load_checkpoint,
    remove_temporaries,
    save_checkpoint,
    write_figure,
    write_json,
    write_netcdf,
    write_text,
)
from geonn.training import CHECKPOINT_NAME, TrainConfig, fit

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and fork"),
]

DT = 0.01
FORK = multiprocessing.get_context("fork")
SOURCE = Path(geonn.__file__).parent


# --- helpers ------------------------------------------------------------------------------------------


@functools.cache
def lorenz_trajectory(n_steps: int = 300) -> torch.Tensor:
    ds = geonn.simulate(geonn.Lorenz63(), n_steps, DT, spinup_steps=500)
    return torch.as_tensor(ds.state.values)


def fresh_run() -> tuple[torch.nn.Module, geonn.RungeKuttaStep]:
    """The model and (learnable) scheme every process of the kill chain starts from (deterministic)."""
    traj = lorenz_trajectory()
    torch.manual_seed(11)
    increments = (traj[1:] - traj[:-1]) / DT
    model = geonn.Standardised(geonn.BilinearResidual(3).double(), traj.mean(0), traj.std(0), increments.std(0))
    return model, geonn.RungeKuttaStep("rk4", learnable=True, learn_dt=True)


# 3 Adam epochs (5 batches each) then 2 L-BFGS epochs: 5 checkpoints.
CHAIN_CONFIG = TrainConfig(epochs=3, batch_size=64, learning_rate=1e-2, refine="lbfgs", refine_epochs=2,
                           refine_iterations=5, seed=2)
ADAM_BATCHES = 5  # ceil(299 windows / 64)


def weights(model, step) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    state.update({f"step.{k}": v.detach().clone() for k, v in step.state_dict().items()})
    return state


@functools.cache
def uninterrupted() -> tuple[dict, list[dict]]:
    model, step = fresh_run()
    result = fit(model, lorenz_trajectory(), DT, step=step, config=CHAIN_CONFIG, progress=False)
    return weights(model, step), result.history


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) if folder.is_dir() else []


def checkpoint_epoch(folder: Path) -> int | None:
    path = folder / CHECKPOINT_NAME
    return int(load_checkpoint(path)["epoch"]) if path.exists() else None


def _hold(marker: Path, note: dict) -> None:
    """In a child: say where it stopped, then wait to be killed."""
    marker.write_text(json.dumps(note))
    time.sleep(600)
    os._exit(3)  # never reached when the parent kills us


class _PausingOs:
    """Stands in for ``os`` inside geonn.io.atomic: holds just before renaming a checkpoint of ``epoch``
    over ``checkpoint.pt``, i.e. with the temporary file written and synced but not yet renamed."""

    def __init__(self, epoch: int, marker: Path):
        self.epoch, self.marker = epoch, marker

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        if Path(dst).name == CHECKPOINT_NAME:
            written = int(torch.load(src, weights_only=True)["epoch"])  # the temporary file is whole
            if written == self.epoch:
                _hold(self.marker, {"at": "mid-write", "temporary": Path(src).name, "epoch_in_temporary": written})
        return os.replace(src, dst)


def _train_until_paused(checkpoint_dir: str, pause: tuple[str, int], marker: str) -> None:
    """Child process of the kill chain: resume the run from ``checkpoint_dir`` and hold at ``pause``:

    - ``("loss", n)``: inside the n-th loss evaluation of this process (an Adam batch or an L-BFGS closure call);
    - ``("after-save", e)``: right after the checkpoint of epoch ``e`` is in place;
    - ``("mid-write", e)``: while writing the checkpoint of epoch ``e``: temporary file written, not yet renamed.
    """
    torch.set_num_threads(1)
    from geonn.io import atomic

    kind, at = pause
    marker = Path(marker)
    if kind == "loss":
        real_rollout, calls = training.rollout, [0]

        def counting_rollout(*args, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                _hold(marker, {"at": "loss", "call": at})
            return real_rollout(*args, **kwargs)

        training.rollout = counting_rollout
    elif kind == "after-save":
        real_save = training.save_checkpoint

        def save_then_hold(state, path):
            real_save(state, path)
            if state["epoch"] == at:
                _hold(marker, {"at": "after-save", "epoch": at})

        training.save_checkpoint = save_then_hold
    else:
        atomic.os = _PausingOs(at, marker)
    model, step = fresh_run()
    fit(model, lorenz_trajectory(), DT, step=step, config=CHAIN_CONFIG, checkpoint_dir=checkpoint_dir, resume=True,
        progress=False)
    os._exit(4)  # finished without reaching the pause: the parent reports it


def run_and_kill(target, args, marker: Path, timeout: float = 120) -> dict:
    """Start ``target(*args)`` in a forked child, wait until it writes ``marker``, SIGKILL it; return the marker's note."""
    child = FORK.Process(target=target, args=args)
    child.start()
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert child.is_alive(), f"the child exited (code {child.exitcode}) before reaching its pause"
            assert time.monotonic() < deadline, "the child did not reach its pause in time"
            time.sleep(0.01)
        note = None
        while note is None:  # the marker is written by a plain write_text: wait until it parses
            try:
                note = json.loads(marker.read_text())
            except json.JSONDecodeError:
                time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    assert child.exitcode == -signal.SIGKILL
    marker.unlink()
    return note


# --- faults survived: training killed at five moments resumes bit for bit ------------------------------

# (what the killed process does, where it holds, the checkpoint epoch left on disk after the kill)
KILL_CHAIN = [
    ("mid Adam batch 3 of epoch 1, before any checkpoint", ("loss", 3), None),
    ("writing the first checkpoint: temporary file whole, not renamed", ("mid-write", 1), None),
    ("between epochs, right after checkpoint 2", ("after-save", 2), 2),
    ("mid L-BFGS step of epoch 4 (3rd closure call)", ("loss", ADAM_BATCHES + 3), 3),
    ("writing the last checkpoint (epoch 5)", ("mid-write", 5), 4),
]


@pytest.mark.slow
def test_training_killed_at_five_moments_resumes_bit_for_bit(tmp_path):
    """Five processes in a row, each resuming from what the previous one left and killed with SIGKILL at
    another moment (mid batch, mid write of a checkpoint, between epochs, mid L-BFGS step, mid write of
    the last checkpoint); a sixth resumes to the end. Weights (model and learnable scheme) and the loss
    history equal those of an uninterrupted run bit for bit."""
    folder = tmp_path / "checkpoints"
    marker = tmp_path / "paused.json"
    expected_weights, expected_history = uninterrupted()
    for what, pause, epoch_left in KILL_CHAIN:
        note = run_and_kill(_train_until_paused, (str(folder), pause, str(marker)), marker)
        assert note["at"] == pause[0], what
        assert checkpoint_epoch(folder) == epoch_left, what
        if pause[0] == "mid-write":
            # the killed writer left only its hidden temporary file; the checkpoint name holds the last whole one
            assert temporaries(folder) == [note["temporary"]], what
            assert note["epoch_in_temporary"] == pause[1]
        else:
            assert temporaries(folder) == [], what
    model, step = fresh_run()
    result = fit(model, lorenz_trajectory(), DT, step=step, config=CHAIN_CONFIG, checkpoint_dir=folder, resume=True,
                 progress=False)
    assert result.resumed_from_epoch == 4
    assert sorted(p.name for p in folder.iterdir()) == [CHECKPOINT_NAME]  # the stale temporary was cleared
    assert [h["loss"] for h in result.history] == [h["loss"] for h in expected_history]
    assert [(h["epoch"], h["phase"], h["lr"]) for h in result.history] == [
        (h["epoch"], h["phase"], h["lr"]) for h in expected_history
    ]
    got = weights(model, step)
    assert got.keys() == expected_weights.keys()
    assert [k for k in got if not torch.equal(got[k], expected_weights[k])] == []


SMALL_CASE = [
    "data.n_train=200", "data.n_test=100", "data.spinup_steps=100", "training.epochs=3", "training.batch_size=64",
    'training.refine="lbfgs"', "training.refine_epochs=1", "training.refine_iterations=5", "metrics.lyapunov_steps=50",
    "metrics.lyapunov_trajectories=2", "metrics.forecast_steps=20", "metrics.curve_leads=[1,2]",
]


def _case_until_paused(out: str, epoch: int, marker: str) -> None:
    torch.set_num_threads(1)
    real_save = training.save_checkpoint

    def save_then_hold(state, path):
        real_save(state, path)
        if state["epoch"] == epoch:
            _hold(Path(marker), {"at": "after-save", "epoch": epoch})

    training.save_checkpoint = save_then_hold
    main(["case", "lorenz63", "--out", out, *[a for s in SMALL_CASE for a in ("--set", s)], "--quiet"])
    os._exit(4)


@pytest.mark.slow
def test_case_killed_then_resumed_writes_the_same_metrics(tmp_path, capsys):
    """``geonn case`` killed after its second checkpoint and rerun with ``--resume`` ends with the checkpoint
    weights and every metric (all but the timings) of an uninterrupted run."""
    settings = [a for s in SMALL_CASE for a in ("--set", s)]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["case", "lorenz63", "--out", str(whole), *settings, "--quiet"]) == 0
    marker = tmp_path / "paused.json"
    run_and_kill(_case_until_paused, (str(killed), 2, str(marker)), marker)
    assert not (killed / "metrics.json").exists()  # written last: a killed run has none
    assert main(["case", "lorenz63", "--out", str(killed), *settings, "--quiet"]) == 2  # not mixed in silently
    assert "--resume" in capsys.readouterr().err
    assert main(["case", "lorenz63", "--out", str(killed), *settings, "--quiet", "--resume"]) == 0

    def timeless(path):
        return {k: v for k, v in json.loads((path / "metrics.json").read_text()).items() if not k.endswith("seconds")}

    assert timeless(killed) == timeless(whole)
    a = load_checkpoint(whole / "checkpoints" / CHECKPOINT_NAME)
    b = load_checkpoint(killed / "checkpoints" / CHECKPOINT_NAME)
    assert a["history"] == b["history"]
    for part in ("model", "step"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    with xr.open_dataset(whole / "forecast.nc") as x, xr.open_dataset(killed / "forecast.nc") as y:
        xr.testing.assert_identical(x.load(), y.load())


# --- faults survived: a writer killed at random moments leaves whole files or none ---------------------


def _payload(kind: str, version: int):
    """Large enough that writing takes a while (a kill lands mid-write), and self-checking: every value is
    a function of ``version``."""
    n = 400_000 + 1000 * (version % 7)  # sizes differ between versions: a mix of two would show
    if kind == "json":
        return {"version": version, "values": [version + 0.5] * (n // 20)}
    if kind == "checkpoint":
        return {"version": version, "values": torch.full((n,), float(version), dtype=torch.float64)}
    return xr.Dataset({"values": ("i", np.full(n, float(version)), {"long_name": "payload", "units": "1"})},
                      attrs={"version": version})


WRITERS = {"json": ("metrics.json", write_json), "checkpoint": ("state.pt", save_checkpoint),
           "netcdf": ("field.nc", write_netcdf)}


def _write_forever(folder: str, start: int, announce) -> None:
    """Child: write the three files again and again with increasing versions; before each write, send its name."""
    torch.set_num_threads(1)
    version = start
    while True:
        for kind, (name, writer) in WRITERS.items():
            payload = _payload(kind, version)
            announce.send(name)
            writer(payload, Path(folder) / name)
        version += 1


def _check_whole(path: Path) -> int:
    """Read ``path`` fully and check it is one version's payload; return the version."""
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        assert data["values"] == [data["version"] + 0.5] * len(data["values"])
        return data["version"]
    if path.suffix == ".pt":
        data = load_checkpoint(path)
        assert torch.equal(data["values"], torch.full_like(data["values"], float(data["version"])))
        return data["version"]
    with xr.open_dataset(path) as ds:
        values = ds["values"].values
        version = int(ds.attrs["version"])
    assert values.size == 400_000 + 1000 * (version % 7) and (values == version).all()
    return version


@pytest.mark.slow
def test_writer_killed_at_random_moments_leaves_old_file_or_none(tmp_path):
    """A process writing netCDF, checkpoint and JSON files in a loop is killed with SIGKILL 9 times, each
    time a random 0-20 ms after it announced a write; every file is then either absent or one whole
    version (never truncated, never a mix), and a rerun clears the temporaries of the killed writes."""
    rng = random.Random(7)
    folder = tmp_path / "out"
    folder.mkdir()
    mid_write, versions = 0, {}
    for kill in range(9):
        receive, announce = FORK.Pipe(duplex=False)
        child = FORK.Process(target=_write_forever, args=(str(folder), 100 * kill, announce))
        child.start()
        announce.close()
        try:
            writes = rng.randrange(1, 8)  # which announced write to kill: the first round may not be finished
            for _ in range(writes):
                assert receive.poll(60), "the writer announced nothing"
                receive.recv()
            time.sleep(rng.uniform(0, 0.02))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.join(30)
        assert child.exitcode == -signal.SIGKILL
        left = temporaries(folder)
        mid_write += bool(left)
        for name, _ in WRITERS.values():
            path = folder / name
            if path.exists():
                version = _check_whole(path)
                assert version >= versions.get(name, -1)  # the old file or a newer one, never older
                versions[name] = version
        for tmp in left:  # what a later writer of that name clears (geonn.training.fit does so on start)
            target = folder / tmp[1:].rsplit(".", 2)[0]  # .NAME.XXXXXX.tmp -> NAME
            removed = remove_temporaries(target)
            assert folder / tmp in removed
        assert temporaries(folder) == []
    assert mid_write >= 1, "no kill landed during a write"
    assert versions, "nothing was ever written"


# --- faults survived: an OSError during a write leaves nothing partial and names the path ---------------


def _disk_full(path=None):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_then_fail(write):
    """A writer that writes part of its output, then fails as a full disk would."""

    def failing(obj, target, *args, **kwargs):
        write(obj, target, *args, **kwargs)
        data = Path(target).read_bytes()
        Path(target).write_bytes(data[: len(data) // 2])
        raise _disk_full()

    return failing


WRITE_CASES = {
    "json": ("metrics.json", lambda p: write_json({"rmse": 0.5}, p)),
    "text": ("config.toml", lambda p: write_text(p, "a = 1\n")),
    "checkpoint": ("checkpoint.pt", lambda p: save_checkpoint({"x": torch.zeros(1000)}, p)),
    "netcdf": ("analysis.nc", lambda p: write_netcdf(xr.Dataset({"a": ("t", np.zeros(100))}), p)),
    "figure": ("figure.png", lambda p: write_figure(_figure(), p)),
}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    return fig


def _break_the_writer(monkeypatch, kind: str) -> None:
    if kind in ("json", "text"):
        real = Path.write_text

        def failing(self, data, *args, **kwargs):
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise _disk_full()

        monkeypatch.setattr(Path, "write_text", failing)
    elif kind == "checkpoint":
        monkeypatch.setattr(torch, "save", _half_then_fail(torch.save))
    elif kind == "netcdf":
        monkeypatch.setattr(xr.Dataset, "to_netcdf", _half_then_fail(xr.Dataset.to_netcdf))
    else:
        from matplotlib.figure import Figure

        real = Figure.savefig

        def failing(self, target, *args, **kwargs):
            real(self, target, *args, **kwargs)
            data = Path(target).read_bytes()
            Path(target).write_bytes(data[: len(data) // 2])
            raise _disk_full()

        monkeypatch.setattr(Figure, "savefig", failing)


@pytest.mark.parametrize("old", [False, True], ids=["no-old-file", "old-file"])
@pytest.mark.parametrize("failure", ["write", "fsync", "rename"])
@pytest.mark.parametrize("kind", sorted(WRITE_CASES))
def test_oserror_during_a_write_leaves_nothing_partial(tmp_path, monkeypatch, kind, failure, old):
    """Disk full while writing, an I/O error on fsync, or a failed rename: the target keeps its old content
    (or stays absent), no temporary file is left, and the error is a WriteError (an OSError) naming the path."""
    name, write = WRITE_CASES[kind]
    path = tmp_path / "out" / name
    if old:
        path.parent.mkdir()
        path.write_bytes(b"old content")
    if failure == "write":
        _break_the_writer(monkeypatch, kind)
    else:
        from geonn.io import atomic

        def failing(*args, **kwargs):
            raise OSError(errno.EIO if failure == "fsync" else errno.EXDEV, "simulated")

        monkeypatch.setattr(atomic.os, failure if failure == "fsync" else "replace", failing)
    with pytest.raises(WriteError) as info:
        write(path)
    monkeypatch.undo()
    err = info.value
    assert isinstance(err, OSError) and isinstance(err, GeonnError)
    assert str(path) in str(err) and "could not write" in str(err)
    assert err.errno == {"write": errno.ENOSPC, "fsync": errno.EIO, "rename": errno.EXDEV}[failure]
    if old:
        assert sorted(p.name for p in path.parent.iterdir()) == [name]
        assert path.read_bytes() == b"old content"
    else:
        assert not path.exists() and list(path.parent.iterdir()) == []


def test_unwritable_folder_is_a_write_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WriteError, match=r"could not write .*file/sub/metrics\.json"):
        write_json({}, blocker / "sub" / "metrics.json")


def test_cli_disk_full_is_a_clear_error_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """``geonn assimilate`` on a full disk: exit code 2, ``geonn: error: could not write ...analysis.nc``,
    and neither the output folder nor its hidden staging folder is left behind."""
    obs = tmp_path / "obs.nc"
    write_netcdf(twin_experiment(geonn.Lorenz63(), 0.01, 100, Subset([0, 1, 2], 3), ObservationError(std=1.0),
                                 every=10, spinup_steps=100), obs)
    monkeypatch.setattr(xr.Dataset, "to_netcdf", _half_then_fail(xr.Dataset.to_netcdf))
    out = tmp_path / "da"
    code = main(["assimilate", str(obs), "--model", "lorenz63", "--method", "etkf", "--members", "5", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("geonn: error: could not write ") and "analysis.nc" in err and "No space left" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obs.nc"]


def test_atomic_path_does_not_wrap_errors_that_are_not_about_files(tmp_path):
    with pytest.raises(InputError, match="bad"), atomic_path(tmp_path / "x") as tmp:
        tmp.write_text("partial")
        raise InputError("bad")
    assert list(tmp_path.iterdir()) == []


def test_output_folder_of_another_run_is_refused(tmp_path, capsys):
    """A folder holding other outputs is refused by every command unless --overwrite (or --resume of the same case)."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.nc").write_text("someone else's result")
    obs = tmp_path / "obs.nc"
    write_netcdf(twin_experiment(geonn.Lorenz63(), 0.01, 50, Subset([0, 1, 2], 3), ObservationError(std=1.0),
                                 every=10, spinup_steps=10), obs)
    commands = [
        ["case", "lorenz63", "--out", str(out), "--set", "training.epochs=1"],
        ["assimilate", str(obs), "--model", "lorenz63", "--method", "etkf", "--out", str(out)],
        ["fields", "reduce", str(obs), "--var", "observations", "--modes", "1", "--out", str(out)],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("geonn: error: --out:") and "--overwrite" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["precious.nc"]
    assert (out / "precious.nc").read_text() == "someone else's result"


# --- divergence: raised with step and time, or flagged per member ---------------------------------------


def squaring_model() -> geonn.Standardised:
    """A learned (bilinear) operator whose weights give dx/dt = x * x: a state x0 > 0 blows up at t = 1 / x0,
    a negative one decays to 0."""
    operator = geonn.BilinearResidual(3, n_linear=1, n_bilinear=3).double()
    with torch.no_grad():
        operator.inner.weight.zero_()
        operator.inner.bias.zero_()
        operator.inner.weight[1:4] = torch.eye(3)
        operator.inner.weight[4:7] = torch.eye(3)
        operator.transition.weight.zero_()
        operator.transition.bias.zero_()
        operator.transition.weight[:, 1:4] = torch.eye(3)
    ones = torch.ones(3, dtype=torch.float64)
    return geonn.Standardised(operator, 0 * ones, ones, ones)


def test_squaring_model_is_what_it_says():
    x = torch.tensor([[0.5, -2.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(squaring_model()(0.0, x), x * x)


@pytest.mark.parametrize("gradient", [None, "backprop", "checkpoint", "adjoint"])
def test_long_learned_rollout_that_diverges_raises_with_step_and_time(gradient):
    model = squaring_model()
    x0 = torch.tensor([2.0, -1.0, 0.25], dtype=torch.float64)  # the first component blows up at t = 0.5
    kwargs = {}
    if gradient is not None:
        x0 = x0.clone().requires_grad_(True)
        kwargs["gradient"] = gradient
    with pytest.raises(NonFiniteError) as info:
        geonn.rollout(model, x0, 300, 0.01, **kwargs)
    err = info.value
    assert isinstance(err, InputError)
    assert 45 <= err.step <= 55 and err.time == pytest.approx(err.step * 0.01)
    assert f"at step {err.step} (t = {err.time:g})" in str(err)


def test_diverged_members_are_flagged_when_asked_to_keep_going():
    """``nonfinite="keep"``: the rollout of an ensemble comes back whole; ``diverged_members`` flags exactly
    the members that blew up, ``divergence_steps`` says when, and the other members are untouched."""
    model = squaring_model()
    x0 = torch.tensor(
        [[-1.0, -0.5, -2.0], [4.0, -1.0, -1.0], [-1.0, -1.0, 2.0], [-0.1, -0.2, -0.3]], dtype=torch.float64
    )  # members 1 and 2 blow up, at t = 0.25 and t = 0.5
    traj = geonn.rollout(model, x0, 150, 0.01, nonfinite="keep")
    assert traj.shape == (151, 4, 3)
    assert diverged_members(traj).tolist() == [False, True, True, False]
    steps = divergence_steps(traj)
    assert steps[0] == -1 and steps[3] == -1 and 20 <= steps[1] <= 30 and 45 <= steps[2] <= 55
    for member in (0, 3):
        alone = geonn.rollout(model, x0[member], 150, 0.01)
        assert torch.equal(traj[:, member], alone)
    # the same flags through the top-level name, for a member grid (2, 2) and a single state
    grid = geonn.rollout(model, x0.reshape(2, 2, 3), 150, 0.01, nonfinite="keep")
    assert geonn.diverged_members(grid).tolist() == [[False, True], [True, False]]
    assert diverged_members(traj[:, 0]).shape == () and not bool(diverged_members(traj[:, 0]))
    with pytest.raises(NonFiniteError):
        geonn.rollout(model, x0, 150, 0.01)


@pytest.mark.parametrize("bad", [torch.zeros(5), torch.zeros(0, 3), torch.arange(6).reshape(2, 3), "x"])
def test_diverged_members_refuses_what_is_not_a_trajectory(bad):
    with pytest.raises((geonn.InputError, geonn.InputTypeError), match="trajectory"):
        diverged_members(bad)


def test_training_that_diverges_stops_with_a_clear_error(tmp_path):
    traj = lorenz_trajectory()
    model, _ = fresh_run()
    config = TrainConfig(epochs=2, batch_size=64, learning_rate=1e4, schedule="constant")
    with pytest.raises(NonFiniteError, match=r"training diverged at epoch 0: the model's rollout became non-finite"):
        fit(model, traj, DT, config=config, checkpoint_dir=tmp_path, progress=False)
    # no checkpoint of a diverged epoch is written
    if (tmp_path / CHECKPOINT_NAME).exists():
        state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
        assert all(np.isfinite(h["loss"]) for h in state["history"])
        assert all(bool(torch.isfinite(v).all()) for v in state["model"].values())


# --- untrusted files are harmless -------------------------------------------------------------------------


class RunsCode:
    """Pickles to a call of ``os.system``: plain unpickling would run the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else None
                yield node, owner, func.attr
            elif isinstance(func, ast.Name):
                yield node, None, func.id


def test_source_never_unpickles_or_evaluates():
    """Every module of geonn, parsed: no pickle/marshal/dill/shelve loads, no torch.load without
    weights_only=True, no numpy load with allow_pickle=True, no eval/exec/compile/__import__ of text,
    no yaml.load; config files are read with tomllib (data, never code)."""
    problems, torch_loads, files = [], 0, sorted(SOURCE.rglob("*.py"))
    assert len(files) > 30
    for path in files:
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(SOURCE.parent)
        for module in ("pickle", "marshal", "dill", "shelve", "cloudpickle", "joblib"):
            if f"import {module}" in text and module != "pickle":
                problems.append(f"{where}: imports {module}")
        for node, owner, name in _calls(ast.parse(text)):
            line = f"{where}:{node.lineno}"
            keywords = {k.arg: k.value for k in node.keywords}
            if owner in ("pickle", "marshal", "dill", "cloudpickle", "joblib", "_pickle") and name in ("load", "loads"):
                problems.append(f"{line}: {owner}.{name}")
            if name == "Unpickler":
                problems.append(f"{line}: Unpickler")
            if owner == "torch" and name == "load":
                torch_loads += 1
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{line}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and name == "load":
                flag = keywords.get("allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    problems.append(f"{line}: numpy load with allow_pickle")
            if owner is None and name in ("eval", "exec", "compile", "__import__"):
                problems.append(f"{line}: {name}()")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
                problems.append(f"{line}: yaml.{name}")
    assert problems == []
    assert torch_loads >= 1  # the check saw the checkpoint loader
    config = (SOURCE / "cases" / "config.py").read_text()
    assert "tomllib.load(" in config and "tomllib.loads(" in config


def test_crafted_checkpoint_given_to_the_cli_is_refused_without_running(tmp_path, capsys):
    """``geonn assimilate --model RUN`` where RUN's checkpoint would run a command when unpickled: exit code 2,
    the message says it was refused, the command never ran, no output folder."""
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text('name = "evil"\nkind = "identification"\n')
    torch.save({"model": {"w": RunsCode(f"touch {marker}")}, "step": {}, "epoch": 1}, run / "checkpoints" / CHECKPOINT_NAME)
    obs = tmp_path / "obs.nc"
    write_netcdf(twin_experiment(geonn.Lorenz63(), 0.01, 50, Subset([0, 1, 2], 3), ObservationError(std=1.0),
                                 every=10, spinup_steps=10), obs)
    code = main(["assimilate", str(obs), "--model", str(run), "--method", "etkf", "--out", str(tmp_path / "da")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("geonn: error: checkpoint") and "refused" in err
    assert not marker.exists(), "loading the checkpoint ran code"
    assert not (tmp_path / "da").exists()


CODE_STRINGS = [
    "__import__('os').system('touch {marker}')",
    "$(touch {marker})",
    "`touch {marker}`",
    "!!python/object/apply:os.system ['touch {marker}']",
    "{{{{ ''.__class__.__mro__[1].__subclasses__() }}}}; import os; os.system('touch {marker}')",
]


@pytest.mark.parametrize("template", CODE_STRINGS)
def test_config_values_are_data_never_evaluated(tmp_path, template, capsys):
    """Code in a case file or a --set value stays a string (or is refused as a bad value); it never runs."""
    marker = tmp_path / "pwned"
    code = template.format(marker=marker)
    case = tmp_path / "evil.toml"
    case.write_text(f'name = "evil"\nkind = "identification"\ndescription = {json.dumps(code)}\n'
                    f'[data]\nmodel = "lorenz63"\n')
    loaded = geonn.cases.load_case(str(case))
    assert loaded.description == code
    for override in (f"description={code}", f"data.model={code}", f"training.epochs={code}", f"{code}=1"):
        try:
            config = geonn.cases.load_case(str(case), [override])
        except geonn.ConfigError:
            continue
        assert code in (config.description, config.data.model) or override.startswith(code)
    assert main(["case", str(case), "--set", f"data.model={code}", "--out", str(tmp_path / "o")]) == 2
    assert "data.model" in capsys.readouterr().err
    assert not marker.exists()


def test_relative_paths_in_configs_are_resolved_and_reported(tmp_path, monkeypatch, capsys):
    """A fields case's data.file and the assimilate command's inputs are resolved against the current
    folder; the absolute paths are what the outputs record, and a missing file's error shows both."""
    monkeypatch.chdir(tmp_path)
    case = tmp_path / "f.toml"
    case.write_text('name = "f"\nkind = "fields"\nverb = "reduce"\n[data]\nfile = "sub/../missing.nc"\nvar = "v"\n'
                    '[options]\nmodes = 1\n')
    assert main(["case", str(case), "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "data.file" in err and "'sub/../missing.nc'" in err and repr(str(tmp_path / "missing.nc")) in err
    write_netcdf(twin_experiment(geonn.Lorenz63(), 0.01, 50, Subset([0, 1, 2], 3), ObservationError(std=1.0),
                                 every=10, spinup_steps=10), tmp_path / "obs.nc")
    assert main(["assimilate", "obs.nc", "--model", "lorenz63", "--method", "etkf", "--members", "5", "--out", "da",
                 "--truth", "./obs.nc"]) == 0
    import tomllib

    resolved = tomllib.loads((tmp_path / "da" / "config.toml").read_text())
    assert resolved["observations"] == str(tmp_path / "obs.nc") and resolved["truth"] == str(tmp_path / "obs.nc")
    with xr.open_dataset(tmp_path / "da" / "analysis.nc") as ds:
        assert ds.attrs["observation_file"] == str(tmp_path / "obs.nc")


ABSURD_ATTRS = {
    "long": "x" * 1_000_000,
    "unicode": "héllo wörld ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 مرحبا \u200f\u0301 🚀 \u4e2d\u6587",
    "control": "tab\tnewline\nbell\x07 escape\x1b[31m",
    "quotes": "'\"\\ ${HOME} $(ls) %s %n {0}",
    "empty": "",
    "numbers": np.array([1.5, -2.0, np.nan, np.inf]),
    "int_list": np.array([1, 2, 3], dtype=np.int64),
    "strings": ["a", "ü", ""],
    **{f"many_{i:04d}": f"value {i}" for i in range(2000)},
}


def _with_absurd_attrs(ds: xr.Dataset, variable: str) -> xr.Dataset:
    ds = ds.copy()
    ds.attrs.update(ABSURD_ATTRS)
    ds[variable].attrs.update({k: v for k, v in ABSURD_ATTRS.items() if not k.startswith("many_")})
    return ds


def _same_attrs(got: dict, want: dict) -> bool:
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            if not np.array_equal(np.asarray(got[key]), value, equal_nan=value.dtype.kind == "f"):
                return False
        elif isinstance(value, list):
            if list(np.atleast_1d(got[key])) != value:
                return False
        elif got[key] != value:
            return False
    return True


@pytest.mark.slow
def test_absurd_attributes_survive_assimilate_and_fields_reduce(tmp_path, capsys):
    """Observation and field files whose attributes are a megabyte long, unicode of every script, control
    characters, 2000 of them, arrays with NaN/inf: both commands read them, run, and write readable outputs;
    fields reduce carries the variable's attributes into reconstruction.nc unchanged. A file name with characters
    in every script still gives readable outputs."""
    obs = _with_absurd_attrs(twin_experiment(geonn.Lorenz63(), 0.01, 100, Subset([0, 2], 3), ObservationError(std=1.0),
                                             every=10, spinup_steps=100), "observations")
    obs_path = tmp_path / "obs ☃ \u4e2d.nc"
    write_netcdf(obs, obs_path)
    with xr.open_dataset(obs_path) as back:
        assert _same_attrs(back.attrs, ABSURD_ATTRS) and _same_attrs(back["observations"].attrs, {"long": "x" * 1_000_000})
    code = main(["assimilate", str(obs_path), "--model", "lorenz63", "--method", "etkf", "--members", "5",
                 "--out", str(tmp_path / "da")])
    assert code == 0, capsys.readouterr().err
    with xr.open_dataset(tmp_path / "da" / "analysis.nc") as ds:
        assert ds["analysis"].shape == (10, 3) and np.isfinite(ds["analysis"].values).all()
        assert ds.attrs["title"].endswith("on obs ☃ \u4e2d.nc")

    rng = np.random.default_rng(0)
    field = xr.Dataset(
        {"tas": (("time", "lat", "lon"), 280 + rng.standard_normal((12, 4, 5)).cumsum(0),
                 {"units": "K", "long_name": "air temperature"})},
        coords={"time": ("time", np.arange(12.0), {"units": "days since 2000-01-01", "calendar": "noleap"}),
                "lat": ("lat", np.linspace(-30, 30, 4), {"units": "degrees_north"}),
                "lon": ("lon", np.linspace(0, 80, 5), {"units": "degrees_east"})},
    )
    field = _with_absurd_attrs(field, "tas")
    field_path = tmp_path / "field ☃.nc"
    write_netcdf(field, field_path)
    code = main(["fields", "reduce", str(field_path), "--var", "tas", "--modes", "2", "--out", str(tmp_path / "red"),
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    with xr.open_dataset(tmp_path / "red" / "reconstruction.nc") as ds:
        attrs = {k: v for k, v in ABSURD_ATTRS.items() if not k.startswith("many_")}
        assert _same_attrs(ds["tas"].attrs, {**attrs, "units": "K", "long_name": "air temperature"})
        assert ds["tas"].shape == (12, 4, 5) and np.isfinite(ds["tas"].values).all()
    assert json.loads((tmp_path / "red" / "metrics.json").read_text())["modes"] == 2


def test_attributes_netcdf_cannot_hold_are_written_in_the_nearest_form(tmp_path):
    """Lone surrogates (what Python makes of undecodable bytes) become backslash escapes and booleans 0/1,
    instead of an encoder's traceback; the dataset given is not changed; what cannot be stored at all is an
    InputError naming the attribute and the path."""
    ds = xr.Dataset({"v": ("t", np.arange(3.0), {"flag": True, "origin": "obs-\udcff.nc"})},
                    attrs={"history": "geonn assimilate obs-\udcff\udcfe.nc", "names": ["a", "\udcff"], "ok": False})
    path = write_netcdf(ds, tmp_path / "x.nc")
    with xr.open_dataset(path) as back:
        assert back.attrs["history"] == "geonn assimilate obs-\\udcff\\udcfe.nc"
        assert list(back.attrs["names"]) == ["a", "\\udcff"] and back.attrs["ok"] == 0
        assert back["v"].attrs["flag"] == 1 and back["v"].attrs["origin"] == "obs-\\udcff.nc"
    assert ds.attrs["ok"] is False and ds["v"].attrs["flag"] is True and ds.attrs["history"].endswith("\udcfe.nc")
    ds.attrs["nested"] = {"a": 1}
    with pytest.raises(InputError, match=r"ds: cannot be written to netCDF .*y\.nc.*'nested'"):
        write_netcdf(ds, tmp_path / "y.nc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nc"]


def test_resume_into_a_folder_of_other_outputs_is_refused(tmp_path):
    from geonn.cases import prepare_output

    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.nc").write_text("someone else's result")
    with pytest.raises(geonn.ConfigError, match="--resume"):
        prepare_output(out, 'name = "x"\n', overwrite=False, resume=True)
