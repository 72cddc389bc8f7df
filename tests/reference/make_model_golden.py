#!/usr/bin/python3
"""Golden references for qlora's Llama-family forward/backward with LoRA (tests/test_model_golden.cpp).

An independent implementation of Hugging Face's Llama and Qwen2 modeling
(RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU; Qwen2 adds biases
on q, k and v only) with PEFT-style LoRA on q, k, v, o, gate, up, down,
written directly in torch from the transformers formulas. A tiny random model
per case runs on two rows, each packing two documents (positions restart at 0;
a token attends only within its own document); the script writes the weights,
inputs, logits, loss and the LoRA gradients. Weights are drawn and stored in
fp32 and the model is evaluated in fp64 (RoPE frequencies in fp32, as
transformers computes them), so the reference's own rounding is negligible
next to the fp32 engine's; results are stored as fp32.

The cases cover the two sides of each switch:
  model_golden.safetensors        llama: explicit head_dim, GQA 4 heads / 2 kv,
                                  llama3 rope scaling, untied lm_head, no biases
  model_golden_qwen2.safetensors  qwen2: q/k/v biases (random, non-zero), o and
                                  MLP without, derived head_dim, GQA 6 heads / 2
                                  kv, default rope, tied lm_head (= embed_tokens),
                                  sliding_window set but use_sliding_window false
                                  (HF then attends to the whole document)

Base weights are plain fp32: the C++ test loads them with the dense fp32
linear path (WeightLoadOptions.quantize = false), so both sides see the same
base weights; the NF4 linear is checked against the dense one in test_ops_forward.

Each case draws from its own seeded generator, so re-running rewrites an
unchanged case byte for byte. Run with Debian's interpreter:
    /usr/bin/python3 tests/reference/make_model_golden.py
"""
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from golden_io import write_safetensors  # noqa: E402

MAGIC = "qlora-model-golden"
VERSION = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = [
    {
        "file": "model_golden.safetensors", "seed": 20261126, "rank": 4, "alpha": 8.0, "embed_std": 1.0,
        "docs": [[6, 4], [3, 7]],  # document lengths of each row (T = 10)
        "config": {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 500.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
        },
    },
    {
        "file": "model_golden_qwen2.safetensors", "seed": 20261207, "rank": 4, "alpha": 8.0,
        # Tied: the embedding is also the lm_head, so a smaller one keeps the
        # logits (std ~2) and the softmax away from saturation.
        "embed_std": 0.3,
        "docs": [[7, 5], [4, 8]],  # T = 12; documents longer than sliding_window
        "config": {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "vocab_size": 64, "hidden_size": 48, "intermediate_size": 40, "num_hidden_layers": 2,
            "num_attention_heads": 6, "num_key_value_heads": 2,  # head_dim = 48 / 6 = 8, 3 heads per kv head
            "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "use_sliding_window": False, "sliding_window": 4, "max_window_layers": 2,
            "tie_word_embeddings": True, "hidden_act": "silu",
            "bos_token_id": 62, "eos_token_id": 63, "torch_dtype": "float32",
        },
    },
]


def head_dim(c):
    # Qwen2Attention / LlamaAttention: getattr(config, "head_dim", hidden_size // num_attention_heads)
    return c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])


def biased_targets(c):
    """The linears with a bias in HF: Qwen2 always q/k/v; Llama per attention_bias / mlp_bias."""
    if c["model_type"] == "qwen2":
        return ["q_proj", "k_proj", "v_proj"]
    assert c["model_type"] == "llama"
    return (TARGETS[:4] if c.get("attention_bias") else []) + (TARGETS[4:] if c.get("mlp_bias") else [])


def rope_inv_freq(c):
    """transformers' _compute_default_rope_parameters (+ _compute_llama3_parameters), in fp32."""
    d = head_dim(c)
    inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = c.get("rope_scaling")
    if rs is None:
        return inv_freq
    assert rs["rope_type"] == "llama3"
    factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], \
        rs["original_max_position_embeddings"]
    low_wl, high_wl = old / lo, old / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rmsnorm(x, w, eps):
    var = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + eps))


