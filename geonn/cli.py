"""The ``geonn`` command: ``geonn case NAME`` runs a case study into one output folder;
``geonn assimilate OBS.nc --model M --method X --out DIR`` assimilates an observation file;
``geonn fields reduce|emulate|generate IN.nc --var V --out DIR`` runs a netCDF pipeline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import GeonnError


def _case_command(args) -> int:
    from .cases import check_expected, list_cases, load_case, run_case

    if args.list:
        for name, path in list_cases().items():
            print(f"{name:24s} {path}")
        return 0
    if not args.name:
        raise GeonnError("case: expected a case name or a .toml path (see geonn case --list)")
    case = load_case(args.name, args.set)
    out = Path(args.out) if args.out else Path("runs") / case.name
    metrics = run_case(case, out, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet, device=args.device)
    from .distributed import is_main

    if not is_main():
        return 0
    print(f"\ncase {case.name}: outputs in {out}/")
    for key in sorted(metrics):
        value = metrics[key]
        print(f"  {key:22s} {value:.4g}" if isinstance(value, float) else f"  {key:22s} {value}")
    rows = check_expected(case, metrics)
    if rows:
        print(f"targets ({case.expected.source}):")
        for name, value, bound, met in rows:
            print(f"  {'met    ' if met else 'MISSED '} {name} = {value:.3g} (target <= {bound:g})")
    return 0


def _assimilate_command(args) -> int:
    from .assimilation.command import AssimilateSettings, assimilate

    settings = AssimilateSettings(
        observations=args.observations, model=args.model, method=args.method, out=args.out, members=args.members,
        inflation=args.inflation, lag=args.lag, radius=args.radius, dt=args.dt, truth=args.truth, burn_in=args.burn_in,
        seed=args.seed, background_scale=args.background_scale, overwrite=args.overwrite,
    )
    metrics = assimilate(settings)
    print(f"assimilate {args.method}: outputs in {args.out}/")
    for key in sorted(metrics):
        value = metrics[key]
        print(f"  {key:22s} {value:.4g}" if isinstance(value, float) else f"  {key:22s} {value}")
    return 0


_FIELD_OPTIONS = {"reduce": ("modes", "method", "epochs"), "emulate": ("epochs",), "generate": ("samples", "epochs")}


def _fields_command(args) -> int:
    from .pipelines import run_verb
    from .pipelines.verbs import make_options

    options = make_options(args.verb, **{name: getattr(args, name) for name in _FIELD_OPTIONS[args.verb]})
    metrics = run_verb(args.verb, args.input, args.var, options, args.out, train_fraction=args.train_fraction,
                       seed=args.seed, overwrite=args.overwrite, progress=not args.quiet, stream=args.stream or None, resume=args.resume,
                       device=args.device)
    from .distributed import is_main

    if not is_main():
        return 0
    print(f"fields {args.verb}: outputs in {args.out}/")
    for key in sorted(metrics):
        value = metrics[key]
        print(f"  {key:30s} {value:.4g}" if isinstance(value, float) else f"  {key:30s} {value}")
    return 0


def _add_fields_parser(sub) -> None:
    fields = sub.add_parser("fields", help="netCDF pipelines over gridded fields: reduce, emulate, generate")
    verbs = fields.add_subparsers(dest="verb", required=True)
    helps = {
        "reduce": "encode a variable to K latent modes (EOF or autoencoder) and rebuild it",
        "emulate": "train a CNN one-step emulator; score it against persistence, ridge and a LIM",
        "generate": "train a GAN generator of fields; score it against an EOF-Gaussian sampler",
    }
    for verb, text in helps.items():
        p = verbs.add_parser(verb, help=text, description=text)
        p.add_argument("input", metavar="IN.nc", help="netCDF file, or a quoted glob pattern over many ('data/*.nc')")
        p.add_argument("--var", required=True, metavar="V", help="the variable (needs time, latitude, longitude dims)")
        p.add_argument("--train-fraction", type=float, default=0.8, metavar="F",
                       help="share of the time axis, from the start, used for training (default 0.8); the rest is scored")
        p.add_argument("--seed", type=int, default=0, help="seed of the training (default 0)")
        p.add_argument("--out", required=True, metavar="DIR", help="output folder (written whole at the end, or not at all)")
        p.add_argument("--overwrite", action="store_true", help="replace the outputs already in --out")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its checkpoints (kept in .DIR.checkpoints beside --out)")
        p.add_argument("--epochs", type=int, help="training epochs of the learned model (default: its own)")
        p.add_argument("--stream", action="store_true",
                       help="read the variable in blocks of time steps, never whole (automatic above 2 GiB; "
                            "reduce --method eof, emulate)")
        _add_device(p)
        if verb == "reduce":
            p.add_argument("--modes", type=int, required=True, metavar="K", help="number of latent modes")
            p.add_argument("--method", default="eof", choices=("eof", "autoencoder"), help="the reducer (default eof)")
        if verb == "generate":
            p.add_argument("--samples", type=int, required=True, metavar="N", help="number of fields to generate")
        p.set_defaults(func=_fields_command)


def _add_device(parser) -> None:
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where models train and run: auto (a CUDA GPU when torch sees one, else the CPU; the default), "
                             "cpu or cuda (an error without a GPU); under torchrun each rank takes its local GPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geonn", description="Deep learning for the geosciences.")
    sub = parser.add_subparsers(dest="command", required=True)
    case = sub.add_parser("case", help="run a case study from cases/ (geonn case --list)")
    case.add_argument("name", nargs="?", help="case name (e.g. lorenz63) or path to a case .toml file")
    case.add_argument("--out", help="output folder (default runs/NAME)")
    case.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set training.epochs=5 (repeatable)")
    case.add_argument("--list", action="store_true", help="list the available cases")
    case.add_argument("--overwrite", action="store_true", help="replace the outputs already in --out")
    case.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its checkpoint")
    case.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_device(case)
    case.set_defaults(func=_case_command)

    from .assimilation.command import METHODS

    da = sub.add_parser("assimilate", help="assimilate an observation file with a reference or learned model")
    da.add_argument("observations", metavar="OBS.nc", help="observation file (format: docs/assimilation.md)")
    da.add_argument("--model", required=True, metavar="MODEL",
                    help="lorenz63, lorenz96, or a geonn case run folder (or its checkpoints/checkpoint.pt)")
    da.add_argument("--method", required=True, choices=METHODS, help="the assimilation method")
    da.add_argument("--out", required=True, metavar="DIR", help="output folder (written whole at the end, or not at all)")
    da.add_argument("--members", type=int, help="ensemble size (ensemble methods; default 20)")
    da.add_argument("--inflation", type=float, help="multiplicative inflation (default 1: none)")
    da.add_argument("--lag", type=int, help="smoother lag / window length in observation cycles (enks, ienks, 4dvar)")
    da.add_argument("--radius", type=float, help="Gaspari-Cohn localisation half-width in grid units (letkf)")
    da.add_argument("--dt", type=float, help="model step (default: the file's dt attribute)")
    da.add_argument("--truth", metavar="TRUTH.nc", help="netCDF with truth(time, component) (or state) to score against")
    da.add_argument("--burn-in", type=float, default=0.0, metavar="T",
                    help="leave observation times <= T (model time units) out of the scores")
    da.add_argument("--seed", type=int, help="seed of the initial ensemble and the method's random draws")
    da.add_argument("--background-scale", type=float, metavar="XB",
                    help="3dvar/4dvar: B = XB x the model's climatological covariance (DAPPER's xB; default 1)")
    da.add_argument("--overwrite", action="store_true", help="replace the outputs already in --out")
    da.set_defaults(func=_assimilate_command)
    _add_fields_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GeonnError as err:
        print(f"geonn: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("geonn: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
