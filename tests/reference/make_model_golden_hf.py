#!/usr/bin/env python3
"""Golden references for Qwen3 and sliding-window attention (tests/test_model_golden.cpp),
computed by transformers' own model classes with PEFT's LoRA.

Unlike make_model_golden.py (an independent torch implementation), this script
runs the real Qwen3ForCausalLM and MistralForCausalLM of transformers (5.25)
with the LoRA layers of PEFT (0.22) on every linear of the blocks, so the
reference is the peer library itself: Qwen3's per-head q/k RMSNorm, its
attention without biases, its explicit head_dim (here != hidden / heads), and
transformers' sliding-window mask (masking_utils.sliding_window_overlay: key
s is visible from query t when t - s < sliding_window) with its rule for
which layers slide (Qwen3Config: layer index >= max_window_layers when
use_sliding_window; Mistral: every layer).

A tiny random model per case runs on two rows, each packing two documents:
position_ids restart at 0 at each document and transformers 5 then masks
across documents itself (masking_utils.find_packed_sequence_indices); the
script checks that by running each document alone. Weights are drawn in fp32
and stored so; the models run in float64 with SDPA attention. transformers'
RMSNorm casts its input to float32 (for bf16 training); it is run in float64
here (the same formula, patched below) so that the reference's own rounding
stays negligible next to the fp32 engine's. The RoPE tables stay as
transformers computes them (fp32), as the engine does.

Cases:
  model_golden_qwen3.safetensors           qwen3: head_dim 16 with hidden 32 and 4 heads (q_proj 32 -> 64),
                                           GQA 4/2, q/k norms with random weights, tied lm_head,
                                           no sliding window
  model_golden_qwen3_window.safetensors    qwen3: use_sliding_window, sliding_window 3, max_window_layers 1
                                           (layer 0 full attention, layer 1 sliding), untied
  model_golden_mistral_window.safetensors  mistral: sliding_window 4 on every layer, documents of up to 8

Re-run with the interop venv (scripts/interop-venv.sh builds it):
    build/interop-venv/bin/python tests/reference/make_model_golden_hf.py
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from golden_io import write_safetensors  # noqa: E402

import peft  # noqa: E402
import transformers  # noqa: E402
from transformers.models.mistral import modeling_mistral  # noqa: E402
from transformers.models.qwen3 import modeling_qwen3  # noqa: E402

MAGIC = "qlora-model-golden"
VERSION = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

COMMON = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "torch_dtype": "float32"}

CASES = [
    {"file": "model_golden_qwen3.safetensors", "seed": 20261207, "rank": 4, "alpha": 8.0, "embed_std": 0.3,
     "docs": [[7, 5], [4, 8]],
     "config": dict(COMMON, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=16,
                    attention_bias=False, tie_word_embeddings=True, use_sliding_window=False,
                    sliding_window=None, max_window_layers=2, bos_token_id=62, eos_token_id=63)},
    {"file": "model_golden_qwen3_window.safetensors", "seed": 20261208, "rank": 4, "alpha": 8.0,
     "embed_std": 1.0, "docs": [[7, 5], [4, 8]],
     "config": dict(COMMON, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=16,
                    attention_bias=False, tie_word_embeddings=False, use_sliding_window=True,
                    sliding_window=3, max_window_layers=1, bos_token_id=62, eos_token_id=63)},
    {"file": "model_golden_mistral_window.safetensors", "seed": 20261209, "rank": 4, "alpha": 8.0,
     "embed_std": 1.0, "docs": [[8, 4], [3, 9]],
     "config": dict(COMMON, architectures=["MistralForCausalLM"], model_type="mistral", head_dim=8,
                    sliding_window=4, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)},
]


def rmsnorm_fp64(self, hidden_states):
    """LlamaRMSNorm's formula without its cast to float32 (see the top)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


modeling_qwen3.Qwen3RMSNorm.forward = rmsnorm_fp64
modeling_mistral.MistralRMSNorm.forward = rmsnorm_fp64


