"""
How fast is a training step, and how much does our loop cost over the bare minimum?

    python bench/bench_train.py                                   # GPT-2 124M on the best device here
    python bench/bench_train.py --compile --micro_batch_size 16   # any train_gpt2.py flag passes through
    python bench/bench_train.py --n_layer 4 --n_embd 256 --n_head 4 --seq_len 256 --micro_batch_size 8 --device cpu

Four measurements of the same model, batch and precision:
1. train_gpt2.train() itself, on a shard of random tokens, evals and checkpoints off: the wall time
   between consecutive steps in its metrics.jsonl, after warm-up. Logging, the loss all-reduce and the
   data loader are all in it: it is the real loop, not a copy.
2. a bare loop: forward, backward, clip, AdamW step, nothing else.
3. the output layer and loss alone, forward+backward on the micro batch's hidden states: model.py's
   chunked linear_cross_entropy against the plain F.linear + slice + F.cross_entropy (time, peak memory).
4. forward+backward of our model.py against Hugging Face's GPT2LMHeadModel of the same shape, each with
   its loss (HF: labels=).
Prints tokens/s, ms/step, MFU (against the device's dense bf16 peak) and peak memory.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distributed  # noqa: E402
import train_gpt2  # noqa: E402
from data import write_shard  # noqa: E402
from model import GPT, linear_cross_entropy  # noqa: E402


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_gb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the whole process


def bench_loop(cfg, model_cfg, steps, warmup, tmp):
    """Run train_gpt2.train for warmup + steps steps; seconds per step from its own log."""
    cfg.max_steps = warmup + steps
    cfg.val_every = cfg.hellaswag_every = cfg.sample_every = cfg.checkpoint_every = 0
    cfg.checkpoint_every_minutes = 0
    cfg.log_dir, cfg.run_name = os.path.join(tmp, "logs"), "bench"
    cfg.checkpoint_dir = os.path.join(tmp, "ckpt")
    cfg.resume = "none"
    train_gpt2.train(cfg, model_cfg)
    with open(os.path.join(cfg.log_dir, "bench", "metrics.jsonl")) as f:
        elapsed = [r["elapsed_s"] for r in map(json.loads, f) if r["event"] == "train"]
    # from the end of the last warm-up step to the end of the last step: everything the loop does
    return (elapsed[-1] - elapsed[warmup - 1]) / steps


def bench_bare(cfg, model_cfg, device, ptdtype, steps, warmup):
    """The least a training step can do: accum × (forward, backward), clip, AdamW step."""
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device)
    opt = model.configure_optimizers(cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), device.split(":")[0])
    step_model = torch.compile(model) if cfg.compile else model
    autocast = torch.autocast(device.split(":")[0], dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
    accum = cfg.total_batch_size // (cfg.micro_batch_size * cfg.seq_len)
    x = torch.randint(0, model_cfg.vocab_size, (cfg.micro_batch_size, cfg.seq_len), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        for _ in range(accum):
            with autocast:
                _, loss = step_model(x, x)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return (time.perf_counter() - t0) / steps


def timed(fn, device, iters, warmup):
    """Seconds per call of fn, after warmup calls."""
    for i in range(warmup + iters):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def peak_bytes(fn, device):
    """The most memory fn's tensors hold at once: CUDA's allocator, or torch's MemTracker on the CPU."""
    if device.startswith("cuda"):
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() - before
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        fn()
    return tracker.get_tracker_snapshot("peak")[torch.device(device)]["Total"]


