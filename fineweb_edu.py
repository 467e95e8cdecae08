"""
Tokenise FineWeb-Edu (or your own text files) with GPT-2's tokenizer into token shards for training.

    python fineweb_edu.py                          # HuggingFaceFW/fineweb-edu sample-10BT, from the hub
    python fineweb_edu.py --max_tokens 10000000 --shard_size 1000000 --data_dir data/trial   # a trial
    python fineweb_edu.py --input 'corpus/*.jsonl' --data_dir data/corpus  # local .parquet/.jsonl/.json/.txt

Writes {data_dir}/edufineweb_val_000000.bin, edufineweb_train_000001.bin, ...: shard_size tokens each
(the last one may hold fewer), every document starting with <|endoftext|>; shard 0 is the validation
shard, as in build-nanogpt. meta.json is written last. --format npy writes build-nanogpt's .npy shards.

Killed? Run the same command again: it finds where the first missing shard starts in the document
stream (recorded in {data_dir}/.resume.json), skips the documents before it without tokenising them,
and writes the rest: the output is byte-identical to an uninterrupted run. A data_dir holding shards
made with other settings is refused, never mixed.
"""

import argparse
import glob
import json
import multiprocessing as mp
import os
import sys
import time
from itertools import islice

import numpy as np
from tqdm import tqdm

from data import EOT, atomic_write, gpt2_tokenizer, write_shard

# --input files go through datasets' reader for their type: a document per record (.txt: per line)
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
RESUME = ".resume.json"  # in data_dir: the settings its shards were made with, and where each shard starts
CHUNKSIZE = 1024  # documents per pool task: large, so passing work between processes costs little (measured)
RETRIES = 10  # dropped hub connections in a row before giving up; waits 1, 2, 4, ... 60 s in between


class DataError(Exception):
    """A problem with the input or the data_dir: reported as one line, without a traceback."""


# ---------------------------------------------------------------------------
# Reading documents

def input_files(patterns):
    """The files --input names (globs expanded, each sorted), checked to exist and to be of a known type."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DataError(f"--input {pattern}: no such file")
        for path in matches:
            if os.path.splitext(path)[1] not in BUILDERS:
                raise DataError(f"--input {path}: unknown file type; expected one of {', '.join(BUILDERS)}")
        files += [path for path in matches if os.path.getsize(path) > 0]  # empty: datasets' json reader fails
    return files


def read_texts(source, text_field):
    """The text of every document of `source` (settings["source"]), in order, streamed through datasets."""
    import pyarrow  # slow to import (~2 s): only once the arguments have been checked
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    if "files" in source:
        loads = [dict(path=BUILDERS[os.path.splitext(f)[1]], data_files=f, split="train")
                 for f in source["files"]]
    else:
        loads = [dict(path=source["dataset"], name=source["name"], split=source["split"])]
    for load in loads:
        where = load.get("data_files", load["path"])
        try:
            records = load_dataset(**load, streaming=True)
        except ValueError as e:  # e.g. a config or split the dataset does not have
            raise DataError(f"{where}: {e}") from e
        n = 0  # records read from this source
        try:
            for batch in records.iter(batch_size=1024):  # a column at a time: 3x faster than record by record
                texts = batch.get(text_field)
                bad = next((i for i, text in enumerate(texts or [None]) if not isinstance(text, str)), None)
                if bad is not None:
                    if texts is not None and texts[bad] is not None:
                        raise DataError(f"{where}: record {n + bad}'s '{text_field}' is a "
                                        f"{type(texts[bad]).__name__}, not text")
                    fields = ", ".join(k for k, v in batch.items() if isinstance(v[bad], str)) or "none"
                    raise DataError(f"{where}: record {n + bad} has no text field '{text_field}' "
                                    f"(its text fields: {fields}); name the right one with --text_field")
                n += len(texts)
                yield from (text for text in texts if text)  # an empty line or record is no document
        except (UnicodeDecodeError, pyarrow.ArrowException, DatasetGenerationError) as e:
            # a broken json line, text that is not UTF-8, ...: the reader's own words, on one line
            raise DataError(f"{where}: cannot read it after record {n}: {' '.join(str(e).split())[:300]}") from e


def network_errors():
    """What a dropped connection raises: OSError (ConnectionError, TimeoutError, huggingface_hub's HTTP
    errors) and the request errors of the HTTP client huggingface_hub uses, which are not OSErrors."""
    try:
        from huggingface_hub.utils import httpx
        return (OSError, httpx.RequestError)
    except ImportError:  # an older huggingface_hub on requests, whose errors are OSErrors
        return (OSError,)


def resilient(open_texts, skip=0, retries=RETRIES, wait=1.0):
    """The texts of open_texts(skip): when the connection drops mid-stream, reopen it past the texts
    already yielded, after a wait that doubles each time, so a hub hiccup costs a minute, not the run.
    A stream that fails before its first text is not hiccuping (no network, a wrong name): report it."""
    done, failures = skip, 0
    while True:
        try:
            for text in open_texts(done):
                done, failures = done + 1, 0
                yield text
            return
        except network_errors() as e:
            failures += 1
            if done == 0:  # never read a thing: not a hiccup
                raise DataError(f"cannot stream the dataset: {e}") from e
            if failures > retries:
                raise DataError(f"lost the connection {retries} times in a row at document {done:,} ({e}); "
                                "run the same command again to resume") from e
            delay = min(wait * 2 ** (failures - 1), 60)
            tqdm.write(f"warning: connection lost at document {done:,} ({type(e).__name__}: {e}); "
                       f"reopening the stream in {delay:.0f} s (try {failures} of {retries})", file=sys.stderr)
            time.sleep(delay)


# ---------------------------------------------------------------------------
# Tokenising, in a pool of processes

enc = None  # each worker's tokenizer, loaded once by init_worker


def init_worker():
    global enc
    enc = gpt2_tokenizer()


def tokenize(text):
    """<|endoftext|> then the document's tokens (special-token text in it is just text), as uint16:
    2 bytes a token to send back to the parent process."""
    return np.array([EOT] + enc.encode_ordinary(text), dtype=np.uint16)


def tokenize_all(texts, num_proc):
    """The tokens of each text, in order, tokenised by num_proc worker processes. imap (not
    imap_unordered) keeps the order, so the shards do not depend on timing or on num_proc."""
    with mp.Pool(num_proc, initializer=init_worker) as pool:
        yield from pool.imap(tokenize, texts, chunksize=CHUNKSIZE)


# ---------------------------------------------------------------------------
# Shards, resuming, and the run

def shard_path(args, k):
    split = "val" if k == 0 else "train"  # shard 0 is the validation shard, as in build-nanogpt
    return os.path.join(args.data_dir, f"edufineweb_{split}_{k:06d}.{args.format}")


def settings_of(args):
    """Everything that decides the shards' bytes (num_proc and data_dir do not)."""
    if args.input:
        # with their sizes: a file edited between a killed run and its resume is not mixed in
        source = {"files": [os.path.abspath(f) for f in input_files(args.input)],
                  "sizes": [os.path.getsize(f) for f in input_files(args.input)]}
    else:
        source = {"dataset": args.dataset, "name": args.name, "split": args.split}
    return dict(source=source, text_field=args.text_field, tokenizer="gpt2", shard_size=args.shard_size,
                max_tokens=args.max_tokens, format=args.format)


