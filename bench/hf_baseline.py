#!/usr/bin/env python3
"""The baseline qlora's GPU training step is measured against: one QLoRA training step with
transformers + PEFT (+ bitsandbytes 4-bit NF4 with double quantization when `import bitsandbytes`
works; otherwise a bf16 base, labelled as such) on Llama-shaped models with RANDOM weights.

Nothing is downloaded: each LlamaConfig comes from bench/shapes.json (the published config.json values,
shared with bench/bench_cuda_train), the model skeleton is built on the meta
device, and each of the 7 block linears is given random bf16 weights on the GPU, one at a time, and
quantized there at once, so a 70B shape never needs its 140 GB of bf16 weights.

Step: LoRA r=16 (alpha 16, no dropout) on q,k,v,o,gate,up,down; gradient checkpointing; seq 2048;
micro-batch 1; bf16 autocast (what Trainer(bf16=True) does); grad-norm clip 0.3; paged AdamW 32-bit
(bitsandbytes) or torch AdamW (fused) without it. Measured: tokens/s over timed steps after warm-up
(torch.cuda.synchronize around each step; median step time), peak memory (max_memory_allocated and
max_memory_reserved since the model was built, weights included).

Output: a table, and with --json FILE the same figures as JSON (docs/benchmarks.md, "GPU benchmarks:
how to run", gives the schema bench/gpu_bench.sh reads). `--help` works without torch installed.
"""
import argparse
import datetime
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time
import traceback

# The shapes and GPU peaks, shared with bench/bench_cuda_train (C++): each model's published
# config.json values, and the dense bf16 tensor-core peaks (TFLOP/s, fp32 accumulation, no sparsity)
# matched as a substring of the device name, first match first. Other GPUs get no MFU unless
# --peak-tflops or PEAK_TFLOPS gives their peak.
SHAPES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes.json")
# The config.json keys that shape the model (the rest, such as token ids or torch_dtype, do not).
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta",
               "rope_scaling", "rms_norm_eps", "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act")


def load_shapes(path=SHAPES_FILE):
    with open(path) as f:
        shapes = json.load(f)
    # null means "absent" (transformers' default), as qlora's config parser reads it.
    models = {name: {k: v for k, v in cfg.items() if k in CONFIG_KEYS and v is not None}
              for name, cfg in shapes["models"].items()}
    peaks = tuple((str(name), float(tflops)) for name, tflops in shapes.get("gpu_peak_bf16_tflops", []))
    return models, peaks


