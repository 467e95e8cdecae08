"""Beyond one node and beyond 124M: presets, the memory estimate, the micro-batch search, multi-node runs."""
import dataclasses

import pytest
import torch

import train_gpt2
from model import GPT, GPTConfig
from checkpoint import load_model
from distributed import estimate_memory, find_micro_batch, largest_fitting
from train_gpt2 import parse_args


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


@pytest.mark.parametrize("shape", [(2, 4, 128, 128, 4, 50257), (6, 6, 384, 128, 2, 50257), (3, 8, 512, 256, 2, 4096),
                                   (8, 4, 256, 256, 8, 512),  # activations are most of it
                                   (1, 2, 64, 256, 16, 50257)])  # 4 chunks of the loss: one alive at a time
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

    # a compiled run is searched compiled (eager needs more memory: it would pick too small)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    tried.clear()
    assert find_micro_batch(dataclasses.replace(cfg, compile=True), model_cfg, "cpu", 1) == 6
    assert len(compiled) == len(set(tried)) and all(isinstance(m, GPT) for m in compiled)


def test_find_micro_batch_needs_cuda(tmp_path):
    with pytest.raises(SystemExit, match="--find_micro_batch print: takes print or use, and a CUDA GPU"):
        train_gpt2.train(*parse_args(["--find_micro_batch", "print", "--device", "cpu"]))


