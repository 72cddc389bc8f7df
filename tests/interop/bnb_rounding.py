"""How each bitsandbytes backend rounds, re-computed in numpy so that every byte in which
bitsandbytes' CPU backend and qlora differ can be attributed to its cause (docs/quantization.md,
"bitsandbytes' CPU backend").

* NF4 codes. The CUDA kernel (csrc/kernels.cu, dQuantizeNF4) walks a decision tree whose 15 pivots
  are float literals; with strict `>` tests a value is given the number of pivots it exceeds.
  The CPU backend has no 4-bit quantize kernel of its own: bitsandbytes/backends/default/ops.py
  computes the pivots as fp32 midpoints (code[i] + code[i+1]) / 2 of the fp32 NF4 table and calls
  torch.bucketize (value <= pivot takes the lower code: the same tie rule). Both scale by the
  rounded reciprocal, x * (1 / absmax). The pivots differ in the last bit where the two roundings
  of the midpoint disagree.
* Double quantization codes (8-bit dynamic map, block 256). The CUDA kernel (dQuantize<0>) does a
  7-step binary search from index 127 and a final midpoint test. The CPU backend's C++ kernel
  (csrc/cpu_ops.cpp, quantize_cpu_impl) looks the code up in a 65,536-entry table over [-1, 1]:
  the value is rounded to the nearest of 65,536 evenly spaced bins (spacing 2/65535 = 3.05e-5)
  and the bin's nearest code is taken. The dynamic map is far denser than that near zero, so values
  whose nearest code is closer than half a bin to another code can get the neighbour.
"""
from fractions import Fraction

import numpy as np

F32 = np.float32

NF4_PIVOT_LITERALS = [
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011"]

# bitsandbytes.functional.get_4bit_type("nf4") (the published NF4 table)
NF4_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def f32_of_literal(text: str) -> np.float32:
    """The float32 a C compiler makes of the literal `text`f: nearest to the exact decimal value."""
    exact = Fraction(text)
    g = F32(float(text))
    best = None
    for c in (np.nextafter(g, F32(-np.inf)), g, np.nextafter(g, F32(np.inf))):
        d = abs(Fraction(float(c)) - exact)
        if best is None or d < best[0] or (d == best[0] and int(np.array(c).view(np.uint32)) % 2 == 0):
            best = (d, c)
    return F32(best[1])


CUDA_NF4_PIVOTS = np.array([f32_of_literal(t) for t in NF4_PIVOT_LITERALS], dtype=F32)
_t = np.array(NF4_TABLE, dtype=F32)
CPU_NF4_PIVOTS = ((_t[:-1] + _t[1:]) / F32(2)).astype(F32)


def scaled_blocks(w: np.ndarray, block: int):
    """absmax per block and the scaled values x * (1/absmax), as both backends compute them."""
    x = w.astype(F32).reshape(-1, block)
    absmax = np.max(np.abs(x), axis=1).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = (F32(1) / absmax).astype(F32)
        s = (x * inv[:, None]).astype(F32)
    return absmax, s


def nf4_codes(s: np.ndarray, pivots: np.ndarray) -> np.ndarray:
    """Number of pivots strictly below each value: the tree of strict `>` tests, or bucketize."""
    return np.searchsorted(pivots, s.reshape(-1), side="left").astype(np.uint8)


def pack(codes: np.ndarray) -> np.ndarray:
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


def dquantize_cuda(code: np.ndarray, x: np.ndarray) -> np.ndarray:
    """csrc/kernels.cu dQuantize<0>: binary search from 127 in 7 steps, then a midpoint test."""
    code = code.astype(F32)
    x = x.astype(F32)
    pivot = np.full(x.shape, 127, dtype=np.int64)
    upper_pivot = np.full(x.shape, 255, dtype=np.int64)
    lower_pivot = np.zeros(x.shape, dtype=np.int64)
    lower = np.full(x.shape, F32(-1))
    upper = np.full(x.shape, F32(1))
    val = code[pivot]
    for i in (64, 32, 16, 8, 4, 2, 1):
        gt = x > val
        lower_pivot = np.where(gt, pivot, lower_pivot)
        lower = np.where(gt, val, lower)
        upper_pivot = np.where(gt, upper_pivot, pivot)
        upper = np.where(gt, upper, val)
        pivot = np.where(gt, pivot + i, pivot - i)
        val = code[pivot]
    upper = np.where(upper_pivot == 255, code[255], upper).astype(F32)
    lower = np.where(lower_pivot == 0, code[0], lower).astype(F32)
    gt = x > val
    mid_up = ((upper + val) * F32(0.5)).astype(F32)
    mid_lo = ((lower + val) * F32(0.5)).astype(F32)
    return np.where(gt, np.where(x > mid_up, upper_pivot, pivot),
                    np.where(x < mid_lo, lower_pivot, pivot)).astype(np.uint8)


_LUT = 65536


def cpu_lut(code: np.ndarray) -> np.ndarray:
    """csrc/cpu_ops.cpp build_quantize_lut: for each of 65,536 bins over [-1, 1], the number of
    code midpoints below the bin's value."""
    code = code.astype(F32)
    mids = (F32(0.5) * (code[:-1] + code[1:])).astype(F32)
    i = np.arange(_LUT, dtype=F32)
    val = (F32(-1) + ((F32(2) * i).astype(F32) / F32(_LUT - 1)).astype(F32)).astype(F32)
    return np.searchsorted(mids, val, side="left").astype(np.uint8)


def lut_index(v: np.ndarray, fused: bool) -> np.ndarray:
    """norm_to_lut_index: (clamp(v) + 1) * 0.5 * 65535 + 0.5, truncated; `fused` = the last
    multiply-add contracted into one FMA (one rounding)."""
    v = np.clip(v.astype(F32), F32(-1), F32(1))
    a = ((v + F32(1)) * F32(0.5)).astype(F32)
    if fused:
        r = (a.astype(np.float64) * (_LUT - 1) + 0.5).astype(F32)
    else:
        r = ((a * F32(_LUT - 1)).astype(F32) + F32(0.5)).astype(F32)
    return r.astype(np.int64)  # truncation toward zero (values are >= 0.5)


def dquantize_cpu(code: np.ndarray, x: np.ndarray, fused: bool) -> np.ndarray:
    return cpu_lut(code)[lut_index(x, fused)]


def double_quant_inputs(absmax: np.ndarray, offset: np.float32, nested_block: int = 256):
    """(absmax - offset) scaled by the reciprocal of each block's absmax (block 256)."""
    a = (absmax.astype(F32) - F32(offset)).astype(F32)
    n = a.size
    pad = (-n) % nested_block
    ap = np.concatenate([a, np.zeros(pad, dtype=F32)]).reshape(-1, nested_block)
    nested = np.max(np.abs(ap), axis=1).astype(F32)
    inv = (F32(1) / nested).astype(F32)
    s = (ap * inv[:, None]).astype(F32).reshape(-1)[:n]
    return nested, s
