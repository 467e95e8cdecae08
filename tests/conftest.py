import os
import random
import sys

import pytest

# One intra-op thread per process: the tests' models are tiny, so a second thread buys nothing, and where
# processes share the cores (two DDP ranks, a neighbour's job, pytest-xdist's workers) a parallel region
# waits on a descheduled thread at every op: a manifold-Muon test took 100 s that way against 0.1 s.
# Set before torch is imported; every script a test starts inherits it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts live at the top level, not in a package

# never let a test reach the network: the HF hub and datasets read local files only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random Hugging Face GPT2LMHeadModel saved to disk (config.json + model.safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**TINY))
    with torch.no_grad():  # HF initialises biases to 0 and LayerNorms to 1/0: randomise every tensor so
        for p in hf.parameters():  # that a bias or gain lost on import or export shows in the logits
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("tiny_hf")
    hf.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def enc():
    from data import gpt2_tokenizer

    return gpt2_tokenizer()


WORDS = ("the a cat dog sat ran on under mat tree and then it was happy sad because of rain sun in "
         "town sea old new big small house river went home saw bird").split()


def make_corpus(n_docs, seed=0):
    """Documents of English-like word salad with some regularity a tiny model can learn."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(2, 12))]
        docs.append(" ".join(sentences))
    return docs


def run_script(*args, env=None, timeout=600, check=True):
    """Run one of the repo's scripts with this interpreter; returns the CompletedProcess."""
    import subprocess

    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    if check and out.returncode != 0:
        raise AssertionError(f"{args[0]} exited {out.returncode}\nstdout:\n{out.stdout[-3000:]}\n"
                             f"stderr:\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory):
    """Tiny token shards made the way users make them: fineweb_edu.py --input corpus.jsonl."""
    import json

    root = tmp_path_factory.mktemp("shards")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_corpus(1500)))
    data_dir = root / "data"
    run_script("fineweb_edu.py", "--input", str(corpus), "--data_dir", str(data_dir), "--shard_size", "20000",
               "--num_proc", "1")
    return str(data_dir)


HELLASWAG_WORDS = ("the a man woman child dog cat ball water kitchen knife onion bread slowly carefully quickly then "
         "he she they is are runs picks up puts down into onto over under table garden bike ladder paint "
         "brush wall window door opens closes smiles jumps laughs cuts washes throws catches rides").split()


def make_hellaswag_examples(n, seed=0):
    """n examples in rowanz/hellaswag's shape: contexts of 4-60 words, endings of 1-20."""
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(HELLASWAG_WORDS) for _ in range(rng.randint(lo, hi)))

    examples = []
    for i in range(n):
        ctx_a, ctx_b = words(3, 50).capitalize() + ".", words(1, 10)
        examples.append({
            "ind": i, "activity_label": "Synthetic", "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}",
            "split": "val", "split_type": "indomain", "label": rng.randrange(4),
            "endings": [words(1, 20) + "." for _ in range(4)], "source_id": f"synthetic~{i}",
        })
    return examples


@pytest.fixture(scope="session")
def hellaswag_file(tmp_path_factory):
    """A small local file in rowanz/hellaswag's jsonl shape."""
    import json

    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_hellaswag_examples(12, seed=1)))
    return str(path)


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory, enc):
    """Two short train shards, so a dozen steps of 256 tokens cross shard ends and an epoch."""
    from data import EOT, write_shard

    data_dir = tmp_path_factory.mktemp("small_shards")
    tokens = []
    for doc in make_corpus(120, seed=3):
        tokens += [EOT] + enc.encode_ordinary(doc)
    write_shard(data_dir / "t_val_000000.bin", tokens[:2000])
    write_shard(data_dir / "t_train_000001.bin", tokens[2000:3600])
    write_shard(data_dir / "t_train_000002.bin", tokens[3600:5400])
    return str(data_dir)


class FullDisk:
    """A file on a disk with room for `room` more bytes: writes past it fail as a full disk does (ENOSPC)."""

    def __init__(self, f, room=1000):
        self.f, self.used, self.room = f, 0, room

    def write(self, b):
        import errno

        if self.used + len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.used += len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


class NoBackgroundPlot:
    """train_gpt2's BackgroundPlot, drawing nothing: the run's end still draws plot.png, in-process."""

    def __init__(self, run_dir):
        pass

    def request(self):
        return False

    def wait(self, timeout=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.fixture(autouse=True)
def no_background_plots(monkeypatch):
    """Runs trained in the test process redraw no plot.png after each evaluation, only at their end: each
    redraw is a Python process (~0.5 s of CPU), about 100 in a suite whose runs evaluate every few steps.
    (Runs started as scripts keep them; test_monitor tests BackgroundPlot itself.)"""
    import train_gpt2

    monkeypatch.setattr(train_gpt2, "BackgroundPlot", NoBackgroundPlot)
