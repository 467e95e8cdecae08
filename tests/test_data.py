import os
import subprocess
import sys

import pytest

from data import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_known_ids(enc):
    assert enc.encode_ordinary("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256


NO_NETWORK = r"""
import socket
def refuse(*a, **k):
    raise OSError("network disabled by the test")
socket.getaddrinfo = refuse
socket.create_connection = refuse
socket.socket.connect = refuse
import data
enc = data.gpt2_tokenizer()
print(enc.encode_ordinary("Hello, I'm a language model,"))
"""


@pytest.mark.parametrize("cache", ["corrupt", "unwritable", "off"])
def test_tokenizer_offline_whatever_the_cache(tmp_path, cache):
    env = dict(os.environ)
    if cache == "corrupt":  # a damaged copy is replaced, not handed to tiktoken (which would download)
        (tmp_path / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").write_bytes(b"garbage")
        env["TIKTOKEN_CACHE_DIR"] = str(tmp_path)
    elif cache == "unwritable":
        env["TIKTOKEN_CACHE_DIR"] = "/dev/null/cache"
    else:
        env["TIKTOKEN_CACHE_DIR"] = ""
    out = subprocess.run([sys.executable, "-c", NO_NETWORK], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[15496, 11, 314, 1101, 257, 3303, 2746, 11]"


def test_tokenizer_offline_into_empty_cache(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-c", NO_NETWORK], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[15496, 11, 314, 1101, 257, 3303, 2746, 11]"
    # seeded under the names tiktoken itself uses (sha1 of the URL)
    assert sorted(os.listdir(cache)) == ["6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",
                                         "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"]


def test_atomic_write_success_and_failure(tmp_path):
    path = tmp_path / "f.txt"
    with atomic_write(path, "w") as f:
        f.write("first")
    assert path.read_text() == "first"
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # normal permissions, not mkstemp's
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "first"  # the old file is intact
    assert os.listdir(tmp_path) == ["f.txt"]  # and no temp file is left behind


@pytest.mark.parametrize("ext", [".bin", ".npy"])
def test_shard_round_trip(tmp_path, ext):
    import numpy as np

    from data import read_shard, write_shard

    tokens = np.array([50256, 0, 1, 65535, 1234], dtype=np.int64)
    path = tmp_path / f"s{ext}"
    write_shard(path, tokens)
    back = read_shard(path)
    assert back.dtype == np.uint16 and back.tolist() == tokens.tolist()
    if ext == ".bin":  # llm.c's layout, checked byte by byte
        raw = path.read_bytes()
        header = np.frombuffer(raw[:1024], dtype="<i4")
        assert header[:3].tolist() == [20240520, 1, 5] and not header[3:].any()
        assert np.frombuffer(raw[1024:], dtype="<u2").tolist() == tokens.tolist()
    else:
        assert np.load(path).tolist() == tokens.tolist()


def test_shard_errors(tmp_path):
    import numpy as np

    from data import read_shard, write_shard

    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "big.bin", [70000])
    path = tmp_path / "t.bin"
    write_shard(path, np.arange(100))
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_shard(path)
    path.write_bytes(b"\0" * 1024 + raw[1024:])
    with pytest.raises(ValueError, match="bad magic"):
        read_shard(path)


def _shards(tmp_path, sizes, eot_every=7):
    """Train shards of consecutive integers (so every token says where it came from), EOT every few."""
    import numpy as np

    from data import EOT, write_shard

    write_shard(tmp_path / "d_val_000000.bin", np.arange(100))
    start = 0
    for i, n in enumerate(sizes):
        tokens = np.arange(start, start + n) % 50000
        tokens[::eot_every] = EOT
        write_shard(tmp_path / f"d_train_{i + 1:06d}.bin", tokens)
        start += n
    return str(tmp_path)


@pytest.mark.parametrize("world_size,B,accum", [(1, 2, 2), (2, 1, 2), (2, 2, 1), (4, 1, 1)])
def test_loader_steps_do_not_depend_on_the_split(tmp_path, world_size, B, accum):
    """Every way of splitting a 4-sequence step over ranks and micro-steps reads the same sequences."""
    import torch

    from data import DataLoader

    d = _shards(tmp_path, [500, 300])
    single = DataLoader(d, "train", B=4, T=8)
    ranks = [DataLoader(d, "train", B=B, T=8, rank=r, world_size=world_size, accum=accum)
             for r in range(world_size)]
    for _ in range(60):  # several shard changes and epochs
        x, y = single.next_batch()
        # micro-step by micro-step, rank by rank: the order of the slices in the step's span
        parts = [loader.next_batch() for _ in range(accum) for loader in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        assert all(loader.state_dict() == single.state_dict() for loader in ranks)
    assert single.epoch > 0


def test_loader_reads_every_shard_in_order_and_skips_short_tails(tmp_path):
    from data import DataLoader

    d = _shards(tmp_path, [100, 40, 5], eot_every=1000)  # the 5-token shard is too short: skipped
    loader = DataLoader(d, "train", B=2, T=10)
    firsts = [loader.next_batch()[0][0, 1].item() - 1 for _ in range(5)]  # [0, 0] is an EOT
    # shard 1: windows at 0, 20, 40, 60 (80+21 > 100); shard 2: window at 100; then epoch 2 again at 0
    assert firsts == [0, 20, 40, 60, 100] and loader.state_dict() == {"epoch": 1, "shard": 0, "pos": 0}


def test_loader_state_dict_resumes_exactly(tmp_path):
    import torch

    from data import DataLoader

    d = _shards(tmp_path, [500, 300])
    a = DataLoader(d, "train", B=2, T=8, shuffle=True, seed=5)
    for _ in range(23):
        a.next_batch()
    b = DataLoader(d, "train", B=2, T=8, shuffle=True, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(60):
        xa, xb = a.next_batch()[0], b.next_batch()[0]
        assert torch.equal(xa, xb)


def test_prefetcher_changes_no_batch(tmp_path):
    """The Prefetcher hands out the loader's batches in the loader's order (across shard changes and
    epochs, shuffled), and between steps its state_dict is where a plain loader stands: a run resumed from
    it reads on with the same batches."""
    import torch

    from data import DataLoader, Prefetcher

    d = _shards(tmp_path, [500, 300])
    plain = DataLoader(d, "train", B=2, T=8, accum=2, shuffle=True, seed=5)
    batches = Prefetcher(DataLoader(d, "train", B=2, T=8, accum=2, shuffle=True, seed=5), "cpu")
    for step in range(30):  # an epoch is ~24 steps
        assert batches.state_dict() == plain.state_dict()
        for _ in range(2):
            (x, y), (xp, yp) = plain.next_batch(), batches.next_batch()
            assert torch.equal(x, xp) and torch.equal(y, yp)
    assert plain.epoch > 0
    resumed = DataLoader(d, "train", B=2, T=8, accum=2, shuffle=True, seed=5)
    resumed.load_state_dict(batches.state_dict())
    batches.next_batch()
    with pytest.raises(AssertionError):  # mid-step there is no position to save
        batches.state_dict()
    resumed.next_batch()
    for _ in range(30):
        assert torch.equal(resumed.next_batch()[0], batches.next_batch()[0])


def test_loader_resumes_with_a_bigger_step(tmp_path):
    # saved by a run with 16-token steps, 48 tokens before the end of a 1000-token shard; resumed by
    # 2 ranks reading 4×8 each, whose 64-token step no longer fits there: both move on to the next shard
    from data import DataLoader

    d = _shards(tmp_path, [1000, 500], eot_every=1000)
    ranks = [DataLoader(d, "train", B=4, T=8, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict({"epoch": 0, "shard": 0, "pos": 952})
        x, _ = loader.next_batch()
        assert x.shape == (4, 8) and x[0, 1].item() == 1000 + loader.rank * 32 + 1


def test_shuffle_permutes_whole_documents(tmp_path):
    import numpy as np

    from data import EOT, DataLoader

    d = _shards(tmp_path, [2000], eot_every=9)
    plain = DataLoader(d, "train", B=1, T=16)
    shuffled = DataLoader(d, "train", B=1, T=16, shuffle=True, seed=0)
    assert sorted(shuffled.tokens.tolist()) == sorted(plain.tokens.tolist())  # same tokens
    assert shuffled.tokens.tolist() != plain.tokens.tolist()  # other order
    # every document (EOT + the 8 numbers after it) is still whole and in order
    t = np.asarray(shuffled.tokens)
    for start in np.flatnonzero(t == EOT):
        doc = t[start + 1: start + 9]
        if len(doc) == 8 and EOT not in doc:
            assert np.all(np.diff(doc) == 1)
    again = DataLoader(d, "train", B=1, T=16, shuffle=True, seed=0)
    assert again.tokens.tolist() == shuffled.tokens.tolist()  # seeded: every rank agrees
    other = DataLoader(d, "train", B=1, T=16, shuffle=True, seed=1)
    assert other.tokens.tolist() != shuffled.tokens.tolist()


def test_loader_errors(tmp_path):
    from data import DataLoader

    with pytest.raises(FileNotFoundError, match="python fineweb_edu.py"):
        DataLoader(str(tmp_path), "train", B=1, T=8)
    d = _shards(tmp_path, [10])
    with pytest.raises(ValueError, match="lower total_batch_size"):
        DataLoader(d, "train", B=4, T=8)
