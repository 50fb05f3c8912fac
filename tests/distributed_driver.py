"""Run under ``torchrun`` by tests/test_distributed.py: the joint estimates and case runs of a plan.

``joint(folder, mode)`` runs the joint estimator (geonn.joint) on 5 windows, sharded 3 + 2 over two
ranks: the states and a learned model ("train"), the states under a known model ("held"), and the
partial case's inference ("partial": one component held at exact observations, the latents free,
the model held); the tests call it in one process too. Then the case runs of the plan; a run marked
to resume starts from the checkpoint in its folder.

Usage: ``torchrun --nproc-per-node 2 tests/distributed_driver.py plan.json``.
"""
import json
import sys
from pathlib import Path

import torch

import geonn
from geonn import distributed
from geonn.cases import load_case, run_case
from geonn.joint import JointConfig, estimate_jointly
from geonn.operators import BilinearResidual, Standardised


def joint(folder, mode):
    truth = torch.as_tensor(geonn.simulate(geonn.Lorenz63(), 5 * 40 - 1, 0.01, spinup_steps=200).state.values)
    truth = truth.reshape(5, 40, 3)
    noisy = truth + torch.randn(truth.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flat = truth.reshape(-1, 3)
    torch.manual_seed(0)
    model = Standardised(BilinearResidual(3).double(), flat.mean(0), flat.std(0), torch.full((3,), 50.0, dtype=torch.float64))
    if mode == "train":
        config = JointConfig(model_std=[1e-1, 1e-2], iterations=3)
        result = estimate_jointly(model, noisy, 0.01, config=config, checkpoint_dir=folder, progress=False)
    elif mode == "held":
        config = JointConfig(model_std=[1e-1, 1e-2], iterations=3, train_model=False)
        result = estimate_jointly(geonn.Lorenz63(), noisy, 0.01, config=config, checkpoint_dir=folder, progress=False)
    else:
        observed = torch.full_like(noisy, float("nan"))
        observed[..., 0] = truth[..., 0]
        config = JointConfig(model_std=[1e-3], iterations=3, train_model=False)
        result = estimate_jointly(model, observed, 0.01, mask=torch.tensor([True, False, False]), states=noisy, obs_std=0.0,
                                  dynamics_scale=flat.std(0), config=config, checkpoint_dir=folder, progress=False)
    if distributed.is_main():
        torch.save({"states": result.states, "model": model.state_dict(), "cost": [h["cost"] for h in result.history]},
                   folder + "/result.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    plan = json.loads(Path(sys.argv[1]).read_text())
    for mode, folder in plan["joint"]:
        joint(folder, mode)
    for name, overrides, out, resume in plan["runs"]:
        run_case(load_case(name, overrides), out, resume=resume, progress=False)
