"""
Time HellaSwag scoring: the batched hellaswag.evaluate against the per-example reference
(4 unpadded forwards per example), on the same examples, and check both give the same counts.

    python bench/bench_hellaswag.py --size tiny --n 64     # random model, synthetic examples: works offline
    python bench/bench_hellaswag.py --size 124M --n 64
    python bench/bench_hellaswag.py --model gpt2 --data_file data/hellaswag/hellaswag_val.jsonl --n 1000
"""

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts live one level up
import hellaswag
from distributed import default_autocast_dtype
from model import GPT, GPTConfig

SIZES = {"tiny": GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=64), "124M": GPTConfig()}
WORDS = ("the a man woman child dog ball water kitchen knife onion bread slowly carefully then he she they "
         "is are runs picks up puts down into onto over table garden bike ladder paint brush wall window "
         "door opens closes smiles jumps laughs cuts washes throws catches rides camera shows").split()


def synthetic_examples(n, seed=0):
    """n examples in rowanz/hellaswag's shape: contexts of 10-60 words, endings of 5-30 words."""
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"ctx": words(10, 60), "endings": [words(5, 30) + "." for _ in range(4)], "label": rng.randrange(4)}
            for _ in range(n)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=SIZES, help="random model to build when --model is not given")
    parser.add_argument("--model", help="anything hellaswag.py --model takes (default: a random --size model)")
    parser.add_argument("--data_file", help="a hellaswag jsonl (default: synthetic examples)")
    parser.add_argument("--n", type=int, default=64, help="number of examples")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    device = hellaswag.default_device() if args.device == "auto" else args.device
    torch.manual_seed(0)
    model = hellaswag.load_model(args.model, device) if args.model else GPT(SIZES[args.size]).to(device)
    examples = hellaswag.load_examples(args.data_file, args.n) if args.data_file else synthetic_examples(args.n)
    autocast_dtype = default_autocast_dtype(device)
    print(f"{args.model or 'random ' + args.size} ({model.num_params() / 1e6:.1f}M params), {len(examples)} examples, "
          f"{device}, {autocast_dtype or torch.float32}, {torch.get_num_threads()} threads")

    results = {}
    for name, kwargs in [("batched", {"batch_size": args.batch_size}), ("per-example", {"reference": True})]:
        hellaswag.evaluate(model, examples[:2], device=device, autocast_dtype=autocast_dtype, **kwargs)  # warm up
        t0 = time.perf_counter()
        result = hellaswag.evaluate(model, examples, device=device, autocast_dtype=autocast_dtype, **kwargs)
        seconds = time.perf_counter() - t0  # evaluate ends in .tolist(), which waits for the GPU
        results[name] = (result, len(examples) / seconds)
        label = f"batched (batch_size {args.batch_size})" if name == "batched" else "per-example reference"
        print(f"{label:28s} {len(examples) / seconds:8.1f} examples/s  "
              f"acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}")
    (batched, batched_speed), (reference, reference_speed) = results["batched"], results["per-example"]
    same = "same counts" if batched == reference else "COUNTS DIFFER (near-ties in low precision?)"
    print(f"speedup {batched_speed / reference_speed:.1f}x, {same}")


if __name__ == "__main__":
    main()
