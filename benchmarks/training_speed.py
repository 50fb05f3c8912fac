"""Training speed: an MLP tendency inside RK4, n-step rollout loss on Lorenz-63, geonn vs torchdiffeq.

One model, ``Standardised(MLP(3, (64, 64)))`` (3-64-64-3, tanh, on standardised states), is trained
with Adam on windows of a Lorenz-63 trajectory: each batch holds ``--batch`` start states, the model
is unrolled ``--unroll`` steps of RK4 with step ``--dt`` and the loss is the mean squared error of
the unrolled states against the truth. Four ways of getting the gradient are compared, in pairs:

* geonn ``rollout(..., gradient="backprop")``  vs  ``torchdiffeq.odeint(method="rk4")``
* geonn ``rollout(..., gradient="adjoint")``   vs  ``torchdiffeq.odeint_adjoint(method="rk4")``

All four start from the same initial weights, see the same batches in the same order, and take
4 tendency evaluations per step (checked and printed). NOTE: torchdiffeq's ``"rk4"`` is the 3/8
rule; geonn uses classic RK4 (``--geonn-scheme rk38`` makes the schemes identical). The methods are
interleaved epoch by epoch, in an order reversed every epoch, so background load and position
effects hit them alike; the first ``--warmup-epochs`` are excluded from the timings.

    python benchmarks/training_speed.py           # full
    python benchmarks/training_speed.py --quick   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from _common import environment_line, set_threads, table

METHODS = ("geonn backprop", "torchdiffeq odeint", "geonn adjoint", "torchdiffeq odeint_adjoint")
PAIRS = (("geonn backprop", "torchdiffeq odeint"), ("geonn adjoint", "torchdiffeq odeint_adjoint"))


def make_data(args, dtype):
    """Windows ``(n_windows, unroll + 1, 3)`` of one long Lorenz-63 trajectory (classic RK4, float64)."""
    import geonn

    n_windows = args.batch * args.batches_per_epoch
    length = n_windows + args.unroll + 1
    with torch.no_grad():
        x0 = geonn.Lorenz63().default_initial_state()
        x0 = geonn.rollout(geonn.Lorenz63(), x0, 1000, args.dt, "rk4")[-1]  # onto the attractor
        traj = geonn.rollout(geonn.Lorenz63(), x0, length, args.dt, "rk4")
    idx = torch.arange(n_windows)[:, None] + torch.arange(args.unroll + 1)[None, :]
    windows = traj[idx].to(dtype)
    tendency = (traj[1:] - traj[:-1]) / args.dt
    stats = (traj.mean(0).to(dtype), traj.std(0).to(dtype), tendency.std(0).to(dtype))
    return windows, stats


def make_model(args, stats, dtype):
    import geonn

    torch.manual_seed(args.seed)
    mlp = geonn.MLP(3, tuple(args.hidden)).to(dtype)
    return geonn.Standardised(mlp, *stats).to(dtype)


def make_forward(name, args, dtype):
    """``forward(model, x0) -> trajectory (unroll + 1, batch, 3)`` for one method."""
    import torchdiffeq

    import geonn

    t = args.dt * torch.arange(args.unroll + 1, dtype=dtype)
    if name == "geonn backprop":
        return lambda model, x0: geonn.rollout(model, x0, args.unroll, args.dt, args.geonn_scheme, gradient="backprop")
    if name == "geonn adjoint":
        return lambda model, x0: geonn.rollout(model, x0, args.unroll, args.dt, args.geonn_scheme, gradient="adjoint")
    if name == "torchdiffeq odeint":
        return lambda model, x0: torchdiffeq.odeint(model, x0, t, method="rk4")
    if name == "torchdiffeq odeint_adjoint":
        return lambda model, x0: torchdiffeq.odeint_adjoint(model, x0, t, method="rk4")
    raise ValueError(name)


def count_evaluations(forward, model, windows, args) -> tuple[float, float]:
    """Tendency evaluations per step in the forward and in the backward pass of one batch."""
    calls = [0]
    handle = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        batch = windows[: args.batch]
        traj = forward(model, batch[:, 0])
        n_forward = calls[0]
        torch.nn.functional.mse_loss(traj[1:], batch[:, 1:].transpose(0, 1)).backward()
        n_backward = calls[0] - n_forward
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return n_forward / args.unroll, n_backward / args.unroll


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced size for a smoke test")
    p.add_argument("--batch", type=int, default=256, help="start states per batch")
    p.add_argument("--unroll", type=int, default=10, help="RK4 steps per rollout (the loss horizon)")
    p.add_argument("--batches-per-epoch", type=int, default=20)
    p.add_argument("--epochs", type=int, default=8, help="timed epochs per method")
    p.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs per method first")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--dt", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--geonn-scheme", choices=("rk4", "rk38"), default="rk4",
                   help="geonn's scheme: classic RK4 (default) or rk38, the 3/8 rule torchdiffeq calls 'rk4'")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0 = torch's default); default 1: on a small shared machine OpenMP "
                        "barriers under oversubscription make multi-threaded timings erratic")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.batches_per_epoch, args.epochs = min(args.batches_per_epoch, 5), min(args.epochs, 2)
    threads = set_threads(args.threads)
    import geonn  # noqa: F401  (after set_threads)

    dtype = getattr(torch, args.dtype)
    windows, stats = make_data(args, dtype)
    base = make_model(args, stats, dtype)
    n_params = sum(q.numel() for q in base.parameters())
    forwards = {name: make_forward(name, args, dtype) for name in METHODS}
    models = {name: copy.deepcopy(base) for name in METHODS}
    optims = {name: torch.optim.Adam(models[name].parameters(), lr=args.lr) for name in METHODS}
    evals = {name: count_evaluations(forwards[name], copy.deepcopy(base), windows, args) for name in METHODS}

    print(f"# Training speed: {'-'.join(map(str, [3, *args.hidden, 3]))} MLP (tanh, standardised states, "
          f"{n_params} parameters, {args.dtype}) in RK4, Lorenz-63\n")
    print(f"batch {args.batch}, {args.unroll}-step unroll (dt = {args.dt}), {args.batches_per_epoch} batches per epoch, "
          f"Adam lr {args.lr}; {args.epochs} timed epochs after {args.warmup_epochs} warm-up; torch threads {threads}; "
          f"geonn scheme {args.geonn_scheme!r}, torchdiffeq 'rk4' (= 3/8 rule)\n")
    print(f"Environment: {environment_line()}\n")

    epoch_times = {name: [] for name in METHODS}
    last_loss = {}
    gen = torch.Generator().manual_seed(args.seed)
    n_windows = windows.shape[0]
    for epoch in range(args.warmup_epochs + args.epochs):
        order = torch.randperm(n_windows, generator=gen)  # the same batches for every method
        # alternate the running order every epoch: the position in the sequence costs a few per cent
        for name in METHODS if epoch % 2 == 0 else METHODS[::-1]:
            model, opt, forward = models[name], optims[name], forwards[name]
            total = 0.0
            t0 = time.perf_counter()
            for b in range(args.batches_per_epoch):
                batch = windows[order[b * args.batch : (b + 1) * args.batch]]
                opt.zero_grad(set_to_none=True)
                traj = forward(model, batch[:, 0])
                loss = torch.nn.functional.mse_loss(traj[1:], batch[:, 1:].transpose(0, 1))
                loss.backward()
                opt.step()
                total += loss.item()
            elapsed = time.perf_counter() - t0
            if epoch >= args.warmup_epochs:
                epoch_times[name].append(elapsed)
            last_loss[name] = total / args.batches_per_epoch

    rows = []
    for name in METHODS:
        ts = epoch_times[name]
        fwd, bwd = evals[name]
        rows.append([name, f"{statistics.median(ts):.3f}", f"{min(ts):.3f}",
                     f"{1e3 * statistics.median(ts) / args.batches_per_epoch:.1f}", f"{fwd:g} / {bwd:g}",
                     f"{last_loss[name]:.4g}"])
    print("## Seconds per epoch\n")
    print(table(["method", "median [s/epoch]", "best [s/epoch]", "ms / batch (median)",
                 "f evals per step (forward / backward)", "loss, last epoch"], rows))
    rows = []
    for geo, peer in PAIRS:
        g, q = statistics.median(epoch_times[geo]), statistics.median(epoch_times[peer])
        paired = statistics.median(b / a for a, b in zip(epoch_times[geo], epoch_times[peer]))
        verdict = "yes" if paired >= 1.0 else ("tie (within 3 %)" if paired >= 0.97 else "no")
        rows.append([f"{geo} vs {peer}", f"{g:.3f}", f"{q:.3f}", f"{q / g:.2f}x", f"{paired:.2f}x",
                     ">= 1.00x (no slower)", verdict])
    print("\n## geonn vs torchdiffeq (speed-up = peer time / geonn time)\n")
    print(table(["pairing", "geonn median [s/epoch]", "torchdiffeq median [s/epoch]", "ratio of medians",
                 "median of per-epoch ratios", "target", "met"], rows))
    print("\nNotes: backward-pass evaluations of the adjoint methods are the vector-Jacobian products of the adjoint "
          "ODE (one per stage); backprop re-evaluates nothing. Losses differ slightly between the pairs' schemes "
          "(classic RK4 vs 3/8 rule) unless --geonn-scheme rk38. The per-epoch ratio pairs epochs run back to back, which "
          "cancels slow drifts of background load. Timings on a shared machine are noisy.")
    print(f"\nEnd load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
