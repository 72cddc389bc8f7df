"""Part b: PEFT. Adapters qlora trains load in PeftModel with the same outputs, adapters PEFT makes
load in qlora with the same outputs (or are refused by name), and PEFT's merge_and_unload equals
`qlora merge` within bf16 rounding."""
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import CACHE, lib, report, run_qlora, version
from models import (tol, qlora_eval_loss, qlora_greedy, rel, smollm_hf, text_docs, tiny_model, token_docs, torch_greedy,
                    torch_loss, write_tokens_jsonl)

# (model, lora section of the recipe): all targets, a subset, rsLoRA, dropout, on every architecture
TRAINED = {
    "llama-all": ("llama-gqa-rope3", dict(rank=8, alpha=16, dropout=0.0, targets="all-linear", rslora=False)),
    "llama-subset": ("llama-gqa-rope3", dict(rank=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"],
                                             rslora=False)),
    "qwen2-rslora": ("qwen2-bias", dict(rank=16, alpha=8, dropout=0.0, targets="all-linear", rslora=True)),
    "mistral-dropout": ("mistral", dict(rank=8, alpha=16, dropout=0.1, targets="attention", rslora=False)),
    "smollm2-all-dropout": ("smollm2-135m", dict(rank=8, alpha=16, dropout=0.05, targets="all-linear", rslora=False)),
    # DoRA, per-module ranks and alphas (issue 17): PEFT must read use_dora, the magnitudes and the patterns
    "llama-dora-patterns": ("llama-gqa-rope3", dict(rank=8, alpha=16, dropout=0.0, targets="all-linear", rslora=False,
                                                    dora=True, rank_pattern={"down_proj": 4, "layers.0.mlp.up_proj": 2},
                                                    alpha_pattern={"v_proj": 24})),
    "qwen2-dora-bias-dropout": ("qwen2-bias", dict(rank=4, alpha=8, dropout=0.1, targets="all-linear", rslora=True,
                                                   dora=True)),
}


def model_dir(name: str) -> Path:
    return smollm_hf() if name == "smollm2-135m" else tiny_model(name)


def docs_for(name: str, d: Path, n: int, length: int, seed: int):
    if name == "smollm2-135m":
        return text_docs(d, n, length)
    return token_docs(n, length, 512, seed=seed)


class Captured:
    """Every Python warning and every WARNING+ log record of peft/transformers inside the block."""

    def __enter__(self):
        self.records = []
        self._w = warnings.catch_warnings(record=True)
        self.warns = self._w.__enter__()
        warnings.simplefilter("always")
        self._h = logging.Handler(logging.WARNING)
        self._h.emit = lambda rec: self.records.append(rec.getMessage())
        for n in ("peft", "transformers"):
            logging.getLogger(n).addHandler(self._h)
        return self

    def __exit__(self, *exc):
        for n in ("peft", "transformers"):
            logging.getLogger(n).removeHandler(self._h)
        self._w.__exit__(*exc)
        return False

    @property
    def messages(self):
        return [str(w.message) for w in self.warns] + self.records


def fp32_base(d: Path):
    torch = lib("torch")
    transformers = lib("transformers")
    m = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    m.eval()
    return m


def trained_adapter(key: str) -> tuple[Path, Path]:
    """`qlora run` of a tiny recipe (NF4 base, 3 AdamW steps at a high learning rate so B moves far
    from zero); returns (model folder, adapter folder). Made once per suite run."""
    mname, lora = TRAINED[key]
    mdir = model_dir(mname)
    out = CACHE / "runs" / f"train-{key}"
    if (out / "adapter" / "adapter_config.json").exists() and (out / ".fresh").exists():
        return mdir, out / "adapter"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = write_tokens_jsonl(out.parent / f"train-{key}.jsonl", docs_for(mname, mdir, 8, 64, seed=11))
    recipe = {
        "model": {"path": str(mdir)},
        "quant": {"type": "nf4", "block_size": 64, "double_quant": True},
        "lora": lora,
        "data": {"train": str(data), "format": "tokens", "chat_template": "none", "seq_len": 64, "packing": True,
                 "cache": False},
        "train": {"max_steps": 3, "micro_batch": 2, "grad_accum": 1, "lr": 0.02 if mname != "smollm2-135m" else 2e-3,
                  "schedule": "constant",
                  "optimizer": "adamw", "seed": 42, "max_grad_norm": 0.0, "keep_checkpoints": 1},
        "device": {"backend": "cpu"},
        "output": {"dir": str(out)},
        "logging": {"report": False},
    }
    rfile = out.parent / f"train-{key}.yaml"
    rfile.write_text(json.dumps(recipe, indent=1))  # JSON is YAML
    run_qlora("run", rfile, "--overwrite", "--no-samples")
    (out / ".fresh").write_text("")
    return mdir, out / "adapter"


