"""Beyond one node and beyond 124M: presets, the memory estimate, the micro-batch search, multi-node runs."""
import pytest
import torch

import train_gpt2
from model import GPT, GPTConfig
from train_gpt2 import estimate_memory, find_micro_batch, largest_fitting, parse_args


@pytest.mark.parametrize("preset, published", [(None, 124_439_808), ("gpt2-medium", 354_823_168),
                                                ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_presets_have_gpt2s_parameter_counts(preset, published):
    """OpenAI's checkpoints hold these counts (50257-token vocabulary, tied output layer)."""
    cfg, model_cfg = parse_args(["--preset", preset] if preset else [])
    with torch.device("meta"):
        model = GPT(GPTConfig(**{**vars(model_cfg), "vocab_pad_multiple": 1}))
    assert model.num_params(non_embedding=False) == published
    assert cfg.total_batch_size % (cfg.micro_batch_size * cfg.seq_len * 8) == 0  # 8 GPUs divide the batch
    # the micro batch was chosen to fit an 80 GB GPU by the estimate
    assert estimate_memory(model_cfg, cfg.micro_batch_size, cfg.seq_len, world_size=8) < 75 * 2**30


@pytest.mark.parametrize("shape", [(2, 4, 128, 128, 4, 50257), (6, 6, 384, 128, 2, 50257), (3, 8, 512, 256, 2, 4096)])
def test_memory_estimate_bounds_the_measured_peak(shape):
    """The estimate against what torch's MemTracker counts in a second training step (bf16 autocast, CPU):
    never below it, and not more than 30% above."""
    from torch.distributed._tools.mem_tracker import MemTracker

    n_layer, n_head, n_embd, seq_len, micro_batch, vocab = shape
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=seq_len, vocab_size=vocab,
                    vocab_pad_multiple=64)
    model = GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, vocab, (micro_batch, seq_len))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state exists from here on
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    measured = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    estimate = estimate_memory(cfg, micro_batch, seq_len)
    assert measured <= estimate <= 1.3 * measured


def test_largest_fitting_is_a_binary_search():
    candidates = [1, 2, 4, 8, 16, 32, 64]
    for limit in [0, 1, 3, 8, 40, 64, 1000]:
        calls = []
        fits = lambda m: calls.append(m) or m <= limit
        assert largest_fitting(candidates, fits) == max([c for c in candidates if c <= limit], default=None)
        assert len(calls) <= 3  # log2(7) rounded up


def test_find_micro_batch_tries_real_steps(monkeypatch):
    """The search runs real training steps; an out-of-memory error (simulated above 6 sequences) means
    too big. Candidates divide the tokens each rank handles per step: 12 sequences -> 1, 2, 3, 4, 6, 12."""
    cfg, model_cfg = parse_args(["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "8",
                                 "--seq_len", "8", "--total_batch_size", "96", "--vocab_size", "64",
                                 "--vocab_pad_multiple", "1"])
    tried = []
    forward = GPT.forward

    def limited(self, idx, targets=None):
        tried.append(idx.shape[0])
        if idx.shape[0] > 6:
            raise torch.OutOfMemoryError("simulated")
        return forward(self, idx, targets)

    monkeypatch.setattr(GPT, "forward", limited)
    assert find_micro_batch(cfg, model_cfg, "cpu", 1) == 6
    assert set(tried) <= {1, 2, 3, 4, 6, 12} and 12 in tried


def test_find_micro_batch_needs_cuda(tmp_path):
    with pytest.raises(SystemExit, match="--find_micro_batch print: takes print or use, and a CUDA GPU"):
        train_gpt2.train(*parse_args(["--find_micro_batch", "print", "--device", "cpu"]))
