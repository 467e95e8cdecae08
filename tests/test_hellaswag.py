import contextlib
import http.server
import json
import math
import os
import re
import subprocess
import sys
import threading
from dataclasses import asdict

import pytest
import torch
from torch import nn

import hellaswag
from checkpoint import load_model
from conftest import make_hellaswag_examples as make_examples
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def write_jsonl(path, examples):
    with open(path, "w") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")


@pytest.fixture(scope="module")
def examples():
    return make_examples(12)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, examples):
    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl"
    write_jsonl(path, examples)
    return str(path)


@pytest.fixture(scope="module")
def hf_gpt(tiny_hf_dir):
    return load_model(tiny_hf_dir, "cpu")


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A checkpoint folder as training writes it: step_NNNNNN.pt plus a `latest` file naming it.
    block_size 64 crops some rows; the padded vocab checks that padded logits are never scored."""
    config = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, vocab_pad_multiple=64)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = GPT(config)
    path = tmp_path_factory.mktemp("ckpt")
    torch.save({"model": model.state_dict(), "model_config": asdict(config), "step": 10}, path / "step_000010.pt")
    (path / "latest").write_text("step_000010.pt\n")
    return str(path)


def test_load_examples(data_file, examples):
    assert hellaswag.load_examples(data_file) == examples
    assert hellaswag.load_examples(data_file, limit=3) == examples[:3]


@pytest.mark.parametrize("which", ["hf_dir", "checkpoint"])
def test_batched_matches_reference(which, hf_gpt, ckpt_dir, examples, enc):
    model = hf_gpt if which == "hf_dir" else load_model(ckpt_dir, "cpu")
    if which == "checkpoint":
        assert model.config.block_size == 64 and model.config.padded_vocab_size == 50304
        longest = max(len(enc.encode_ordinary(e["ctx"] + " " + ending)) for e in examples for ending in e["endings"])
        assert longest > 64  # so some rows are cropped
    sum_loss, n_tokens = hellaswag.ending_losses(model, examples, device="cpu", batch_size=5)
    ref_sum, ref_n = hellaswag.reference_losses(model, examples, device="cpu")
    assert torch.equal(n_tokens, ref_n)
    torch.testing.assert_close(sum_loss / n_tokens, ref_sum / ref_n, rtol=0, atol=1e-5)  # mean loss per token

    # the counts, computed here from the reference losses
    labels = torch.tensor([example["label"] for example in examples])
    correct = (ref_sum.argmin(1) == labels).sum().item()
    correct_norm = ((ref_sum / ref_n).argmin(1) == labels).sum().item()
    expected = {"acc": correct / 12, "acc_norm": correct_norm / 12, "n": 12, "correct": correct,
                "correct_norm": correct_norm}
    assert hellaswag.evaluate(model, examples, device="cpu", batch_size=5) == expected
    assert hellaswag.evaluate(model, examples, device="cpu", reference=True) == expected


def hf_ending_losses(hf, enc, ctx_tokens, endings, block_size=None):
    """Summed loss of each ending as Hugging Face's GPT2LMHeadModel computes it (it shifts labels itself)."""
    losses = []
    for ending in endings:
        end = enc.encode_ordinary(" " + ending)
        ids = (ctx_tokens + end)[-block_size:] if block_size else ctx_tokens + end
        labels = [-100] * (len(ids) - len(end)) + end
        with torch.no_grad():
            mean = hf(torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        losses.append(mean * len(end))
    return torch.tensor(losses)


def test_matches_hugging_face(tiny_hf_dir, hf_gpt, examples, enc):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    sum_loss, _ = hellaswag.ending_losses(hf_gpt, examples[:3], device="cpu")
    for i, example in enumerate(examples[:3]):
        expected = hf_ending_losses(hf, enc, enc.encode_ordinary(example["ctx"]), example["endings"])
        torch.testing.assert_close(sum_loss[i], expected, rtol=1e-5, atol=1e-4)


def test_context_longer_than_block_size(tiny_hf_dir, hf_gpt, enc):
    from transformers import GPT2LMHeadModel

    long = make_examples(1, seed=7)[0]
    long["ctx"] = " ".join([long["ctx"]] * 20)
    ctx_tokens = enc.encode_ordinary(long["ctx"])
    assert len(ctx_tokens) > 3 * hf_gpt.config.block_size
    sum_loss, n_tokens = hellaswag.ending_losses(hf_gpt, [long], device="cpu")
    ref_sum, ref_n = hellaswag.reference_losses(hf_gpt, [long], device="cpu")
    # every ending token is still scored: only the far left of the context was cropped
    assert n_tokens[0].tolist() == [len(enc.encode_ordinary(" " + e)) for e in long["endings"]] == ref_n[0].tolist()
    hf = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    expected = hf_ending_losses(hf, enc, ctx_tokens, long["endings"], block_size=128)
    torch.testing.assert_close(sum_loss[0], expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ref_sum[0], expected, rtol=1e-5, atol=1e-4)


class UnigramModel(nn.Module):
    """Ignores its input: at every position it gives the same logits, `bonus` higher for the `good`
    tokens, so the loss of each ending token is known in closed form."""

    def __init__(self, good, bonus):
        super().__init__()
        self.config = GPTConfig(block_size=32)
        scores = torch.zeros(self.config.vocab_size)
        scores[good] = bonus
        self.register_buffer("scores", scores)

    def features(self, idx):
        return torch.zeros(*idx.shape, 1)

    def head(self, x):
        return self.scores.expand(*x.shape[:-1], -1)

    def forward(self, idx):
        return self.head(self.features(idx)), None


def test_known_accuracy(enc):
    yes, no = enc.encode_ordinary(" yes"), enc.encode_ordinary(" no")
    assert len(yes) == len(no) == 1 and enc.encode_ordinary(" yes yes yes yes") == yes * 4
    bonus = 8.0
    log_z = math.log(math.exp(bonus) + 50256)
    good, bad = log_z - bonus, log_z  # the loss of one " yes" (2.88) and of one " no" (10.88)
    # "yes yes yes yes" has the lowest mean loss, but its sum (4 x 2.88) is above a lone "no" (10.88):
    # acc and acc_norm pick different endings
    endings = ["no", "yes yes yes yes", "no no", "no no no"]
    examples = [
        {"ctx": "Do you agree?", "endings": endings, "label": 1},  # acc wrong, acc_norm right
        {"ctx": "Say it again.", "endings": endings, "label": 1},  # acc wrong, acc_norm right
        {"ctx": "Do you agree?", "endings": endings, "label": 0},  # acc right, acc_norm wrong
        {"ctx": "Well?", "endings": ["no no", "yes", "no", "no no no"], "label": 1},  # both right
        {"ctx": "Well?", "endings": endings, "label": 3},  # both wrong
    ]
    model = UnigramModel(yes, bonus)
    sum_loss, n_tokens = hellaswag.ending_losses(model, examples, device="cpu", batch_size=2)
    torch.testing.assert_close(sum_loss[0], torch.tensor([bad, 4 * good, 2 * bad, 3 * bad]), rtol=1e-5, atol=0)
    assert n_tokens[0].tolist() == [1, 4, 2, 3]
    expected = {"acc": 2 / 5, "acc_norm": 3 / 5, "n": 5, "correct": 2, "correct_norm": 3}
    assert hellaswag.evaluate(model, examples, device="cpu", batch_size=2) == expected
    assert hellaswag.evaluate(model, examples, device="cpu", reference=True) == expected


def test_batch_size_does_not_matter(hf_gpt, examples):
    results = [hellaswag.evaluate(hf_gpt, examples, device="cpu", batch_size=b) for b in (1, 7, 64)]
    assert results[0] == results[1] == results[2]


def test_restores_mode_and_leaves_rng_alone(hf_gpt, examples):
    for training in (True, False):
        hf_gpt.train(training)
        rng = torch.get_rng_state()
        hellaswag.evaluate(hf_gpt, examples[:4], device="cpu")
        assert hf_gpt.training == training
        assert torch.equal(torch.get_rng_state(), rng)


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="expected one of gpt2"):
        load_model(str(tmp_path / "nothing_here"), "cpu")
    torch.save({"state_dict": {}}, tmp_path / "wrong_keys.pt")
    with pytest.raises(ValueError, match="'model' and 'model_config'"):
        load_model(str(tmp_path / "wrong_keys.pt"), "cpu")


