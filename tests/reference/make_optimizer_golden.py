#!/usr/bin/python3
"""Golden reference for qlora's optimizers (tests/test_optimizer.cpp).

torch.optim.AdamW and torch.optim.SGD themselves (the single-tensor path,
foreach=False), in fp32 on the CPU, run a few steps on one random parameter
tensor with random gradients and a learning rate that changes every step (as
a schedule makes it). Per case the file holds the initial parameters, the
gradient of every step, the parameters after every step and the optimizer
state after the last step; the learning rates and hyper-parameters are in the
metadata as exact decimal strings (repr of the Python floats).

The tensor length is odd and not a multiple of any vector width, so the
vectorised body and the scalar tail of torch's kernels both contribute; a few
gradients are exactly zero.

Writes tests/reference/optimizer_golden.safetensors. Run with Debian's interpreter:
    /usr/bin/python3 tests/reference/make_optimizer_golden.py
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from golden_io import write_safetensors  # noqa: E402

MAGIC = "qlora-optimizer-golden"
VERSION = "1"
HERE = os.path.dirname(os.path.abspath(__file__))

N = 515
STEPS = 5
LRS = [1e-3, 2e-3, 1.5e-3, 7e-4, 3e-4]

# name -> (torch constructor, hyper-parameters as qlora's OptimizerConfig names them)
CASES = {
    "adamw": ("adamw", {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}),
    "adamw_wd": ("adamw", {"beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.1}),
    "sgd_momentum": ("sgd", {"momentum": 0.9, "weight_decay": 0.01}),
    "sgd_plain": ("sgd", {"momentum": 0.0, "weight_decay": 0.0}),
}


def make_optimizer(kind, hp, param):
    if kind == "adamw":
        return torch.optim.AdamW([param], lr=LRS[0], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                                 weight_decay=hp["weight_decay"], foreach=False)
    return torch.optim.SGD([param], lr=LRS[0], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                           foreach=False)


def main():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(20261127)
    tensors, cases_meta = {}, {}
    for case, (kind, hp) in CASES.items():
        p0 = (torch.randn(N, generator=g) * 0.5).float()
        grads = (torch.randn(STEPS, N, generator=g) * 0.1).float()
        grads[:, ::97] = 0.0  # zero gradients: m and v decay, the update is not NaN
        param = torch.nn.Parameter(p0.clone())
        opt = make_optimizer(kind, hp, param)
        after = []
        for s in range(STEPS):
            for group in opt.param_groups:
                group["lr"] = LRS[s]
            param.grad = grads[s].clone()
            opt.step()
            after.append(param.detach().clone())
        tensors[f"{case}.params0"] = p0.numpy()
        tensors[f"{case}.grads"] = grads.numpy()
        tensors[f"{case}.params"] = torch.stack(after).numpy()
        state = opt.state[param]
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if state.get(key) is not None:
                tensors[f"{case}.{key}"] = state[key].float().numpy()
        cases_meta[case] = {"kind": kind, **{k: repr(v) for k, v in hp.items()}}
    metadata = {
        "magic": MAGIC, "version": VERSION, "torch": torch.__version__,
        "steps": str(STEPS), "lrs": json.dumps([repr(x) for x in LRS]), "cases": json.dumps(cases_meta),
    }
    out = os.path.join(HERE, "optimizer_golden.safetensors")
    write_safetensors(out, tensors, metadata)
    print("wrote", out)


if __name__ == "__main__":
    main()
