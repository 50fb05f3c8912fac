"""The ``geonn`` command: listing cases, a reduced run, errors as exit code 2 with a message naming the
problem, and the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from geonn.cases import load_case
from geonn.cli import main

SMALL = [
    "data.n_train=200",
    "data.n_test=100",
    "data.spinup_steps=100",
    "training.epochs=1",
    "training.refine_epochs=1",
    "training.refine_iterations=5",
    "metrics.lyapunov_steps=50",
    "metrics.lyapunov_trajectories=2",
    "metrics.forecast_steps=20",
    "metrics.curve_leads=[1,2]",
]


def set_args(settings):
    return [arg for setting in settings for arg in ("--set", setting)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_case_list(capsys):
    assert main(["case", "--list"]) == 0
    out, err = capsys.readouterr()
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert "lorenz63" in names and "lorenz63-mlp" in names
    assert all(line.split()[1].endswith(".toml") for line in out.splitlines() if line.strip())
    assert err == ""


@pytest.mark.slow
def test_case_run_prints_the_metrics(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["case", "lorenz63", "--out", str(out_dir), *set_args(SMALL), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert f"case lorenz63: outputs in {out_dir}/" in out
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for key in ("rmse_lead1", "rmse_lead4", "rmse_lead8", "lyapunov_max", "lyapunov_max_true", "n_params"):
        line = next(line for line in out.splitlines() if line.split()[:1] == [key])
        value = metrics[key]
        assert line.split()[1] == (f"{value:.4g}" if isinstance(value, float) else str(value)), line
    assert "targets (issue 2 targets" in out and "rmse_lead1 = " in out
    assert "fit" not in err  # --quiet: no progress bar
    assert load_case(str(out_dir / "config.toml")).training.epochs == 1
    # a second run into the same folder is refused without --overwrite, and says how to proceed
    assert main(["case", "lorenz63", "--out", str(out_dir), *set_args(SMALL), "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert "geonn: error: --out:" in err and "--overwrite" in err and "--resume" in err and out == ""
    # --resume with another config is refused too
    assert (
        main(["case", "lorenz63", "--out", str(out_dir), *set_args(SMALL), "--set", "training.epochs=2", "--resume", "--quiet"])
        == 2
    )
    assert "geonn: error: --resume:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["case", "lorenz-63"], "geonn: error: case: no case named 'lorenz-63'; expected one of ["),
        (["case", "lorenz63", "--set", "training.epoch=3"], "geonn: error: unknown key training.epoch; expected one of"),
        (
            ["case", "lorenz63", "--set", "training.epochs=ten"],
            "geonn: error: training.epochs: expected an integer, got str 'ten'",
        ),
        (["case", "lorenz63", "--set", "training.epochs"], "geonn: error: --set: expected key=value"),
        (["case"], "geonn: error: case: expected a case name or a .toml path"),
    ],
)
def test_errors_exit_with_code_2_and_a_message(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "never")]) == 2
    out, err = capsys.readouterr()
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err and out == ""
    assert not (tmp_path / "never").exists()  # refused before anything is written


def test_argparse_errors_exit_with_code_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["case", "--no-such-flag"])
    assert info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def console_script() -> Path | None:
    script = Path(sys.executable).parent / "geonn"
    return script if script.is_file() else (Path(found) if (found := shutil.which("geonn")) else None)


@pytest.mark.slow
def test_installed_console_script(tmp_path):
    script = console_script()
    if script is None:
        pytest.skip("the geonn console script is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    listed = subprocess.run(
        [str(script), "case", "--list"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False
    )  # outside the source tree: the cases come with the package
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    assert "lorenz63" in names and "lorenz63-mlp" in names
    failed = subprocess.run(
        [sys.executable, "-m", "geonn.cli", "case", "no-such-case"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert failed.returncode == 2
    assert "geonn: error: case: no case named 'no-such-case'" in failed.stderr and failed.stdout == ""
