"""Preemption-safe training: exact resume, SIGTERM, damaged checkpoints, refused settings."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script
from test_train_gpt2 import events, final_weights, losses_by_step, run_inprocess, tiny_args, torchrun


def assert_same_run(ref_dir, run_dir, from_step):
    """Bitwise-identical logged losses from from_step on."""
    for kind, key in (("train", "loss"), ("val", "val_loss")):
        ref = {s: v for s, v in losses_by_step(ref_dir, kind, key).items() if s >= from_step}
        got = losses_by_step(run_dir, kind, key)
        assert ref and {s: got[s] for s in ref} == ref, kind


def assert_same_weights(ckpt_a, ckpt_b):
    a, b = final_weights(ckpt_a), final_weights(ckpt_b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_and_resume_at_3(tmp_path, data_dir, *flags):
    """Train run "ref" with flags (checkpoints every 3 steps), then run "resumed" from its step-3
    checkpoint: both must log the same run and end with the same weights. Returns ref's train losses."""
    run_inprocess(tiny_args(tmp_path, data_dir, "ref", *flags, "--checkpoint_every", "3"))
    run_inprocess(tiny_args(tmp_path, data_dir, "resumed", *flags,
                            "--resume", str(tmp_path / "ckpt" / "ref" / "step_000003.pt")))
    assert_same_run(tmp_path / "logs" / "ref", tmp_path / "logs" / "resumed", 3)
    assert_same_weights(tmp_path / "ckpt" / "ref", tmp_path / "ckpt" / "resumed")
    return losses_by_step(tmp_path / "logs" / "ref")


@pytest.mark.parametrize("k", [3, 5])  # 3: mid-epoch, between evals; 5: right after the eval at step 4
def test_resume_is_bitwise_exact(small_shards, tmp_path, k):
    common = ["--max_steps", "14", "--val_every", "4", "--shuffle", "--keep_checkpoints", "0"]
    run_inprocess(tiny_args(tmp_path, small_shards, "ref", *common, "--checkpoint_every", "1"))
    ref_ckpt = tmp_path / "ckpt" / "ref"
    loader = torch.load(ref_ckpt / f"step_{k:06d}.pt", weights_only=True)["loader"]
    assert loader["epoch"] == 0 and loader["pos"] > 0  # mid-shard, mid-epoch
    assert torch.load(ref_ckpt / "step_000014.pt", weights_only=True)["loader"]["epoch"] == 1  # crossed an epoch

    run_inprocess(tiny_args(tmp_path, small_shards, "resumed", *common,
                            "--resume", str(ref_ckpt / f"step_{k:06d}.pt")))
    resumed = tmp_path / "logs" / "resumed"
    assert events(resumed, "resume")[0]["step"] == k
    assert min(losses_by_step(resumed)) == k  # training restarted exactly where the checkpoint was
    assert_same_run(tmp_path / "logs" / "ref", resumed, k)
    assert_same_weights(ref_ckpt, tmp_path / "ckpt" / "resumed")