def build(case):
    c = case["config"]
    g = torch.Generator().manual_seed(case["seed"])
    cls = {"qwen3": transformers.Qwen3ForCausalLM, "mistral": transformers.MistralForCausalLM}[c["model_type"]]
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in c.items() if k != "architectures"})
    hf_config._attn_implementation = "sdpa"
    model = cls(hf_config)

    def rnd(*shape, s=0.1):
        return (torch.randn(*shape, generator=g) * s).float()

    # Every base tensor drawn in state_dict order (a tied lm_head is the embedding).
    weights = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "model.embed_tokens.weight":
                v = rnd(*p.shape, s=case["embed_std"])
            elif name.endswith("norm.weight"):
                v = 1 + rnd(*p.shape, s=0.3 if ("q_norm" in name or "k_norm" in name) else 0.1)
            elif name == "lm_head.weight":
                v = rnd(*p.shape, s=0.2)
            else:
                v = rnd(*p.shape, s=1.0 / p.shape[1] ** 0.5)
            p.copy_(v)
            weights[name] = v
    model = model.double()
    lcfg = peft.LoraConfig(r=case["rank"], lora_alpha=case["alpha"], target_modules=TARGETS, lora_dropout=0.0,
                           bias="none", init_lora_weights=False)
    pm = peft.get_peft_model(model, lcfg)
    lora = {}
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" not in name:
                continue
            v = rnd(*p.shape, s=0.2)
            p.copy_(v.double())
            lora[name.replace(".default", "")] = p
    return pm, weights, lora


def batch(case, g):
    c, docs = case["config"], case["docs"]
    B, T = len(docs), sum(docs[0])
    assert all(sum(d) == T for d in docs)
    tokens = torch.randint(0, c["vocab_size"], (B, T), generator=g, dtype=torch.int64)
    pos = torch.zeros(B, T, dtype=torch.int64)
    targets = torch.full((B, T), -100, dtype=torch.int64)
    for b, lens in enumerate(docs):
        t0 = 0
        for n in lens:
            pos[b, t0:t0 + n] = torch.arange(n)
            targets[b, t0:t0 + n - 1] = tokens[b, t0 + 1:t0 + n]  # next token inside the document
            t0 += n
    targets[0, 2] = -100  # an ignored target inside a document too
    return tokens, pos, targets


def make_case(case):
    c = case["config"]
    pm, weights, lora = build(case)
    tokens, pos, targets = batch(case, torch.Generator().manual_seed(case["seed"] + 1))
    # use_cache=False: transformers detects packing only without a cache.
    logits = pm(input_ids=tokens, position_ids=pos, use_cache=False).logits  # (B,T,V) float64

    # transformers must have masked across documents: each document alone gives the same logits.
    with torch.no_grad():
        for b, lens in enumerate(case["docs"]):
            t0 = 0
            for n in lens:
                alone = pm(input_ids=tokens[b:b + 1, t0:t0 + n], position_ids=pos[b:b + 1, t0:t0 + n],
                           use_cache=False).logits
                assert torch.allclose(alone[0], logits[b, t0:t0 + n], rtol=0, atol=1e-10), "packing not masked"
                t0 += n
    # ... and the window must matter (the documents are longer than it).
    window = c.get("sliding_window") if c["model_type"] == "mistral" or c.get("use_sliding_window") else None
    if window is not None:
        assert max(max(d) for d in case["docs"]) > window
        assert pm.base_model.model.config.sliding_window == window

    V = c["vocab_size"]
    ntarget = int((targets != -100).sum())
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100,
                                             reduction="sum") / ntarget
    loss.backward()

    out = {k: v.numpy() for k, v in weights.items() if not (k == "lm_head.weight" and c["tie_word_embeddings"])}
    out.update({k: v.detach().float().numpy() for k, v in lora.items()})
    out.update({"grad." + k: v.grad.float().numpy() for k, v in lora.items()})
    out["input.tokens"] = tokens.int().numpy()
    out["input.targets"] = targets.int().numpy()
    out["input.positions"] = pos.int().numpy()
    out["expected.logits"] = logits.detach().float().numpy()
    out["expected.loss"] = np.array([loss.item()], dtype=np.float32)
    meta = {"magic": MAGIC, "version": VERSION, "config": json.dumps(c), "lora_rank": str(case["rank"]),
            "lora_alpha": str(case["alpha"]),
            "source": f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}"}
    path = os.path.join(HERE, case["file"])
    write_safetensors(path, out, meta)
    print("wrote", path, "loss", loss.item(), "targets", ntarget)


def main():
    for case in CASES:
        make_case(case)


if __name__ == "__main__":
    main()