def two_nodes(tmp_path, args_for_node, timeout=300):
    """Launch 2 torchrun 'nodes' (1 process each) on localhost that meet through a c10d rendezvous, as on
    two machines; returns their CompletedProcess-like (returncode, output) pairs."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", f"--rdzv-id={tmp_path.name}",
               "train_gpt2.py", *args_for_node(node)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]


def test_two_nodes_per_node_checkpoints(small_shards, tmp_path):
    """torchrun --nnodes=2 with a c10d rendezvous logs the same losses as one process (and so as 1 node ×
    2 processes: test_ddp_matches_single_process); with --checkpoint_per_node each node writes its own full
    copy, both resume from it, and nodes that hold different checkpoints are refused on every rank."""
    from test_train_gpt2 import losses_by_step, run_inprocess, tiny_args

    common = ["--max_steps", "6", "--val_every", "3", "--checkpoint_every", "3"]
    run_inprocess(tiny_args(tmp_path, small_shards, "one_node", *common))

    def node_args(node):  # the same command on both machines, except each node's own disk
        args = tiny_args(tmp_path, small_shards, "two_nodes", *common, "--checkpoint_per_node")
        return [*args, "--checkpoint_dir", str(tmp_path / f"node{node}" / "ckpt")]

    for rc, out in two_nodes(tmp_path, node_args):
        assert rc == 0, out[-3000:]
    one, two = tmp_path / "logs" / "one_node", tmp_path / "logs" / "two_nodes"
    for kind, key in (("train", "loss"), ("val", "val_loss")):  # summed in another order: not bitwise
        assert losses_by_step(two, kind, key) == pytest.approx(losses_by_step(one, kind, key), rel=1e-5)
    copies = [tmp_path / f"node{n}" / "ckpt" for n in range(2)]
    for name in ("step_000003.pt", "step_000006.pt"):
        a, b = (torch.load(c / name, weights_only=True) for c in copies)
        assert a["step"] == b["step"] and a["loader"] == b["loader"]  # the copies differ only in checkpoint_dir
        for k, v in a["model"].items():
            assert torch.equal(v, b["model"][k])
        for i, state in a["optimizer"]["state"].items():
            assert torch.equal(state["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])

    # both nodes lose their last checkpoint (as if killed after step 5): both resume from step 3
    for c in copies:
        (c / "step_000006.pt").unlink()
        (c / "step_000006.json").unlink()
        (c / "latest").write_text("step_000003.pt\n")
    for rc, out in two_nodes(tmp_path, node_args):
        assert rc == 0, out[-3000:]
    from test_train_gpt2 import events

    assert [e["step"] for e in events(two, "resume")] == [3]
    assert losses_by_step(two) == pytest.approx(losses_by_step(one), rel=1e-5)

    # node 1 comes back with an empty disk: every rank refuses, naming what each node has
    import shutil

    shutil.rmtree(copies[1])
    results = two_nodes(tmp_path, lambda n: [*node_args(n), "--max_steps", "9"])
    assert all(rc != 0 for rc, _ in results)
    assert any("the nodes would resume from different checkpoints" in out and "none" in out for _, out in results)


def test_fsdp_matches_ddp_and_resumes_on_any_number_of_ranks(small_shards, hellaswag_file, tmp_path):
    """--parallelism fsdp on 2 CPU processes, 2 micro-steps each: the same losses, HellaSwag and samples
    as DDP (here one process, which DDP matches: test_ddp_matches_single_process); sharded checkpoints
    (torch.distributed.checkpoint) that hold DDP's weights; a rewind with --resume PATH replays exactly
    on 2 ranks and, resharded, on 1. HellaSwag at the resumed step comes before any other forward (FSDP
    must already be set up by then)."""
    from test_train_gpt2 import events, final_weights, losses_by_step, run_inprocess, tiny_args, torchrun
    from checkpoint import load_checkpoint, verify_checkpoint

    common = ["--max_steps", "6", "--micro_batch_size", "2", "--val_every", "4", "--checkpoint_every", "3",
              "--hellaswag_every", "3",
              "--hellaswag_file", hellaswag_file, "--hellaswag_limit", "5", "--sample_every", "6",
              "--num_samples", "2", "--sample_tokens", "4"]
    run_inprocess(tiny_args(tmp_path, small_shards, "ddp", *common))
    fsdp = tiny_args(tmp_path, small_shards, "fsdp", *common, "--parallelism", "fsdp")
    torchrun(2, *fsdp)
    logs = tmp_path / "logs"
    for kind, key in (("train", "loss"), ("val", "val_loss"), ("hella", "acc_norm")):
        assert losses_by_step(logs / "fsdp", kind, key) == pytest.approx(losses_by_step(logs / "ddp", kind, key),
                                                                        rel=1e-5), kind
    assert events(logs / "fsdp", "sample")[0]["samples"] == events(logs / "ddp", "sample")[0]["samples"]

    ckpt = tmp_path / "ckpt" / "fsdp"
    assert (ckpt / "latest").read_text().strip() == "step_000006.dcp"
    assert verify_checkpoint(str(ckpt / "step_000006.dcp")) is None
    full = load_checkpoint(str(ckpt / "step_000006.dcp"))  # gathered in one process, no process group
    assert full["step"] == 6 and full["train_config"]["parallelism"] == "fsdp"

    model = load_model(str(ckpt), "cpu").state_dict()  # the folder's `latest` names the .dcp
    ddp_weights = final_weights(tmp_path / "ckpt" / "ddp")
    assert set(model) >= set(ddp_weights)
    for k, v in ddp_weights.items():  # both readers of the .dcp give the weights DDP trained
        torch.testing.assert_close(full["model"][k], v, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model[k], v, rtol=1e-4, atol=1e-5)

    whole, hella = losses_by_step(logs / "fsdp"), losses_by_step(logs / "fsdp", "hella", "acc_norm")
    rewind = [*fsdp, "--resume", str(ckpt / "step_000003.dcp")]
    torchrun(2, *rewind)  # on 2 ranks: exactly the same steps again
    assert losses_by_step(logs / "fsdp") == whole and losses_by_step(logs / "fsdp", "hella", "acc_norm") == hella
    run_inprocess(rewind)  # on 1 rank (4 micro-steps): resharded, equal up to summation order
    assert [(e["step"], e["world_size"]) for e in events(logs / "fsdp", "resume")] == [(3, 2), (3, 1)]
    assert losses_by_step(logs / "fsdp") == pytest.approx(whole, rel=1e-5)


@pytest.mark.slow
def test_fsdp_under_compile(small_shards, tmp_path):
    """torch.compile of the FSDP2-sharded model (2 CPU processes) trains like the eager model (one
    process, which eager FSDP matches: test_fsdp_matches_ddp_and_resumes_on_any_number_of_ranks)."""
    from test_train_gpt2 import losses_by_step, run_inprocess, tiny_args, torchrun

    common = ["--max_steps", "3", "--val_every", "3"]
    run_inprocess(tiny_args(tmp_path, small_shards, "eager", *common))
    torchrun(2, *tiny_args(tmp_path, small_shards, "compiled", *common, "--parallelism", "fsdp", "--compile"))
    for kind, key in (("train", "loss"), ("val", "val_loss")):
        assert losses_by_step(tmp_path / "logs" / "compiled", kind, key) == \
            pytest.approx(losses_by_step(tmp_path / "logs" / "eager", kind, key), rel=1e-4)


def test_fsdp_bf16_keeps_fp32_master_weights(small_shards, tmp_path):
    """--dtype bfloat16 with FSDP (2 CPU processes): the bf16 MixedPrecisionPolicy path (bf16 shards
    gathered over gloo, fp32 reduction) runs, trains like DDP under bf16 autocast up to bf16 rounding,
    and its checkpoint holds fp32 master weights."""
    from test_train_gpt2 import losses_by_step, run_inprocess, tiny_args, torchrun
    from checkpoint import load_checkpoint

    common = ["--max_steps", "4", "--val_every", "4", "--dtype", "bfloat16"]
    run_inprocess(tiny_args(tmp_path, small_shards, "ddp", *common))  # one process: DDP's math
    torchrun(2, *tiny_args(tmp_path, small_shards, "fsdp", *common, "--parallelism", "fsdp"))
    for kind, key in (("train", "loss"), ("val", "val_loss")):
        fsdp, ddp = (losses_by_step(tmp_path / "logs" / run, kind, key) for run in ("fsdp", "ddp"))
        assert fsdp.keys() == ddp.keys() and fsdp == pytest.approx(ddp, rel=1e-3), kind
    weights = load_checkpoint(str(tmp_path / "ckpt" / "fsdp" / "step_000004.dcp"))["model"]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
