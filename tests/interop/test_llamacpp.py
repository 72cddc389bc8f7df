"""Part d: llama.cpp (llama-cpp-python). The harness check: llama.cpp loads the fixture GGUF and
decodes expected_greedy.json's cases as transformers does (within the bounds stated there). Then
qlora's own GGUF output: a merged f32 GGUF, and an adapter GGUF over an f32 GGUF base, each giving
the greedy continuation qlora gives on the same weights."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import CACHE, lib, need_fixture, report, run_qlora, version
from models import SMOLLM_GGUF, qlora_greedy, smollm_hf, text_docs


def load_llama(path: Path, lora: Path | None = None):
    llama_cpp = lib("llama_cpp")
    kw = dict(model_path=str(path), n_ctx=512, n_threads=os.cpu_count() or 2, n_batch=512, verbose=False,
              seed=0)
    if lora is not None:
        kw["lora_path"] = str(lora)
    return llama_cpp.Llama(**kw)


def last_logits(llm) -> np.ndarray:
    """llama.cpp's logits of the last evaluated token (llama_get_logits_ith(ctx, -1))."""
    llama_cpp = lib("llama_cpp")
    p = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(p, shape=(llm.n_vocab(),)).copy()


def llama_greedy(llm, prompt, n):
    """Greedy decoding without an end-of-sequence stop: argmax of llama.cpp's last logits."""
    llm.reset()
    llm.eval(list(prompt))
    out = []
    for _ in range(n):
        tok = int(np.argmax(last_logits(llm)))
        out.append(tok)
        llm.eval([tok])
    return out


def test_llamacpp_fixture_greedy():
    """llama.cpp loads the fixture GGUF (Q4_1) and greedy-decodes the cases of expected_greedy.json,
    the continuation transformers computes in fp32 from the same file dequantized. llama.cpp's Q4_1
    dot products quantize the activations to 8 bits (Q8_1), so its logits are not fp32's: measured
    within 0.8 of the reference on the top-5 (of ~25-30), which flips near ties. Case 0's first token
    is one (504 vs 60: 25.33 vs 25.24 in fp32). The check: every case's first-token logits agree
    within 1.0 with llama.cpp's pick among the reference's top 2, and the case without a near tie
    on its path (case 2) gives the same 24 ids."""
    gguf = need_fixture(SMOLLM_GGUF)
    cases = json.loads((gguf.parent / "expected_greedy.json").read_text())["cases"]
    llm = load_llama(gguf)
    prefixes, dls, firsts = [], [], []
    for case in cases:
        want = case["greedy_24"]
        got = llama_greedy(llm, case["prompt_ids"], len(want))
        prefixes.append(next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), len(want)))
        llm.reset()
        llm.eval(case["prompt_ids"])
        top = last_logits(llm)  # the next-token logits after the prompt
        ref_ids = case["next_token_top5"]["ids"]
        ref_logits = np.asarray(case["next_token_top5"]["logits"])
        dls.append(float(np.max(np.abs(top[ref_ids] - ref_logits))))
        firsts.append(int(np.argmax(top)) in ref_ids[:2])
    report("llamacpp.fixture_greedy", f"fixture GGUF {gguf.name}: llama.cpp greedy 24 tokens vs expected_greedy.json "
           f"(transformers fp32 on the dequantized file), {len(cases)} cases", version("llama_cpp_python"),
           f"ids equal before the first difference: {prefixes} of 24; next-token top-5 logits max |diff| "
           f"{', '.join(f'{d:.2f}' for d in dls)}; case 0 starts on a near tie (0.08)",
           equal_prefix=prefixes, top5_max_abs=dls)
    assert all(d < 1.0 for d in dls)
    assert all(firsts)
    assert prefixes[2] == 24


def _adapter():
    from test_peft import trained_adapter
    return trained_adapter("smollm2-all-dropout")


def test_merged_gguf_f32(tmp_path):
    """`qlora merge --format gguf --dtype f32` loads in llama.cpp and gives the greedy continuation
    qlora gives on the same merged weights (its HF merge, --dtype f32)."""
    lib("llama_cpp")
    model, adapter = _adapter()
    out = tmp_path / "merged.gguf"
    run_qlora("merge", "--model", model, "--adapter", adapter, "--format", "gguf", "--dtype", "f32", "-o", out)
    run_qlora("merge", "--model", model, "--adapter", adapter, "--dtype", "f32", "-o", tmp_path / "merged-hf",
              "--no-progress")
    prompt = text_docs(model, 1, 24)[0]
    ours = qlora_greedy(run_qlora, tmp_path / "merged-hf", prompt, 16, dense=True)
    got = llama_greedy(load_llama(out), prompt, 16)
    report("llamacpp.merged_gguf", "qlora merge --format gguf --dtype f32 in llama.cpp vs qlora generate on the merged "
           "weights, 16 greedy tokens", version("llama_cpp_python"), f"equal: {got == ours}")
    assert got == ours


def test_adapter_gguf_over_f32_base(tmp_path):
    """`qlora export --adapter DIR --format gguf` loads in llama.cpp as a LoRA over an f32 GGUF base
    and gives the greedy continuation `qlora generate --adapter` gives on the dense base."""
    lib("llama_cpp")
    from test_bitsandbytes import _zero_adapter
    model, adapter = _adapter()
    base = tmp_path / "base-f32.gguf"
    run_qlora("merge", "--model", model, "--adapter", _zero_adapter(model, tmp_path / "zero"), "--format", "gguf",
              "--dtype", "f32", "-o", base)
    a = tmp_path / "adapter.gguf"
    run_qlora("export", "--adapter", adapter, "--format", "gguf", "-o", a)
    prompt = text_docs(model, 1, 24)[0]
    ours = qlora_greedy(run_qlora, model, prompt, 16, adapter=adapter, dense=True)
    got = llama_greedy(load_llama(base, lora=a), prompt, 16)
    report("llamacpp.adapter_gguf", "qlora export --adapter --format gguf over an f32 GGUF base in llama.cpp vs qlora "
           "generate --adapter (dense base), 16 greedy tokens", version("llama_cpp_python"), f"equal: {got == ours}")
    assert got == ours
