"""Case kind ``fields``: a ``geonn fields`` verb on a netCDF variable, optionally swept over one option.

The file may name data shipped in a package as ``iris-sample-data:NAME.nc`` (the ``data`` extra);
other paths are resolved against the current folder and reported in the resolved config. A sweep
(``sweep = { modes = [5, 10] }``) runs the verb once per value into ``out/<option><value>/`` and
suffixes the metrics (``rmse_test_modes5``); without one the verb writes straight into ``out``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, InputError
from ..pipelines import run_verb
from ..pipelines.verbs import VERBS, make_options

PACKAGED = {"iris-sample-data": ("iris_sample_data", "path")}


@dataclass
class FieldsData:
    """The input: ``file`` (a path, or ``iris-sample-data:NAME.nc``), the variable, the training share."""

    file: str = "iris-sample-data:A1B_north_america.nc"
    var: str = "air_temperature"
    train_fraction: float = 0.8


@dataclass
class FieldsExpected:
    """Targets: ``max`` bounds on metrics, and ``max_ratio`` bounds on ratios written ``"a/b"``."""

    source: str = ""
    max: dict = field(default_factory=dict)
    max_ratio: dict = field(default_factory=dict)


@dataclass
class FieldsCase:
    name: str
    verb: str = "reduce"
    kind: str = "fields"
    description: str = ""
    seed: int = 0
    data: FieldsData = field(default_factory=FieldsData)
    options: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)
    expected: FieldsExpected = field(default_factory=FieldsExpected)

    def __post_init__(self):
        if self.verb not in VERBS:
            raise ConfigError(f"verb: expected one of {sorted(VERBS)}, got {self.verb!r}")
        if len(self.sweep) > 1:
            raise ConfigError(f"sweep: expected at most one option to sweep, got {sorted(self.sweep)}")
        for key, values in self.sweep.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep.{key}: expected a non-empty list of values, got {values!r}")
        try:
            for values in self.runs():
                make_options(self.verb, **values)
        except (InputError, ConfigError) as err:
            raise ConfigError(f"options: {err}") from None

    def runs(self) -> list[dict]:
        if not self.sweep:
            return [dict(self.options)]
        ((key, values),) = self.sweep.items()
        return [{**self.options, key: value} for value in values]


def resolve_file(spec: str) -> Path:
    """A data file path from ``spec``: ``package:NAME`` for packaged sample data, else a path."""
    package, sep, name = spec.partition(":")
    if sep and package in PACKAGED:
        module_name, attribute = PACKAGED[package]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise ConfigError(f"data.file: {spec!r} needs the {package} package: pip install 'geonn[data]'") from None
        return Path(getattr(module, attribute)) / name
    path = Path(os.path.expanduser(spec)).resolve()
    if not path.is_file():
        raise ConfigError(f"data.file: expected an existing netCDF file, got {spec!r} (resolved to {str(path)!r})")
    return path


def run(case: FieldsCase, out: Path, *, resume: bool = False, progress: bool = True) -> dict:
    path = resolve_file(case.data.file)
    runs = case.runs()
    metrics: dict = {"verb": case.verb, "input": str(path)}
    for values in runs:
        options = make_options(case.verb, **values)
        if case.sweep:
            ((key, _),) = case.sweep.items()
            label = f"{key}{values[key]}"
            folder = out / label
            if resume and (folder / "metrics.json").is_file():
                found = json.loads((folder / "metrics.json").read_text())
            else:
                found = run_verb(case.verb, path, case.data.var, options, folder, train_fraction=case.data.train_fraction,
                                 seed=case.seed, overwrite=True, progress=progress)
            metrics.update({f"{k}_{label}": v for k, v in found.items() if k not in ("verb",)})
        else:
            found = _run_into(case, path, options, out, progress)
            metrics.update({k: v for k, v in found.items() if k != "verb"})
    return metrics


def _run_into(case: FieldsCase, path: Path, options, out: Path, progress: bool) -> dict:
    """Run the verb into a subfolder, then move its files up next to the case's config.toml."""
    folder = out / f".{case.verb}"
    found = run_verb(case.verb, path, case.data.var, options, folder, train_fraction=case.data.train_fraction,
                     seed=case.seed, overwrite=True, progress=progress)
    for item in folder.iterdir():
        target = out / ("verb_config.toml" if item.name == "config.toml" else item.name)
        if item.name == "metrics.json":
            continue
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    shutil.rmtree(folder, ignore_errors=True)
    return found


def check_expected(case: FieldsCase, metrics: dict) -> list[tuple[str, float, float, bool]]:
    rows = []
    for name, bound in case.expected.max.items():
        if name in metrics:
            rows.append((name, float(metrics[name]), float(bound), float(metrics[name]) <= float(bound)))
    for ratio, bound in case.expected.max_ratio.items():
        top, _, bottom = ratio.partition("/")
        if top in metrics and bottom in metrics and float(metrics[bottom]) != 0:
            value = float(metrics[top]) / float(metrics[bottom])
            rows.append((ratio, value, float(bound), value <= float(bound)))
    return rows


CONFIG = FieldsCase
