"""Part a: bitsandbytes. qlora's 4-bit checkpoints against bitsandbytes' own quantizer and against
transformers + bitsandbytes loading and saving 4-bit models, on the CPU."""
import json
from pathlib import Path

import numpy as np
import pytest

import bnb_rounding as R
from conftest import CACHE, lib, report, run_qlora, version
from models import (TINY, tol, qlora_eval_loss, qlora_greedy, rel, smollm_hf, text_docs, tiny_model, token_docs,
                    torch_greedy, torch_loss, write_tokens_jsonl)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODELS = ["smollm2-135m"] + list(TINY)


def model_dir(name: str) -> Path:
    return smollm_hf() if name == "smollm2-135m" else tiny_model(name)


def load_folder(d: Path) -> dict:
    st = lib("safetensors.torch")
    idx = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(st.load_file(str(d / f)))
    return out


def quantized(name: str, src: Path) -> Path:
    """`qlora quantize` of the model (the thing under test; made once per run)."""
    out = CACHE / "runs" / f"{src.name}-nf4"  # keyed by the source folder (its name carries its hash)
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        run_qlora("quantize", src, "-o", out, "--device", "cpu", "--no-progress", "--force")
    return out


def eval_docs(name: str, d: Path):
    if name == "smollm2-135m":
        return text_docs(d, 3, 48)
    return token_docs(3, 48, 512, seed=7)


@pytest.mark.parametrize("name", MODELS)
def test_quantize_4bit_bytes(name, tmp_path):
    """bitsandbytes.functional.quantize_4bit (nf4, block 64, compress_statistics) of every linear
    weight against `qlora quantize`: codes, double-quantized absmax, nested absmax, offset, maps.
    Every differing byte must be one of the explained classes (docs/quantization.md)."""
    torch = lib("torch")
    F = lib("bitsandbytes.functional")
    src_dir = model_dir(name)
    q_dir = quantized(name, src_dir)
    src, ours = load_folder(src_dir), load_folder(q_dir)
    names = sorted(n for n in src if n.endswith(".weight") and n.split(".")[-2] in LINEARS)
    assert names, f"no linear weights in {src_dir}"
    tot = dict(code_bytes=0, code_diff=0, code_diff_pivot=0, absmax_bytes=0, absmax_diff=0,
               absmax_diff_lut=0, absmax_diff_offset=0, absmax_diff_map=0, nested_diff=0, nested_diff_offset=0,
               offset_diff=0, map_diff=0, map_tensors=0, ours_not_cuda=0, bnb_not_cpu=0)
    lut_fused = None
    for n in names:
        w = src[n].float().contiguous()
        packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        b_codes = packed.flatten().numpy()
        q_codes = ours[n].flatten().numpy()
        tot["code_bytes"] += q_codes.size
        # what each backend's rounding gives from the same weight
        absmax, s = R.scaled_blocks(w.numpy(), 64)
        cuda_codes = R.pack(R.nf4_codes(s, R.CUDA_NF4_PIVOTS))
        cpu_codes = R.pack(R.nf4_codes(s, R.CPU_NF4_PIVOTS))
        tot["ours_not_cuda"] += int(np.sum(q_codes != cuda_codes))
        tot["bnb_not_cpu"] += int(np.sum(b_codes != cpu_codes))
        d = q_codes != b_codes
        tot["code_diff"] += int(d.sum())
        tot["code_diff_pivot"] += int(np.sum(d & (cuda_codes != cpu_codes)))

        # double quantization: the chain from qlora's result to bitsandbytes' changes one thing at a
        # time (offset, then dynamic map, then rounding algorithm); a differing byte is counted under
        # the first change that flips it
        b_q8 = st.absmax.numpy()
        q_q8 = ours[n + ".absmax"].numpy()
        qs = json.loads(bytes(ours[n + ".quant_state.bitsandbytes__nf4"].numpy()).decode())
        q_off = np.float32(qs["nested_offset"])
        b_off = np.float32(st.offset.item())
        q_map = ours[n + ".nested_quant_map"].numpy()
        b_map = st.state2.code.numpy()
        off_same = q_off == b_off
        tot["offset_diff"] += int(not off_same)
        tot["map_diff"] += int(np.sum(b_map != q_map))
        tot["map_tensors"] += 1
        tot["nested_diff"] += int(np.sum(st.state2.absmax.numpy() != ours[n + ".nested_absmax"].numpy()))
        if not off_same:
            tot["nested_diff_offset"] += int(np.sum(st.state2.absmax.numpy() != ours[n + ".nested_absmax"].numpy()))
        tot["absmax_bytes"] += q_q8.size
        _, sq = R.double_quant_inputs(absmax, q_off)
        _, sb = R.double_quant_inputs(absmax, b_off)
        c_qq = R.dquantize_cuda(q_map, sq)  # qlora's offset and map, CUDA rounding: qlora's bytes
        c_qb = R.dquantize_cuda(q_map, sb)  # bnb's offset
        c_bb = R.dquantize_cuda(b_map, sb)  # bnb's offset and map
        if lut_fused is None:  # which contraction the installed CPU kernel was compiled with
            lut_fused = bool(np.sum(R.dquantize_cpu(b_map, sb, True) != b_q8) <
                             np.sum(R.dquantize_cpu(b_map, sb, False) != b_q8))
        cpu_b = R.dquantize_cpu(b_map, sb, lut_fused)  # and the CPU lookup table: bnb's bytes
        tot["ours_not_cuda"] += int(np.sum(q_q8 != c_qq))
        tot["bnb_not_cpu"] += int(np.sum(b_q8 != cpu_b))
        d8 = q_q8 != b_q8
        by_offset = d8 & (c_qq != c_qb)
        by_map = d8 & ~by_offset & (c_qb != c_bb)
        by_lut = d8 & ~by_offset & ~by_map & (c_bb != cpu_b)
        tot["absmax_diff"] += int(d8.sum())
        tot["absmax_diff_offset"] += int(by_offset.sum())
        tot["absmax_diff_map"] += int(by_map.sum())
        tot["absmax_diff_lut"] += int(by_lut.sum())

    unexplained = (tot["code_diff"] - tot["code_diff_pivot"]) + \
        (tot["absmax_diff"] - tot["absmax_diff_offset"] - tot["absmax_diff_map"] - tot["absmax_diff_lut"]) + \
        (tot["nested_diff"] - tot["nested_diff_offset"])
    report("bnb.quantize_4bit", f"{name}: {len(names)} linear weights, bitsandbytes.functional.quantize_4bit "
           f"(CPU) vs qlora quantize, byte for byte", version("bitsandbytes"),
           f"codes differ in {tot['code_diff']:,} of {tot['code_bytes']:,} bytes "
           f"({tot['code_diff_pivot']:,} NF4 pivot last bit); double-quant absmax differ in "
           f"{tot['absmax_diff']:,} of {tot['absmax_bytes']:,} ({tot['absmax_diff_lut']:,} CPU lookup table, "
           f"{tot['absmax_diff_offset']:,} offset, {tot['absmax_diff_map']:,} dynamic map); offsets differ in "
           f"{tot['offset_diff']} of {len(names)} weights (nested absmax values differing there: "
           f"{tot['nested_diff_offset']}, elsewhere {tot['nested_diff'] - tot['nested_diff_offset']}); dynamic map "
           f"entries differing: {tot['map_diff'] // max(1, tot['map_tensors'])} of 256; unexplained {unexplained}; "
           f"qlora = CUDA rounding re-computed: {tot['ours_not_cuda'] == 0}; "
           f"bnb CPU = its rounding re-computed: {tot['bnb_not_cpu'] == 0} (FMA {lut_fused})",
           model=name, **tot)
    assert tot["ours_not_cuda"] == 0, "qlora no longer rounds as bitsandbytes' CUDA kernels"
    assert tot["bnb_not_cpu"] == 0, "bitsandbytes' CPU backend no longer rounds as re-computed (bnb_rounding.py)"
    assert unexplained == 0, f"bytes that differ for no known reason: {tot}"


