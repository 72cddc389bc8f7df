#!/usr/bin/env python3
"""Writes the small committed seed inputs of the fuzz targets into
fuzz/corpus/<target>/seed-*. Run once by hand when a format gains a field
(the fixtures add larger real files at fuzz time, scripts/fuzz.sh).
Needs only the standard library, plus `gguf` and numpy for the GGUF seed
(the interop venv has them; it is skipped when absent)."""
import json, os, struct, sys

here = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(here, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape, bytes)]"""
    header, off, blob = {}, 0, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
        blob += data
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + blob


put("safetensors", "f32", safetensors([("w", "F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4))], {"format": "pt"}))
put("safetensors", "mixed", safetensors([("a.bias", "BF16", [3], b"\x80\x3f" * 3),
                                          ("a.weight", "U8", [4, 1], b"\x01\x02\x03\x04"),
                                          ("s", "I64", [], struct.pack("<q", 7))]))
put("safetensors", "empty", safetensors([("z", "F16", [0, 4], b"")]))

put("safetensors_index", "two", json.dumps({"metadata": {"total_size": 22}, "weight_map": {
    "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}))

llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 128,
         "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
         "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
put("hf_config", "llama", json.dumps(llama, indent=1))
put("hf_config", "llama3-rope", json.dumps(dict(llama, rope_scaling={
    "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}, eos_token_id=[2, 3], tie_word_embeddings=True)))
put("hf_config", "qwen2", json.dumps(dict(llama, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                          sliding_window=4096, use_sliding_window=False)))
put("hf_config", "mistral", json.dumps(dict(llama, architectures=["MistralForCausalLM"], model_type="mistral",
                                            head_dim=32, rope_scaling={"type": "linear", "factor": 2.0})))

bpe = {"version": "1.0", "truncation": None, "padding": None,
       "added_tokens": [{"id": 0, "content": "<s>", "single_word": False, "lstrip": False, "rstrip": False,
                         "normalized": False, "special": True}],
       "normalizer": None,
       "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
       "post_processor": None,
       "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
       "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                 "vocab": {"<s>": 0, "H": 1, "e": 2, "l": 3, "o": 4, "He": 5, "ll": 6, "Hell": 7, "\u0120": 8},
                 "merges": ["H e", "l l", "He ll"]}}
put("tokenizer_json", "bytelevel-bpe", json.dumps(bpe))
spm_like = dict(bpe, normalizer={"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
    pre_tokenizer=None, decoder={"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]})
spm_like["model"] = dict(bpe["model"], byte_fallback=True, fuse_unk=True, unk_token="<unk>",
                         vocab={"<unk>": 0, "<s>": 1, "<0x41>": 2, "\u2581": 3, "H": 4, "i": 5, "Hi": 6},
                         merges=[["H", "i"]])
put("tokenizer_json", "sentencepiece-bpe", json.dumps(spm_like))
put("tokenizer_json", "split-regex", json.dumps(dict(bpe, pre_tokenizer={"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "(?i:'s|'t)|\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+|\\s+"},
     "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
    normalizer={"type": "NFC"})))

templates = {
    "llama3": "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "llama2": "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}",
}
for name, t in templates.items():
    put("tokenizer_config", name, json.dumps({"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
                                              "eos_token": {"content": "</s>", "lstrip": False},
                                              "chat_template": t}))
put("tokenizer_config", "list-template", json.dumps({"bos_token": None, "chat_template": [
    {"name": "default", "template": templates["chatml"]}, {"name": "tool_use", "template": "x"}]}))

with open(os.path.join(here, "..", "recipes", "demo.yaml")) as f:
    demo = "".join(l for l in f if not l.lstrip().startswith("#"))
put("recipe", "demo", demo)
put("recipe", "overrides", "model:\n  path: builtin:tiny\ndata:\n  train: t.jsonl\n  format: messages\n"
    "output:\n  dir: out\n\0train.lr=1e-4\nlora.rank=4\nlora.targets=[q_proj, v_proj]\ntrain.max_steps=3\n")

dsets = [  # (format index as fuzz_dataset.cpp picks it, name, JSONL text)
    (0, "alpaca", '{"instruction": "Say hi", "input": "", "output": "hi"}\n'
                  '[{"instruction": "a", "output": "b", "system": "s"}, {"instruction": "c", "output": "d"}]\n'),
    (1, "messages", '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},'
                    ' {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}\n'),
    (2, "sharegpt", '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n'),
    (3, "prompt_completion", '{"prompt": "2+2=", "completion": "4"}\n{"prompt": "x", "completion": ""}\n'),
    (4, "text", '{"text": "Once upon a time"}\n{"text": "\\u00e9t\\u00e9"}\n'),
    (5, "tokens", '{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}\n{"input_ids": [5]}\n'),
]
for fmt, name, text in dsets:
    put("dataset", name + "-jsonl", bytes([fmt]) + text.encode())
    arr = "[" + ",".join(l for l in text.splitlines() if l.startswith("{")) + "]"
    put("dataset", name + "-array", bytes([fmt | 0x8]) + arr.encode())
put("dataset", "pubmedqa-object", bytes([3 | 0x8 | 0x10]) + b'{"1": {"prompt": "q", "completion": "a"}, "2": {}}')

put("peft_config", "rank1-q", json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 2,
    "lora_dropout": 0.0, "target_modules": ["q_proj"], "use_rslora": False, "use_dora": False, "bias": "none",
    "base_model_name_or_path": "builtin:tiny", "fan_in_fan_out": False, "inference_mode": True,
    "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}, indent=2))
put("peft_config", "paths", json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2.5,
    "target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]}))

ts = []
for i in range(4):
    p = "base_model.model.model.layers.%d.self_attn.q_proj." % i
    ts.append((p + "lora_A.weight", "F32", [1, 128], struct.pack("<128f", *[0.01 * k for k in range(128)])))
    ts.append((p + "lora_B.weight", "F32", [128, 1], struct.pack("<128f", *[0.0] * 128)))
put("peft_tensors", "rank1-q", safetensors(sorted(ts), {"format": "pt"}))

put("checkpoint", "state", json.dumps({"format_version": 1, "step": 1, "epoch": 0, "micro_batch_cursor": 2,
    "forward_count": 2, "rng": 12345678901234, "tokens_seen": 190, "wall_seconds": 1.5, "last_loss": 6.2,
    "last_eval_loss": None, "best_eval_loss": None, "recipe_hash": "0123456789abcdef",
    "base_fingerprint": "fedcba9876543210", "optimizer": "adamw", "qlora_version": "0.1.0"}, indent=2))

put("bnb_quant_state", "nf4", json.dumps({"quant_type": "nf4", "absmax": [], "blocksize": 64,
    "quant_map": [], "dtype": "bfloat16", "shape": [128, 128], "nested_blocksize": 256,
    "nested_offset": 0.0123, "nested_dtype": "float32", "nested_absmax": [], "nested_quant_map": []}))
put("bnb_quant_state", "fp4-flat", json.dumps({"quant_type": "fp4", "blocksize": 64, "dtype": "float16",
                                               "shape": [64, 2]}))

try:
    import gguf, numpy as np
    path = os.path.join(here, "corpus", "gguf", "seed-tiny")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1); w.add_context_length(64); w.add_embedding_length(8); w.add_feed_forward_length(16)
    w.add_head_count(2); w.add_head_count_kv(1); w.add_layer_norm_rms_eps(1e-5); w.add_rope_freq_base(10000.0)
    w.add_vocab_size(6)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "\u2581", "H", "i"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0, -3.0])
    w.add_token_types([2, 3, 3, 1, 1, 1])
    w.add_bos_token_id(1); w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", np.arange(48, dtype=np.float32).reshape(6, 8))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float16))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
except ImportError as e:
    print("gguf seed skipped:", e, file=sys.stderr)


def pb_varint(v):
    out = b""
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def pb_field(num, wire, payload):
    key = pb_varint((num << 3) | wire)
    if wire == 0:
        return key + pb_varint(payload)
    if wire == 5:
        return key + struct.pack("<f", payload)
    return key + pb_varint(len(payload)) + payload


def spm_model(pieces, model_type, byte_fallback=False):
    """A SentencePiece ModelProto by hand (sentencepiece_model.proto field
    numbers): pieces [(text, score, type)], type 1 normal 2 unknown 3 control
    6 byte; trainer_spec.model_type 1 unigram 2 bpe."""
    body = b""
    for text, score, typ in pieces:
        body += pb_field(1, 2, pb_field(1, 2, text.encode()) + pb_field(2, 5, score) + pb_field(3, 0, typ))
    trainer = pb_field(3, 0, model_type) + pb_field(35, 0, 1 if byte_fallback else 0)
    trainer += pb_field(40, 0, 0) + pb_field(41, 0, 1) + pb_field(42, 0, 2)  # unk, bos, eos ids
    normalizer = pb_field(1, 2, b"identity") + pb_field(3, 0, 1) + pb_field(4, 0, 0)  # add_dummy_prefix
    return body + pb_field(2, 2, trainer) + pb_field(3, 2, normalizer)


base = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
words = [("\u2581", -1.0, 1), ("H", -2.0, 1), ("e", -2.0, 1), ("l", -2.0, 1), ("o", -2.0, 1),
         ("\u2581H", -3.0, 1), ("ll", -3.0, 1), ("\u2581Hello", -4.0, 1)]
put("sentencepiece", "bpe", spm_model(base + words, 2))
put("sentencepiece", "unigram", spm_model(base + words, 1))
put("sentencepiece", "bytefallback", spm_model(base + [("<0x%02X>" % b, 0.0, 6) for b in range(256)] + words, 2, True))