def make_case(case):
    c = case["config"]
    RANK, ALPHA, DOCS = case["rank"], case["alpha"], case["docs"]
    g = torch.Generator().manual_seed(case["seed"])
    V, C, I, L = c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    H, KVH, D = c["num_attention_heads"], c["num_key_value_heads"], head_dim(c)
    tied = c["tie_word_embeddings"]
    biased = biased_targets(c)
    # Qwen2 applies the window only with use_sliding_window (and this reference has none).
    assert not c.get("use_sliding_window", False)
    dims = {"q_proj": (C, H * D), "k_proj": (C, KVH * D), "v_proj": (C, KVH * D), "o_proj": (H * D, C),
            "gate_proj": (C, I), "up_proj": (C, I), "down_proj": (I, C)}

    def rnd(*shape, s=0.1):
        # Stored as fp32; computed in fp64 (below) so the reference's own
        # rounding is negligible next to the fp32 engine's.
        return (torch.randn(*shape, generator=g) * s).float().double()

    # Draw order = file order; the llama case's must not change (its file is
    # rewritten byte for byte).
    W = {"model.embed_tokens.weight": rnd(V, C, s=case["embed_std"]), "model.norm.weight": 1 + rnd(C)}
    if not tied:
        W["lm_head.weight"] = rnd(V, C, s=0.2)
    lora = {}
    for i in range(L):
        p = f"model.layers.{i}."
        W[p + "input_layernorm.weight"] = 1 + rnd(C)
        W[p + "post_attention_layernorm.weight"] = 1 + rnd(C)
        for t in TARGETS:
            mod = ("self_attn." if t in TARGETS[:4] else "mlp.") + t
            fin, fout = dims[t]
            W[p + mod + ".weight"] = rnd(fout, fin, s=1.0 / math.sqrt(fin))
            if t in biased:
                # Large enough to move the logits well past the tolerance
                # (q/k biases shift the attention scores, v biases the values).
                W[p + mod + ".bias"] = rnd(fout, s=0.5)
            base = "base_model.model." + p + mod
            lora[base + ".lora_A.weight"] = rnd(RANK, fin, s=0.2).requires_grad_()
            lora[base + ".lora_B.weight"] = rnd(fout, RANK, s=0.2).requires_grad_()

    B, T = len(DOCS), sum(DOCS[0])
    assert all(sum(d) == T for d in DOCS)
    tokens = torch.randint(0, V, (B, T), generator=g, dtype=torch.int64)
    pos = torch.zeros(B, T, dtype=torch.int64)
    doc = torch.zeros(B, T, dtype=torch.int64)
    targets = torch.full((B, T), -100, dtype=torch.int64)
    for b, lens in enumerate(DOCS):
        t0 = 0
        for di, n in enumerate(lens):
            pos[b, t0:t0 + n] = torch.arange(n)
            doc[b, t0:t0 + n] = di
            targets[b, t0:t0 + n - 1] = tokens[b, t0 + 1:t0 + n]  # next token inside the document
            t0 += n
    targets[0, 2] = -100  # an ignored target inside a document too

    inv_freq = rope_inv_freq(c).double()  # the fp32 frequencies transformers computes
    freqs = pos[:, :, None].float() * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # (B,1,T,D)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    mask = causal[None] & (doc[:, :, None] == doc[:, None, :])  # (B,T,T)
    scale = ALPHA / RANK

    def proj(x, i, t):
        # PEFT: base(x) (with its bias) + scale * B(A(x)); the adapter has no bias.
        mod = ("self_attn." if t in TARGETS[:4] else "mlp.") + t
        p = f"model.layers.{i}." + mod
        base = "base_model.model." + p
        y = x @ W[p + ".weight"].T
        if t in biased:
            y = y + W[p + ".bias"]
        return y + (x @ lora[base + ".lora_A.weight"].T) @ lora[base + ".lora_B.weight"].T * scale

    x = W["model.embed_tokens.weight"][tokens]
    eps = c["rms_norm_eps"]
    for i in range(L):
        p = f"model.layers.{i}."
        h = rmsnorm(x, W[p + "input_layernorm.weight"], eps)
        q = proj(h, i, "q_proj").view(B, T, H, D).transpose(1, 2)
        k = proj(h, i, "k_proj").view(B, T, KVH, D).transpose(1, 2)
        v = proj(h, i, "v_proj").view(B, T, KVH, D).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(H // KVH, dim=1)
        v = v.repeat_interleave(H // KVH, dim=1)
        att = (q @ k.transpose(2, 3)) / math.sqrt(D)
        att = att.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(B, T, H * D)
        x = x + proj(o, i, "o_proj")
        h = rmsnorm(x, W[p + "post_attention_layernorm.weight"], eps)
        a = torch.nn.functional.silu(proj(h, i, "gate_proj")) * proj(h, i, "up_proj")
        x = x + proj(a, i, "down_proj")
    x = rmsnorm(x, W["model.norm.weight"], eps)
    lm_head = W["model.embed_tokens.weight"] if tied else W["lm_head.weight"]
    logits = x @ lm_head.T
    ntarget = int((targets != -100).sum())
    loss = torch.nn.functional.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100,
                                             reduction="sum") / ntarget
    loss.backward()

    out = {k: v.detach().float().numpy() for k, v in W.items()}
    out.update({k: v.detach().float().numpy() for k, v in lora.items()})
    out.update({"grad." + k: v.grad.float().numpy() for k, v in lora.items()})
    out["input.tokens"] = tokens.int().numpy()
    out["input.targets"] = targets.int().numpy()
    out["input.positions"] = pos.int().numpy()
    out["expected.logits"] = logits.detach().float().numpy()
    out["expected.loss"] = np.array([loss.item()], dtype=np.float32)
    meta = {"magic": MAGIC, "version": VERSION, "config": json.dumps(c), "lora_rank": str(RANK),
            "lora_alpha": str(ALPHA)}
    path = os.path.join(HERE, case["file"])
    write_safetensors(path, out, meta)
    print("wrote", path, "loss", loss.item(), "targets", ntarget)


def main():
    for case in CASES:
        make_case(case)


if __name__ == "__main__":
    main()
