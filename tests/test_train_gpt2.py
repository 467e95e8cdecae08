import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import distributed
import train_gpt2
from conftest import ROOT, run_script
from model import GPT, GPTConfig
from train_gpt2 import TrainConfig, get_lr, grad_accum_steps, parse_args

# a model small enough for 2 CPU cores; the real GPT-2 vocabulary so shards and samples are real text
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--seq_len", "32",
        "--micro_batch_size", "4", "--total_batch_size", "256", "--warmup_steps", "2", "--max_lr", "3e-3",
        "--val_steps", "1", "--hellaswag_every", "0", "--sample_every", "0", "--checkpoint_every_minutes", "0",
        "--device", "cpu"]


def tiny_args(tmp_path, data_dir, name, *extra):
    return [*TINY, "--data_dir", data_dir, "--log_dir", str(tmp_path / "logs"), "--run_name", name,
            "--checkpoint_dir", str(tmp_path / "ckpt" / name), *extra]


def run_inprocess(argv):
    return train_gpt2.train(*parse_args(argv))


def events(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["event"] == kind]


def losses_by_step(run_dir, kind="train", key="loss"):
    return {r["step"]: r[key] for r in events(run_dir, kind)}


def final_weights(ckpt_dir):
    with open(os.path.join(ckpt_dir, "latest")) as f:
        return torch.load(os.path.join(ckpt_dir, f.read().strip()), weights_only=True)["model"]


# ---- configuration ----

def test_flags_config_file_and_bools(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"max_lr": 1e-3, "n_layer": 3, "compile": True}))
    cfg, model_cfg = parse_args(["--config", str(cfg_file), "--micro_batch_size", "16", "--seq_len=128",
                                 "--n_layer", "5", "--no-compile"])
    assert cfg.max_lr == 1e-3 and cfg.micro_batch_size == 16 and cfg.seq_len == 128
    assert model_cfg.n_layer == 5  # the flag wins over the file
    assert cfg.compile is False
    assert model_cfg.vocab_pad_multiple == 64 and model_cfg.padded_vocab_size == 50304
    default, _ = parse_args([])
    assert default == TrainConfig() and default.compile is None  # None: on for CUDA only
    # a run's config.json is accepted as --config
    # ... without its identity: a new run, not the old one's checkpoints
    nested = tmp_path / "run.json"
    nested.write_text(json.dumps({"train": {"seq_len": 64, "run_name": "old", "checkpoint_dir": "/vol/old",
                                            "resume": "/vol/old/step_000100.pt"},
                                  "model": {"n_embd": 48}, "run": {"ignored": 1}}))
    cfg, model_cfg = parse_args(["--config", str(nested)])
    assert cfg.seq_len == 64 and model_cfg.n_embd == 48
    assert (cfg.run_name, cfg.checkpoint_dir, cfg.resume) == ("", "", "auto")


def test_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"learning_rate": 1e-3}))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(bad)])
    assert "unknown settings learning_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--micro_batch_size", "x"])
    assert "invalid int value: 'x'" in capsys.readouterr().err
    bad.write_text(json.dumps({"compile": "false"}))  # a string, which Python would read as True
    with pytest.raises(SystemExit):
        parse_args(["--config", str(bad)])
    assert "compile must be" in capsys.readouterr().err


def test_cuda_device_gets_an_index(monkeypatch):
    # torch.cuda.set_device("cuda") raises: a single-GPU run must name cuda:0 (checked without a GPU)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    rank, local_rank, world_size, device = distributed.setup_distributed(TrainConfig())
    assert (rank, world_size, device, calls) == (0, 1, "cuda:0", ["cuda:0"])
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.setup_distributed(TrainConfig(device="cuda"))[3] == "cuda:3"


