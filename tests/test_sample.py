"""sample.py: seeded, streamed, greedy at temperature 0, and one clear line for each bad input."""

import io
import os
import sys
from dataclasses import asdict

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402
from data import EOT, gpt2_tokenizer  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random GPT-2 with the real vocabulary (so its tokens decode), saved as training saves it."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_pad_multiple=64)
    model = GPT(config)
    path = tmp_path_factory.mktemp("ckpt") / "step_000010.pt"
    torch.save({"model": model.state_dict(), "model_config": asdict(config), "step": 10}, path)
    return str(path), model


def run(capsys, *args):
    sample.main(["--device", "cpu", *args])
    return capsys.readouterr().out


def test_same_seed_same_text_other_seed_other_text(ckpt, capsys):
    path, _ = ckpt
    args = ["--model", path, "--prompt", "Hello, world", "--num_samples", "2", "--max_new_tokens", "20"]
    first = run(capsys, *args)
    assert first == run(capsys, *args)
    assert first != run(capsys, *args, "--seed", "7")
    assert first.startswith("Hello, world") and first.count("-" * 40) == 1  # two samples, one separator


def test_text_is_the_decoded_tokens_of_seeded_generate(ckpt, capsys):
    """What is printed is exactly tiktoken's decoding of what GPT.generate samples with the same seed and
    settings, up to the first <|endoftext|>: the streamed, incremental UTF-8 decoding loses nothing."""
    path, model = ckpt
    enc = gpt2_tokenizer()
    prompt = "Les élèves — 東京"
    out = run(capsys, "--model", path, "--prompt", prompt, "--num_samples", "1", "--max_new_tokens", "24",
              "--temperature", "1.0", "--top_k", "50", "--seed", "3")
    ids = enc.encode(prompt)
    gen = torch.Generator().manual_seed(3)
    tokens = model.eval().generate(torch.tensor([ids]), 24, temperature=1.0, top_k=50, generator=gen)[0, len(ids):]
    tokens = tokens.tolist()
    tokens = tokens[:tokens.index(EOT)] if EOT in tokens else tokens
    assert out == prompt + enc.decode(tokens) + "\n"


def test_temperature_zero_is_greedy(ckpt, capsys):
    path, model = ckpt
    enc = gpt2_tokenizer()
    out = run(capsys, "--model", path, "--prompt", "The", "--num_samples", "1", "--max_new_tokens", "12",
              "--temperature", "0")
    idx = torch.tensor([enc.encode("The")])
    expected = []
    with torch.no_grad():
        for _ in range(12):  # the likeliest token, one forward at a time, written here
            nxt = model(idx)[0][0, -1].argmax().item()
            if nxt == EOT:
                break
            expected.append(nxt)
            idx = torch.cat([idx, torch.tensor([[nxt]])], dim=1)
    assert out == "The" + enc.decode(expected) + "\n"


def test_no_prompt_starts_a_new_document(ckpt, capsys):
    path, model = ckpt
    out = run(capsys, "--model", path, "--num_samples", "1", "--max_new_tokens", "8", "--temperature", "0")
    greedy = model.eval().generate(torch.tensor([[EOT]]), 8, temperature=0)[0, 1:].tolist()
    greedy = greedy[:greedy.index(EOT)] if EOT in greedy else greedy
    assert out == gpt2_tokenizer().decode(greedy) + "\n"


def test_prompt_from_stdin_and_file(ckpt, capsys, monkeypatch, tmp_path):
    path, _ = ckpt
    args = ["--model", path, "--num_samples", "1", "--max_new_tokens", "6", "--temperature", "0"]
    direct = run(capsys, *args, "--prompt", "Once upon a time")
    (tmp_path / "p.txt").write_text("Once upon a time", encoding="utf-8")
    assert run(capsys, *args, "--prompt_file", str(tmp_path / "p.txt")) == direct
    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time"))
    assert run(capsys, *args, "-") == direct


def test_text_streams_while_generating(ckpt, capsys, monkeypatch):
    """Each token is written before the next forward runs, not all at the end."""
    path, _ = ckpt
    events = []
    real_load = sample.load_model

    def load_and_watch(spec, device):
        model = real_load(spec, device)
        model.register_forward_pre_hook(lambda *_: events.append("forward"))
        return model

    class Recorder(io.StringIO):
        def write(self, s):
            if s:
                events.append("write")
            return super().write(s)

    monkeypatch.setattr(sample, "load_model", load_and_watch)
    monkeypatch.setattr(sys, "stdout", Recorder())
    sample.main(["--device", "cpu", "--model", path, "--prompt", "Hi", "--num_samples", "1",
                 "--max_new_tokens", "10", "--temperature", "1.0", "--top_k", "0", "--seed", "1"])
    forwards = [i for i, e in enumerate(events) if e == "forward"]
    writes_between = [any(e == "write" for e in events[a:b]) for a, b in zip(forwards, forwards[1:])]
    assert len(forwards) >= 3 and all(writes_between[1:])  # after the prompt's forward, a write per token


@pytest.mark.parametrize("args, message", [
    (["--model", "no/such/model"], "--model no/such/model: expected one of"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "word " * 40], "longer than the model's context of 32"),
    (["--prompt_file", "/nonexistent/p.txt"], "--prompt_file /nonexistent/p.txt"),
    (["--temperature", "-1"], "--temperature (finite) and --top_k at least 0"),
    (["--temperature", "nan"], "--temperature (finite) and --top_k at least 0"),
    (["--num_samples", "0"], "--num_samples and --max_new_tokens must be at least 1"),
])
def test_bad_input_is_one_line(ckpt, capsys, args, message):
    path, _ = ckpt
    if "--model" not in args:
        args = ["--model", path, *args]
    with pytest.raises(SystemExit) as e:
        sample.main(["--device", "cpu", *args])
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)
    assert capsys.readouterr().out == ""  # nothing printed as a sample


def test_a_model_of_another_vocabulary_is_refused(tmp_path, capsys):
    """Its ids are not GPT-2's tokens: one line, not an IndexError or a KeyError mid-stream."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=300)
    path = tmp_path / "small.pt"
    torch.save({"model": GPT(config).state_dict(), "model_config": asdict(config)}, path)
    with pytest.raises(SystemExit) as e:
        sample.main(["--device", "cpu", "--model", str(path), "--prompt", "hello"])
    assert "vocabulary of 300 tokens, not GPT-2's 50257" in str(e.value) and capsys.readouterr().out == ""