def _set_fp32(model):
    """Dequantize to fp32 and compute in fp32, as qlora's CPU engine does. As loaded, a qlora folder
    says dtype bfloat16 (quant state) and compute dtype bfloat16 (config.json), and on a CPU with
    AVX512-BF16 bitsandbytes repacks every 4-bit weight at its first forward for its own bf16 GEMM
    kernel; both are switched off here, before any forward."""
    bnb = lib("bitsandbytes")
    torch = lib("torch")
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = torch.float32
            m.weight.quant_state.dtype = torch.float32
            m.support_avx512bf16_for_cpu = False
            n += 1
    for p in model.parameters():  # transformers keeps a 4-bit folder's BF16 tensors BF16 whatever dtype says
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    return n


def _zero_adapter(src_dir: Path, out: Path) -> Path:
    """A PEFT adapter with B = 0 (rank 1, all seven targets): `qlora merge --dtype f32` of a
    4-bit folder with it writes qlora's dequantization of every 4-bit weight."""
    st = lib("safetensors.torch")
    torch = lib("torch")
    cfg = json.loads((src_dir / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    dims = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    t = {}
    for i in range(layers):
        for mod, (fi, fo) in dims.items():
            part = "self_attn" if mod[0] in "qkvo" else "mlp"
            p = f"base_model.model.model.layers.{i}.{part}.{mod}"
            t[p + ".lora_A.weight"] = torch.ones(1, fi)
            t[p + ".lora_B.weight"] = torch.zeros(fo, 1)
    out.mkdir(parents=True, exist_ok=True)
    st.save_file(t, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0,
        "target_modules": list(dims), "bias": "none", "use_rslora": False}))
    return out


def _dequant_matches(model, merged_dir: Path) -> tuple[int, int, int]:
    """(weights, weights bit-identical, values differing): bitsandbytes' dequantize_4bit of every
    loaded 4-bit weight against qlora's dequantization (its f32 merge with a zero adapter)."""
    F = lib("bitsandbytes.functional")
    bnb = lib("bitsandbytes")
    ours = load_folder(merged_dir)
    n = same = diff = 0
    for mod_name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            deq = F.dequantize_4bit(m.weight.data, qs).float()
            ref = ours[mod_name + ".weight"].float()
            n += 1
            d = int((deq != ref).sum())
            same += d == 0
            diff += d
    return n, same, diff