def plain_loss(x, w, targets, vocab_size):
    """What model.py did before linear_cross_entropy: the whole logits, sliced to the vocabulary, in fp32."""
    logits = torch.nn.functional.linear(x, w)[..., :vocab_size].float()
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def bench_loss(cfg, model_cfg, device, ptdtype, iters, warmup):
    """(fused s, plain s, fused peak bytes, plain peak bytes) for forward+backward of the output layer and loss
    on one micro batch of hidden states."""
    autocast = torch.autocast(device.split(":")[0], dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
    rows = cfg.micro_batch_size * cfg.seq_len
    x = torch.randn(rows, model_cfg.n_embd, device=device, requires_grad=True)
    w = (0.02 * torch.randn(model_cfg.padded_vocab_size, model_cfg.n_embd, device=device)).requires_grad_()
    targets = torch.randint(0, model_cfg.vocab_size, (rows,), device=device)
    results = {}
    for name, loss_fn in (("fused", linear_cross_entropy), ("plain", plain_loss)):
        if cfg.compile:
            loss_fn = torch.compile(loss_fn)

        def step():
            x.grad = w.grad = None
            with autocast:
                loss = loss_fn(x, w, targets, model_cfg.vocab_size)
            loss.backward()

        results[name] = timed(step, device, iters, warmup), peak_bytes(step, device)
    return results["fused"][0], results["plain"][0], results["fused"][1], results["plain"][1]


def bench_vs_hf(cfg, model_cfg, device, ptdtype, iters, warmup):
    from transformers import GPT2Config, GPT2LMHeadModel

    autocast = torch.autocast(device.split(":")[0], dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
    x = torch.randint(0, model_cfg.vocab_size, (cfg.micro_batch_size, cfg.seq_len), device=device)
    ours = GPT(model_cfg).to(device)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=model_cfg.vocab_size, n_positions=model_cfg.block_size,
                                    n_embd=model_cfg.n_embd, n_layer=model_cfg.n_layer, n_head=model_cfg.n_head,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).to(device)
    if cfg.compile:
        ours, hf = torch.compile(ours), torch.compile(hf)

    def step(model, loss):
        with autocast:
            loss(model).backward()

    # HF shifts its labels inside (predicting x[1:] from x[:-1]); ours are given: the same work either way
    t_ours = timed(lambda: step(ours, lambda m: m(x, x)[1]), device, iters, warmup)
    t_hf = timed(lambda: step(hf, lambda m: m(x, labels=x).loss), device, iters, warmup)
    return t_ours, t_hf


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, caches)")
    parser.add_argument("--no_hf", action="store_true", help="skip the Hugging Face comparison")
    args, rest = parser.parse_known_args()
    # train_gpt2's own flags; one micro-step per step unless --total_batch_size says otherwise
    cfg, model_cfg = train_gpt2.parse_args(rest)
    if "--total_batch_size" not in " ".join(rest):
        cfg.total_batch_size = cfg.micro_batch_size * cfg.seq_len
    device = distributed.default_device(cfg.device)  # never a silent fallback to the CPU
    cfg.device = device
    device_type = device.split(":")[0]
    cfg.compile = distributed.use_compile(cfg, device_type)
    ptdtype = distributed.resolve_dtype(cfg, device_type)
    torch.set_float32_matmul_precision("high")
    tokens = cfg.total_batch_size
    peak = distributed.peak_flops_per_device(cfg, device_type)

    with tempfile.TemporaryDirectory() as tmp:
        # random tokens: speed does not depend on what they say
        n = tokens * (args.warmup + args.steps) + 1
        rng = np.random.default_rng(0)
        for name in ("bench_val_000000.bin", "bench_train_000001.bin"):
            write_shard(os.path.join(tmp, name), rng.integers(0, model_cfg.vocab_size, n))
        cfg.data_dir = tmp
        t_loop = bench_loop(cfg, model_cfg, args.steps, args.warmup, tmp)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_bare = bench_bare(cfg, model_cfg, device, ptdtype, args.steps, args.warmup)
    mem = peak_memory_gb(device)

    with torch.device("meta"):
        flops_per_token = GPT(model_cfg).flops_per_token(cfg.seq_len)
    name = torch.cuda.get_device_name() if device_type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\n{name}, torch {torch.__version__}, {str(ptdtype).removeprefix('torch.')}, compile {cfg.compile}")
    print(f"model: {model_cfg.n_layer} layers, {model_cfg.n_embd} wide, {model_cfg.n_head} heads, "
          f"vocab {model_cfg.padded_vocab_size}; step: {tokens} tokens = {cfg.micro_batch_size} × {cfg.seq_len} "
          f"× {tokens // (cfg.micro_batch_size * cfg.seq_len)} micro-steps")
    for label, t in (("train_gpt2 loop", t_loop), ("bare step", t_bare)):
        mfu = f" | MFU {flops_per_token * tokens / t / peak * 100:.1f}%" if peak else ""
        print(f"{label:16s} {t * 1000:9.1f} ms/step | {tokens / t:12,.0f} tokens/s{mfu}")
    print(f"loop / bare      {t_loop / t_bare:.3f}  (overhead {100 * (t_loop / t_bare - 1):+.1f}%)")
    print(f"peak memory      {mem:.2f} GiB" + (" (process max RSS)" if device_type == "cpu" else ""))
    t_fused, t_plain, m_fused, m_plain = bench_loss(cfg, model_cfg, device, ptdtype, args.steps, args.warmup)
    print(f"loss fused       {t_fused * 1000:9.1f} ms fwd+bwd | peak {m_fused / 2**20:8.1f} MiB  "
          f"(output layer + loss of {cfg.micro_batch_size * cfg.seq_len} rows)")
    print(f"loss plain       {t_plain * 1000:9.1f} ms fwd+bwd | peak {m_plain / 2**20:8.1f} MiB  "
          f"| fused is {t_plain / t_fused:.2f}× as fast, {m_plain / m_fused:.1f}× less memory")
    if not args.no_hf:
        t_ours, t_hf = bench_vs_hf(cfg, model_cfg, device, ptdtype, args.steps, args.warmup)
        per = cfg.micro_batch_size * cfg.seq_len
        print(f"fwd+bwd model.py {per / t_ours:12,.0f} tokens/s | HF GPT2LMHeadModel {per / t_hf:12,.0f} tokens/s"
              f" | ratio {t_hf / t_ours:.2f}")


if __name__ == "__main__":
    main()
