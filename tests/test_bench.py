"""The benchmarks run end to end on a tiny config and print every figure they promise."""

import re

from conftest import run_script


def test_bench_train_prints_every_figure():
    out = run_script("bench/bench_train.py", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size",
                     "32", "--seq_len", "32", "--micro_batch_size", "2", "--device", "cpu", "--steps", "2",
                     "--warmup", "1", "--peak_flops", "1e12").stdout
    loop = re.search(r"train_gpt2 loop\s+([\d.]+) ms/step \|\s+([\d,]+) tokens/s \| MFU ([\d.]+)%", out)
    bare = re.search(r"bare step\s+([\d.]+) ms/step \|\s+([\d,]+) tokens/s", out)
    assert loop and bare, out
    ratio = float(re.search(r"loop / bare\s+([\d.]+)", out).group(1))
    assert abs(ratio - float(loop.group(1)) / float(bare.group(1))) < 0.01
    assert re.search(r"peak memory\s+[\d.]+ GiB", out)
    fused = re.search(r"loss fused\s+([\d.]+) ms fwd\+bwd \| peak\s+([\d.]+) MiB", out)
    plain = re.search(r"loss plain\s+([\d.]+) ms fwd\+bwd \| peak\s+([\d.]+) MiB", out)
    assert fused and plain, out
    assert float(fused.group(2)) < float(plain.group(2))  # 64 rows: one chunk, and still no fp32 logits kept
    assert re.search(r"fwd\+bwd model.py\s+[\d,]+ tokens/s \| HF GPT2LMHeadModel\s+[\d,]+ tokens/s \| ratio [\d.]+", out)
    assert "64 tokens = 2 × 32 × 1 micro-steps" in out


def test_bench_optim_times_every_optimizer():
    out = run_script("bench/bench_optim.py", "--iters", "1", "--warmup", "1", "--n_layer", "1", "--n_head", "2",
                     "--n_embd", "32", "--block_size", "32", "--seq_len", "32", "--micro_batch_size", "2",
                     "--device", "cpu").stdout
    fb = float(re.search(r"forward\+backward:\s+([\d.]+) ms", out).group(1))
    for kind in ("adamw", "muon", "sphere", "manifold_muon"):
        m = re.search(rf"\b{kind} step:\s+([\d.]+) ms\s+\(\s*([\d.]+)% of", out)
        assert m, (kind, out)
        # share = 100·s/(fb+s) of the printed times, each rounded to ±0.05 ms, so it may be off by up to
        # 100·0.05·(fb+s)/(fb+s)² = 5/(fb+s) points, plus 0.05 for the printed share's own rounding
        s = float(m.group(1))
        assert abs(float(m.group(2)) - 100 * s / (fb + s)) <= 5 / (fb + s) + 0.05 + 1e-9, (kind, out)


def test_bench_generate_times_both_paths():
    out = run_script("bench/bench_generate.py", "--n_layer", "2", "--n_head", "4", "--n_kv_head", "2", "--n_embd",
                     "32", "--block_size", "32", "--vocab_size", "128", "--pos", "rope", "--sinks", "--window", "4",
                     "--max_new_tokens", "12", "--batch_size", "2", "--device", "cpu").stdout
    assert "4 heads (2 kv heads), vocab 128, block_size 32" in out, out
    assert "2 × (8-token prompt + 12 new tokens)" in out
    seconds = {}
    for label in ("with cache", "without cache"):
        m = re.search(rf"{label}\s+([\d,.]+) tokens/s \|\s+([\d.]+) ms/token \|\s+([\d.]+) s", out)
        assert m, (label, out)
        tokens_per_s, s = float(m.group(1).replace(",", "")), float(m.group(3))
        # the figures agree, up to their printed rounding (±0.0005 s, ±0.05 tokens/s)
        assert 24 / (s + 0.0005) - 0.05 <= tokens_per_s <= 24 / max(s - 0.0005, 1e-9) + 0.05, (label, out)
        seconds[label] = s
    speedup = float(re.search(r"cache speedup\s+([\d.]+)×", out).group(1))
    with_cache, without = seconds["with cache"], seconds["without cache"]
    assert (without - 0.0005) / (with_cache + 0.0005) - 0.005 <= speedup, out
    assert speedup <= (without + 0.0005) / max(with_cache - 0.0005, 1e-9) + 0.005, out
    assert re.search(r"same tokens\s+yes", out)  # fp32