def read_starts(data_dir, settings):
    """Where each shard in data_dir starts, [document, token in it, tokens before it], from .resume.json;
    [[0, 0, 0]] for a fresh start. Refuses shards made with other settings: two runs never mix."""
    if not glob.glob(os.path.join(data_dir, "edufineweb_*")):
        return [[0, 0, 0]]
    path = os.path.join(data_dir, RESUME)
    if not os.path.exists(path):
        raise DataError(f"{data_dir} holds shards but no {RESUME} saying how they were made; "
                        "use another --data_dir, or empty this one")
    with open(path) as f:
        resume = json.load(f)
    for key, value in settings.items():
        old = resume["settings"].get(key)
        if key == "source" and old and old.get("files") == value.get("files") and old != value:
            raise DataError(f"the input has changed since {data_dir} was written (file sizes differ); "
                            "use another --data_dir")
        if old != value:
            raise DataError(f"{data_dir} holds shards made with {key}={old!r}, not {value!r}; "
                            "re-run with the same settings to resume, or use another --data_dir")
    return resume["starts"]


def run(args):
    settings = settings_of(args)
    what = " ".join(args.input) if args.input else f"{args.dataset} ({args.name}, {args.split})"
    starts = read_starts(args.data_dir, settings)
    meta_path = os.path.join(args.data_dir, "meta.json")
    # resume at the first missing shard; starts[-1] is where the shard after the last recorded one starts
    shard = 0
    while shard < len(starts) - 1 and os.path.exists(shard_path(args, shard)):
        shard += 1
    if shard > 0 and shard == len(starts) - 1 and os.path.exists(meta_path):
        print(f"nothing to do: {args.data_dir} already holds all {shard} shards (meta.json)")
        return
    doc, pos, total = starts[shard]  # shard `shard` starts at token `pos` of document `doc`
    if shard > 0:
        print(f"resuming at shard {shard}: shards 0-{shard - 1} are in {args.data_dir}; "
              f"skipping their {doc:,} documents without tokenising them")
    for tmp in glob.glob(os.path.join(args.data_dir, ".*.tmp")):
        os.remove(tmp)  # files a killed run was half-way through writing (atomic_write's temporary files)

    # load the tokenizer here once: seeds tiktoken's cache before the workers start, and checks that
    # every token id (at most max_token_value) fits the shards' uint16
    assert gpt2_tokenizer().max_token_value < 2**16, "token ids must fit uint16"

    def open_texts(skip):
        return islice(read_texts(settings["source"], args.text_field), skip, None)

    texts = open_texts(doc) if args.input else resilient(open_texts, doc)  # local files do not hiccup
    print(f"tokenising {what} into {args.data_dir}, num_proc={args.num_proc}")

    def finish_shard(k, tokens, end):
        """Record where shard k + 1 starts (`end`), then write shard k unless it is already there."""
        if k + 1 < len(starts):  # re-making a shard a previous run recorded: the stream must agree
            if starts[k + 1] != end:
                raise DataError(f"the input has changed since {args.data_dir} was written (shard {k} "
                                "now ends elsewhere); use another --data_dir")
        else:
            starts.append(end)
            with atomic_write(os.path.join(args.data_dir, RESUME), "w") as f:
                json.dump(dict(settings=settings, starts=starts), f)
        path = shard_path(args, k)
        if os.path.exists(path):
            tqdm.write(f"kept {path}: already written")
        else:
            write_shard(path, tokens)
            tqdm.write(f"wrote {path} ({len(tokens):,} tokens)")

    limit = args.max_tokens or float("inf")
    buf = np.empty(args.shard_size, dtype=np.uint16)
    fill = 0  # tokens in buf: the shard being filled
    t0 = time.time()
    # progress in tokens: overall (with an ETA when --max_tokens gives the total) and for this shard
    overall = tqdm(total=args.max_tokens, initial=total, unit="tok", unit_scale=True, desc="all", disable=None)
    this_shard = tqdm(total=args.shard_size, unit="tok", unit_scale=True, desc=f"shard {shard}", disable=None)
    with overall, this_shard:
        for tokens in tokenize_all(texts, args.num_proc):  # documents `doc`, `doc` + 1, ...
            while pos < len(tokens) and total < limit:  # a document may span shards
                take = min(len(tokens) - pos, args.shard_size - fill, limit - total)
                buf[fill:fill + take] = tokens[pos:pos + take]
                fill, pos, total = fill + take, pos + take, total + take
                overall.update(take)
                this_shard.update(take)
                if fill == args.shard_size:
                    finish_shard(shard, buf, [doc, pos, total])
                    shard, fill = shard + 1, 0
                    this_shard.reset()
                    this_shard.set_description(f"shard {shard}")
            if total >= limit:
                break
            doc, pos = doc + 1, 0
        if fill:  # the last shard, shorter than the others
            finish_shard(shard, buf[:fill], [doc, pos, total])
            shard += 1
    if total == 0:
        raise DataError(f"no documents in {what}: nothing to write")

    meta = dict(settings, num_shards=shard, num_tokens=total, args=vars(args))
    with atomic_write(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    seconds = time.time() - t0
    print(f"done: {total:,} tokens in {shard} shards in {args.data_dir} "
          f"({seconds:.0f} s, {total / seconds:,.0f} tokens/s)")
    if shard == 1:
        print("note: there is only the val shard; use a smaller --shard_size to get train shards too")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="hub dataset to stream")
    p.add_argument("--name", default="sample-10BT", help="its config (sample-10BT: ~10B GPT-2 tokens)")
    p.add_argument("--split", default="train")
    p.add_argument("--input", nargs="+", metavar="FILE", help="local files (globs ok) to read instead of the hub")
    p.add_argument("--text_field", default="text", help="the record field holding each document's text")
    p.add_argument("--data_dir", default="data/fineweb_edu", help="where the shards go")
    p.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--max_tokens", type=int, default=None, help="stop after this many tokens (trials, tests)")
    cores = os.cpu_count()
    p.add_argument("--num_proc", type=int, default=cores if cores <= 4 else cores - 1,
                   help="tokenizer processes; default: one per core but one, left for reading and writing "
                        "(all cores on a box of 4 or fewer, where each one counts: measured 1.7x on 2 cores)")
    p.add_argument("--format", choices=["bin", "npy"], default="bin", help="bin: llm.c's (header + uint16); npy")
    args = p.parse_args(argv)
    if args.shard_size < 1 or (args.max_tokens is not None and args.max_tokens < 1) or args.num_proc < 1:
        p.error("--shard_size, --max_tokens and --num_proc must be positive")
    try:
        run(args)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