# ---- command line ----


def run_cli(*args, launcher=()):
    cmd = [sys.executable, *launcher, "hellaswag.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def parse(stdout):
    """{"acc": (value, correct, n), "acc_norm": ...} from the CLI's output."""
    return {m[1]: (float(m[2]), int(m[3]), int(m[4]))
            for m in re.finditer(r"^(acc|acc_norm) +([\d.]+) +\((\d+)/(\d+)\)", stdout, re.MULTILINE)}


# the CLI tests load the checkpoint rather than the HF folder: importing transformers alone takes ~7 s here


def test_cli(ckpt_dir, data_file, examples):
    out = run_cli("--model", ckpt_dir, "--data_file", data_file, "--device", "cpu", "--limit", "10")
    assert out.returncode == 0, out.stderr
    r = hellaswag.evaluate(load_model(ckpt_dir, "cpu"), examples[:10], device="cpu")
    assert parse(out.stdout) == {"acc": (round(r["acc"], 4), r["correct"], 10),
                                 "acc_norm": (round(r["acc_norm"], 4), r["correct_norm"], 10)}
    assert "mean loss per ending token" in out.stdout
    assert re.search(r"^n +10$", out.stdout, re.MULTILINE)
    assert "examples/s" in out.stdout


def test_cli_bad_model(data_file, tmp_path):
    out = run_cli("--model", str(tmp_path / "no_such_model"), "--data_file", data_file, "--device", "cpu")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()  # one line, no traceback
    assert len(lines) == 1 and lines[0].startswith("error: --model") and "no_such_model" in lines[0], out.stderr


def test_cli_missing_data_file(ckpt_dir, tmp_path):
    # in-process (a subprocess costs seconds of torch import): sys.exit(message) prints the message
    # to stderr and exits with status 1
    with pytest.raises(SystemExit) as e:
        hellaswag.main(["--model", ckpt_dir, "--data_file", str(tmp_path / "no_such_file.jsonl"), "--device", "cpu"])
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("error:") and "no_such_file.jsonl" in message


def test_torchrun_two_ranks(ckpt_dir, data_file, examples):
    # gloo on CPU: each rank scores half the examples, the counts are summed over both
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    out = run_cli("--model", ckpt_dir, "--data_file", data_file, "--device", "cpu", "--limit", "7", launcher=launcher)
    assert out.returncode == 0, out.stderr
    r = hellaswag.evaluate(load_model(ckpt_dir, "cpu"), examples[:7], device="cpu")
    assert parse(out.stdout) == {"acc": (round(r["acc"], 4), r["correct"], 7),
                                 "acc_norm": (round(r["acc_norm"], 4), r["correct_norm"], 7)}
    assert "2 ranks" in out.stdout and out.stdout.count("examples/s") == 1  # rank 0 prints, once


# ---- download ----


@contextlib.contextmanager
def serve(body, *, fail_first=0, truncate=False):
    """A local HTTP server in a thread. The first `fail_first` requests get a 503; with truncate the
    connection drops halfway through the body. Yields the URL template and the list of requests."""
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if len(requests) <= fail_first:
                self.send_error(503)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if truncate else body)

        def log_message(self, *args):  # keep the test output quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hellaswag_{{split}}.jsonl", requests
    finally:
        server.shutdown()
        server.server_close()