@pytest.fixture(scope="session", autouse=True)
def _fresh_runs():
    for p in (CACHE / "runs").glob("train-*/.fresh"):
        p.unlink()  # retrain once per session: the adapters are what is under test
    yield


@pytest.mark.parametrize("key", list(TRAINED))
def test_peft_loads_qlora_adapter(key, tmp_path):
    """An adapter `qlora run` trained loads in PeftModel without a warning, and PEFT over the fp32
    base gives the loss `qlora eval --quant none --adapter` gives (relative 1e-5) and the same
    greedy tokens as `qlora generate --dense --adapter`."""
    peft = lib("peft")
    mdir, adapter = trained_adapter(key)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base = fp32_base(mdir)
    with Captured() as cap:
        model = peft.PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    n_lora = sum(1 for n, _ in model.named_parameters() if "lora_B" in n)
    st = lib("safetensors.torch").load_file(str(adapter / "adapter_model.safetensors"))
    b_norm = max(float(v.abs().max()) for k, v in st.items() if "lora_B" in k)
    mname = TRAINED[key][0]
    docs = docs_for(mname, mdir, 3, 48, seed=5)
    data = write_tokens_jsonl(tmp_path / "eval.jsonl", docs)
    ours = qlora_eval_loss(run_qlora, mdir, data, 48, adapter=adapter, quant="none")["loss"]
    ref = torch_loss(model, docs)
    base_loss = qlora_eval_loss(run_qlora, mdir, data, 48, quant="none")["loss"]
    g_ref = torch_greedy(model, docs[0][:12], 8)
    g_ours = qlora_greedy(run_qlora, mdir, docs[0][:12], 8, adapter=adapter, dense=True)
    report("peft.load_qlora_adapter", f"{key}: qlora run adapter (r={cfg['r']}, alpha={cfg['lora_alpha']}, "
           f"rslora={cfg.get('use_rslora')}, dropout={cfg.get('lora_dropout')}, targets={cfg['target_modules']}) "
           f"in PeftModel over the fp32 base vs qlora eval/generate", version("peft"),
           f"loss rel err {rel(ref, ours):.2e} (loss {ours:.6f}, base {base_loss:.6f}, max|B| {b_norm:.3g}); "
           f"greedy 8 equal: {g_ref == g_ours}; PEFT warnings: {len(cap.messages)}",
           adapter=key, rel=rel(ref, ours), warnings=cap.messages)
    assert n_lora > 0
    assert b_norm > 0, "training left B at zero: the check would prove nothing"
    assert abs(ours - base_loss) > 1e-4, "the adapter does not change the loss: the check would prove nothing"
    assert rel(ref, ours) < tol(mname)
    assert g_ref == g_ours


