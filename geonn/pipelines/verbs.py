"""Run one verb on one netCDF variable into one output folder, whole or not at all."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .. import __version__, distributed
from ..errors import ConfigError, GeonnError, InputError
from ..io import check_output_folder, staged_folder, write_json, write_text
from .source import StreamedField, open_field

# verb -> module defining ``Options`` (a dataclass) and ``run(data, options, folder, *, seed, progress) -> metrics``
VERBS = {
    "reduce": "geonn.pipelines.reduce",      # EOF or autoencoder reducer: latent.nc, reconstruction.nc
    "emulate": "geonn.pipelines.emulate",    # CNN one-step emulator vs persistence, ridge, LIM: forecast.nc
    "generate": "geonn.pipelines.generate",  # WGAN-GP generator vs an EOF-Gaussian sampler: samples.nc
}


def verb_module(verb: str):
    if verb not in VERBS:
        raise ConfigError(f"verb: expected one of {sorted(VERBS)}, got {verb!r}")
    return importlib.import_module(VERBS[verb])


def make_options(verb: str, **values):
    """The verb's ``Options`` from keyword values; ``None`` values keep the defaults."""
    cls = verb_module(verb).Options
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{verb}: unknown options {unknown}; expected some of {sorted(names)}")
    return cls(**{k: v for k, v in values.items() if v is not None})


# verbs whose training runs data-parallel under torchrun (rank 0 writes the checkpoints, the others read them on resume)
DISTRIBUTED = ("reduce", "emulate", "generate")

# verb -> the function that runs it on a variable larger than memory (StreamedField)
STREAMED = {"reduce": "geonn.pipelines.streaming:reduce_streamed", "emulate": "geonn.pipelines.streaming:emulate_streamed"}


def run_verb(verb: str, path: str | os.PathLike, var: str, options, out: str | os.PathLike, *,
             train_fraction: float = 0.8, seed: int = 0, overwrite: bool = False, progress: bool = True,
             stream: bool | None = None, resume: bool = False, device: str | torch.device = "auto") -> dict:
    """Run ``verb`` on variable ``var`` of ``path``; write its outputs into ``out``.

    Everything is checked before training starts (file, variable, dimensions, split, options,
    output folder); outputs are written into a hidden folder beside ``out`` that becomes ``out``
    at the end, so a failed or interrupted run leaves nothing behind. ``out`` ends up holding the
    verb's netCDF outputs, ``model.pt`` (its fitted state, weights-only), ``config.toml`` (the
    resolved settings), ``figures/*.png`` and, written last, ``metrics.json``.

    ``path`` may be a glob pattern over many files (``data/*.nc``). A variable larger than 2 GiB
    (or any, with ``stream=True``) is read a block of time steps at a time; verbs without an
    out-of-core path (:data:`STREAMED`) then refuse it with a clear message.

    Training checkpoints go to a hidden folder beside ``out`` (``.OUT.checkpoints``), outside the
    staged outputs, so a run that is killed or fails keeps them: ``resume=True`` (``--resume``)
    continues from them and ends with the weights of an uninterrupted run. The folder is removed
    once ``out`` is complete.

    ``device`` (``"auto"``, ``"cpu"`` or ``"cuda"``, :func:`geonn.distributed.resolve_device`)
    is where the models train and run. Under ``torchrun`` the verbs in :data:`DISTRIBUTED` train
    data-parallel (each rank takes its share of every global batch and the gradients are summed
    over ranks); rank 0 alone writes ``out`` and the checkpoints, the other ranks write their copies
    of the outputs into a temporary folder that is removed at the end.

    Returns:
        The metrics (flat floats and strings).
    """
    if stream and verb not in STREAMED:
        raise InputError(f"--stream: {verb} needs the variable in memory; out-of-core runs exist for {sorted(STREAMED)}")
    module = verb_module(verb)
    if not isinstance(options, module.Options):
        raise InputError(f"options: expected {module.Options.__name__} for {verb}, got {type(options).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"--seed: expected an int, got {seed!r}")
    context = distributed.setup(device)
    problem = None
    if context.is_main:
        try:
            out = check_output_folder(out, overwrite)
        except GeonnError as err:
            problem = err
    if context.distributed and distributed.broadcast_object(None if problem is None else str(problem)) is not None:
        raise problem if problem is not None else InputError("--out: rank 0 refused the output folder (see its message)")
    if problem is not None:
        raise problem
    out = Path(out)
    data = open_field(path, var, train_fraction, stream=stream)
    runner = module.run
    if isinstance(data, StreamedField):
        if verb not in STREAMED:
            raise InputError(f"IN.nc: {var} is larger than memory allows ({data.da.nbytes / 1024**3:.1f} GiB); {verb} needs it "
                             f"in memory, out-of-core runs exist for {sorted(STREAMED)}")
        module_name, _, name = STREAMED[verb].partition(":")
        runner = getattr(importlib.import_module(module_name), name)
    resolved = {"geonn": __version__, "verb": verb, "seed": seed, "train_fraction": float(train_fraction),
                **data.describe(), verb: _without_none(dataclasses.asdict(options))}
    checkpoints = out.absolute().parent / f".{out.name}.checkpoints"
    if context.is_main and checkpoints.exists() and not resume:
        shutil.rmtree(checkpoints)  # a failed run's checkpoints: starting afresh, as asked
    distributed.barrier()
    parameters = inspect.signature(runner).parameters
    extra = {"device": context.device} if "device" in parameters else {}
    if not context.is_main:
        with tempfile.TemporaryDirectory(prefix=f"geonn-rank{context.rank}-") as scratch:
            folder = Path(scratch)
            (folder / "figures").mkdir()
            if "checkpoints" in parameters:  # DDP-aware runners read rank 0's checkpoint; the others keep their own
                extra.update(checkpoints=checkpoints if verb in DISTRIBUTED else folder / "checkpoints", resume=resume)
                extra["checkpoints"].mkdir(parents=True, exist_ok=True)
            torch.manual_seed(seed)
            metrics = runner(data, options, folder, seed=seed, progress=False, **extra)
        distributed.barrier()
        return {"verb": verb, **metrics}
    if "checkpoints" in parameters:
        checkpoints.mkdir(parents=True, exist_ok=True)
        extra.update(checkpoints=checkpoints, resume=resume)
    torch.manual_seed(seed)
    try:
        with staged_folder(out, overwrite) as stage:
            import tomli_w

            write_text(stage / "config.toml", tomli_w.dumps(resolved))
            (stage / "figures").mkdir()
            start = time.perf_counter()
            metrics = runner(data, options, stage, seed=seed, progress=progress, **extra)
            metrics = {"verb": verb, **metrics, "seconds": time.perf_counter() - start}
            write_json(metrics, stage / "metrics.json")
    except BaseException:
        if checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()  # failed before any checkpoint: leave nothing behind
        raise
    shutil.rmtree(checkpoints, ignore_errors=True)
    distributed.barrier()
    return metrics


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value
