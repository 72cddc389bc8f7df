#!/usr/bin/env python3
"""Golden reference for qlora's DoRA ops (tests/test_dora.cpp).

PEFT itself (0.22, use_dora=True) on one torch.nn.Linear with a bias, in
float64: the magnitude is initialised by PEFT (the row norms of W), then
perturbed so that m / ||W + s B A|| is not 1, and B is made nonzero. The
forward is PEFT's (evaluation mode, no dropout: base = result - bias), the
loss is sum(y * dy), and the gradients of A, B, the magnitude and the input
come from torch autograd through PEFT's graph (the weight norm detached, as
PEFT detaches it). Every tensor is written as float32 (the inputs exactly
representable: they were rounded to float32 before the float64 run).

Writes tests/reference/dora_golden.safetensors. Run with the interop venv:
    /work/main/build/interop-venv/bin/python tests/reference/make_dora_golden.py
(or any Python with torch and peft==0.22).
"""
import json
import os
import sys

import numpy as np
import peft
import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from golden_io import write_safetensors  # noqa: E402

MAGIC = "qlora-dora-golden"
VERSION = "1"
HERE = os.path.dirname(os.path.abspath(__file__))

N, IN, OUT, R, ALPHA = 5, 24, 20, 4, 12.0


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(IN, OUT, bias=True)

    def forward(self, x):
        return self.lin(x)


def f32(t):
    return t.float().double()  # round to float32, compute in float64


def main():
    torch.manual_seed(20261207)
    model = Tiny().double()
    with torch.no_grad():
        model.lin.weight.copy_(f32(torch.randn(OUT, IN) * 0.3))
        model.lin.bias.copy_(f32(torch.randn(OUT) * 0.1))
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"], use_dora=True, lora_dropout=0.0)
    pm = get_peft_model(model, cfg)
    lin = pm.base_model.model.lin
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(f32(torch.randn(R, IN) * 0.4))
        lin.lora_B["default"].weight.copy_(f32(torch.randn(OUT, R) * 0.4))
        mag = lin.lora_magnitude_vector["default"].weight
        init_norm = mag.detach().clone()  # PEFT's init: ||W|| per row (B was 0 then)
        mag.copy_(f32(mag * (1.0 + 0.3 * torch.randn(OUT))))
    pm.eval()
    x = f32(torch.randn(N, IN)).requires_grad_(True)
    dy = f32(torch.randn(N, OUT))
    y = pm(x)
    (y * dy).sum().backward()
    A = lin.lora_A["default"].weight
    B = lin.lora_B["default"].weight
    m = lin.lora_magnitude_vector["default"].weight
    scale = lin.scaling["default"]
    with torch.no_grad():
        wnorm = torch.linalg.norm(lin.base_layer.weight + scale * (B @ A), dim=1)
    t = {
        "x": x, "dy": dy, "W": lin.base_layer.weight, "bias": lin.base_layer.bias, "A": A, "B": B, "m": m,
        "init_norm": init_norm, "wnorm": wnorm, "y": y, "dA": A.grad, "dB": B.grad, "dm": m.grad, "dx": x.grad,
    }
    tensors = {k: v.detach().float().numpy().astype(np.float32) for k, v in t.items()}
    metadata = {
        "magic": MAGIC, "version": VERSION, "peft": peft.__version__, "torch": torch.__version__,
        "dims": json.dumps({"N": N, "IN": IN, "OUT": OUT, "R": R}), "scale": repr(float(scale)),
    }
    out = os.path.join(HERE, "dora_golden.safetensors")
    write_safetensors(out, tensors, metadata)
    print("wrote", out)


if __name__ == "__main__":
    main()
