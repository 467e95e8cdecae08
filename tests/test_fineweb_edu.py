import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fineweb_edu
from data import read_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "fineweb_edu.py")
SHARD = 1000
FAST = ["--shard_size", str(SHARD), "--num_proc", "2"]


def make_docs(n, seed=0):
    """Documents with what a tokenizer can get wrong: unicode, special-token text, an empty document.
    No newlines, so a .txt file holds one per line."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "Ünïcödé", "naïve", "日本語", "🙂", "<|endoftext|>", "42", "\t", "  ",
             "don't"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 80))) for _ in range(n)]
    docs[3] = ""  # not a document: skipped (a blank line in a .txt file), no lone <|endoftext|>
    return docs


def write_corpus(path, docs, field="text"):
    path = str(path)
    if path.endswith(".parquet"):
        pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path)
    elif path.endswith(".txt"):
        with open(path, "w") as f:
            f.write("".join(doc + "\n" for doc in docs))
    else:
        with open(path, "w") as f:
            f.write("".join(json.dumps({"id": i, field: doc}) + "\n" for i, doc in enumerate(docs)))
    return path


def reference(enc, docs):
    """What the shards must hold, made independently: <|endoftext|> + encode_ordinary, for each non-empty
    document."""
    return np.array([t for doc in docs if doc for t in [50256] + enc.encode_ordinary(doc)], dtype=np.uint16)


def shards(data_dir):
    """The shard file names in order: by index, so val_000000 comes first."""
    names = [p for p in os.listdir(data_dir) if p.startswith("edufineweb_")]
    return sorted(names, key=lambda p: p.split("_")[2])


def contents(data_dir):
    """Every file the run leaves, by name (bytes), so two data_dirs can be compared."""
    return {name: open(os.path.join(data_dir, name), "rb").read() for name in os.listdir(data_dir)}


def run_main(*args):
    fineweb_edu.main([str(a) for a in args])


def error_of(*args):
    """main()'s error: the one line sys.exit prints to stderr, with a non-zero exit code."""
    with pytest.raises(SystemExit) as e:
        run_main(*args)
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def test_tokenize_all_keeps_order(enc, monkeypatch):
    monkeypatch.setattr(fineweb_edu, "CHUNKSIZE", 7)  # many pool tasks, finishing in any order
    docs = [doc for doc in make_docs(700) if doc]  # read_texts drops empty documents before this
    got = list(fineweb_edu.tokenize_all(docs, num_proc=2))
    assert all(t.dtype == np.uint16 for t in got)
    assert np.array_equal(np.concatenate(got), reference(enc, docs))
    # text that looks like a special token is just text: only the document's first token is 50256
    assert list(fineweb_edu.tokenize_all(["<|endoftext|>"], num_proc=1))[0].tolist() == \
        [50256, 27, 91, 437, 1659, 5239, 91, 29]


