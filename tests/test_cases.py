"""Case files: strict loading (unknown keys, wrong types and bad --set are errors naming the key), the
resolved config round-trips, and a reduced run writes every output, atomically, into a folder it owns."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math

import pytest
import xarray as xr

from geonn import ConfigError
from geonn.cases import KINDS, check_expected, find_case, list_cases, load_case, read_metrics, run_case
from geonn.cases.config import parse_override, to_toml
from geonn.cases.identification import IdentificationCase
from geonn.training import TrainConfig

# A lorenz63 run small enough for a test (seconds, not minutes).
SMALL = [
    "data.n_train=400",
    "data.n_test=200",
    "data.spinup_steps=100",
    "training.epochs=2",
    "training.refine_epochs=1",
    "training.refine_iterations=10",
    "metrics.lyapunov_steps=200",
    "metrics.lyapunov_trajectories=2",
    "metrics.forecast_steps=50",
    "metrics.curve_leads=[1,2,4]",
]
METRIC_KEYS = {"rmse_lead1", "rmse_lead4", "rmse_lead8", "lyapunov_max", "lyapunov_max_true", "train_seconds", "n_params"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def temp_files(folder):
    return [p for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]


# --- loading ---------------------------------------------------------------------------------------


def test_the_shipped_cases_are_listed():
    cases = list_cases()
    assert {"lorenz63", "lorenz63-mlp"} <= set(cases)
    for name, path in cases.items():
        assert path.suffix == ".toml" and path.stem == name and path.is_file()


@pytest.mark.parametrize("name", sorted(list_cases()))
def test_every_case_file_loads(name, tmp_path):
    case = load_case(name)
    assert isinstance(case, importlib.import_module(KINDS[case.kind]).CONFIG)
    assert case.name == name and case.description
    if case.kind == "identification":
        assert isinstance(case, IdentificationCase) and isinstance(case.training, TrainConfig)
        assert case.expected.source and case.expected.max
    assert load_case(str(list_cases()[name])) == case  # by path as well as by name
    # the resolved config written back as TOML loads to the same config
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(case), encoding="utf-8")
    assert load_case(str(path)) == case


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.epoch=5", r"unknown key training\.epoch; expected one of \[.*'epochs'"),
        ("colour=1", r"unknown key colour; expected one of"),
        ("data.modell=lorenz96", r"unknown key data\.modell"),
        ("metrics.lyapunov.steps=10", r"unknown key metrics\.lyapunov\b"),
        ("expected.maximum=1", r"unknown key expected\.maximum"),
    ],
)
def test_unknown_keys_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_case("lorenz63", [override])


def test_unknown_keys_in_a_file_are_refused(tmp_path):
    text = list_cases()["lorenz63"].read_text(encoding="utf-8")
    path = tmp_path / "typo.toml"
    path.write_text(text.replace("refine_epochs = 3", "refine_epochs = 3\nrefine_epoch = 3\nlr = 0.1"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown keys training\.lr, training\.refine_epoch"):
        load_case(str(path))


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.epochs='ten'", r"training\.epochs: expected an integer, got str 'ten'"),
        ("training.epochs=ten", r"training\.epochs: expected an integer, got str 'ten'"),
        ("training.epochs=5.0", r"training\.epochs: expected an integer, got float 5\.0"),
        ("training.epochs=true", r"training\.epochs: expected an integer, got bool True"),
        ("data.dt=true", r"data\.dt: expected a number, got bool True"),
        ("data.dt='0.01'", r"data\.dt: expected a number, got str '0\.01'"),
        ("metrics.leads=[1, 'a']", r"metrics\.leads\[1\]: expected an integer"),
        ("metrics.leads=4", r"metrics\.leads: expected a list"),
        ("model.learnable_scheme=1", r"model\.learnable_scheme: expected true or false"),
        ("model.operator=3", r"model\.operator: expected a string"),
        ("data.model_parameters=3", r"data\.model_parameters: expected a table"),
        ("expected.lyapunov_abs_error_max='small'", r"expected\.lyapunov_abs_error_max: expected a number"),
        ("training=5", r"training: expected a table of keys"),
    ],
)
def test_wrong_types_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_case("lorenz63", [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.dt=0", r"data\.dt: expected a positive step"),
        ("data.n_train=5", r"data\.n_train: expected at least 10"),
        ("data.model=lorenz99", r"data\.model: expected one of"),
        ("model.operator=cnn", r"model\.operator: expected"),
        ("model.scheme=rk5", r"model\.scheme"),
        ("metrics.leads=[0, 1]", r"metrics\.leads: expected lead times >= 1"),
        ("training.refine=newton", r"training.refine: expected one of"),
        ("training.epochs=-1", r"training.epochs: expected an integer >= 0"),
        ("kind=forecast", r"kind: expected one of \[.*'identification'.*\], got 'forecast'"),
    ],
)
def test_bad_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_case("lorenz63", [override])


@pytest.mark.parametrize("value", ["[0]", "{ a = 1 }", "3", "true"])
def test_a_kind_that_is_not_a_string_is_refused(value, tmp_path):
    """``--set kind=[0]`` raised TypeError: unhashable type: 'list'."""
    with pytest.raises(ConfigError, match=r"kind: expected one of \[.*'identification'.*\], got"):
        load_case("lorenz63", [f"kind={value}"])
    path = tmp_path / "odd.toml"
    path.write_text(f"kind = {value}\n")
    with pytest.raises(ConfigError, match="kind: expected one of"):
        load_case(str(path))


def test_overrides_apply_with_toml_types():
    base = load_case("lorenz63")
    case = load_case(
        "lorenz63",
        [
            "training.epochs=5",
            "training.learning_rate=3e-3",
            "training.refine=lbfgs",
            "training.schedule='constant'",
            "model.operator=mlp",
            "model.hidden=[8, 8]",
            "data.model_parameters.rho=30",
            "data.dt=1",
            "metrics.leads=[1, 2]",
            "description=a quick run",
            "seed=7",
        ],
    )
    assert case.training.epochs == 5 and case.training.learning_rate == 3e-3
    assert case.training.refine == "lbfgs" and case.training.schedule == "constant"
    assert case.model.operator == "mlp" and case.model.hidden == [8, 8]
    assert case.data.model_parameters == {"rho": 30}
    assert case.data.dt == 1.0 and isinstance(case.data.dt, float)
    assert case.metrics.leads == [1, 2] and case.description == "a quick run" and case.seed == 7
    # everything not overridden is as in the file, and the file's data are not changed by an override
    assert case.training.batch_size == base.training.batch_size and case.data.n_train == base.data.n_train
    assert load_case("lorenz63") == base and base.training.epochs == 20
    # the last of repeated overrides wins
    assert load_case("lorenz63", ["training.epochs=5", "training.epochs=6"]).training.epochs == 6


def test_parse_override():
    assert parse_override("training.epochs=5") == (["training", "epochs"], 5)
    assert parse_override(" training.learning_rate = 1e-3 ") == (["training", "learning_rate"], 1e-3)
    assert parse_override("metrics.leads=[1, 4]") == (["metrics", "leads"], [1, 4])
    assert parse_override("model.scheme=rk4") == (["model", "scheme"], "rk4")  # a bare word is a string
    assert parse_override("description=a=b") == (["description"], "a=b")  # split at the first '='
    assert parse_override("model.learn_dt=false") == (["model", "learn_dt"], False)


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.epochs", r"--set: expected key=value \(e\.g\. training\.epochs=5\), got 'training\.epochs'"),
        ("=5", r"--set: expected a dotted key such as training\.epochs, got ''"),
        ("training..epochs=5", r"--set: expected a dotted key .*got 'training\.\.epochs'"),
        (".epochs=5", r"--set: expected a dotted key"),
        ("training.epochs.max=5", r"--set 'training\.epochs\.max=5': 'epochs' is not a section"),
    ],
)
def test_bad_set_syntax_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_case("lorenz63", [override])


def test_missing_and_malformed_case_files(tmp_path):
    with pytest.raises(ConfigError, match=r"case: no case named 'lorenz-63'; expected one of \[.*'lorenz63'"):
        find_case("lorenz-63")
    with pytest.raises(ConfigError, match="no case named"):
        load_case(str(tmp_path / "absent.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nepochs = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"case file '.*bad\.toml' is not valid TOML"):
        load_case(str(bad))
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"name = '\xff\xfe'\n")
    with pytest.raises(ConfigError, match="binary.toml"):
        load_case(str(binary))


def test_check_expected():
    case = load_case("lorenz63")  # targets: rmse_lead1 <= 1e-5, |lyapunov error| <= 0.05
    rows = check_expected(case, {"rmse_lead1": 2e-6, "lyapunov_max": 0.93, "lyapunov_max_true": 0.90})
    assert [(name, met) for name, _, _, met in rows] == [("rmse_lead1", True), ("|lyapunov_max - lyapunov_max_true|", True)]
    assert rows[1][1] == pytest.approx(0.03)
    rows = check_expected(case, {"rmse_lead1": 3e-5, "lyapunov_max": 0.80, "lyapunov_max_true": 0.90})
    assert [met for *_, met in rows] == [False, False]


# --- running ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lorenz63_run(tmp_path_factory, one_torch_thread):
    case = load_case("lorenz63", SMALL)
    out = tmp_path_factory.mktemp("runs") / "lorenz63"
    metrics = run_case(case, out, progress=False)
    return case, out, metrics


@pytest.mark.slow
def test_run_writes_metrics(lorenz63_run):
    _, out, metrics = lorenz63_run
    assert METRIC_KEYS <= set(metrics)
    assert all(isinstance(metrics[k], float) and math.isfinite(metrics[k]) for k in METRIC_KEYS - {"n_params"})
    assert metrics["n_params"] == 57  # BilinearResidual(3, 3, 3): 3*9 + 9 + 6*3 + 3
    assert 0 < metrics["rmse_lead1"] < metrics["rmse_lead8"]
    assert metrics["train_seconds"] > 0
    assert read_metrics(out) == metrics
    assert json.loads((out / "metrics.json").read_text()) == metrics


@pytest.mark.slow
def test_run_writes_the_resolved_config(lorenz63_run):
    case, out, _ = lorenz63_run
    back = load_case(str(out / "config.toml"))
    assert back == case
    assert back.training.epochs == 2 and back.metrics.curve_leads == [1, 2, 4] and back.data.n_train == 400


@pytest.mark.slow
def test_run_writes_a_cf_netcdf(lorenz63_run):
    case, out, metrics = lorenz63_run
    with xr.open_dataset(out / "forecast.nc") as ds:
        ds = ds.load()
    assert ds.attrs["Conventions"] == "CF-1.8" and ds.attrs["case"] == "lorenz63" and ds.attrs["dt"] == 0.01
    assert ds["truth"].dims == ("time", "component") and ds["forecast"].dims == ("time", "component")
    assert ds.sizes["time"] == case.metrics.forecast_steps + 1
    assert list(ds["component"].values) == ["x", "y", "z"]
    for name in ("truth", "forecast", "rmse"):
        assert ds[name].attrs["long_name"] and "units" in ds[name].attrs, name
    assert ds["time"].attrs["units"] == "model time units" and ds["time"].attrs["axis"] == "T"
    assert ds["time"].values[1] == pytest.approx(0.01) and ds["time"].values[0] == 0
    assert ds["rmse"].dims == ("lead",)
    assert list(ds["lead"].values) == [1, 2, 4, 8] and ds["lead"].attrs["units"] == "steps"
    assert ds["lead_time"].attrs["units"] == "model time units"
    assert list(ds["lead_time"].values) == pytest.approx([0.01, 0.02, 0.04, 0.08])
    for k in (1, 4, 8):
        assert float(ds["rmse"].sel(lead=k)) == metrics[f"rmse_lead{k}"]
    assert (ds["forecast"].isel(time=0) == ds["truth"].isel(time=0)).all()  # the forecast starts from the truth


@pytest.mark.slow
def test_run_writes_figures_and_no_temp_files(lorenz63_run):
    _, out, _ = lorenz63_run
    for name in ("attractor.png", "rmse_by_lead.png", "forecast.png"):
        data = (out / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert (out / "checkpoints" / "checkpoint.pt").is_file()
    assert temp_files(out) == []
    assert {p.name for p in out.iterdir()} == {"checkpoints", "config.toml", "figures", "forecast.nc", "metrics.json"}


@pytest.mark.slow
def test_run_refuses_to_mix_outputs(lorenz63_run, tmp_path):
    case, out, _ = lorenz63_run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"--out: '.*lorenz63' already holds outputs; pass --overwrite"):
        run_case(case, out, progress=False)
    changed = load_case("lorenz63", [*SMALL, "training.epochs=3"])
    with pytest.raises(ConfigError, match=r"--resume: '.*lorenz63' holds outputs of a different config"):
        run_case(changed, out, resume=True, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        run_case(case, a_file, progress=False)


@pytest.mark.slow
def test_run_resumed_after_completion_reproduces_the_metrics(lorenz63_run):
    case, out, metrics = lorenz63_run
    again = run_case(case, out, resume=True, progress=False)
    ignore = {"case_seconds"}
    assert {k: v for k, v in again.items() if k not in ignore} == {k: v for k, v in metrics.items() if k not in ignore}
    assert temp_files(out) == []


@pytest.mark.slow
def test_mlp_case_runs_and_overwrite_replaces_old_outputs(tmp_path):
    case = load_case("lorenz63-mlp", [*SMALL, "training.refine_iterations=3"])
    out = tmp_path / "mlp"
    out.mkdir()
    (out / "stale.txt").write_text("from another run")
    with pytest.raises(ConfigError, match="already holds outputs"):
        run_case(case, out, progress=False)
    metrics = run_case(case, out, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists()
    assert METRIC_KEYS <= set(metrics) and metrics["n_params"] == 4611  # 3-64-64-3
    assert all(math.isfinite(metrics[k]) for k in ("rmse_lead1", "rmse_lead4", "rmse_lead8", "lyapunov_max_true"))
    assert load_case(str(out / "config.toml")) == case
    for name in (
        "metrics.json",
        "config.toml",
        "forecast.nc",
        "figures/attractor.png",
        "figures/rmse_by_lead.png",
        "figures/forecast.png",
    ):
        assert (out / name).is_file(), name
    assert temp_files(out) == []
    assert dataclasses.asdict(case)["model"]["operator"] == "mlp"
