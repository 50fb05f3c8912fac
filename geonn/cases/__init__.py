"""Case studies: find a case file, load it strictly, run it into one output folder.

A case file in ``cases/`` is TOML; its ``kind`` picks the runner. Every run writes
``config.toml`` (the resolved config), netCDF outputs, ``figures/*.png`` and, last,
``metrics.json``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import shutil
from pathlib import Path

import torch

from .. import distributed
from ..errors import ConfigError
from ..io import write_json, write_text
from .config import apply_overrides, build, read_toml, to_toml

# kind -> the module that runs it. Each module defines ``CONFIG`` (the case's dataclass),
# ``run(case, out, *, resume, progress) -> metrics`` and ``check_expected(case, metrics)``.
KINDS = {
    "identification": "geonn.cases.identification",   # issue 2: noise-free identification
    "assimilation": "geonn.cases.assimilation",       # issue 4: twin experiments, DA methods
    "noisy": "geonn.cases.noisy",                     # issue 3: weak-constraint identification from noisy data
    "transport": "geonn.cases.transport",             # issue 3: optimal-transport term on the attractor
    "stochastic": "geonn.cases.stochastic",           # issue 3: drift + likelihood covariance
    "partial": "geonn.cases.partial",                 # issue 3: latent augmented state from one component
    "learned-solver": "geonn.cases.learned_solver",   # issue 4: 4DVarNet
    "fields": "geonn.cases.fields",                   # issue 5: reduce / emulate / generate on a netCDF file
}


def _kind(kind: str):
    if not isinstance(kind, str) or kind not in KINDS:
        raise ConfigError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
    return importlib.import_module(KINDS[kind])


def check_expected(case, metrics: dict) -> list[tuple[str, float, float, bool]]:
    """Compare metrics with the case's recorded targets: rows of (name, value, bound, met)."""
    return _kind(case.kind).check_expected(case, metrics)


def case_dirs() -> list[Path]:
    """Folders searched for case files: ``./cases``, the installed package's, and the source tree's."""
    here = Path(__file__).resolve().parent.parent
    dirs = [Path.cwd() / "cases", here / "_cases", here.parent / "cases"]
    seen, unique = set(), []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            unique.append(d)
    return unique


def list_cases() -> dict[str, Path]:
    """Case name -> file, first folder wins."""
    found: dict[str, Path] = {}
    for d in case_dirs():
        for path in sorted(d.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def find_case(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        return path
    cases = list_cases()
    if name_or_path in cases:
        return cases[name_or_path]
    raise ConfigError(f"case: no case named {name_or_path!r}; expected one of {sorted(cases)} or a path to a .toml file")


def load_case(name_or_path: str, overrides: list[str] | None = None):
    """Load a case file (by name or path) with ``--set`` overrides into its typed config."""
    path = find_case(name_or_path)
    data = apply_overrides(read_toml(path), overrides or [])
    kind = data.get("kind", "identification")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ConfigError(f"kind: expected one of {sorted(KINDS)}, got {kind!r} (in {path})")
    data.setdefault("name", path.stem)
    return build(_kind(kind).CONFIG, data)


def prepare_output(out: Path, config_text: str, *, overwrite: bool, resume: bool) -> None:
    """Refuse to mix outputs: ``out`` must be empty, or ``overwrite``, or ``resume`` of the same config."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        saved = out / "config.toml"
        if resume:
            if not saved.is_file():
                raise ConfigError(f"--resume: {str(out)!r} holds files but no config.toml of a geonn case run; "
                                  f"pick another folder or pass --overwrite")
            if saved.read_text(encoding="utf-8") != config_text:
                raise ConfigError(f"--resume: {str(out)!r} holds outputs of a different config (compare its config.toml)")
        elif overwrite:
            shutil.rmtree(out)
        else:
            raise ConfigError(
                f"--out: {str(out)!r} already holds outputs; pass --overwrite to replace them or --resume to continue"
            )
    out.mkdir(parents=True, exist_ok=True)


def run_case(case, out: str | Path, *, overwrite: bool = False, resume: bool = False, progress: bool = True,
             device: str = "cpu") -> dict:
    """Run a loaded case into ``out``; returns its metrics (also written to ``out/metrics.json``).

    Under ``torchrun`` every rank runs the case (training is data-parallel, see
    :mod:`geonn.distributed`); rank 0 alone writes into ``out``, the other ranks write their copies
    of the outputs into a temporary folder that is removed at the end.

    ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``) goes to kinds whose ``run`` takes a ``device``
    argument; the others run on the CPU (``"cuda"`` asked of them is an error).
    """
    out = Path(out)
    runner = _kind(case.kind).run
    resolved = distributed.resolve_device(device)
    if "device" in inspect.signature(runner).parameters:
        runner = functools.partial(runner, device=resolved)
    elif device == "cuda":
        raise ConfigError(f"--device: the {case.kind!r} kind runs on the CPU only; got 'cuda' (use 'cpu' or 'auto')")
    else:
        resolved = torch.device("cpu")
    context = distributed.setup(resolved)
    text = to_toml(case)
    problem = None
    if context.is_main:
        try:
            prepare_output(out, text, overwrite=overwrite, resume=resume)
        except ConfigError as err:
            problem = err
    if context.distributed and distributed.broadcast_object(None if problem is None else str(problem)) is not None:
        raise problem if problem is not None else ConfigError("--out: rank 0 refused the output folder (see its message)")
    if problem is not None:
        raise problem
    if not context.is_main:
        import tempfile

        with tempfile.TemporaryDirectory(prefix=f"geonn-rank{context.rank}-") as scratch:
            metrics = runner(case, Path(scratch), resume=resume, progress=False)
        distributed.barrier()
        return metrics
    write_text(out / "config.toml", text)
    metrics = runner(case, out, resume=resume, progress=progress)
    write_json(metrics, out / "metrics.json")
    distributed.barrier()
    return metrics


def read_metrics(out: str | Path) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text())


__all__ = ["KINDS", "check_expected", "find_case", "list_cases", "load_case", "read_metrics", "run_case"]
