#!/usr/bin/python3
"""Golden reference for qlora's 4-bit quantization (tests/test_quant_golden.cpp).

An independent implementation of bitsandbytes' published algorithm
(bitsandbytes/functional.py: create_dynamic_map, quantize_4bit with
compress_statistics, quantize_blockwise; csrc/kernels.cu: kQuantizeBlockwise,
dQuantizeNF4, dQuantizeFP4, dQuantize), computed with torch and numpy in fp32.

Writes tests/reference/quant_golden.safetensors (inputs and expected outputs)
and, when the fixture model is present, tests/reference/stories260K_nf4.json
(FNV-1a 64 digests of the expected codes and scales of its linear weights).

Run with Debian's interpreter and packages (python3-torch, python3-numpy):
    /usr/bin/python3 tests/reference/make_quant_golden.py [--fixtures DIR]
"""
import argparse
import json
import os
import sys
import struct
from decimal import Decimal
from fractions import Fraction

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from golden_io import write_safetensors  # noqa: E402

MAGIC = "qlora-quant-golden"
VERSION = "1"
HERE = os.path.dirname(os.path.abspath(__file__))

def f32_literal(text):
    """The float a C/CUDA compiler makes of the literal `<text>f`: the float32
    nearest to the exact decimal value (ties to even). np.float32(float(text))
    would round twice (decimal -> double -> float) and can differ in the last bit."""
    exact = Fraction(Decimal(text))
    guess = np.float32(float(text))
    cands = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    def key(f):
        mantissa_odd = int(np.array(f, dtype=np.float32).view(np.uint32)) & 1
        return (abs(Fraction(float(f)) - exact), mantissa_odd)
    return min(cands, key=key)


def f32_literals(texts):
    return np.array([f32_literal(t) for t in texts], dtype=np.float32)


# --- code books, as published in bitsandbytes (functional.get_4bit_type) -----
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
FP4 = (torch.tensor([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                     -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]) / 12.0).numpy()
# Pivots of the CUDA decision trees (midpoints between neighbouring codes), as
# the float literals of csrc/kernels.cu.
NF4_PIVOTS = f32_literals(["-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906",
                           "-0.33967943489551544", "-0.23460740596055984", "-0.13791173323988914",
                           "-0.045525018125772476", "0.03979014977812767", "0.1202552504837513",
                           "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
                           "0.5016634166240692", "0.6427869200706482", "0.8614784181118011"])
# FP4 magnitudes in increasing order and their 3-bit patterns; pivots between them.
FP4_MAG_BITS = np.array([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], dtype=np.uint8)
FP4_PIVOTS = f32_literals(["0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333",
                           "0.8333333"])


def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    """bitsandbytes.functional.create_dynamic_map, as published."""
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    assert additional_items == 0
    data.append(0)
    data.append(1.0)
    assert len(data) == 2 ** total_bits
    data.sort()
    return np.array(data, dtype=np.float32)


def blocks_absmax(x, block):
    n = x.size
    nb = (n + block - 1) // block
    padded = np.zeros(nb * block, dtype=np.float32)
    padded[:n] = x
    return np.abs(padded.reshape(nb, block)).max(axis=1).astype(np.float32), padded


def quantize4(x, block, qtype):
    """kQuantizeBlockwise<NF4|FP4>: x * (1/absmax), strict '>' pivots (ties go down), NaN -> code 0."""
    x = x.astype(np.float32).reshape(-1)
    n = x.size
    absmax, padded = blocks_absmax(x, block)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = (np.float32(1.0) / absmax).astype(np.float32)
        scaled = (padded.reshape(-1, block) * inv[:, None]).astype(np.float32).reshape(-1)
    if qtype == "nf4":
        # searchsorted(side='left') counts pivots strictly below x: the code whose
        # pivot x exceeds with '>'.
        q = np.searchsorted(NF4_PIVOTS, scaled, side="left").astype(np.uint8)
        q[np.isnan(scaled)] = 0
    else:
        mag = np.abs(scaled)
        idx = np.searchsorted(FP4_PIVOTS, mag, side="left")
        idx[np.isnan(mag)] = 0
        q = FP4_MAG_BITS[idx] + np.where(scaled < 0, 8, 0).astype(np.uint8)
        q = q.astype(np.uint8)
    nbytes = (n + 1) // 2
    # The element past an odd n is the zero the padded load provides.
    q = q[: 2 * nbytes]
    packed = ((q[0::2] << 4) | q[1::2]).astype(np.uint8)
    return packed, absmax


