#!/usr/bin/env python3
"""The CPU peer of bench/cpu_vs_hf.sh: one measurement of transformers + PEFT on the CPU per process
(peak RSS is the process's), printed as one JSON line; and --table, which reads the JSON lines of both
sides (this script's and bench_cpu_engine's) and prints the comparison table.

--train MODEL: LoRA r 16 (alpha 16, no dropout) on q,k,v,o,gate,up,down of random weights of a published
config (bench/shapes.json "cpu_models", built with AutoConfig.for_model so Qwen2 gets its q/k/v biases),
seq T x micro-batch B, fp32 compute (no autocast: the CPU has no fast bf16 here), the step a Trainer runs:
forward with labels, backward, clip_grad_norm_(1.0), torch AdamW, zero_grad. --base fp32 keeps the base
linears fp32; --base nf4 replaces them by bitsandbytes Linear4bit (NF4, block 64, double-quantized scales,
fp32 compute) on its CPU backend (the QLoRA stack on the CPU). torch.set_num_threads(--threads).
--generate GGUF: batch-1 greedy decode tokens/s of llama.cpp (llama-cpp-python) on the same file, the
same 8-token prompt and token count as bench_cpu_engine --generate.
--gemm-ceiling: the best of a few square fp32 matmuls through torch (its own BLAS).

Run with the interop virtual environment (scripts/interop-venv.sh); bench/cpu_vs_hf.sh does.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_baseline import LORA_TARGETS, SHAPES_FILE, useful_flops_per_token  # noqa: E402


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def cpu_models(path=SHAPES_FILE):
    with open(path) as f:
        return json.load(f)["cpu_models"]


def config_dict(name):
    models = cpu_models()
    if name not in models:
        sys.exit("hf_cpu_peer: unknown model %r (known: %s)" % (name, ", ".join(models)))
    return {k: v for k, v in models[name].items() if not k.startswith("_")}


def nf4_linear(bnb, torch, w):
    out_f, in_f = w.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                            quant_type="nf4", device="meta")
    p = bnb.nn.Params4bit(w, requires_grad=False, blocksize=64, compress_statistics=True, quant_type="nf4",
                          module=lin)
    if p.quant_state is None:
        p = p._quantize("cpu")
    if p.quant_state is None:
        raise RuntimeError("bitsandbytes did not quantize the weight on the CPU")
    lin.weight = p
    return lin


def build_model(name, base, torch, seed):
    import transformers
    cfg = config_dict(name)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config.use_cache = False
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    if base == "fp32":
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        # Built on the meta device, each block linear quantized from random fp32 values one at a time, so
        # the fp32 copy of the linears never exists at once (as from_pretrained(load_in_4bit) loads).
        from accelerate import init_empty_weights
        import bitsandbytes as bnb
        with init_empty_weights(include_buffers=False):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if child_name in LORA_TARGETS and isinstance(child, torch.nn.Linear):
                    w = torch.randn(child.out_features, child.in_features) * 0.02
                    lin = nf4_linear(bnb, torch, w)
                    if child.bias is not None:  # Qwen2's q/k/v biases stay fp32
                        lin.bias = torch.nn.Parameter(torch.zeros(child.out_features), requires_grad=False)
                    setattr(module, child_name, lin)
        for module in model.modules():
            for pname, p in list(module.named_parameters(recurse=False)):
                if p.device.type == "meta":
                    t = (torch.ones(p.shape) if "norm" in type(module).__name__.lower()
                         else torch.randn(p.shape) * 0.02)
                    module._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)
        if config.tie_word_embeddings:
            model.tie_weights()
        model.is_loaded_in_4bit = True
    return model


def train(args):
    import torch
    from peft import LoraConfig, get_peft_model
    torch.set_num_threads(args.threads)
    model = build_model(args.train, args.base, torch, args.seed)
    model.train()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=list(LORA_TARGETS),
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    times, cpu_times, losses = [], [], []
    for i in range(args.warmup + args.steps):
        t, c = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
        losses.append(float(loss.detach()))
    step = statistics.median(times)
    return dict(side="hf-" + args.base, model=args.train, seq=args.seq, micro_batch=args.batch,
                threads=torch.get_num_threads(), checkpointing=args.checkpointing, steps=args.steps,
                step_s_median=step, tokens_per_s=args.batch * args.seq / step,
                cpu_s_median=statistics.median(cpu_times), peak_rss_bytes=peak_rss_bytes(),
                loss_first=losses[0], loss_last=losses[-1])


def generate(args):
    from llama_cpp import Llama
    llm = Llama(model_path=args.generate, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=8 + args.tokens + 8, n_batch=8 + args.tokens + 8, logits_all=True, verbose=False)
    vocab = llm.n_vocab()
    prompt = [(i * 7919 + 13) % vocab for i in range(8)]  # the same ids as bench_cpu_engine --generate
    llm.reset()
    llm.eval(prompt)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(args.tokens):
        logits = llm.scores[llm.n_tokens - 1]
        llm.eval([int(logits.argmax())])
    sec, cpu = time.perf_counter() - t, time.process_time() - c
    return dict(side="llama.cpp", generate=args.generate, tokens=args.tokens, threads=args.threads,
                tokens_per_s=args.tokens / sec, cpu_s=cpu, peak_rss_bytes=peak_rss_bytes())


def gemm_ceiling(args):
    import torch
    torch.set_num_threads(args.threads)
    n = args.size
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = best_cpu = 1e30
    for _ in range(5):
        t, c = time.perf_counter(), time.process_time()
        a @ b
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.process_time() - c)
    return dict(side="torch", gemm="torch.matmul fp32", size=n, threads=torch.get_num_threads(),
                gflops=2.0 * n ** 3 / best / 1e9, gflop_per_cpu_s=2.0 * n ** 3 / best_cpu / 1e9)


def gib(b):
    return b / 2 ** 30


def table(path):
    """The comparison table from the JSON lines both sides printed (one object per line; others skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    ceiling = max([r["gflops"] for r in rows if "gflops" in r] or [0.0])
    cpu_ceiling = max([r.get("gflop_per_cpu_s", 0.0) for r in rows if "gflops" in r] or [0.0])
    for r in rows:
        if "gflops" in r:
            print("fp32 GEMM ceiling: %s %d^3, %d threads: %.1f GFLOP/s, %.1f GFLOP per CPU-second" % (
                r["gemm"], r["size"], r["threads"], r["gflops"], r.get("gflop_per_cpu_s", 0.0)))
    print("CPU MFU = useful GFLOP/s / %.1f (the higher ceiling); useful FLOPs = 4 x linear params x tokens + "
          "causal attention (hf_baseline.useful_flops_per_token). tokens/CPU-s: per second of the process's CPU "
          "time (all threads, user + system), steadier than wall time on a shared machine; MFU per CPU-s = useful "
          "GFLOP per CPU-second / %.1f, the GEMM's per CPU-second" % (ceiling, cpu_ceiling))
    train_rows = [r for r in rows if "step_s_median" in r]
    keys = []
    for r in train_rows:
        if (r["model"], r["seq"]) not in keys:
            keys.append((r["model"], r["seq"]))
    hdr = ("model", "seq x B", "side", "ckpt", "tokens/s", "tokens/CPU-s", "peak RSS GiB", "plan GiB",
           "useful GFLOP/s", "CPU MFU", "MFU per CPU-s", "qlora tok/s ratio", "qlora tok/CPU-s ratio",
           "qlora RSS ratio")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for model, seq in keys:
        cfg = config_dict(model)
        cfg.pop("model_type")
        flops = useful_flops_per_token(cfg, seq)
        group = [r for r in train_rows if (r["model"], r["seq"]) == (model, seq)]
        ours = next((r for r in group if r["side"] == "qlora"), None)
        for r in group:
            gf = flops * r["tokens_per_s"] / 1e9
            mfu = "%.0f%%" % (100 * gf / ceiling) if ceiling else "n/a"
            plan = "%.2f" % gib(r["planned_bytes"]) if "planned_bytes" in r else ""
            tokens = seq * r["micro_batch"]
            ratio = cratio = rss = ""
            if ours is not None and r is not ours:
                ratio = "%.2fx" % (ours["tokens_per_s"] / r["tokens_per_s"])
                cratio = "%.2fx" % (r["cpu_s_median"] / ours["cpu_s_median"])
                rss = "%.2fx" % (ours["peak_rss_bytes"] / r["peak_rss_bytes"])
            # Useful FLOPs per CPU-second over the GEMM's FLOPs per CPU-second: the MFU a machine of its own
            # would show if nothing else changed (load takes CPU-seconds from neither).
            cmfu = ("%.0f%%" % (100 * flops * tokens / r["cpu_s_median"] / 1e9 / cpu_ceiling)
                    if cpu_ceiling else "n/a")
            print("| %s | %d x %d | %s | %s | %.1f | %.1f | %.2f | %s | %.1f | %s | %s | %s | %s | %s |" % (
                model, seq, r["micro_batch"], r["side"], "on" if r["checkpointing"] else "off", r["tokens_per_s"],
                tokens / r["cpu_s_median"], gib(r["peak_rss_bytes"]), plan, gf, mfu, cmfu, ratio, cratio, rss))
    gen = [r for r in rows if "generate" in r]
    if gen:
        print("\nbatch-1 greedy generation (same GGUF, same 8-token prompt)")
        print("| file | side | threads | tokens | tokens/s | tokens/CPU-s | peak RSS GiB | qlora / llama.cpp tok/s |"
              " tok/CPU-s |")
        print("|---|---|---|---|---|---|---|---|---|")
        ours = next((r for r in gen if r["side"] == "qlora"), None)
        for r in gen:
            ratio = cratio = ""
            if ours is not None and r is not ours:
                ratio = "%.2fx" % (ours["tokens_per_s"] / r["tokens_per_s"])
                cratio = "%.2fx" % (r["cpu_s"] / ours["cpu_s"])
            print("| %s | %s | %d | %d | %.1f | %.1f | %.2f | %s | %s |" % (
                os.path.basename(r["generate"]), r["side"], r["threads"], r["tokens"], r["tokens_per_s"],
                r["tokens"] / r["cpu_s"], gib(r["peak_rss_bytes"]), ratio, cratio))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", metavar="MODEL", help="a cpu_models entry of bench/shapes.json")
    p.add_argument("--base", choices=("fp32", "nf4"), default="fp32")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant)")
    p.add_argument("--generate", metavar="GGUF")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--gemm-ceiling", action="store_true")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", metavar="JSONL", help="print the comparison table of a file of JSON lines")
    args = p.parse_args()
    if args.table:
        table(args.table)
        return
    if args.gemm_ceiling:
        print(json.dumps(gemm_ceiling(args)), flush=True)
    if args.train:
        print(json.dumps(train(args)), flush=True)
    if args.generate:
        print(json.dumps(generate(args)), flush=True)


if __name__ == "__main__":
    main()
