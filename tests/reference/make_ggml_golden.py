#!/usr/bin/python3
"""Golden reference for qlora's ggml (llama.cpp) dequantization (tests/test_ggml_quants.cpp).

Run with pinned packages in a throw-away virtual environment:
    python3 -m venv /tmp/gv && /tmp/gv/bin/pip install gguf==0.19.0 numpy==2.4.6 \
        && /tmp/gv/bin/python tests/reference/make_ggml_golden.py

The independent reference is gguf-py (the `gguf` package, llama.cpp's own
Python implementation): gguf.quants.dequantize / quantize, and
gguf.constants.GGML_QUANT_SIZES. Writes tests/reference/ggml_golden.safetensors:

  <TYPE>/input    U8   whole blocks of TYPE: random bytes, with the fp16
                       scale fields set to a spread of finite values (zero,
                       -0, subnormals, the smallest normal, +-65504, 1, tiny
                       and random finite values), plus, where gguf-py can
                       quantize TYPE, blocks quantized from smooth "weight-
                       like" float data
  <TYPE>/output   F32  gguf.quants.dequantize(input, TYPE)
  sizes           I32  [k, 3]: (ggml id, values per block, bytes per block)
                       for every type in GGML_QUANT_SIZES; names in the
                       metadata key "size_names", in the same order
                       (gguf-py's Q8_1 entry, 40 bytes, is the layout ggml
                       dropped in 2024: ggml-common.h now asserts 36; the
                       test knows this one exception)
  q8_0_quantize/input  F32 and  q8_0_quantize/output  U8:
                       gguf.quants.quantize(x, Q8_0)

Does gguf-py compute in ggml's float order? Read side by side with ggml-quants.c
(dequantize_row_*): yes, for every type here. All arithmetic is float32 ufuncs
(fp16 fields go through .astype(np.float32) first, integer codes are formed in
integer types and converted once), one rounding per ufunc, no FMA:
  Q4_0, Q5_0, Q8_0   d * q                 ggml: q*d (commutative: same)
  Q4_1, Q5_1         (d * q) + m           ggml: q*d + m
  Q2_K, Q4_K, Q5_K   (d*sc) * q - (dmin*m) ggml: d1 = d*sc; m1 = min*m; d1*q - m1
  Q3_K               (d*(s-32)) * q        ggml: dl = d_all*(s-32); dl*q
  Q6_K               (d*sc) * q            ggml: d * sc * q (left to right)
  F16, BF16, F32     exact conversions
So the golden is ggml's C order and the C++ test compares bit for bit (as
bit patterns: -0.0 and 0.0 differ) for every type; no tolerance is needed.
Moreover, every product in these formulas is exact in fp32: an fp16 scale has
11 significant bits, a sub-block scale at most 7 (|int8| <= 128, 6-bit <= 63),
a code at most 5 (|q| <= 32), so d*sc*q has at most 23 bits, and fp16 ranges
keep it far from fp32 overflow and subnormals. The only rounding is the final
+m / -ml (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K), so each value is the correctly rounded
exact result, whatever the evaluation order; even a ggml build whose compiler
contracts d1*q - m1 into an FMA gives the same bits.

F16 inputs exclude NaN bit patterns: fp16->fp32 of a NaN keeps or quiets
the payload depending on the converter (numpy, F16C, ggml's fallback), so
NaN payloads are not a property of the format. F32 and BF16 inputs are fully
random (NaNs included): their conversion is a bit copy everywhere.

Q8_0 rounding: ggml's quantize_row_q8_0_ref rounds x*id with C roundf
(halves away from zero). gguf-py does NOT use np.round (halves to even): its
Q8_0.quantize_blocks calls np_roundf (floor(|x|) + floor(2*frac), with the
sign), which is roundf. The script checks this on exact ties (values of
k + 0.5 after scaling); qlora's ggml_quantize_q8_0 follows ggml's C code
(std::roundf), which therefore equals this golden bit for bit.
"""
import os
import sys
from importlib.metadata import version

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from golden_io import write_safetensors  # noqa: E402

MAGIC = "qlora-ggml-golden"
VERSION = "1"
HERE = os.path.dirname(os.path.abspath(__file__))

# Byte offsets of the fp16 scale fields in each block (ggml-common.h layouts).
SCALE_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
QUANTIZABLE = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]  # gguf-py has quantize_blocks for these
# Blocks per type: random + (for QUANTIZABLE) quantized from float data.
RANDOM_BLOCKS = {**{t: 48 for t in QUANTIZABLE}, **{t: 24 for t in [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]}}
QUANTIZED_BLOCKS = 16

# fp16 bit patterns: 0, -0, smallest subnormals, largest subnormal, smallest
# normal, +-65504 (max), +-1, tiny normals, a few ordinary values.
EDGE_F16 = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0xBC00,
            0x0010, 0x0800, 0x1400, 0x2E66, 0xB266, 0x5640]


def random_finite_f16(rng, n):
    v = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
    bad = (v & 0x7C00) == 0x7C00  # Inf/NaN exponent
    v[bad] &= 0xBFFF  # clear the top exponent bit: finite
    return v