MODELS, PEAK_BF16_TFLOPS = load_shapes()
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args():
    p = argparse.ArgumentParser(
        description="transformers + PEFT (+ bitsandbytes) QLoRA training-step baseline on random "
                    "Llama-shaped weights (no download).")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated, from: %s (default: all)" % ", ".join(MODELS))
    p.add_argument("--seq", type=int, help="tokens per row (default 2048; 512 with --quick)")
    p.add_argument("--micro-batch", type=int, default=1, help="rows per step (default 1)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16; alpha = rank)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; 1 with --quick)")
    p.add_argument("--steps", type=int, help="timed steps (default 10; 2 with --quick)")
    p.add_argument("--layers", type=int, default=0,
                   help="override the number of decoder layers (0 = the model's own; for smoke runs)")
    p.add_argument("--no-bnb", action="store_true", help="bf16 base even when bitsandbytes imports")
    p.add_argument("--kbit-prepare", action="store_true",
                   help="call peft.prepare_model_for_kbit_training (the QLoRA notebooks do; it upcasts "
                        "embeddings, norms and lm_head to fp32: slower, more memory)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="dense bf16 peak of the GPU for MFU (default: PEAK_TFLOPS, then the table in "
                        "bench/shapes.json)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 layers, seq 512, 1 warm-up and 2 timed steps (each unless given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: check this script against the installed libraries on a machine without a GPU "
                        "(use with --quick --layers 1; bf16 base, times meaningless)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = p.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            p.error("unknown model %r (known: %s)" % (m, ", ".join(MODELS)))
    defaults = dict(seq=512, warmup=1, steps=2) if args.quick else dict(seq=2048, warmup=3, steps=10)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick and args.layers == 0:
        args.layers = 2
    if args.seq < 2 or args.micro_batch < 1 or args.rank < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--seq >= 2, --micro-batch >= 1, --rank >= 1, --steps >= 1 and --warmup >= 0 are required")
    return args


def model_config(name, args):
    cfg = dict(MODELS[name])
    if args.layers > 0:
        cfg["num_hidden_layers"] = args.layers
    return cfg


def head_dim(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def linear_params(cfg):
    """Weights of the matmuls of one forward pass: 7 block linears per layer plus lm_head."""
    C, I, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    D = head_dim(cfg)
    q, kv = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    return L * (C * q + 2 * C * kv + q * C + 3 * C * I) + V * C


def useful_flops_per_token(cfg, seq):
    """The project's MFU numerator (docs/benchmarks.md): forward + input-gradient passes of every
    linear (2 + 2 flops per weight; the base is frozen, so no weight-gradient pass), plus causal
    attention: forward QK^T and PV over the T(T+1)/2 visible pairs (2 matmuls) and backward dV, dP,
    dQ, dK (4 matmuls), 2 flops per multiply-add: 6 * 2 * D * H * T(T+1)/2 per layer and sequence.
    LoRA and recomputation (checkpointing) are not counted."""
    L, H, D = cfg["num_hidden_layers"], cfg["num_attention_heads"], head_dim(cfg)
    attention = 6.0 * D * H * L * (seq + 1)  # = 6 * 2 * D * H * L * T(T+1)/2 / T
    return 4.0 * linear_params(cfg) + attention


def peak_tflops(name, override):
    """--peak-tflops, then the PEAK_TFLOPS environment variable, then the table (as bench_cuda_train)."""
    if override > 0:
        return override
    env = os.environ.get("PEAK_TFLOPS", "")
    if env:
        try:
            value = float(env)
        except ValueError:
            value = 0.0
        if value > 0:
            return value
        sys.exit("hf_baseline: PEAK_TFLOPS: expected a positive number, got %r" % env)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def supported_kwargs(fn, **kwargs):
    """Only the keyword arguments `fn` takes (bitsandbytes' signatures changed between releases)."""
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def nf4_linear(bnb, torch, w):
    """A bitsandbytes Linear4bit (NF4, block 64, double-quantized scales, bf16 compute) holding w."""
    out_f, in_f = w.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, **supported_kwargs(
        bnb.nn.Linear4bit.__init__, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
        device="meta"))
    make = lambda data: bnb.nn.Params4bit(data, requires_grad=False, **supported_kwargs(
        bnb.nn.Params4bit.__new__, blocksize=64, compress_statistics=True, quant_type="nf4", module=lin))
    p = make(w).to("cuda")
    if getattr(p, "quant_state", None) is None:  # releases before 0.43 quantize only on a CPU -> GPU move
        p = make(w.cpu()).to("cuda")
    if getattr(p, "quant_state", None) is None:
        raise RuntimeError("bitsandbytes did not quantize the weight (no quant_state)")
    lin.weight = p
    return lin


def build_model(name, args, torch, bnb):
    """Random-weight Llama of shape `name` on the GPU, 4-bit block linears when bnb is not None."""
    import transformers
    from accelerate import init_empty_weights  # a dependency of peft

    cfg = model_config(name, args)
    extra = dict(use_cache=False, attn_implementation="sdpa")
    try:
        config = transformers.LlamaConfig(**cfg, **extra)
    except (ValueError, KeyError, TypeError):  # transformers < 4.43 rejects llama3 rope_scaling: cost unchanged
        cfg.pop("rope_scaling", None)
        config = transformers.LlamaConfig(**cfg, **extra)
    # Parameters on the meta device (no memory); buffers (the rotary inv_freq) real, on the CPU.
    with init_empty_weights(include_buffers=False):
        model = transformers.LlamaForCausalLM(config)

    dev = args.device
    gen = torch.Generator(device=dev)
    gen.manual_seed(args.seed)

    def randn(*shape):
        return torch.empty(*shape, device=dev, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in LORA_TARGETS and isinstance(child, torch.nn.Linear):
                w = randn(child.out_features, child.in_features)
                if bnb is not None:
                    setattr(module, child_name, nf4_linear(bnb, torch, w))
                else:
                    child.weight = torch.nn.Parameter(w, requires_grad=False)
                del w
    # The rest: embeddings, lm_head (bf16, random), RMSNorm weights (ones), buffers to the GPU.
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.device.type == "meta":
                t = (torch.ones(p.shape, device=dev, dtype=torch.bfloat16)
                     if "norm" in type(module).__name__.lower() else randn(*p.shape))
                module._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)
        for bname, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.device.type != dev:
                module._buffers[bname] = b.to(dev)
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError("parameters left on the meta device: %s" % ", ".join(left[:5]))
    # What from_pretrained(quantization_config=4-bit) sets: PEFT picks its bitsandbytes LoRA layer from it.
    model.is_loaded_in_4bit = bnb is not None
    if dev == "cuda":
        torch.cuda.empty_cache()
    return model, cfg


def base_result(name, args):
    """The fields every result has, measured or skipped."""
    cfg = model_config(name, args)
    return dict(model=name, layers=cfg["num_hidden_layers"], seq=args.seq, micro_batch=args.micro_batch,
                useful_flops_per_token=useful_flops_per_token(cfg, args.seq))


def run_model(name, args, torch, bnb, peak):
    from peft import LoraConfig, get_peft_model

    cfg = model_config(name, args)
    result = base_result(name, args)
    gpu = args.device == "cuda"
    if bnb is None and gpu:
        # bf16 weights + headroom for activations, LoRA state and the (T,V) logits.
        n_params = linear_params(cfg) + cfg["vocab_size"] * cfg["hidden_size"]
        need = 2 * n_params + (8 << 30)
        free, _ = torch.cuda.mem_get_info()
        if need > free:
            result.update(status="skipped", reason="a bf16 base needs ~%.0f GiB, %.0f GiB free; "
                          "bitsandbytes is required for this shape" % (need / 2**30, free / 2**30))
            return result

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, cfg = build_model(name, args, torch, bnb)
    build_s = time.perf_counter() - t0
    model_bytes = torch.cuda.memory_allocated() if gpu else 0
    model.train()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name goes in v6
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.kbit_prepare:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.enable_input_require_grads()
    lora = LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, bias="none",
                      target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if bnb is not None:
        opt = bnb.optim.PagedAdamW(trainable, lr=2e-4, weight_decay=0.0)  # HF's "paged_adamw_32bit"
        opt_name = "bitsandbytes PagedAdamW (32-bit)"
    else:
        opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0, fused=gpu)
        opt_name = "torch AdamW" + (" (fused)" if gpu else "")

    gen = torch.Generator(device=args.device)
    gen.manual_seed(args.seed + 1)
    ids = torch.randint(0, cfg["vocab_size"], (args.micro_batch, args.seq), device=args.device, generator=gen)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    losses, times = [], []
    for i in range(args.warmup + args.steps):
        sync()
        t = time.perf_counter()
        loss = step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
    step_s = statistics.median(times)
    tokens = args.micro_batch * args.seq
    flops = result["useful_flops_per_token"]
    result.update(
        status="ok", optimizer=opt_name, build_s=round(build_s, 2),
        linear_params=linear_params(cfg), lora_params=sum(p.numel() for p in trainable),
        tokens_per_step=tokens, step_s=times, step_s_median=step_s, tokens_per_s=tokens / step_s,
        useful_tflops=flops * tokens / step_s / 1e12,
        mfu=(flops * tokens / step_s / 1e12 / peak) if peak else None,
        model_bytes=model_bytes, peak_allocated_bytes=torch.cuda.max_memory_allocated() if gpu else 0,
        peak_reserved_bytes=torch.cuda.max_memory_reserved() if gpu else 0, loss_first=losses[0],
        loss_last=losses[-1])
    del model, opt, trainable, ids
    return result


def print_table(report):
    print("\nHF baseline: transformers + PEFT, base %s, seq %d x micro-batch %d, LoRA r %d, checkpointing"
          % (report["base"], report["settings"]["seq"], report["settings"]["micro_batch"],
             report["settings"]["rank"]))
    print("GPU: %s" % report["gpu"])
    hdr = ("model", "layers", "tokens/s", "step s", "TFLOP/s", "MFU", "peak alloc GiB", "peak resv GiB")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in report["results"]:
        if r["status"] != "ok":
            print("| %s | %d | %s: %s |" % (r["model"], r["layers"], r["status"], r.get("reason", "")))
            continue
        mfu = "%.1f%%" % (100 * r["mfu"]) if r["mfu"] is not None else "n/a"
        print("| %s | %d | %.0f | %.3f | %.1f | %s | %.1f | %.1f |" % (
            r["model"], r["layers"], r["tokens_per_s"], r["step_s_median"], r["useful_tflops"], mfu,
            r["peak_allocated_bytes"] / 2**30, r["peak_reserved_bytes"] / 2**30))


def main():
    args = parse_args()
    try:
        import torch
    except ImportError as e:
        sys.exit("hf_baseline: PyTorch is not installed (%s)" % e)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("hf_baseline: no CUDA GPU visible to PyTorch")
    import peft
    import transformers

    bnb, base_note = None, ""
    if args.no_bnb or args.device != "cuda":
        base_note = "bitsandbytes not used (%s)" % ("--no-bnb" if args.no_bnb else "--device cpu")
    else:
        try:
            import bitsandbytes as bnb
        except Exception as e:  # ImportError, or a wheel that fails to load its CUDA library
            bnb, base_note = None, "bitsandbytes not importable: %s: %s" % (type(e).__name__, e)
    base = "nf4 double-quant (bitsandbytes %s)" % bnb.__version__ if bnb is not None else "bf16"
    if base_note:
        print("note: base weights in bf16 (%s)" % base_note)

    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (a smoke run: no figures)"
    peak = peak_tflops(gpu, args.peak_tflops)
    report = dict(
        tool="hf_baseline", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu=gpu, peak_bf16_tflops=peak, base=base, base_note=base_note,
        versions=dict(python=platform.python_version(), torch=torch.__version__,
                      transformers=transformers.__version__, peft=peft.__version__,
                      bitsandbytes=bnb.__version__ if bnb is not None else None, cuda=torch.version.cuda),
        settings=dict(seq=args.seq, micro_batch=args.micro_batch, rank=args.rank, alpha=args.rank,
                      lora_dropout=0.0, targets=list(LORA_TARGETS), checkpointing=True,
                      kbit_prepare=args.kbit_prepare, warmup=args.warmup, steps=args.steps,
                      autocast="bf16", max_grad_norm=0.3),
        results=[])
    for name in args.models:
        print("%s: building and training..." % name, flush=True)
        try:
            r = run_model(name, args, torch, bnb, peak)
        except torch.cuda.OutOfMemoryError as e:
            r = dict(base_result(name, args), status="skipped",
                     reason="out of GPU memory: %s" % str(e).splitlines()[0])
        except Exception as e:  # a library version this script does not handle: report it, go on
            traceback.print_exc()
            r = dict(base_result(name, args), status="failed", reason="%s: %s" % (type(e).__name__, e))
        report["results"].append(r)
        if r["status"] == "ok":
            print("%s: %.0f tokens/s, peak %.1f GiB allocated" % (name, r["tokens_per_s"],
                                                                 r["peak_allocated_bytes"] / 2**30))
        else:
            print("%s: %s: %s" % (name, r["status"], r["reason"]))
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print("wrote %s" % args.json)
    if any(r["status"] == "failed" for r in report["results"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
