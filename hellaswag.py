"""
HellaSwag (Zellers et al. 2019): given a short context, pick which of 4 endings comes next.

A language model has no multiple-choice head, so each ending is scored by how well the model
predicts it after the context ("completion style", as in the GPT-3 paper and build-nanogpt):
run context + ending through the model and take the cross-entropy of the ending's tokens only.
  acc       picks the ending with the lowest *summed* loss
  acc_norm  picks the ending with the lowest *mean* loss per ending token (build-nanogpt's
            acc_norm: long endings are not penalised for having more tokens to get wrong).
            lm-evaluation-harness's acc_norm divides by the ending's length in bytes instead,
            so its numbers differ a little; ours compare with build-nanogpt's and llm.c's plots.
build-nanogpt reports acc_norm 0.2955 for OpenAI's GPT-2 124M on the 10042 validation examples.

    python hellaswag.py --model gpt2                  # downloads the val split once, to data/hellaswag/
    python hellaswag.py --model checkpoints/run1 --limit 1000
    torchrun --standalone --nproc-per-node=8 hellaswag.py --model gpt2-xl
"""

import argparse
import functools
import http.client
import json
import os
import pickle
import sys
import time
import urllib.request

import torch
import torch.distributed as dist
from torch.nn import functional as F

from checkpoint import load_model
from data import EOT, atomic_write, gpt2_tokenizer
from distributed import default_autocast_dtype, default_device

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hellaswag")

# ---------------------------------------------------------------------------
# The data


def download(split="val", cache_dir=CACHE_DIR, *, url=URL, attempts=5, backoff_s=2.0):
    """Path of hellaswag_{split}.jsonl in cache_dir, downloaded from rowanz/hellaswag if not there yet.
    Failed attempts are retried after backoff_s, 2·backoff_s, 4·backoff_s... seconds. The file is
    written atomically, so an interrupted or failed download never leaves half a file in the cache."""
    path = os.path.join(cache_dir, f"hellaswag_{split}.jsonl")
    if os.path.exists(path):
        return path
    url = url.format(split=split)
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                blob = response.read()  # raises IncompleteRead if the connection drops early
            break
        except (OSError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors
            if attempt == attempts - 1:
                raise RuntimeError(f"could not download {url} ({e}); pass --data_file with a local copy") from e
            wait = backoff_s * 2**attempt
            print(f"download of {url} failed ({e}); retrying in {wait:.0f} s", file=sys.stderr)
            time.sleep(wait)
    with atomic_write(path) as f:
        f.write(blob)
    return path


def load_examples(path, limit=None):
    """The first `limit` (default: all) examples of a rowanz/hellaswag jsonl file, as dicts."""
    examples = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if limit is not None and len(examples) == limit:
                break
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_number}: not JSON ({e})") from e
            if not isinstance(example.get("ctx"), str) or len(example.get("endings", ())) != 4 or "label" not in example:
                raise ValueError(f"{path} line {line_number}: not a HellaSwag example (needs ctx, 4 endings, label)")
            examples.append(example)
    return examples


def render(example, enc, block_size):
    """The 4 token rows of an example, each (tokens, n) where the last n tokens are the ending's.
    A row longer than block_size loses tokens from the left of its context: the ending is kept."""
    ctx = enc.encode_ordinary(example["ctx"]) or [EOT]  # an empty context: the ending follows a document break
    rows = []
    for ending in example["endings"]:
        end = enc.encode_ordinary(" " + ending)  # the space that joins ending to context belongs to the ending
        tokens = (ctx + end)[-block_size:]
        # every scored token needs at least one token before it to be predicted from
        rows.append((tokens, min(len(end), len(tokens) - 1)))
    return rows


@functools.lru_cache(maxsize=None)
def _rendered(ctx, endings, block_size):
    return render({"ctx": ctx, "endings": endings}, gpt2_tokenizer(), block_size)


def rendered(example, block_size):
    """render(example) with GPT-2's tokenizer, tokenised once per process: training evaluates the same
    10,042 examples every few hundred steps."""
    return _rendered(example["ctx"], tuple(example["endings"]), block_size)