@pytest.mark.parametrize("name", MODELS)
def test_transformers_loads_qlora_4bit(name, tmp_path):
    """transformers + bitsandbytes load a `qlora quantize` folder (CPU): their dequantized weights
    equal qlora's bit for bit, and their loss on the same tokens equals `qlora eval` (fp32 compute:
    relative 1e-5; the folder's own bf16 compute dtype: within bf16 bounds)."""
    torch = lib("torch")
    transformers = lib("transformers")
    lib("bitsandbytes")
    src = model_dir(name)
    q_dir = quantized(name, src)
    docs = eval_docs(name, src)
    data = write_tokens_jsonl(tmp_path / "eval.jsonl", docs)
    ours = qlora_eval_loss(run_qlora, q_dir, data, len(docs[0]), quant="nf4")["loss"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(q_dir), device_map="cpu")
    model.eval()
    assert model.config.quantization_config.load_in_4bit
    loss_bf16 = torch_loss(model, docs)  # as loaded: bf16 weights and compute, bnb's CPU kernels
    g_bf16 = torch_greedy(model, docs[0][:16], 8)
    del model
    model = transformers.AutoModelForCausalLM.from_pretrained(str(q_dir), device_map="cpu", dtype=torch.float32)
    model.eval()
    _set_fp32(model)
    merged = tmp_path / "deq"
    run_qlora("merge", "--model", q_dir, "--adapter", _zero_adapter(src, tmp_path / "zero"), "-o", merged,
              "--dtype", "f32", "--no-progress")
    n, same, ndiff = _dequant_matches(model, merged)
    loss_f32 = torch_loss(model, docs)
    prompt = docs[0][:16]
    g_ref = torch_greedy(model, prompt, 8)
    g_ours = qlora_greedy(run_qlora, q_dir, prompt, 8, dense=False)
    report("bnb.load_qlora_4bit", f"{name}: transformers from_pretrained(qlora quantize folder) on CPU vs qlora",
           f"{version('transformers')}, {version('bitsandbytes')}",
           f"dequantized weights (fp32) bit-identical {same}/{n} ({ndiff} values differ); loss rel err "
           f"fp32 dequantization and compute {rel(loss_f32, ours):.2e}, as loaded (bf16) {rel(loss_bf16, ours):.2e} "
           f"(loss {ours:.6f}); greedy 8 tokens equal: fp32 {g_ref == g_ours}, as loaded {g_bf16 == g_ours}",
           model=name, dequant_same=same, dequant_n=n, rel_f32=rel(loss_f32, ours), rel_bf16=rel(loss_bf16, ours))
    assert same == n
    assert rel(loss_f32, ours) < tol(name)
    assert rel(loss_bf16, ours) < 2e-2
    assert g_ref == g_ours


@pytest.mark.parametrize("name", MODELS)
def test_qlora_loads_bnb_saved(name, tmp_path):
    """A folder that transformers + bitsandbytes saved (save_pretrained of a model loaded in 4 bits)
    loads in qlora: qlora's dequantization equals bitsandbytes' bit for bit, losses agree."""
    torch = lib("torch")
    transformers = lib("transformers")
    lib("bitsandbytes")
    src = model_dir(name)
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), quantization_config=qc, device_map="cpu",
                                                              dtype=torch.float32)
    model.eval()
    _set_fp32(model)
    saved = tmp_path / "bnb-saved"
    model.save_pretrained(saved)
    for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (src / f).exists():
            (saved / f).write_bytes((src / f).read_bytes())
    merged = tmp_path / "deq"
    run_qlora("merge", "--model", saved, "--adapter", _zero_adapter(src, tmp_path / "zero"), "-o", merged,
              "--dtype", "f32", "--no-progress")
    n, same, ndiff = _dequant_matches(model, merged)
    docs = eval_docs(name, src)
    data = write_tokens_jsonl(tmp_path / "eval.jsonl", docs)
    ours = qlora_eval_loss(run_qlora, saved, data, len(docs[0]), quant="nf4")["loss"]
    ref = torch_loss(model, docs)
    prompt = docs[0][:16]
    g_ref = torch_greedy(model, prompt, 8)
    g_ours = qlora_greedy(run_qlora, saved, prompt, 8, dense=False)
    report("bnb.qlora_loads_bnb_saved", f"{name}: qlora reads a transformers+bitsandbytes save_pretrained 4-bit folder",
           f"{version('transformers')}, {version('bitsandbytes')}",
           f"dequantized weights bit-identical {same}/{n} ({ndiff} values differ); loss rel err {rel(ref, ours):.2e} "
           f"(fp32 compute); greedy 8 tokens equal: {g_ref == g_ours}",
           model=name, dequant_same=same, dequant_n=n, rel_f32=rel(ref, ours))
    assert same == n
    assert rel(ref, ours) < tol(name)
    assert g_ref == g_ours
