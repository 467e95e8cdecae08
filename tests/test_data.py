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
