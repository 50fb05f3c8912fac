"""The ``geonn`` command: ``geonn case NAME`` runs a case study into one output folder."""

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
    metrics = run_case(case, out, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet)
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
    case.set_defaults(func=_case_command)
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