def test_resume_is_exact_with_two_ranks(small_shards, tmp_path):
    common = ["--max_steps", "8", "--val_every", "4", "--keep_checkpoints", "0"]
    torchrun(2, *tiny_args(tmp_path, small_shards, "ref", *common, "--checkpoint_every", "3"))
    ckpt = torch.load(tmp_path / "ckpt" / "ref" / "step_000003.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2  # every rank's RNG is saved
    torchrun(2, *tiny_args(tmp_path, small_shards, "resumed", *common,
                           "--resume", str(tmp_path / "ckpt" / "ref" / "step_000003.pt")))
    assert_same_run(tmp_path / "logs" / "ref", tmp_path / "logs" / "resumed", 3)
    assert_same_weights(tmp_path / "ckpt" / "ref", tmp_path / "ckpt" / "resumed")


def test_resume_on_other_world_size_and_micro_batch(small_shards, tmp_path):
    """The data position is per step, not per micro-step: a 1-GPU checkpoint resumes on 2 ranks, or with
    a smaller micro batch, reading exactly the tokens the original run read (across shard ends)."""
    common = ["--max_steps", "14", "--val_every", "7", "--keep_checkpoints", "0"]
    run_inprocess(tiny_args(tmp_path, small_shards, "ref", *common, "--checkpoint_every", "5"))
    start = str(tmp_path / "ckpt" / "ref" / "step_000005.pt")
    torchrun(2, *tiny_args(tmp_path, small_shards, "two", *common, "--resume", start))
    run_inprocess(tiny_args(tmp_path, small_shards, "micro", *common, "--resume", start, "--micro_batch_size", "2"))
    ref = losses_by_step(tmp_path / "logs" / "ref")
    for name in ("two", "micro"):
        got = losses_by_step(tmp_path / "logs" / name)
        assert sorted(got) == list(range(5, 14))
        for step in got:  # not bitwise: the sums happen in another order
            assert got[step] == pytest.approx(ref[step], rel=1e-5), (name, step)


def test_rewind_and_reseeded_runs(small_shards, tmp_path):
    common = ["--val_every", "0", "--keep_checkpoints", "0", "--checkpoint_every", "2"]
    run_inprocess(tiny_args(tmp_path, small_shards, "a", *common, "--max_steps", "6"))
    ckpt_a = tmp_path / "ckpt" / "a"
    with pytest.raises(SystemExit, match="is at step 4, beyond --max_steps 3"):
        run_inprocess(tiny_args(tmp_path, small_shards, "a", *common, "--max_steps", "3",
                                "--resume", str(ckpt_a / "step_000004.pt")))
    # rewind run a to step 2 (say, after a loss spike) and train on to 5: later saves win over step 4 and 6
    run_inprocess(tiny_args(tmp_path, small_shards, "a", *common, "--max_steps", "5",
                            "--resume", str(ckpt_a / "step_000002.pt")))
    assert (ckpt_a / "latest").read_text().strip() == "step_000005.pt"
    assert events(tmp_path / "logs" / "a", "resume")[-1]["step"] == 2

    # run b starts from a's checkpoint; the same command again continues b, not a's step 2 again
    seeded = tiny_args(tmp_path, small_shards, "b", *common, "--max_steps", "8", "--resume",
                       str(ckpt_a / "step_000002.pt"))
    run_inprocess(seeded)
    run_inprocess([*seeded[:-2], "--max_steps", "10", *seeded[-2:]])
    resumes = [e["step"] for e in events(tmp_path / "logs" / "b", "resume")]
    assert resumes == [2, 8]


def test_sigterm_saves_and_the_same_command_resumes(small_shards, tmp_path):
    common = ["--max_steps", "16", "--val_every", "5"]
    run_inprocess(tiny_args(tmp_path, small_shards, "ref", *common))

    argv = [sys.executable, "train_gpt2.py", *tiny_args(tmp_path, small_shards, "spot", *common)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("step     3 | loss"):
            proc.send_signal(signal.SIGTERM)  # what a spot instance's shutdown sends
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, rest
    spot_dir = tmp_path / "logs" / "spot"
    stopped_at = events(spot_dir, "stop")[0]["step"]
    assert 4 <= stopped_at < 16 and f"stopped at step {stopped_at}" in rest
    ckpt_dir = tmp_path / "ckpt" / "spot"
    assert (ckpt_dir / "latest").read_text().strip() == f"step_{stopped_at:06d}.pt"
    assert f"stopped by a signal at step {stopped_at} of 16" in (spot_dir / "report.md").read_text()

    out = run_script(*argv[1:])  # the very same command
    assert f"resumed from {ckpt_dir / f'step_{stopped_at:06d}.pt'} at step {stopped_at}" in out.stdout
    assert events(spot_dir, "resume")[0]["step"] == stopped_at
    assert_same_run(tmp_path / "logs" / "ref", spot_dir, 0)  # the log, appended, reads as one run
    assert_same_weights(tmp_path / "ckpt" / "ref", ckpt_dir)
    report = (spot_dir / "report.md").read_text()  # rewritten at the end, the repeated steps counted once
    assert "finished: 16 of 16 steps" in report and f"| tokens | {16 * 256:,} |" in report


def test_second_signal_exits_at_once(small_shards, tmp_path):
    # 8 micro-steps of a model 768 wide: a step (~3.2 s on a fast 2-core box) lasts well over the 1.5 s the
    # second Ctrl-C waits (256 wide took 1.0-1.1 s there: the step ended first, and the test failed)
    argv = [sys.executable, "train_gpt2.py", *tiny_args(tmp_path, small_shards, "r", "--max_steps", "500",
                                                        "--n_embd", "768", "--total_batch_size", "1024")]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("step     0 | loss"):
            proc.send_signal(signal.SIGTERM)  # the shutdown signals every process and torchrun
            proc.send_signal(signal.SIGTERM)  # forwards it again: one request, not two
        if line.startswith("SIGTERM: finishing this step"):
            time.sleep(1.5)
            proc.send_signal(signal.SIGINT)  # a Ctrl-C later on: no waiting for the checkpoint
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGINT, rest
    assert "SIGINT again: exiting now without a checkpoint" in rest
    assert not os.path.exists(tmp_path / "ckpt" / "r" / "latest")  # gone before any checkpoint was complete


def test_duplicate_signal_still_saves(small_shards, tmp_path):
    argv = [sys.executable, "train_gpt2.py", *tiny_args(tmp_path, small_shards, "r", "--max_steps", "500")]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("step     1 | loss"):
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGTERM):  # ssh gone, then the shutdown, twice
                proc.send_signal(sig)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, rest
    assert "stopped at step" in rest and os.path.exists(tmp_path / "ckpt" / "r" / "latest")


def test_checkpoint_every_minutes(small_shards, tmp_path):
    run_inprocess(tiny_args(tmp_path, small_shards, "r", "--max_steps", "3", "--val_every", "0",
                            "--checkpoint_every_minutes", "1e-6", "--keep_checkpoints", "0"))
    saved = [e["step"] for e in events(tmp_path / "logs" / "r", "checkpoint")]
    assert saved == [1, 2, 3]  # a step takes longer than 1e-6 minutes: one after every step


def test_damaged_checkpoints_are_skipped(small_shards, tmp_path):
    args = tiny_args(tmp_path, small_shards, "r", "--max_steps", "6", "--val_every", "0", "--checkpoint_every",
                     "2", "--keep_checkpoints", "0")
    run_inprocess(args)
    ckpt_dir = tmp_path / "ckpt" / "r"
    assert sorted(os.listdir(ckpt_dir)) == ["latest", "step_000002.json", "step_000002.pt", "step_000004.json",
                                            "step_000004.pt", "step_000006.json", "step_000006.pt"]
    meta = json.loads((ckpt_dir / "step_000006.json").read_text())
    assert meta["bytes"] == os.path.getsize(ckpt_dir / "step_000006.pt") and len(meta["sha256"]) == 64

    # the newest is truncated (a disk filled up), the next one has a flipped byte (bit rot)
    raw = (ckpt_dir / "step_000006.pt").read_bytes()
    (ckpt_dir / "step_000006.pt").write_bytes(raw[: len(raw) // 2])
    raw = bytearray((ckpt_dir / "step_000004.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (ckpt_dir / "step_000004.pt").write_bytes(bytes(raw))
    (ckpt_dir / ".step_000008.pt.x1y2.tmp").write_bytes(b"half a save")  # a kill mid-save leaves this

    out = run_script("train_gpt2.py", *args)
    assert "skipping" in out.stderr and "step_000006.pt" in out.stderr and "truncated" in out.stderr
    assert "step_000004.pt" in out.stderr and "corrupt" in out.stderr
    assert f"resumed from {ckpt_dir / 'step_000002.pt'} at step 2" in out.stdout
    assert sorted(losses_by_step(tmp_path / "logs" / "r")) == list(range(6))


def test_incompatible_settings_are_refused(small_shards, tmp_path):
    args = tiny_args(tmp_path, small_shards, "r", "--max_steps", "2", "--val_every", "0")
    run_inprocess(args)
    for flags, message in [(["--seq_len", "16"], "--seq_len 16 differs from the checkpoint's 32"),
                           (["--total_batch_size", "512"], "--total_batch_size 512 differs"),
                           (["--n_embd", "48"], "the checkpoint's model differs"),
                           (["--shuffle"], "--shuffle True differs")]:
        with pytest.raises(SystemExit, match=message):
            run_inprocess([*args, *flags])
    out = run_script("train_gpt2.py", *args, "--resume", "none", check=False)  # and on the command line:
    assert out.returncode != 0 and "Traceback" not in out.stderr  # one line, no traceback
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "already holds checkpoints and --resume none was given" in out.stderr


def test_safe_changes_are_allowed_and_logged(small_shards, tmp_path, capsys):
    args = tiny_args(tmp_path, small_shards, "r", "--val_every", "0")
    run_inprocess([*args, "--max_steps", "3"])
    run_inprocess([*args, "--max_steps", "3"])
    assert "already finished at step 3" in capsys.readouterr().out  # rerunning a finished run does nothing
    run_inprocess([*args, "--max_steps", "5", "--val_every", "2", "--micro_batch_size", "2"])
    out = capsys.readouterr().out
    assert "max_steps changed: 3 -> 5" in out and "val_every changed: 0 -> 2" in out
    resume = events(tmp_path / "logs" / "r", "resume")[0]
    assert resume["step"] == 3 and resume["changed"]["micro_batch_size"] == [4, 2]
    assert sorted(losses_by_step(tmp_path / "logs" / "r")) == list(range(5))


def test_keep_checkpoints_prunes_old_ones(small_shards, tmp_path):
    run_inprocess(tiny_args(tmp_path, small_shards, "r", "--max_steps", "5", "--val_every", "0",
                            "--checkpoint_every", "1", "--keep_checkpoints", "2"))
    assert sorted(os.listdir(tmp_path / "ckpt" / "r")) == ["latest", "step_000004.json", "step_000004.pt",
                                                           "step_000005.json", "step_000005.pt"]
