"""The models the interop checks run on, built once and cached under build/interop-cache:

* the real SmolLM2-135M-Instruct: the fixture GGUF (Q4_1) converted by transformers (gguf-py
  dequantization) into an fp32 HF folder with its tokenizer, keyed by the GGUF's sha256;
* tiny random models of every architecture qlora supports, made with transformers' config classes
  from a fixed seed: llama with GQA and llama3 rope scaling, qwen2 with q/k/v biases and tied
  embeddings, mistral with explicit head_dim (two KV heads: bitsandbytes' CPU
  4-bit kernel needs at least 32 output rows). They carry the stories260K tokenizer (vocab 512).

Plus helpers shared by the checks: token data, torch losses and greedy decoding."""
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

from conftest import CACHE, lib, need_fixture, version

SMOLLM_GGUF = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5,
               initializer_range=0.15, bos_token_id=1, eos_token_id=2)
TINY = {
    "llama-gqa-rope3": ("LlamaConfig", dict(
        _COMMON, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32})),
    "qwen2-bias": ("Qwen2Config", dict(
        _COMMON, num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mistral": ("MistralConfig", dict(
        _COMMON, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Qwen3: q/k norms, head_dim 32 != 64 / 4, tied; a 16-token window on layer 1 (max_window_layers 1),
    # shorter than the 48-token documents and the 20-token greedy sequences of the checks.
    "qwen3-window": ("Qwen3Config", dict(
        _COMMON, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, use_sliding_window=True,
        sliding_window=16, max_window_layers=1, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Mistral v0.1's sliding window (every layer), 12 tokens.
    "mistral-window": ("MistralConfig", dict(
        _COMMON, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=12,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cached(dest: Path, build) -> Path:
    """dest, built by build(tmp) into a temporary folder and renamed when complete."""
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def smollm_hf() -> Path:
    """The real SmolLM2-135M-Instruct as an fp32 HF folder (converted once from the fixture GGUF)."""
    gguf = need_fixture(SMOLLM_GGUF)
    transformers = lib("transformers")
    torch = lib("torch")
    lib("gguf")
    key = sha256_file(gguf)[:16]
    dest = CACHE / f"smollm2-135m-instruct-f32-{key}"

    def build(tmp):
        m = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32)
        # a GGUF-loaded model counts as quantized and refuses save_pretrained: copy it into a plain one
        cfg = m.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        plain = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(m.state_dict(), strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
        plain.tie_weights()
        plain.save_pretrained(tmp)
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        (tmp / "CONVERTED.txt").write_text(
            f"{gguf.name} (sha256 {sha256_file(gguf)}) converted by {version('transformers')}, "
            f"{version('gguf')}: AutoModelForCausalLM.from_pretrained(gguf_file=...) in fp32\n")

    return _cached(dest, build)


def tiny_model(name: str) -> Path:
    """A tiny random model of one architecture, seeded, saved as an fp32 HF folder."""
    transformers = lib("transformers")
    torch = lib("torch")
    cls, kw = TINY[name]
    tok_dir = need_fixture("models/stories260K/hf")
    key = hashlib.sha256(json.dumps([name, cls, kw, version("transformers")], sort_keys=True).encode()).hexdigest()[:12]
    dest = CACHE / f"tiny-{name}-{key}"

    def build(tmp):
        torch.manual_seed(1234)
        cfg = getattr(transformers, cls)(**kw)
        m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():  # norms and biases away from their 1/0 init, so they are checked too
            for n, p in m.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                elif n.endswith(".bias"):
                    p.copy_(0.2 * torch.randn_like(p))
        m.save_pretrained(tmp)
        for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            shutil.copy(tok_dir / f, tmp / f)

    return _cached(dest, build)


def token_docs(n: int, length: int, vocab: int, seed: int, bos: int | None = 1):
    """n documents of `length` random token ids (BOS first when given), seeded."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        if bos is not None:
            ids[0] = bos
        docs.append(ids)
    return docs


def text_docs(tokenizer_dir: Path, n: int, length: int):
    """n documents of real text (fixture datasets) tokenized by HF tokenizers to `length` ids each."""
    tokenizers = lib("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    src = need_fixture("datasets/alpaca/llamafactory_alpaca_en_demo.json")
    recs = json.loads(src.read_text())
    docs = []
    for r in recs:
        ids = tok.encode(r["instruction"] + "\n" + r["output"], add_special_tokens=False).ids
        if len(ids) >= length:
            docs.append(ids[:length])
        if len(docs) == n:
            break
    return docs


def write_tokens_jsonl(path: Path, docs):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"input_ids": d}) + "\n")
    return path


def torch_loss(model, docs) -> float:
    """Token-weighted mean cross entropy of next-token prediction over every document, computed
    in double from the model's logits (as `qlora eval` defines its loss)."""
    torch = lib("torch")
    total, count = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([d])
            logits = model(input_ids=ids).logits[0].double()
            lp = torch.log_softmax(logits[:-1], dim=-1)
            tgt = ids[0, 1:]
            total += float(-lp[torch.arange(len(d) - 1), tgt].sum())
            count += len(d) - 1
    return total / count


def torch_greedy(model, prompt, n: int):
    torch = lib("torch")
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt):]


def qlora_eval_loss(run_qlora, model: Path, data: Path, seq_len: int, adapter: Path | None = None,
                    quant: str = "none") -> dict:
    args = ["eval", "--model", model, "--data", data, "--format", "tokens", "--seq-len", seq_len,
            "--quant", quant, "--batch", 1, "--json"]
    if adapter is not None:
        args += ["--adapter", adapter]
    r = run_qlora(*args)
    return json.loads(r.stdout.strip().splitlines()[-1])


def qlora_greedy(run_qlora, model: Path, prompt, n: int, adapter: Path | None = None, dense: bool = True):
    args = ["generate", "--model", model, "--prompt-ids", " ".join(map(str, prompt)),
            "--max-new-tokens", n, "--temperature", 0, "--ignore-eos", "--device", "cpu"]
    if adapter is not None:
        args += ["--adapter", adapter]
    if dense:
        args.append("--dense")
    r = run_qlora(*args)
    for line in r.stdout.splitlines():
        if line.startswith("ids:"):
            return [int(x) for x in line[4:].split()]
    raise AssertionError(f"no ids line in qlora generate output:\n{r.stdout}")


def tol(model: str) -> float:
    """Relative tolerance of an fp32 loss against qlora's fp32 CPU engine: 1e-5 on the tiny models
    (measured ~1e-8). The real 30-layer SmolLM2 shows 3.6e-5 to 4.4e-5 already without any adapter
    (dense base and NF4 base alike), a difference of the fp32 forward passes themselves that is
    reported to the lead (docs/interop.md); held at 1e-4 there until it is understood."""
    return 1e-4 if model.startswith("smollm2") else 1e-5


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)