# ---------------------------------------------------------------------------
# Scoring: both functions return (sum_loss, n_tokens), float32 and int64 CPU tensors of shape (N, 4):
# the summed cross-entropy of each ending's tokens and how many tokens that is.


def autocast(device, dtype):
    """torch.autocast to `dtype` on `device`'s kind of device, or a no-op when dtype is None."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def reference_losses(model, examples, *, device, autocast_dtype=None):
    """The plain, slow way: one example at a time, one unpadded forward per ending."""
    enc = gpt2_tokenizer()
    sum_loss = torch.zeros(len(examples), 4)
    n_tokens = torch.zeros(len(examples), 4, dtype=torch.long)
    for i, example in enumerate(examples):
        for j, (tokens, n) in enumerate(render(example, enc, model.config.block_size)):
            idx = torch.tensor([tokens], device=device)
            with autocast(device, autocast_dtype):
                logits, _ = model(idx)
            # the logits at position t predict token t+1, so the n ending tokens are predicted
            # by the n positions just before them
            sum_loss[i, j] = F.cross_entropy(logits[0, -n - 1:-1].float(), idx[0, -n:], reduction="sum")
            n_tokens[i, j] = n
    return sum_loss, n_tokens


@torch.no_grad()
def ending_losses(model, examples, *, device, batch_size=16, autocast_dtype=None):
    """Like reference_losses, but batched: 4·batch_size rows (the endings of batch_size examples)
    per forward, right-padded to the longest. Attention is causal, so the padding after a row's
    tokens never changes their logits, and the padding itself is not scored."""
    rows = [row for example in examples for row in rendered(example, model.config.block_size)]
    n_tokens = torch.tensor([n for _, n in rows], dtype=torch.long)
    sum_loss = torch.zeros(len(rows), device=device)
    # rows of similar length share a batch, so a batch is mostly tokens rather than padding
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]))
    for start in range(0, len(rows), 4 * batch_size):
        batch = order[start:start + 4 * batch_size]
        T = max(len(rows[r][0]) for r in batch)
        idx = torch.zeros(len(batch), T, dtype=torch.long)  # pad with token 0; never attended to
        targets = torch.full((len(batch), T), -1)  # -1: not an ending token, not scored
        for b, r in enumerate(batch):
            tokens, n = rows[r]
            L = len(tokens)
            idx[b, :L] = torch.tensor(tokens)
            targets[b, L - n - 1:L - 1] = idx[b, L - n:L]  # position t predicts token t+1
        idx, targets = idx.to(device), targets.to(device)
        # the output layer (50257 logits per position) is most of the cost for GPT-2 small: run it at
        # the positions that predict an ending token only
        scored = targets >= 0
        with autocast(device, autocast_dtype):
            logits = model.head(model.features(idx)[scored])
        loss = torch.zeros(targets.shape, device=device)
        loss[scored] = F.cross_entropy(logits.float(), targets[scored], reduction="none")
        sum_loss[batch] = loss.sum(dim=1)
    return sum_loss.cpu().view(-1, 4), n_tokens.view(-1, 4)


def evaluate(model, examples, *, device, batch_size=16, rank=0, world_size=1, autocast_dtype=None,
             reference=False, lockstep=False):
    """HellaSwag accuracy of `model` (a model.GPT) on `examples` (rowanz/hellaswag dicts).

    acc counts the endings with the lowest summed loss, acc_norm those with the lowest mean loss
    per token (build-nanogpt's acc_norm, not lm-evaluation-harness's byte-length one). With
    world_size > 1, example i is scored on rank i % world_size and the counts are summed over
    ranks with torch.distributed, so every rank returns the same totals. reference=True scores
    with reference_losses (slow; for checking). lockstep=True gives every rank the same number of
    forwards (a short shard is topped up with examples scored but not counted): an FSDP model needs
    every rank in each forward. The model's train/eval mode is restored after.
    Returns {"acc", "acc_norm", "n", "correct", "correct_norm"}."""
    shard = examples[rank::world_size]
    n_shard = len(shard)
    if lockstep:
        shard = shard + examples[: -(-len(examples) // world_size) - n_shard]
    was_training = model.training
    model.eval()
    try:
        if reference:
            sum_loss, n_tokens = reference_losses(model, shard, device=device, autocast_dtype=autocast_dtype)
        else:
            sum_loss, n_tokens = ending_losses(model, shard, device=device, batch_size=batch_size,
                                               autocast_dtype=autocast_dtype)
    finally:
        model.train(was_training)
    shard, sum_loss, n_tokens = shard[:n_shard], sum_loss[:n_shard], n_tokens[:n_shard]
    labels = torch.tensor([int(example["label"]) for example in shard], dtype=torch.long)
    correct = int((sum_loss.argmin(dim=1) == labels).sum())
    correct_norm = int(((sum_loss / n_tokens).argmin(dim=1) == labels).sum())
    counts = torch.tensor([len(shard), correct, correct_norm], device=device)  # on device: NCCL needs it there
    if world_size > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    n, correct, correct_norm = counts.tolist()
    return {"acc": correct / max(n, 1), "acc_norm": correct_norm / max(n, 1), "n": n,
            "correct": correct, "correct_norm": correct_norm}


# ---------------------------------------------------------------------------
# Command line


def main(argv=None):
    parser = argparse.ArgumentParser(description="HellaSwag accuracy of a GPT-2 model (completion style)")
    parser.add_argument("--model", default="gpt2",
                        help="gpt2|gpt2-medium|gpt2-large|gpt2-xl, a Hugging Face folder, a checkpoint file "
                             "or a checkpoint folder (its 'latest' file names the checkpoint)")
    parser.add_argument("--data_file", help="a local hellaswag jsonl (default: download --split to data/hellaswag/)")
    parser.add_argument("--split", default="val", choices=["train", "val"])  # test has no labels
    parser.add_argument("--limit", type=int, help="score only the first N examples")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps, cpu...")
    parser.add_argument("--batch_size", type=int, default=16, help="examples per forward (4 rows each)")
    parser.add_argument("--reference", action="store_true",
                        help="score one example at a time with unpadded forwards (slow; checks the batched path)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--batch_size and --limit must be at least 1")

    # under torchrun every rank scores its share of the examples; rank 0 prints
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = default_device(args.device, world_size)  # never a silent fallback to CPU
    if world_size > 1:
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    try:
        # every rank downloads if needed: atomic_write makes simultaneous downloads safe
        path = args.data_file or download(args.split)
        examples = load_examples(path, args.limit)
        model = load_model(args.model, device)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        sys.exit(f"error: {' '.join(str(e).split())}")  # one line, no traceback
    autocast_dtype = default_autocast_dtype(device)

    t0 = time.perf_counter()
    result = evaluate(model, examples, device=device, batch_size=args.batch_size, rank=rank,
                      world_size=world_size, autocast_dtype=autocast_dtype, reference=args.reference)
    seconds = time.perf_counter() - t0
    if rank == 0:
        n = result["n"]
        precision = "bf16 autocast" if autocast_dtype == torch.bfloat16 else "fp32"
        how = "per-example reference" if args.reference else f"batch_size {args.batch_size}"
        ranks = f", {world_size} ranks" if world_size > 1 else ""
        print(f"hellaswag {os.path.basename(path)}: model {args.model} on {device}, {precision}, {how}{ranks}")
        print(f"acc      {result['acc']:.4f}  ({result['correct']}/{n})  lowest summed loss over the ending's tokens")
        print(f"acc_norm {result['acc_norm']:.4f}  ({result['correct_norm']}/{n})  lowest mean loss per ending token "
              "(build-nanogpt's acc_norm; lm-evaluation-harness divides by bytes instead)")
        print(f"n        {n}")
        print(f"{n / seconds:.1f} examples/s ({seconds:.1f} s)")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # leave without Python's shutdown: see train_gpt2.py's end
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
