"""Peak memory of one gradient of an n-step rollout loss: backprop vs checkpoint vs adjoint.

An MLP tendency ``MLP(3, (128, 128))`` (float32, tanh) is rolled out ``n`` RK4 steps from a batch
of ``--batch`` states with ``geonn.rollout(..., gradient=method)``; the loss is the mean square of
the rolled-out states and ``loss.backward()`` is called once. Each (method, n) runs in a fresh
interpreter (a subprocess of this script), after a small warm-up rollout that initialises autograd,
checkpointing and torchdiffeq, so nothing one configuration allocates can hide another's peak.

Two measures are printed:

* peak RSS increase: the process's resident-set high-water mark during the gradient (Linux
  ``VmHWM``, reset through ``/proc/self/clear_refs`` just before; ``ru_maxrss`` where that is not
  available) minus the resident set just before. This is what the machine must provide: tensors,
  the autograd graph's nodes and hooks, Python objects and allocator slack.
* peak live tensor storage (``--live-max-n``, default up to n = 1000 because it is slow): a second
  pass under a ``TorchDispatchMode`` that adds up the bytes of every tensor storage an operator
  creates and subtracts them when the storage is freed. This counts tensors only (activations,
  states, gradients), independent of the allocator, and shows the algorithm's own scaling.

The fitted slope of log(memory) against log(n) is printed per method (expected: backprop ~1,
checkpoint ~0.5, adjoint ~0 apart from the stored trajectory (n+1) x batch x 3, which every
method returns and which the loss's gradient needs).

    python benchmarks/memory.py            # full: n = 100, 1000, 10000
    python benchmarks/memory.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
from _common import emit, environment_line, run_worker, table

METHODS = ("backprop", "checkpoint", "adjoint")
EXPECTED_SLOPE = {"backprop": "~1 (linear)", "checkpoint": "~0.5 (sqrt)", "adjoint": "~0 (flat)"}
MB = 2.0**20


# --- measuring -----------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def _peak_bytes(reset_ok: bool) -> int:
    if reset_ok:
        return _status_kb("VmHWM") * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _live_tensor_peak(fn) -> int:
    """Peak bytes of live tensor storages created while ``fn()`` runs (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map_only

    class LiveStorage(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict[int, int] = {}
            self.current = 0
            self.peak = 0

        def _free(self, key):
            self.current -= self.live.pop(key, 0)

        def _track(self, t):
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self.live:
                return
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tree_map_only(torch.Tensor, self._track, out)
            return out

    mode = LiveStorage()
    with mode:
        fn()
    return mode.peak


# --- worker: one (method, n) in a fresh interpreter -------------------------------------------------


def worker(args) -> None:
    torch.set_num_threads(1)  # memory does not depend on it; keeps the run time steady on a shared machine
    import geonn

    torch.manual_seed(args.seed)
    model = geonn.MLP(3, tuple(args.hidden))
    x0 = torch.randn(args.batch, 3)

    def gradient(n):
        traj = geonn.rollout(model, x0, n, args.dt, "rk4", gradient=args.method)
        loss = traj[1:].square().mean()
        loss.backward()
        return float(loss)

    gradient(4)  # warm-up: autograd engine, checkpoint machinery, torchdiffeq solver registration
    model.zero_grad(set_to_none=True)
    gc.collect()
    before = _rss_bytes()
    reset_ok = _reset_peak()
    t0 = time.perf_counter()
    gradient(args.n)
    seconds = time.perf_counter() - t0
    peak = _peak_bytes(reset_ok)
    result = {"method": args.method, "n": args.n, "rss_increase": max(peak - before, 0), "seconds": seconds,
              "hwm_reset": reset_ok, "baseline_rss": before}
    if args.n <= args.live_max_n:
        model.zero_grad(set_to_none=True)
        gc.collect()
        result["live_peak"] = _live_tensor_peak(lambda: gradient(args.n))
    emit(result)


# --- parent ----------------------------------------------------------------------------------------


def _mem_available() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _slope(points: list[tuple[int, float]]) -> float | None:
    pts = [(math.log(n), math.log(m)) for n, m in points if m > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced size for a smoke test (n = 10, 100)")
    p.add_argument("--steps", type=int, nargs="+", default=[100, 1000, 10_000], help="rollout lengths n")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    p.add_argument("--dt", type=float, default=0.01)
    p.add_argument("--live-max-n", type=int, default=1000, help="largest n that also gets the (slow) live-tensor pass")
    p.add_argument("--max-gb", type=float, default=8.0,
                   help="skip a configuration whose memory, extrapolated linearly from the previous n, would exceed this")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per configuration")
    p.add_argument("--jobs", type=int, default=3,
                   help="methods measured concurrently, one subprocess each (memory is per process and unaffected; "
                        "the time column is only comparable across methods with --jobs 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.live_max_n = [10, 100], 100
    if args.worker:
        return worker(args)

    print(f"# Memory of one gradient: {args.batch} x MLP 3-{'-'.join(map(str, args.hidden))}-3 (float32, tanh), "
          f"n-step classic RK4 rollout, loss = mean square of the states, one loss.backward()\n")
    print(f"Environment: {environment_line()}; each configuration in a fresh subprocess, torch threads 1, "
          f"{args.jobs} concurrent job(s)\n")
    script = os.path.abspath(__file__)
    cap = args.max_gb * 2**30
    avail = _mem_available()
    if avail is not None:
        cap = min(cap, 0.7 * avail)
    results: dict[tuple[str, int], dict] = {}

    def measure(method: str) -> None:
        previous = None
        for n in sorted(args.steps):
            if previous is not None:
                projected = previous["rss_increase"] * n / previous["n"] * 1.2
                if projected > cap:
                    results[(method, n)] = {"skipped": f"skipped: projected {projected / 2**30:.1f} GB > cap {cap / 2**30:.1f} GB"}
                    continue
            worker_args = ["--worker", "--method", method, "--n", str(n), "--batch", str(args.batch), "--dt", str(args.dt),
                           "--live-max-n", str(args.live_max_n), "--seed", str(args.seed), "--hidden", *map(str, args.hidden)]
            r = run_worker(script, worker_args, timeout=args.timeout)
            results[(method, n)] = previous = r
            print(f"<!-- measured {method} n={n}: {r['rss_increase'] / MB:.1f} MB in {r['seconds']:.1f} s -->", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in [pool.submit(measure, m) for m in args.methods]:
            future.result()

    state_bytes = args.batch * 3 * 4
    rows = []
    for method in args.methods:
        for n in sorted(args.steps):
            r = results[(method, n)]
            traj = f"{(n + 1) * state_bytes / MB:.2f}"
            if "skipped" in r:
                rows.append([method, n, r["skipped"], "-", traj, "-"])
                continue
            live = f"{r['live_peak'] / MB:.1f}" if "live_peak" in r else "-"
            rows.append([method, n, f"{r['rss_increase'] / MB:.1f}", live, traj, f"{r['seconds']:.2f}"])
    print("\n## Peak memory of one gradient\n")
    time_header = "time fwd+bwd [s]" + (f" ({args.jobs} jobs at once)" if args.jobs > 1 else "")
    print(table(["gradient", "n steps", "peak RSS increase [MB]", "peak live tensors [MB]",
                 "trajectory (n+1) x batch x 3 [MB]", time_header], rows))

    def per_step(points):
        """Marginal memory per extra step between the two largest n, in KB."""
        if len(points) < 2:
            return "-"
        (n1, m1), (n2, m2) = sorted(points)[-2:]
        return f"{(m2 - m1) / (n2 - n1) / 1024:.1f}"

    rows = []
    for method in args.methods:
        rss_pts = [(n, results[(method, n)]["rss_increase"]) for n in args.steps if "rss_increase" in results[(method, n)]]
        live_pts = [(n, results[(method, n)]["live_peak"]) for n in args.steps if "live_peak" in results[(method, n)]]
        s_rss, s_live = _slope(rss_pts), _slope(live_pts)
        rows.append([method, f"{s_rss:.2f}" if s_rss is not None else "-",
                     ", ".join(str(n) for n, _ in sorted(rss_pts)), per_step(rss_pts),
                     f"{s_live:.2f}" if s_live is not None else "-",
                     ", ".join(str(n) for n, _ in sorted(live_pts)), per_step(live_pts), EXPECTED_SLOPE[method]])
    print("\n## Log-log slope of memory vs n (least squares) and marginal memory per step\n")
    print(table(["gradient", "slope, RSS", "n used", "RSS KB / step", "slope, live tensors", "n used",
                 "live tensors KB / step", "expected slope"], rows))
    print(f"\nOne stored state (batch x 3 float32) is {state_bytes / 1024:.2f} KB; a method that keeps only the "
          "trajectory and its gradient grows by a few times that per step, whatever the network's width.")
    reset = all(r.get("hwm_reset", True) for r in results.values())
    print(f"\nNotes: peak RSS from {'VmHWM reset via /proc/self/clear_refs' if reset else 'ru_maxrss (no VmHWM reset)'}; "
          "it includes the autograd graph (nodes, saved-tensor hooks), Python objects and malloc slack, which the "
          "live-tensor column excludes. Memory figures do not depend on machine load; times do.")


if __name__ == "__main__":
    sys.exit(main())