def scale_values(rng, n, rotate):
    """n fp16 bit patterns: the edge list (rotated, so two fields pair differently), then random finite."""
    edge = EDGE_F16[rotate:] + EDGE_F16[:rotate]
    out = np.array(edge[:n] + [0] * max(0, n - len(edge)), dtype=np.uint16)
    if n > len(edge):
        out[len(edge):] = random_finite_f16(rng, n - len(edge))
    return out


def weight_like(rng, nblocks, block):
    """Smooth rows with outliers and a few constant/zero blocks, like real weights."""
    x = rng.standard_normal((nblocks, block)).astype(np.float32) * np.float32(0.02)
    x *= np.exp(rng.standard_normal((nblocks, 1))).astype(np.float32)
    x[1, 3] = np.float32(0.7)          # an outlier
    x[2, :] = np.float32(0.0)          # all zero: d = 0
    x[3, :] = np.float32(-0.25)        # constant
    x[4, :] = np.linspace(-1, 1, block, dtype=np.float32) * np.float32(1e-6)  # tiny: subnormal fp16 scales
    x[5, :] = np.float32(1000.0) * np.sign(rng.standard_normal(block)).astype(np.float32)
    return x


def dequant_case(rng, t):
    block, size = GGML_QUANT_SIZES[t]
    nb = RANDOM_BLOCKS[t]
    raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint32).astype(np.uint8)
    for k, off in enumerate(SCALE_FIELDS[t]):
        raw[:, off:off + 2] = scale_values(rng, nb, rotate=5 * k).view(np.uint8).reshape(nb, 2)
    parts = [raw]
    if t in QUANTIZABLE:
        q = quants.quantize(weight_like(rng, QUANTIZED_BLOCKS, block), t)
        parts.append(np.asarray(q, dtype=np.uint8).reshape(QUANTIZED_BLOCKS, size))
    data = np.concatenate(parts, axis=0).reshape(-1)
    out = quants.dequantize(data, t)
    assert out.dtype == np.float32 and out.size == data.size // size * block, t.name
    return data, out.reshape(-1)


def plain_cases(rng):
    cases = {}
    # F32: random bit patterns (NaN/Inf included) and ordinary values.
    f32 = np.concatenate([rng.integers(0, 1 << 32, size=128, dtype=np.uint64).astype(np.uint32),
                          rng.standard_normal(128).astype(np.float32).view(np.uint32)])
    cases[T.F32] = f32.view(np.uint8)
    # F16: every non-NaN bit pattern would be 126 KiB; a sample plus all edges.
    f16 = np.concatenate([random_finite_f16(rng, 768), np.array(EDGE_F16 + [0x7C00, 0xFC00], dtype=np.uint16)])
    cases[T.F16] = f16.view(np.uint8)
    # BF16: random bit patterns, NaN included, and ordinary values via gguf-py's own quantize.
    bf = np.concatenate([rng.integers(0, 1 << 16, size=512, dtype=np.uint32).astype(np.uint16),
                         np.asarray(quants.quantize(rng.standard_normal(256).astype(np.float32), T.BF16))
                         .view(np.uint16).reshape(-1)])
    cases[T.BF16] = bf.view(np.uint8)
    out = {}
    for t, data in cases.items():
        data = np.ascontiguousarray(data, dtype=np.uint8)
        out[t] = (data, np.asarray(quants.dequantize(data, t), dtype=np.float32).reshape(-1))
    return out


def q8_0_quantize_case(rng):
    x = weight_like(rng, 24, 32)
    # Exact ties after scaling: amax = 127 gives d = 1 and id = 1, so x*id = x.
    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5, 4.5] + [0.0] * 21 + [127.0],
                    dtype=np.float32)
    x = np.concatenate([x, ties.reshape(1, 32)], axis=0)
    q = np.asarray(quants.quantize(x, T.Q8_0), dtype=np.uint8).reshape(-1, 34)
    got = q[-1, 2:].view(np.int8)[:10].tolist()
    half_away = [1, 2, 3, -1, -2, -3, 127, -127, 4, 5]
    half_even = [0, 2, 2, -0, -2, -2, 126, -126, 4, 4]
    assert got == half_away and got != half_even, f"gguf-py Q8_0 ties: {got}"
    return x.reshape(-1), q.reshape(-1)


def main():
    rng = np.random.default_rng(20240611)
    tensors = {}
    for t, (data, out) in plain_cases(rng).items():
        tensors[f"{t.name}/input"] = data
        tensors[f"{t.name}/output"] = out
    for t in [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]:
        data, out = dequant_case(rng, t)
        tensors[f"{t.name}/input"] = data
        tensors[f"{t.name}/output"] = out
    x, q = q8_0_quantize_case(rng)
    tensors["q8_0_quantize/input"] = x.astype(np.float32)
    tensors["q8_0_quantize/output"] = q
    types = sorted(GGML_QUANT_SIZES, key=int)
    tensors["sizes"] = np.array([[int(t), *GGML_QUANT_SIZES[t]] for t in types], dtype=np.int32)
    metadata = {
        "magic": MAGIC,
        "version": VERSION,
        "gguf": version("gguf"),
        "numpy": version("numpy"),
        "size_names": ",".join(t.name for t in types),
    }
    path = os.path.join(HERE, "ggml_golden.safetensors")
    write_safetensors(path, tensors, metadata)
    print(f"wrote {path} ({os.path.getsize(path)} bytes), gguf {metadata['gguf']}, numpy {metadata['numpy']}")


if __name__ == "__main__":
    main()
