"""The assimilation case with a learned forecast model (lorenz63-da-learned): the [model] section loads
strictly, the learned model is trained into the run's model/ folder (or loaded from a run), every
method runs with it and with the true equations, and the ratio targets are checked."""

from __future__ import annotations

import json
import math

import pytest

from geonn import ConfigError
from geonn.cases import check_expected, load_case, run_case
from geonn.cases.assimilation import AssimilationCase

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the lorenz63 identification case, small enough for a test
SMALL_TRAINING = [
    "data.n_train=400", "data.n_test=200", "data.spinup_steps=100", "training.epochs=2", "training.refine_epochs=1",
    "training.refine_iterations=10", "metrics.lyapunov_steps=200", "metrics.lyapunov_trajectories=2",
    "metrics.forecast_steps=50", "metrics.curve_leads=[1,2,4]",
]
REDUCED = [
    "twin.cycles=12",
    "model.overrides=[" + ",".join(f'"{s}"' for s in SMALL_TRAINING) + "]",
    'methods=[{method="etkf", members=10, inflation=1.02, rotate=true}]',
]


def test_the_learned_model_case_loads():
    case = load_case("lorenz63-da-learned")
    assert isinstance(case, AssimilationCase) and case.model.train_case == "lorenz63" and case.model.compare_true
    assert case.model.learned and case.expected.max_ratio_to_true == pytest.approx(1.1)
    assert [m.label for m in case.methods] == ["etkf", "enkfn", "ienks", "3dvar", "4dvar"]
    # the Sakov setup of lorenz63-da
    reference = load_case("lorenz63-da")
    assert case.twin == reference.twin
    assert not reference.model.learned
    rows = check_expected(case, {"rmse_analysis_etkf": 0.55, "rmse_analysis_etkf_true_model": 0.54,
                                 "rmse_analysis_ienks": 0.4, "rmse_analysis_ienks_true_model": 0.3})
    assert [(name.split(" / ")[0], met) for name, _, _, met in rows] == [("rmse_analysis_etkf", True),
                                                                         ("rmse_analysis_ienks", False)]


@pytest.mark.parametrize(("override", "message"), [
    ("model.checkpoint=\"runs/x\"", "one of them"),
    ("model.trainng=1", r"unknown key model\.trainng"),
    ("model.compare_true=1", "model.compare_true"),
])
def test_the_model_section_is_strict(override, message):
    with pytest.raises(ConfigError, match=message):
        load_case("lorenz63-da-learned", [override])


@pytest.mark.slow
def test_the_learned_model_case_runs_reduced(tmp_path):
    case = load_case("lorenz63-da-learned", REDUCED)
    out = tmp_path / "run"
    metrics = run_case(case, out, progress=False)
    for suffix in ("", "_true_model"):
        assert math.isfinite(metrics[f"rmse_analysis_etkf{suffix}"]), suffix
        assert (out / f"analysis-etkf{suffix}.nc").is_file() and (out / "figures" / f"error-etkf{suffix}.png").is_file()
    assert (out / "model" / "checkpoints" / "checkpoint.pt").is_file()
    assert "rmse_lead1" in json.loads((out / "model" / "metrics.json").read_text())
    rows = check_expected(case, metrics)
    assert [row[0] for row in rows] == ["rmse_analysis_etkf / rmse_analysis_etkf_true_model"]
    # the trained run as a checkpoint: the same learned model, the same analyses
    from_run = load_case("lorenz63-da-learned", REDUCED[:1] + REDUCED[2:] + [
        "model.train_case=\"\"", f"model.checkpoint=\"{out / 'model'}\"", "model.compare_true=false"])
    again = run_case(from_run, tmp_path / "again", progress=False)
    assert again["rmse_analysis_etkf"] == metrics["rmse_analysis_etkf"]
    assert "rmse_analysis_etkf_true_model" not in again