@pytest.mark.parametrize("kind,fmt", [("jsonl", "bin"), ("parquet", "bin"), ("txt", "bin"), ("jsonl", "npy")])
def test_shards_hold_every_document_in_order(tmp_path, enc, kind, fmt):
    docs = make_docs(150)
    if kind != "txt":
        docs[5] = "two\nlines\n\nand a blank one"
    # two files through a glob: read in sorted order, as one stream
    write_corpus(tmp_path / f"a.{kind}", docs[:100])
    write_corpus(tmp_path / f"b.{kind}", docs[100:])
    out = tmp_path / "out"
    run_main("--input", tmp_path / f"*.{kind}", "--data_dir", out, "--format", fmt, *FAST)

    want = reference(enc, docs)
    n = -(-len(want) // SHARD)
    assert n >= 4
    names = [f"edufineweb_{'val' if k == 0 else 'train'}_{k:06d}.{fmt}" for k in range(n)]
    assert shards(out) == names  # shard 0 is val, the rest train
    got = [np.array(read_shard(out / name)) for name in names]
    assert [len(t) for t in got] == [SHARD] * (n - 1) + [len(want) - SHARD * (n - 1)]
    assert np.array_equal(np.concatenate(got), want)
    for name, tokens in zip(names, got):  # the exact file layout, from the raw bytes
        raw = (out / name).read_bytes()
        if fmt == "bin":  # llm.c: 256 int32 header (magic, version, token count), then uint16 tokens
            header = np.frombuffer(raw[:1024], dtype="<i4")
            assert header[:3].tolist() == [20240520, 1, len(tokens)] and not header[3:].any()
            assert np.array_equal(np.frombuffer(raw[1024:], dtype="<u2"), tokens)
        else:
            assert np.array_equal(np.load(out / name), tokens) and np.load(out / name).dtype == np.uint16
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_shards"] == n and meta["num_tokens"] == len(want)
    assert meta["shard_size"] == SHARD and meta["format"] == fmt and meta["tokenizer"] == "gpt2"
    assert meta["source"]["files"] == [str(tmp_path / f"a.{kind}"), str(tmp_path / f"b.{kind}")]
    assert meta["source"]["sizes"] == [os.path.getsize(tmp_path / f"{n}.{kind}") for n in "ab"]
    assert meta["args"]["num_proc"] == 2


@pytest.mark.parametrize("max_tokens", [2345, 2000])  # mid-shard, and exactly on a shard boundary
def test_max_tokens(tmp_path, enc, max_tokens):
    docs = make_docs(150)
    out = tmp_path / "out"
    run_main("--input", write_corpus(tmp_path / "c.jsonl", docs), "--data_dir", out,
             "--max_tokens", max_tokens, *FAST)
    got = [read_shard(out / name) for name in shards(out)]
    assert [len(t) for t in got] == [SHARD, SHARD, 345][:len(got)] and len(got) == -(-max_tokens // SHARD)
    assert np.array_equal(np.concatenate(got), reference(enc, docs)[:max_tokens])


def test_killed_run_resumes_byte_identical(tmp_path, capsys):
    docs = make_docs(600, seed=1)  # ~70 shards of 1000 tokens: the run outlives the kill by a second or more
    args = ["--input", write_corpus(tmp_path / "c.jsonl", docs), *FAST]
    run_main(*args, "--data_dir", tmp_path / "uninterrupted")

    # kill the whole process group (the script and its workers) once a few shards are written
    out = tmp_path / "out"
    killed = subprocess.Popen([sys.executable, SCRIPT, *args, "--data_dir", str(out)], cwd=ROOT,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "edufineweb_train_000002.bin").exists():
        assert killed.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.002)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (out / "meta.json").exists()  # killed mid-run, not after it finished
    kept = {name: os.stat(out / name).st_ino for name in shards(out)}
    assert 3 <= len(kept) < len(shards(tmp_path / "uninterrupted"))

    capsys.readouterr()
    run_main(*args, "--data_dir", out)
    assert "resuming at shard" in capsys.readouterr().out
    # the same shards and .resume.json, byte for byte, and the same meta.json but for --data_dir
    want, got = contents(tmp_path / "uninterrupted"), contents(out)
    want_meta, got_meta = json.loads(want.pop("meta.json")), json.loads(got.pop("meta.json"))
    assert got == want
    assert got_meta["args"].pop("data_dir") == str(out) and want_meta["args"].pop("data_dir") != str(out)
    assert got_meta == want_meta
    assert all(os.stat(out / name).st_ino == ino for name, ino in kept.items())  # not re-written


def test_rerun_skips_finished_and_remakes_missing_shards(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--input", write_corpus(tmp_path / "c.jsonl", make_docs(150)), "--data_dir", out, *FAST]
    run_main(*args)
    first = contents(out)
    inodes = {name: os.stat(out / name).st_ino for name in first}

    run_main(*args)  # finished: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    assert all(os.stat(out / name).st_ino == ino for name, ino in inodes.items())

    os.remove(out / "edufineweb_train_000002.bin")  # say a shard was deleted: it is made again
    run_main(*args)
    assert "resuming at shard 2" in capsys.readouterr().out
    assert contents(out) == first
    assert os.stat(out / "edufineweb_train_000003.bin").st_ino == inodes["edufineweb_train_000003.bin"]

    write_corpus(args[1], make_docs(150, seed=1))  # the same file name, other documents: caught, not mixed
    os.remove(out / "edufineweb_train_000002.bin")
    assert "the input has changed" in error_of(*args)
    assert not os.path.exists(out / "edufineweb_train_000002.bin")


def test_stream_reopens_after_a_hiccup(capsys):
    docs = [f"doc {i}" for i in range(10)]
    opened = []

    def open_texts(skip):  # a stream that drops the connection once, after 4 documents
        opened.append(skip)
        for i in range(skip, len(docs)):
            if len(opened) == 1 and i == 4:
                raise ConnectionError("connection reset by peer")
            yield docs[i]

    assert list(fineweb_edu.resilient(open_texts, skip=2, wait=0)) == docs[2:]
    assert opened == [2, 4]  # reopened past the documents already read
    assert "connection lost at document 4" in capsys.readouterr().err


def test_stream_gives_up_with_a_clear_error():
    def open_texts(skip):  # the first connection gives one document, every later one fails at once
        if skip == 0:
            yield "doc 0"
        raise TimeoutError("read timed out")

    with pytest.raises(fineweb_edu.DataError, match="lost the connection 3 times in a row at document 1"):
        list(fineweb_edu.resilient(open_texts, wait=0, retries=3))
    # failing before the first document of a fresh start is no hiccup (no network, a wrong name):
    # reported at once, without waiting
    def never(skip):
        raise TimeoutError("no route to host")
        yield

    with pytest.raises(fineweb_edu.DataError, match="cannot stream the dataset"):
        list(fineweb_edu.resilient(never, wait=3600))
    # a resume that fails while skipping what earlier runs wrote is a hiccup: retried, then given up
    with pytest.raises(fineweb_edu.DataError, match="lost the connection 2 times in a row at document 5"):
        list(fineweb_edu.resilient(never, skip=5, wait=0, retries=2))


def test_hub_unreachable_is_one_clear_error(tmp_path):
    # conftest.py turns the hub off: the default source fails at once, with one line, writing nothing
    message = error_of("--data_dir", tmp_path / "out", "--max_tokens", "1000")
    assert message.startswith("error: cannot stream the dataset") and "fineweb-edu" in message
    assert not os.path.exists(tmp_path / "out")


@pytest.fixture
def finished(tmp_path):
    """A data_dir with finished shards, and its bytes, to check that failing runs leave it alone."""
    out = tmp_path / "out"
    corpus = write_corpus(tmp_path / "c.jsonl", make_docs(100))
    run_main("--input", corpus, "--data_dir", out, *FAST)
    return corpus, out, contents(out)


def test_cli_error_is_one_line(tmp_path, finished):
    corpus, out, before = finished
    pattern = str(tmp_path / "no_*.parquet")
    p = subprocess.run([sys.executable, SCRIPT, "--input", corpus, pattern, "--data_dir", str(out), *FAST],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and p.stderr.splitlines() == [f"error: --input {pattern}: no such file"]
    assert contents(out) == before


def test_record_without_the_text_field(tmp_path, capfd):
    corpus = write_corpus(tmp_path / "c.jsonl", make_docs(50), field="content")
    out = tmp_path / "out"
    # raised in the pool's feeder thread, and still one line, without a traceback
    assert error_of("--input", corpus, "--data_dir", out, *FAST) == (
        f"error: {corpus}: record 0 has no text field 'text' (its text fields: content); "
        "name the right one with --text_field")
    assert "Traceback" not in capfd.readouterr().err
    assert not os.path.exists(out)  # nothing written
    run_main("--input", corpus, "--data_dir", out, "--text_field", "content", *FAST)  # the fix works
    assert os.path.exists(out / "meta.json")


def test_bad_inputs(tmp_path, finished):
    _, out, before = finished
    (tmp_path / "notes.csv").write_text("a,b\n")
    assert "unknown file type" in error_of("--input", tmp_path / "notes.csv", "--data_dir", out, *FAST)
    assert "no such file" in error_of("--input", tmp_path / "missing.jsonl", "--data_dir", out, *FAST)
    assert contents(out) == before

    (tmp_path / "empty.txt").write_text("")
    fresh = tmp_path / "fresh"
    assert "no documents in" in error_of("--input", tmp_path / "empty.txt", "--data_dir", fresh, *FAST)
    assert not os.path.exists(fresh)
    (tmp_path / "blank.txt").write_text("\n\n\n")  # blank lines are no documents either
    assert "no documents in" in error_of("--input", tmp_path / "blank.txt", "--data_dir", fresh, *FAST)


def test_unreadable_records_are_one_clear_error(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "cut off\n')
    assert "broken.jsonl: cannot read it" in error_of("--input", broken, "--data_dir", tmp_path / "a", *FAST)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    assert "latin1.txt: cannot read it" in error_of("--input", latin1, "--data_dir", tmp_path / "b", *FAST)
    numbers = write_corpus(tmp_path / "n.jsonl", [1, 2, 3])
    assert "record 0's 'text' is a int, not text" in error_of("--input", numbers, "--data_dir", tmp_path / "c",
                                                              *FAST)


@pytest.mark.parametrize("change,conflict", [
    (["--shard_size", "400"], "shard_size=1000, not 400"),
    (["--format", "npy"], "format='bin', not 'npy'"),
    (["--max_tokens", "2000"], "max_tokens=None, not 2000"),
    (["--text_field", "body"], "text_field='text', not 'body'"),
    (["--input", "OTHER"], "source="),
])
def test_data_dir_with_other_settings_is_refused(tmp_path, finished, change, conflict):
    corpus, out, before = finished
    other = write_corpus(tmp_path / "other.jsonl", make_docs(10))
    change = [other if a == "OTHER" else a for a in change]
    message = error_of("--input", corpus, "--data_dir", out, *FAST, *change)  # the last of a repeated flag wins
    assert conflict in message and "another --data_dir" in message
    assert contents(out) == before


def test_data_dir_with_unrecorded_shards_is_refused(tmp_path, finished):
    corpus, out, before = finished
    os.remove(out / ".resume.json")
    assert ".resume.json" in error_of("--input", corpus, "--data_dir", out, *FAST)
    assert contents(out) == {name: b for name, b in before.items() if name != ".resume.json"}