def test_peft_no_warnings_on_qlora_adapter():
    """PEFT loads an adapter qlora wrote without a single warning."""
    peft = lib("peft")
    mdir, adapter = trained_adapter("llama-all")
    with Captured() as cap:
        peft.PeftModel.from_pretrained(fp32_base(mdir), str(adapter))
    report("peft.no_warnings", "PeftModel.from_pretrained of a qlora adapter: warnings and log records", version("peft"),
           f"{len(cap.messages)} warnings" + (f": {cap.messages[0][:160]}" if cap.messages else ""))
    assert not cap.messages, f"PEFT warned when loading our adapter: {cap.messages}"


ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_MADE = {
    # name: (model, LoraConfig kwargs)
    "llama-r4-a8-all7": ("llama-gqa-rope3", dict(r=4, lora_alpha=8, target_modules=ALL7)),
    "llama-r8-a32-attn": ("llama-gqa-rope3", dict(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"])),
    "qwen2-r16-a4-rslora-mlp": ("qwen2-bias", dict(r=16, lora_alpha=4, use_rslora=True,
                                                   target_modules=["gate_proj", "up_proj", "down_proj"])),
    "mistral-r2-a2-qv": ("mistral", dict(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"])),
    # Sliding windows shorter than the documents (eval) and the greedy sequences (KV-cache generation).
    "qwen3-window-r4-a8-all7": ("qwen3-window", dict(r=4, lora_alpha=8, target_modules=ALL7)),
    "mistral-window-r4-a8-all7": ("mistral-window", dict(r=4, lora_alpha=8, target_modules=ALL7)),
    "smollm2-r8-a16-all7": ("smollm2-135m", dict(r=8, lora_alpha=16, target_modules=ALL7)),
    "llama-r4-a8-all-linear": ("llama-gqa-rope3", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    # issue 17: DoRA (use_dora), per-module ranks and alphas (first matching key wins)
    "llama-dora-all7": ("llama-gqa-rope3", dict(r=4, lora_alpha=8, target_modules=ALL7, use_dora=True)),
    "qwen2-dora-rslora-bias": ("qwen2-bias", dict(r=8, lora_alpha=4, use_rslora=True, use_dora=True,
                                                  target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])),
    "llama-rank-alpha-pattern": ("llama-gqa-rope3", dict(r=8, lora_alpha=16, target_modules=ALL7,
                                                         rank_pattern={"layers.1.self_attn.q_proj": 2, "q_proj": 4,
                                                                       r"model\.layers\.0\.mlp\.(up|down)_proj": 3},
                                                         alpha_pattern={"v_proj": 64, "down_proj": 5})),
}


def peft_adapter(mname: str, kw: dict, out: Path):
    """get_peft_model with random (non-zero) B, saved by PEFT; returns the PeftModel too."""
    torch = lib("torch")
    peft = lib("peft")
    base = fp32_base(model_dir(mname))
    torch.manual_seed(99)
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, init_lora_weights=False, **kw)
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():  # make the update large enough to matter next to the base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(4.0 if mname != "smollm2-135m" else 0.05)
    model.eval()
    model.save_pretrained(str(out))
    return model


# "all-linear" is saved by PEFT 0.22 as full module paths, which qlora matches by PEFT's suffix rule.
@pytest.mark.parametrize("key", list(PEFT_MADE))
def test_qlora_loads_peft_adapter(key, tmp_path):
    """An adapter PEFT made (get_peft_model, non-zero B, several ranks and alphas, rsLoRA) loads in
    qlora: `qlora eval --adapter` equals PEFT's loss (relative 1e-5), greedy tokens equal."""
    lib("peft")
    mname, kw = PEFT_MADE[key]
    adapter = tmp_path / "adapter"
    model = peft_adapter(mname, kw, adapter)
    mdir = model_dir(mname)
    docs = docs_for(mname, mdir, 3, 48, seed=3)
    data = write_tokens_jsonl(tmp_path / "eval.jsonl", docs)
    ours = qlora_eval_loss(run_qlora, mdir, data, 48, adapter=adapter, quant="none")["loss"]
    ref = torch_loss(model, docs)
    base_loss = qlora_eval_loss(run_qlora, mdir, data, 48, quant="none")["loss"]
    g_ref = torch_greedy(model, docs[0][:12], 8)
    g_ours = qlora_greedy(run_qlora, mdir, docs[0][:12], 8, adapter=adapter, dense=True)
    report("peft.qlora_loads_peft_adapter", f"{key}: get_peft_model adapter {kw} in qlora eval/generate vs PeftModel",
           version("peft"), f"loss rel err {rel(ref, ours):.2e} (loss {ours:.6f}, base {base_loss:.6f}); "
           f"greedy 8 equal: {g_ref == g_ours}", adapter=key, rel=rel(ref, ours))
    assert abs(ours - base_loss) > 1e-4
    assert rel(ref, ours) < tol(mname)
    assert g_ref == g_ours


def test_rank_pattern_round_trip(tmp_path):
    """rank_pattern / alpha_pattern from PEFT to qlora and back: PEFT's adapter (patterns, first key
    wins, a regex) loads in qlora with PEFT's loss; `qlora run` continuing from it (lora.init, the same
    patterns in the recipe) writes them back in PEFT's form, which PEFT reads with the same ranks."""
    peft = lib("peft")
    mname, kw = PEFT_MADE["llama-rank-alpha-pattern"]
    adapter = tmp_path / "adapter"
    model = peft_adapter(mname, kw, adapter)
    mdir = model_dir(mname)
    ranks = {n.rsplit(".lora_A", 1)[0]: int(p.shape[0]) for n, p in model.named_parameters() if ".lora_A." in n}
    docs = token_docs(2, 32, 512, seed=2)
    data = write_tokens_jsonl(tmp_path / "eval.jsonl", docs)
    ours = qlora_eval_loss(run_qlora, mdir, data, 32, adapter=adapter, quant="none")["loss"]
    ref = torch_loss(model, docs)
    # qlora writes them back: a zero-step run from the adapter, recipe patterns as PEFT's
    out = tmp_path / "run"
    recipe = {
        "model": {"path": str(mdir)}, "quant": {"type": "none"},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear", "init": str(adapter),
                 "rank_pattern": kw["rank_pattern"], "alpha_pattern": kw["alpha_pattern"]},
        "data": {"train": str(data), "format": "tokens", "chat_template": "none", "seq_len": 32, "cache": False},
        "train": {"max_steps": 1, "lr": 1e-12, "schedule": "constant", "max_grad_norm": 0.0},
        "device": {"backend": "cpu"}, "output": {"dir": str(out)}, "logging": {"report": False},
    }
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    run_qlora("run", tmp_path / "r.yaml", "--overwrite", "--no-samples")
    written = json.loads((out / "adapter" / "adapter_config.json").read_text())
    back = peft.PeftModel.from_pretrained(fp32_base(mdir), str(out / "adapter"))
    back_ranks = {n.rsplit(".lora_A", 1)[0]: int(p.shape[0]) for n, p in back.named_parameters() if ".lora_A." in n}
    report("peft.rank_pattern", f"PEFT adapter {kw} in qlora eval, and back through qlora run", version("peft"),
           f"loss rel err {rel(ref, ours):.2e}; written rank_pattern {written['rank_pattern']} "
           f"alpha_pattern {written['alpha_pattern']}; ranks equal after the round trip: {ranks == back_ranks}")
    assert rel(ref, ours) < tol(mname)
    assert list(written["rank_pattern"].items()) == list(kw["rank_pattern"].items())  # PEFT's form, in order
    assert written["alpha_pattern"] == kw["alpha_pattern"]
    assert sorted(set(ranks.values())) == [2, 3, 4, 8]
    assert ranks == back_ranks


def test_alpha_pattern_loaded_or_refused(tmp_path):
    """A PEFT adapter with alpha_pattern (same ranks, a per-module alpha): qlora must either apply it
    (loss equal to PEFT's) or refuse it naming the key. qlora applies it (issue 17)."""
    lib("peft")
    adapter = tmp_path / "adapter"
    model = peft_adapter("llama-gqa-rope3", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 alpha_pattern={"v_proj": 64}), adapter)
    docs = token_docs(2, 32, 512, seed=2)
    data = write_tokens_jsonl(tmp_path / "eval.jsonl", docs)
    r = run_qlora("eval", "--model", model_dir("llama-gqa-rope3"), "--adapter", adapter, "--data", data,
                  "--format", "tokens", "--quant", "none", "--seq-len", 32, "--batch", 1, "--json", check=False)
    msg = (r.stderr + r.stdout).strip()
    assert r.returncode == 0, msg
    ours = json.loads(r.stdout.strip().splitlines()[-1])["loss"]
    ref = torch_loss(model, docs)
    report("peft.alpha_pattern", "PEFT adapter with alpha_pattern={'v_proj': 64} (alpha 16) in qlora eval",
           version("peft"), f"loaded; loss rel err vs PEFT {rel(ref, ours):.2e}")
    assert rel(ref, ours) < 1e-5


def test_dora_magnitude_names_as_peft_saves_them(tmp_path):
    """The tensors of a DoRA adapter qlora writes are exactly those PEFT 0.22 saves for the same
    config (names, shapes), and use_dora is true in both configs."""
    lib("peft")
    mdir, ours = trained_adapter("llama-dora-patterns")
    _, lora = TRAINED["llama-dora-patterns"]
    theirs = tmp_path / "peft"
    peft_adapter("llama-gqa-rope3", dict(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=ALL7, use_dora=True,
                                         rank_pattern=lora["rank_pattern"], alpha_pattern=lora["alpha_pattern"]),
                 theirs)
    st = lib("safetensors.torch")
    a = {k: tuple(v.shape) for k, v in st.load_file(str(ours / "adapter_model.safetensors")).items()}
    b = {k: tuple(v.shape) for k, v in st.load_file(str(theirs / "adapter_model.safetensors")).items()}
    report("peft.dora_names", "tensor names and shapes of a qlora DoRA adapter vs PEFT's save_pretrained",
           version("peft"), f"{len(a)} vs {len(b)} tensors; equal: {a == b}")
    assert a == b
    assert any(k.endswith(".lora_magnitude_vector") for k in a)
    for d in (ours, theirs):
        assert json.loads((d / "adapter_config.json").read_text())["use_dora"] is True


@pytest.mark.parametrize("key", ["llama-r4-a8-all7", "qwen2-r16-a4-rslora-mlp", "smollm2-r8-a16-all7",
                                 "llama-dora-all7", "qwen2-dora-rslora-bias", "llama-rank-alpha-pattern"])
def test_merge_matches_merge_and_unload(key, tmp_path):
    """PEFT's merge_and_unload (fp32, then rounded to bf16) against `qlora merge` (bf16 default and
    f32): bf16 weights equal or one bf16 ulp apart; f32 weights within fp32 rounding."""
    torch = lib("torch")
    lib("peft")
    mname, kw = PEFT_MADE[key]
    adapter = tmp_path / "adapter"
    model = peft_adapter(mname, kw, adapter)
    merged_ref = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    mdir = model_dir(mname)
    from test_bitsandbytes import load_folder
    out = {}
    for dt in ("bf16", "f32"):
        run_qlora("merge", "--model", mdir, "--adapter", adapter, "-o", tmp_path / dt, "--dtype", dt, "--no-progress")
        out[dt] = load_folder(tmp_path / dt)
    names = [n for n in out["bf16"] if n in merged_ref]
    adapted = [n for n in names if any(t in n for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                        "down_proj")) and n.endswith(".weight")]
    vals = exact = one_ulp = worse = beyond = 0
    f32_max = worst = 0.0
    for n in names:
        ref32 = merged_ref[n].float()
        ref16 = ref32.to(torch.bfloat16)
        ours16 = out["bf16"][n]
        assert ours16.dtype == torch.bfloat16, n
        a = ref16.view(torch.int16).numpy().astype(np.int32)
        b = ours16.view(torch.int16).numpy().astype(np.int32)
        d = np.abs(a - b)
        vals += d.size
        exact += int((d == 0).sum())
        one_ulp += int((d == 1).sum())
        worse += int((d > 1).sum())
        # within bf16 rounding: half a bf16 ulp of the value (2^-9 relative) plus the fp32 noise of
        # computing W + scale*B*A in another order (2^-22 of the tensor's largest value)
        err = (ours16.float() - ref32).abs()
        bound = ref32.abs() * 2.0 ** -8 + ref32.abs().max() * 2.0 ** -22
        beyond += int((err > bound).sum())
        worst = max(worst, float((err / bound).max()))
        o32 = out["f32"][n].float()
        f32_max = max(f32_max, float((o32 - ref32).abs().max() / ref32.abs().max().clamp(min=1e-30)))
    missing = sorted(set(merged_ref) - set(out["bf16"]) - {"lm_head.weight"})
    report("peft.merge", f"{key}: PEFT merge_and_unload (fp32 -> bf16) vs qlora merge ({len(adapted)} adapted "
           f"linears, {len(names)} tensors)", version("peft"),
           f"bf16: {exact:,}/{vals:,} values identical, {one_ulp:,} one ulp apart, {worse} further (tiny values "
           f"where fp32 summation order shows; worst error {worst:.2f} of the bf16-rounding bound); "
           f"f32: max |diff| / max |W| {f32_max:.2e}", merge=key, exact=exact, values=vals, one_ulp=one_ulp, worse=worse,
           f32_max_rel=f32_max)
    assert not missing, f"tensors of the merged model missing from qlora merge: {missing}"
    assert adapted
    assert beyond == 0
    assert f32_max < 1e-5
