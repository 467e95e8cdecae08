"""
What does each --optimizer cost per step, next to the forward and backward it follows?

    python bench/bench_optim.py                                       # the cpu-proxy model, on CPU
    python bench/bench_optim.py --n_layer 12 --n_head 12 --n_embd 768 --seq_len 1024 --micro_batch_size 8 --device cuda
    torchrun --nproc-per-node=2 bench/bench_optim.py --kinds muon    # the matrix work split over 2 ranks

Builds the model from train_gpt2.py's flags, runs one forward+backward to have gradients, then times
optimizer.step() (plus the renormalisation that follows it in the loop) for adamw, muon, sphere and
manifold_muon (or --kinds) on the same gradients, and forward+backward itself. Prints ms per call (median
of --iters, after --warmup) and the optimizer's share of a training step of one micro-step. Under torchrun
every rank has the same gradients (as after DDP's all-reduce) and rank 0 prints.
"""

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distributed  # noqa: E402
import train_gpt2  # noqa: E402
from model import GPT  # noqa: E402
from optim import MATRIX_KINDS, build_optimizer  # noqa: E402

PROXY = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "256", "--seq_len", "256",
         "--micro_batch_size", "16", "--device", "cpu"]  # ablate.py's cpu-proxy model


def median_ms(fn, device, warmup, iters):
    times = []
    for i in range(warmup + iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--kinds", default=",".join(("adamw", *MATRIX_KINDS)), help="the optimizers to time")
    args, rest = p.parse_known_args(argv)
    cfg, model_cfg = train_gpt2.parse_args(rest or PROXY)
    rank, _, world_size, device = distributed.setup_distributed(cfg)  # never a silent fallback to the CPU
    say = print if rank == 0 else lambda *a: None
    device_type = device.split(":")[0]
    ptdtype = distributed.resolve_dtype(cfg, device_type)
    autocast = torch.autocast(device_type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device)
    x = torch.randint(0, model_cfg.vocab_size, (cfg.micro_batch_size, cfg.seq_len), device=device)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        with autocast:
            _, loss = model(x, x)
        loss.backward()

    fb = median_ms(forward_backward, device, args.warmup, args.iters)
    ranks = f", {world_size} ranks" if world_size > 1 else ""
    say(f"{model.num_params(non_embedding=False) / 1e6:.2f}M parameters, {cfg.micro_batch_size}×{cfg.seq_len} "
        f"tokens, {device}, {str(ptdtype).removeprefix('torch.')}{ranks}")
    say(f"forward+backward: {fb:8.1f} ms")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for kind in args.kinds.split(","):
        model.load_state_dict(state)  # every optimizer starts from the same weights and gradients
        optimizer = build_optimizer(model, replace(cfg, optimizer=kind), device_type)

        def step():
            optimizer.step()
            model.renormalize_()

        ms = median_ms(step, device, args.warmup, args.iters)
        say(f"{kind:>14} step: {ms:8.1f} ms  ({ms / (fb + ms) * 100:4.1f}% of forward+backward+step)")
    if world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
