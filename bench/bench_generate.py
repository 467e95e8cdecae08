"""
How much faster does GPT.generate sample with its KV cache than by re-running the whole context for
every new token?

    python bench/bench_generate.py                                   # GPT-2 124M, random init, best device
    python bench/bench_generate.py --batch_size 8 --max_new_tokens 512
    python bench/bench_generate.py --pos rope --n_kv_head 4 --window 128 --sinks   # any GPTConfig field
    python bench/bench_generate.py --n_layer 2 --n_head 4 --n_embd 64 --block_size 64 --device cpu

Both paths decode the same random prompt greedily (temperature 0) from the same random weights; the time
includes the prompt's forward (the prefill). Prints tokens/s and ms per token of each, the speedup, and
whether the two produced the same tokens: in fp32 they do; under bf16 autocast a random model's logits
are so close to one another that rounding can flip an argmax, after which the sequences part.
"""

import argparse
import os
import sys
import time
from dataclasses import fields

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts live one level up
import distributed  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(model, idx, max_new_tokens, use_cache, autocast):
    """(the tokens, seconds) of one greedy generate call."""
    sync(str(idx.device))
    t0 = time.perf_counter()
    with autocast:
        out = model.generate(idx, max_new_tokens, temperature=0, use_cache=use_cache)
    sync(str(idx.device))
    return out, time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--prompt_len", type=int, default=8, help="tokens in the (random) prompt")
    parser.add_argument("--batch_size", type=int, default=1, help="sequences generated at once")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="autocast dtype; auto: bfloat16 on GPUs that have it fast (as training samples), else fp32")
    parser.add_argument("--warmup_tokens", type=int, default=4, help="an untimed short generate with each path first")
    parser.add_argument("--seed", type=int, default=0)
    group = parser.add_argument_group("GPTConfig (default: GPT-2 124M)")
    for f in fields(GPTConfig):
        if f.type is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            group.add_argument(f"--{f.name}", type=f.type, default=f.default, metavar=f.type.__name__.upper())
    args = parser.parse_args(argv)
    model_cfg = GPTConfig(**{f.name: getattr(args, f.name) for f in fields(GPTConfig)})
    if args.prompt_len < 1 or args.prompt_len > model_cfg.block_size:
        parser.error(f"--prompt_len must be between 1 and block_size ({model_cfg.block_size})")

    device = distributed.default_device(args.device)  # never a silent fallback to the CPU
    device_type = device.split(":")[0]
    ptdtype = (getattr(torch, args.dtype) if args.dtype != "auto"
               else distributed.default_autocast_dtype(device) or torch.float32)
    autocast = distributed.autocast_for(device_type, ptdtype)
    torch.manual_seed(args.seed)
    model = GPT(model_cfg).to(device).eval()
    idx = torch.randint(0, model_cfg.vocab_size, (args.batch_size, args.prompt_len), device=device)

    results = {}
    for use_cache in (True, False):
        timed_generate(model, idx, args.warmup_tokens, use_cache, autocast)
        results[use_cache] = timed_generate(model, idx, args.max_new_tokens, use_cache, autocast)

    name = torch.cuda.get_device_name(device) if device_type == "cuda" else f"{device} ({torch.get_num_threads()} threads)"
    print(f"{name}, torch {torch.__version__}, {str(ptdtype).removeprefix('torch.')}")
    print(f"model: {model_cfg.n_layer} layers, {model_cfg.n_embd} wide, {model_cfg.n_head} heads "
          f"({model_cfg.kv_heads} kv heads), vocab {model_cfg.padded_vocab_size}, block_size {model_cfg.block_size}, "
          f"{model.num_params(non_embedding=False) / 1e6:.1f}M parameters; "
          f"{args.batch_size} × ({args.prompt_len}-token prompt + {args.max_new_tokens} new tokens)")
    new_tokens = args.batch_size * args.max_new_tokens
    for use_cache, label in ((True, "with cache"), (False, "without cache")):
        _, seconds = results[use_cache]
        print(f"{label:14s} {new_tokens / seconds:10,.1f} tokens/s | {1000 * seconds / args.max_new_tokens:8.2f} "
              f"ms/token | {seconds:8.3f} s")
    print(f"cache speedup  {results[False][1] / results[True][1]:.2f}×")
    cached, uncached = results[True][0], results[False][0]
    differ = (cached != uncached).any(dim=0).nonzero()
    same = "yes" if not len(differ) else f"no, from new token {differ[0].item() - args.prompt_len} on"
    print(f"same tokens    {same}")


if __name__ == "__main__":
    main()