def test_peak_flops_lookup(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A10G")
    assert distributed.peak_flops_per_device(TrainConfig(), "cuda") is None  # not the A10's figure
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert distributed.peak_flops_per_device(TrainConfig(), "cuda") == 989e12
    assert distributed.peak_flops_per_device(TrainConfig(peak_flops=1e12), "cpu") == 1e12


def test_defaults_reproduce_build_nanogpt():
    cfg = TrainConfig()
    assert (cfg.total_batch_size, cfg.seq_len, cfg.max_steps, cfg.warmup_steps) == (524288, 1024, 19073, 715)
    assert (cfg.max_lr, cfg.min_lr_frac, cfg.weight_decay, cfg.grad_clip) == (6e-4, 0.1, 0.1, 1.0)
    assert (cfg.beta1, cfg.beta2, cfg.eps) == (0.9, 0.95, 1e-8)
    assert grad_accum_steps(cfg, world_size=8) == 1 and grad_accum_steps(cfg, world_size=1) == 8


def test_grad_accum_arithmetic():
    cfg = TrainConfig(total_batch_size=1024, micro_batch_size=4, seq_len=32)
    assert grad_accum_steps(cfg, 1) == 8 and grad_accum_steps(cfg, 2) == 4 and grad_accum_steps(cfg, 8) == 1
    with pytest.raises(SystemExit, match=r"not a multiple of micro_batch_size·seq_len·world_size = 4·32·3 = 384"):
        grad_accum_steps(cfg, 3)
    with pytest.raises(SystemExit, match="--micro_batch_size"):
        grad_accum_steps(TrainConfig(total_batch_size=1000, micro_batch_size=3, seq_len=32), 1)


def test_bad_batch_on_the_command_line(shard_dir, tmp_path):
    out = run_script("train_gpt2.py", *tiny_args(tmp_path, shard_dir, "bad"), "--total_batch_size", "300",
                     check=False)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("error: total_batch_size 300 is not a multiple")


def test_lr_schedule():
    cfg = TrainConfig(max_lr=6e-4, min_lr_frac=0.1, warmup_steps=10, max_steps=110)
    assert get_lr(0, cfg) == pytest.approx(6e-5)  # (step+1)/warmup: never exactly 0
    assert get_lr(9, cfg) == pytest.approx(6e-4)
    assert get_lr(10, cfg) == pytest.approx(6e-4)  # peak, then cosine
    assert get_lr(60, cfg) == pytest.approx(0.5 * (6e-4 + 6e-5))  # half way down the cosine
    assert get_lr(35, cfg) == pytest.approx(6e-5 + 0.5 * (1 + math.cos(math.pi / 4)) * 5.4e-4)
    assert get_lr(110, cfg) == pytest.approx(6e-5) and get_lr(500, cfg) == pytest.approx(6e-5)
    lrs = [get_lr(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_inv_sqrt_without_warmup_needs_a_reference_step(tmp_path):
    """inv_sqrt decays from lr_ref_steps, by default warmup_steps: with neither, it would start at step 1."""
    argv = tiny_args(tmp_path, str(tmp_path / "nope"), "x", "--lr_schedule", "inv_sqrt", "--warmup_steps", "0")
    with pytest.raises(SystemExit, match=r"inv_sqrt with --warmup_steps 0 .* set --lr_ref_steps"):
        run_inprocess(argv)
    with pytest.raises(SystemExit, match="make shards first"):  # with it, the run gets as far as its data
        run_inprocess([*argv, "--lr_ref_steps", "100"])


def test_missing_data_dir(tmp_path):
    with pytest.raises(SystemExit, match="does not exist; make shards first: python fineweb_edu.py"):
        run_inprocess(tiny_args(tmp_path, str(tmp_path / "nope"), "x"))


# ---- a whole run ----

def test_tiny_run_end_to_end(shard_dir, hellaswag_file, tmp_path):
    """python train_gpt2.py on shards from fineweb_edu.py: loss falls and every log file is right."""
    args = tiny_args(tmp_path, shard_dir, "e2e", "--max_steps", "30", "--val_every", "10",
                     "--hellaswag_every", "15", "--hellaswag_file", hellaswag_file, "--sample_every", "15",
                     "--num_samples", "2", "--sample_tokens", "5", "--checkpoint_every", "20")
    out = run_script("train_gpt2.py", *args)
    run_dir = tmp_path / "logs" / "e2e"
    files = sorted(os.listdir(run_dir))
    assert [f for f in files if not f.startswith("events.out.tfevents.")] == \
        ["config.json", "log.txt", "metrics.jsonl", "plot.png", "report.md", "samples.txt"]

    train = losses_by_step(run_dir)
    assert sorted(train) == list(range(30))
    assert np.mean([train[s] for s in range(25, 30)]) < np.mean([train[s] for s in range(5)]) - 1.0
    val = losses_by_step(run_dir, "val", "val_loss")
    assert sorted(val) == [0, 10, 20, 30] and val[30] < val[0] - 1.0
    hella = events(run_dir, "hella")
    assert [h["step"] for h in hella] == [0, 15, 30] and all(h["n"] == 12 for h in hella)
    rec = events(run_dir, "train")[0]
    for key in ("loss", "lr", "grad_norm", "dt_ms", "tokens_per_sec", "tokens", "elapsed_s"):
        assert key in rec

    # log.txt keeps build-nanogpt's exact format, which old plotting notebooks parse
    lines = (run_dir / "log.txt").read_text().splitlines()
    assert lines[0] == f"0 val {val[0]:.4f}"
    assert f"0 train {train[0]:.6f}" in lines and f"30 hella {hella[-1]['acc_norm']:.4f}" in lines

    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["max_steps"] == 30 and config["model"]["n_embd"] == 32
    assert config["run"]["world_size"] == 1 and config["run"]["grad_accum_steps"] == 2
    samples = (run_dir / "samples.txt").read_text().splitlines()
    assert len(samples) == 6 and all("Hello, I'm a language model," in s for s in samples)
    assert (run_dir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "step    29 | loss" in out.stdout

    ckpt_dir = tmp_path / "ckpt" / "e2e"
    assert (ckpt_dir / "latest").read_text().strip() == "step_000030.pt"
    assert (ckpt_dir / "step_000020.pt").exists()
    ckpt = torch.load(ckpt_dir / "step_000030.pt", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])  # plain names: no _orig_mod. or module. prefixes
    assert ckpt["train_config"]["max_steps"] == 30 and ckpt["step"] == 30 and ckpt["finished"]
    assert ckpt["evals"]["val_loss"] == pytest.approx(val[30])

    # TensorBoard (installed with the dev group): its own reader finds every series, at every step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for tag, steps in {"train/loss": range(30), "train/lr": range(30), "train/grad_norm": range(30),
                       "perf/tokens_per_sec": range(30), "val/loss": [0, 10, 20, 30],
                       "hellaswag/acc_norm": [0, 15, 30]}.items():
        assert [e.step for e in acc.Scalars(tag)] == list(steps), tag
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([train[s] for s in range(30)])
    assert acc.Scalars("val/loss")[-1].value == pytest.approx(val[30])
    assert [e.step for e in acc.Tensors("samples/text_summary")] == [0, 15, 30]  # add_text

    # report.md: this run's figures, cross-checked against metrics.jsonl, and a plot that exists
    report = (run_dir / "report.md").read_text()
    dts = [r["dt_ms"] for r in events(run_dir, "train")]
    assert "finished: 30 of 30 steps" in report and f"| tokens | {30 * 256:,} |" in report
    assert f"| final val loss | {val[30]:.4f} (step 30) | 3.2924 |" in report
    assert f"{min(val.values()):.4f} (step {min(val, key=val.get)})" in report
    assert f"| HellaSwag acc_norm | {hella[-1]['acc_norm']:.4f} (step 30) | 0.2945 | 0.337 |" in report
    assert f"| mean tokens/s | {30 * 256 / (sum(dts) / 1000):,.0f} " in report
    assert config["run"]["git_commit"] in report and "cpu × 1" in report
    assert "![loss and HellaSwag](plot.png)" in report and "## Samples at step 30" in report


def torchrun(nproc, *args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "train_gpt2.py", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_ddp_matches_single_process(small_shards, tmp_path):
    """2 ranks × 2 micro-steps of 2 sees the same tokens as 1 rank × 2 micro-steps of 4: the same logged
    losses, across shard ends and an epoch (6 steps fit in a shard). The DDP run is compiled (DDP inside
    torch.compile, its backward split at the gradient buckets, the all-reduce skipped on the first
    micro-step), the single one eager."""
    out = torchrun(2, *tiny_args(tmp_path, small_shards, "ddp", "--max_steps", "14", "--val_every", "5",
                                 "--micro_batch_size", "2", "--compile"))
    assert "broadcast_buffers" not in out.stderr, out.stderr[-3000:]  # torch >= 2.13 warns of the old name
    run_inprocess(tiny_args(tmp_path, small_shards, "single", "--max_steps", "14", "--val_every", "5"))
    ddp, single = tmp_path / "logs" / "ddp", tmp_path / "logs" / "single"
    assert json.loads((ddp / "config.json").read_text())["run"]["world_size"] == 2
    for kind, key in (("train", "loss"), ("val", "val_loss")):
        a, b = losses_by_step(ddp, kind, key), losses_by_step(single, kind, key)
        assert sorted(a) == sorted(b) and len(a) >= 3
        for step in a:
            assert a[step] == pytest.approx(b[step], rel=1e-5), (kind, step)
    for k, v in final_weights(tmp_path / "ckpt" / "single").items():
        torch.testing.assert_close(final_weights(tmp_path / "ckpt" / "ddp")[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_on_cpu(shard_dir, hellaswag_file, tmp_path, capsys):
    """torch.compile with val, HellaSwag and samples in the loop (what build-nanogpt had to switch off),
    compiling exactly two graphs: the training step and the no-grad val forward; no recompiles."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run_inprocess(tiny_args(tmp_path, shard_dir, "compiled", "--max_steps", "4", "--compile", "--val_every", "2",
                            "--hellaswag_every", "2", "--hellaswag_file", hellaswag_file, "--hellaswag_limit", "4",
                            "--sample_every", "2", "--sample_tokens", "4"))
    assert counters["stats"]["unique_graphs"] == 2 and not counters["recompiles"]
    run_dir = tmp_path / "logs" / "compiled"
    assert json.loads((run_dir / "config.json").read_text())["run"]["compile"] is True
    assert len(events(run_dir, "train")) == 4 and len(events(run_dir, "val")) == 3
    assert len(events(run_dir, "hella")) == 3 and len(events(run_dir, "sample")) == 3
    assert "compile True" in capsys.readouterr().out