def test_download_retries_then_caches(tmp_path, data_file, examples, capsys):
    body = open(data_file, "rb").read()
    cache = tmp_path / "cache"
    with serve(body, fail_first=1) as (url, requests):
        path = hellaswag.download("val", cache, url=url, backoff_s=0)
        assert requests == ["/hellaswag_val.jsonl"] * 2  # one failure, one retry
        assert "retrying" in capsys.readouterr().err
        assert hellaswag.download("val", cache, url=url, backoff_s=0) == path
        assert len(requests) == 2  # the second call reads the cache
    assert os.listdir(cache) == ["hellaswag_val.jsonl"]  # no temp files left
    assert hellaswag.load_examples(path) == examples


def test_download_failure_leaves_no_file(tmp_path):
    cache = tmp_path / "cache"
    with serve(b'{"ctx": "x"}\n' * 100, truncate=True) as (url, requests):
        with pytest.raises(RuntimeError, match="could not download .*; pass --data_file"):
            hellaswag.download("val", cache, url=url, attempts=3, backoff_s=0)
        assert len(requests) == 3
    assert not cache.exists() or os.listdir(cache) == []


# ---- benchmark ----


def test_bench_runs(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_hellaswag", os.path.join(ROOT, "bench", "bench_hellaswag.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with torch.random.fork_rng():  # the script seeds the global RNG for its random model
        bench.main(["--size", "tiny", "--n", "6", "--batch_size", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("examples/s") == 2 and "speedup" in out and "same counts" in out, out


def test_examples_are_tokenised_once(examples, monkeypatch):
    """Training evaluates the same examples every few hundred steps: the second time reads no tokenizer."""
    import hellaswag
    from data import gpt2_tokenizer

    enc = gpt2_tokenizer()
    first = [hellaswag.rendered(e, 64) for e in examples]
    assert first == [hellaswag.render(e, enc, 64) for e in examples]
    monkeypatch.setattr(hellaswag, "render", lambda *a: pytest.fail("tokenised again"))
    assert [hellaswag.rendered(e, 64) for e in examples] == first
