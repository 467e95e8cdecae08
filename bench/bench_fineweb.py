"""
How fast does fineweb_edu.py tokenise? Measured against tiktoken alone, on the same documents.

    python bench/bench_fineweb.py                          # 40 MB of synthetic English-like text
    python bench/bench_fineweb.py --mb 100 --num_proc 8
    python bench/bench_fineweb.py --input 'corpus/*.jsonl'  # your own documents (.parquet/.jsonl/.json/.txt)

Prints tokens/s, best of --repeat rounds, for
  1. tiktoken encode_ordinary_batch(num_threads=1): one core, the baseline
  2. tiktoken encode_ordinary in a loop: one core, without keeping every token as a Python int (faster)
  3. tiktoken encode_ordinary_batch(num_threads=num_proc): tiktoken's own threads
  4. fineweb_edu.tokenize_all(num_proc): the process pool fineweb_edu.py tokenises with
  5. fineweb_edu.py end to end: documents read from a .jsonl file through datasets, shards written
and the ratios to 1, 2 and 3. num_proc defaults to the number of cores (os.cpu_count()).
"""

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import datasets  # noqa: E402,F401  imported here, so that its ~2 s import is not timed in row 5

import fineweb_edu  # noqa: E402
from data import gpt2_tokenizer  # noqa: E402

COMMON = """the of and to a in is it that was for on are as with his they at be this from have or by one had
not but what all were when we there can an your which their said if do will each about how up out them then
she many some so these would other into has more her two like him see time could no make than first been its
who now people my made over did down only way find use may water long little very after words called just
where most know get through back much before go good new write our used me man too any day same right look
think also around another came come work three word must because does part even place well such here take
why things help put years different away again off went old number great tell men say small every found
still between name should home big give air line set own under read last never us left end along while might
next sound below saw something thought both few those always looked show large often together asked house
world going want school important until form food keep children feet land side without boy once animals life
enough took sometimes four head above kind began almost live page got earth need far hand high year mother
light parts country father let night following picture being study second eyes soon times story boys since
white days ever paper hard near sentence better best across during today others however sure means knew try
told young miles sun ways thing whole hear example heard several change answer room sea against top turned
learn point city play toward five using himself usually""".split()
SYLLABLES = """ab ac al an ar at ble con de di en er es ex ic in ing ion is it ly ment ness o ous per pre pro re
ri sion ter tion un ver vi y ph th qu ch ize ism ist ium""".split()


def synthetic_docs(mb, seed=0):
    """English-like documents of a few KB: paragraphs of sentences of common words, with one word in six
    made of random syllables (as rare words, names and jargon are), numbers and punctuation. Drawn from a
    pool of 20k sentences, so that they are quick to make."""
    rng = random.Random(seed)

    def word():
        if rng.random() < 0.03:
            return str(rng.randint(0, 3000))
        if rng.random() < 1 / 6:
            return "".join(rng.choices(SYLLABLES, k=rng.randint(2, 4)))
        return rng.choice(COMMON)

    def sentence():
        words = [word() for _ in range(rng.randint(4, 30))]
        words[0] = words[0].capitalize()
        return " ".join(w + ("," if rng.random() < 0.08 else "") for w in words) + rng.choice(".....?!")

    pool = [sentence() for _ in range(20_000)]
    docs, size = [], 0
    while size < mb * 1e6:
        paragraphs = [" ".join(rng.choices(pool, k=rng.randint(2, 8))) for _ in range(rng.randint(1, 9))]
        docs.append("\n\n".join(paragraphs))
        size += len(docs[-1])
    return docs


def timed(count_tokens):
    t0 = time.perf_counter()
    n = count_tokens()
    return n, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", metavar="FILE", help="documents to tokenise instead of synthetic text")
    p.add_argument("--text_field", default="text")
    p.add_argument("--mb", type=float, default=40, help="megabytes of synthetic text")
    p.add_argument("--num_proc", type=int, default=os.cpu_count(), help="threads / processes for 3, 4 and 5")
    p.add_argument("--repeat", type=int, default=3, help="rounds; each row reports its fastest")
    args = p.parse_args()

    if args.input:
        docs = list(fineweb_edu.read_texts({"files": fineweb_edu.input_files(args.input)}, args.text_field))
    else:
        docs = synthetic_docs(args.mb)
    enc = gpt2_tokenizer()  # loaded before the pool forks, as fineweb_edu.py does
    n = args.num_proc
    chars = sum(map(len, docs))
    print(f"{len(docs):,} documents, {chars / 1e6:.1f} M characters; {os.cpu_count()} cores, num_proc {n}")

    def single():
        return sum(map(len, enc.encode_ordinary_batch(docs, num_threads=1)))

    def loop():  # one core too, but each document's tokens are dropped at once instead of all kept in lists
        return sum(len(enc.encode_ordinary(doc)) for doc in docs)

    def threads():
        return sum(map(len, enc.encode_ordinary_batch(docs, num_threads=n)))

    def pipeline():  # not counting the <|endoftext|> each document starts with, to compare like with like
        return sum(len(t) - 1 for t in fineweb_edu.tokenize_all(docs, n))

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "docs.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"text": doc}) + "\n" for doc in docs)

        def end_to_end():  # the whole script: read through datasets, tokenise, write shards
            out = tempfile.mkdtemp(dir=tmp)
            with contextlib.redirect_stdout(io.StringIO()):  # its "wrote ..." lines
                fineweb_edu.main(["--input", path, "--data_dir", out, "--num_proc", str(n),
                                  "--shard_size", "1000000"])
            with open(os.path.join(out, "meta.json")) as f:
                return json.load(f)["num_tokens"] - len(docs)

        rows = [("tiktoken encode_ordinary_batch, num_threads=1", single),
                ("tiktoken encode_ordinary, a loop on one core", loop),
                (f"tiktoken encode_ordinary_batch, num_threads={n}", threads),
                (f"fineweb_edu.tokenize_all, num_proc={n}", pipeline),
                (f"fineweb_edu.py end to end, num_proc={n}", end_to_end)]
        tokens = single()
        print(f"{tokens:,} tokens, {chars / tokens:.2f} characters a token; best of {args.repeat} rounds")
        best = [float("inf")] * len(rows)
        for _ in range(args.repeat):  # in rounds, so that a noisy neighbour slows every row alike
            for i, (name, count) in enumerate(rows):
                got, seconds = timed(count)
                assert got == tokens, f"{name} made {got:,} tokens, not {tokens:,}"
                best[i] = min(best[i], seconds)

    print(f"\n{'':48s} {'tokens/s':>11s} {'vs 1 thread':>12s} {'vs loop':>8s} {'vs threads':>11s}")
    for (name, _), seconds in zip(rows, best):
        print(f"{name:48s} {tokens / seconds:11,.0f} {best[0] / seconds:11.2f}x {best[1] / seconds:7.2f}x "
              f"{best[2] / seconds:10.2f}x")


if __name__ == "__main__":
    main()