def dquantize8(code, x):
    """dQuantize<0>: the published binary search over a sorted 256-entry code."""
    x = np.float32(x)
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = np.float32(-1.0), np.float32(1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[upper_pivot]
    if lower_pivot == 0:
        lower = code[lower_pivot]
    if x > val:
        midpoint = np.float32((upper + val) * np.float32(0.5))
        return upper_pivot if x > midpoint else pivot
    midpoint = np.float32((lower + val) * np.float32(0.5))
    return lower_pivot if x < midpoint else pivot


def quantize8(x, block, code):
    absmax, padded = blocks_absmax(x, block)
    q = np.zeros(x.size, dtype=np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(x.size):
            inv = np.float32(1.0) / absmax[i // block]
            q[i] = dquantize8(code, np.float32(x[i] * inv))
    return q, absmax


def double_quant(absmax, code):
    # Mean in float64, rounded to float32 (qlora's documented choice: torch's
    # float32 reduction order may differ in the last bit; the offset is stored).
    offset = np.float32(absmax.astype(np.float64).mean())
    centered = (absmax - offset).astype(np.float32)
    q, nested_absmax = quantize8(centered, 256, code)
    return q, nested_absmax, offset


def dequant(packed, absmax, n, block, qtype):
    table = NF4 if qtype == "nf4" else FP4
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    codes = codes[:n]
    return (table[codes] * np.repeat(absmax, block)[:n]).astype(np.float32)


# --- cases ------------------------------------------------------------------
def make_inputs():
    g = torch.Generator().manual_seed(20261126)
    cases = {}
    cases["gauss_12288"] = torch.randn(12288, generator=g).numpy()                # many blocks, 1 nested block
    cases["gauss_odd_1001"] = (torch.randn(1001, generator=g) * 0.02).numpy()     # odd length, short last block
    cases["gauss_17000"] = (torch.randn(17000, generator=g) * 0.05).numpy()       # 266 blocks at 64: 2 nested
    heavy = torch.randn(4096, generator=g)
    heavy[::97] *= 40.0                                                            # outliers
    cases["outliers_4096"] = heavy.numpy()
    z = torch.randn(640, generator=g).numpy()
    z[64:192] = 0.0                                                                # all-zero blocks
    z[256:320] = 0.75                                                              # constant positive block
    z[320:384] = -3.0                                                              # constant negative block
    cases["zero_and_constant_640"] = z
    # Values exactly on every pivot and on every code, in blocks whose absmax is 1.
    piv = np.concatenate([NF4_PIVOTS, -FP4_PIVOTS, FP4_PIVOTS, NF4, FP4,
                          np.nextafter(NF4_PIVOTS, np.float32(2)), np.nextafter(NF4_PIVOTS, np.float32(-2))])
    # Each block of 32 starts with 1.0, so its absmax is 1 and x * (1/absmax) == x.
    piv = piv.astype(np.float32)
    piv = np.concatenate([piv, np.zeros((-piv.size) % 31, dtype=np.float32)]).reshape(-1, 31)
    cases["pivots"] = np.concatenate([np.ones((piv.shape[0], 1), dtype=np.float32), piv], axis=1).reshape(-1)
    bf = (torch.randn(3000, generator=g) * 0.03).to(torch.bfloat16)
    cases["bf16_3000"] = bf.float().numpy()                                         # bf16-representable
    return cases


def fnv1a64(b):
    h = 0xCBF29CE484222325
    for byte in bytes(b):
        h ^= byte
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=os.environ.get("QLORA_FIXTURES",
                    os.path.join(HERE, "..", "..", "..", "shared", "fixtures")))
    args = ap.parse_args()

    dmap = create_dynamic_map()
    out = {"dynamic_map": dmap}
    cases = make_inputs()
    blocks = {"gauss_12288": [32, 64, 128, 4096], "gauss_odd_1001": [64, 256], "gauss_17000": [64],
              "outliers_4096": [64, 1024], "zero_and_constant_640": [64], "pivots": [32], "bf16_3000": [64]}
    for name, x in cases.items():
        out[f"{name}/input"] = x.astype(np.float32)
        for qtype in ("nf4", "fp4"):
            for block in blocks[name]:
                p = f"{name}/{qtype}/b{block}"
                packed, absmax = quantize4(x, block, qtype)
                out[p + "/codes"] = packed
                out[p + "/absmax"] = absmax
                if block == 64:
                    out[p + "/dequant"] = dequant(packed, absmax, x.size, block, qtype)
                q8, nested, offset = double_quant(absmax, dmap)
                out[p + "/dq_codes"] = q8
                out[p + "/dq_nested_absmax"] = nested
                out[p + "/dq_offset"] = np.array([offset], dtype=np.float32)
                # The packed quant state as QuantState.as_dict(packed=True) + json.dumps write it.
                state = {"quant_type": qtype, "blocksize": block, "dtype": "float32", "shape": [x.size]}
                out[p + "/state_json_plain"] = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
                state.update({"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": float(offset)})
                out[p + "/state_json_nested"] = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
    meta = {"magic": MAGIC, "version": VERSION, "script": "tests/reference/make_quant_golden.py",
            "torch": torch.__version__, "numpy": np.__version__}
    write_safetensors(os.path.join(HERE, "quant_golden.safetensors"), out, meta)
    print("wrote quant_golden.safetensors:", len(out), "tensors")

    model = os.path.join(args.fixtures, "models", "stories260K", "hf", "model.safetensors")
    if os.path.exists(model):
        with open(model, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            hdr = json.loads(f.read(n))
            data = f.read()
        digests = {}
        for name, t in sorted(hdr.items()):
            if name == "__metadata__" or not any(
                    name.endswith(f"{p}_proj.weight") for p in ("q", "k", "v", "o", "gate", "up", "down")):
                continue
            b, e = t["data_offsets"]
            x = np.frombuffer(data[b:e], dtype=np.float32)
            packed, absmax = quantize4(x, 64, "nf4")
            q8, nested, offset = double_quant(absmax, dmap)
            digests[name] = {"codes": fnv1a64(packed.tobytes()), "absmax": fnv1a64(q8.tobytes()),
                             "nested_absmax": fnv1a64(nested.tobytes()),
                             "offset": fnv1a64(np.array([offset], dtype=np.float32).tobytes())}
        doc = {"magic": MAGIC, "version": VERSION, "script": "tests/reference/make_quant_golden.py",
               "quant": "nf4", "block": 64, "double_quant": True, "hash": "fnv1a64", "tensors": digests}
        with open(os.path.join(HERE, "stories260K_nf4.json"), "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
        print("wrote stories260K_nf4.json:", len(digests), "tensors")
    else:
        print("fixture model not found at", model, "- stories260K_nf4.json not regenerated")


if __name__ == "__main__":
    main()
