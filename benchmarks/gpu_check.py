"""A short check of the CUDA path (under 5 minutes): the same work on CPU and on the GPU, with the speed-up.

1. Integration: true Lorenz-63, ``--trajectories`` x ``--steps`` classic RK4 steps, float64, all
   states stored: ``geonn.rollout`` eager and compiled, on each device.
2. Training: ``Standardised(MLP(3, (64, 64)))`` in an RK4 step, Adam on 8-step rollout windows,
   gradient by ``backprop`` and by ``adjoint``: seconds per epoch on each device.
3. The ``lorenz63`` case's training and scores, on each device: the BiNN fitted with
   ``geonn.training.fit`` (Adam, then Levenberg-Marquardt), forecast RMSE at leads 1/4/8 and the
   largest Lyapunov exponent; the two devices must agree on the figures.

Each result is also checked for agreement between devices (the same trajectories to 1e-9, the
same losses). On a machine without a GPU the script says so and exits 0 after the CPU column.

    python benchmarks/gpu_check.py            # about 2-4 minutes with a GPU
    python benchmarks/gpu_check.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import environment_line, table


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=3) -> tuple[float, object]:
    out = fn()  # warm-up (and compilation)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def integration(device, args) -> dict:
    import geonn

    model = geonn.Lorenz63()
    generator = torch.Generator().manual_seed(0)
    x0 = (model.default_initial_state() + torch.randn(args.trajectories, 3, generator=generator, dtype=torch.float64)).to(device)
    results = {}
    for compile in (False, True):
        seconds, traj = timed(lambda compile=compile: geonn.rollout(model, x0, args.steps, 0.01, "rk4", compile=compile), device)
        results["compiled" if compile else "eager"] = (seconds, traj[-1].cpu())
    return results


def training(device, args) -> dict:
    import geonn

    with torch.no_grad():
        x0 = geonn.rollout(geonn.Lorenz63(), geonn.Lorenz63().default_initial_state(), 1000, 0.01, "rk4")[-1]
        traj = geonn.rollout(geonn.Lorenz63(), x0, args.windows + 9, 0.01, "rk4")
    idx = torch.arange(args.windows)[:, None] + torch.arange(9)[None, :]
    windows = traj[idx].float().to(device)
    out = {}
    for gradient in ("backprop", "adjoint"):
        torch.manual_seed(0)
        model = geonn.Standardised(geonn.MLP(3, (64, 64)), traj.mean(0).float(), traj.std(0).float(),
                                   ((traj[1:] - traj[:-1]) / 0.01).std(0).float()).to(device)
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

        def epoch(model=model, optimiser=optimiser, gradient=gradient):
            total = 0.0
            for batch in windows.split(args.batch):
                optimiser.zero_grad()
                pred = geonn.rollout(model, batch[:, 0], 8, 0.01, "rk4", gradient=gradient)[1:]
                loss = (pred.transpose(0, 1) - batch[:, 1:]).pow(2).mean()
                loss.backward()
                optimiser.step()
                total += float(loss.detach())
            return total

        seconds, loss = timed(epoch, device, repeats=2)
        out[gradient] = (seconds, loss)
    return out


def case(device, args) -> dict:
    import geonn
    from geonn.metrics import forecast_rmse, lyapunov_max
    from geonn.operators import BilinearResidual, Standardised
    from geonn.training import TrainConfig, fit

    train = torch.as_tensor(geonn.simulate(geonn.Lorenz63(), args.case_steps, 0.01, spinup_steps=1000).state.values)
    test = torch.as_tensor(geonn.simulate(geonn.Lorenz63(), 2000, 0.01, spinup_steps=1500).state.values)
    torch.manual_seed(0)
    model = Standardised(BilinearResidual(3).double(), train.mean(0), train.std(0), ((train[1:] - train[:-1]) / 0.01).std(0))
    model = model.to(device)
    step = geonn.RungeKuttaStep("rk4").to(device)
    t0 = time.perf_counter()
    fit(model, train.to(device), 0.01, step=step, progress=False,
        config=TrainConfig(epochs=args.case_epochs, batch_size=256, refine="lm", refine_epochs=2, refine_iterations=40))
    sync(device)
    seconds = time.perf_counter() - t0
    rmse = forecast_rmse(model, test.to(device), 0.01, (1, 4, 8), step)
    lyap, _ = lyapunov_max(model, test[::500][:4].to(device), 0.01, step, n_steps=2000, seed=0)
    return {"seconds": seconds, "rmse": rmse, "lyapunov": lyap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    args.trajectories, args.steps = (100, 200) if args.quick else (1000, 10_000)
    args.windows, args.batch = (512, 256) if args.quick else (8192, 256)
    args.case_steps, args.case_epochs = (1000, 2) if args.quick else (10_000, 10)
    print(environment_line())
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        print(f"GPU: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    else:
        print("no CUDA GPU visible to torch: only the CPU column is measured")
    results = {d.type: {"integration": integration(d, args), "training": training(d, args), "case": case(d, args)} for d in devices}

    def row(name, get):
        cells = [name] + [f"{get(results[d.type]):.3g}" for d in devices]
        if len(devices) == 2:
            cells.append(f"{get(results['cpu']) / get(results['cuda']):.1f}x")
        return cells

    headers = ["seconds", *[d.type for d in devices]] + (["speed-up"] if len(devices) == 2 else [])
    rows = [
        row(f"integrate {args.trajectories} x {args.steps} steps, eager", lambda r: r["integration"]["eager"][0]),
        row(f"integrate {args.trajectories} x {args.steps} steps, compiled", lambda r: r["integration"]["compiled"][0]),
        row(f"train epoch ({args.windows} windows x 8 steps), backprop", lambda r: r["training"]["backprop"][0]),
        row(f"train epoch ({args.windows} windows x 8 steps), adjoint", lambda r: r["training"]["adjoint"][0]),
        row("lorenz63 case training (Adam + LM)", lambda r: r["case"]["seconds"]),
    ]
    print(table(headers, rows))
    print()
    scores = [["case score", *[d.type for d in devices]]]
    for lead in (1, 4, 8):
        scores.append([f"rmse_lead{lead}", *[f"{results[d.type]['case']['rmse'][lead]:.3g}" for d in devices]])
    scores.append(["lyapunov_max", *[f"{results[d.type]['case']['lyapunov']:.3f}" for d in devices]])
    print(table(scores[0], scores[1:]))
    if len(devices) == 2:
        a, b = results["cpu"]["integration"]["eager"][1], results["cuda"]["integration"]["eager"][1]
        print(f"\nagreement: integration end states max |cpu - cuda| = {float((a - b).abs().max()):.2e}")


if __name__ == "__main__":
    main()
