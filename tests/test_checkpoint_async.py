"""BackgroundSaver: a checkpoint written by a thread while training goes on is the same file a synchronous
save writes, holds the state as it was when save() returned, is atomic under a kill, reports its failure
as the synchronous save does, and never overlaps another."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

import checkpoint
from checkpoint import (BackgroundSaver, find_resume_checkpoint, latest_checkpoint, list_checkpoints,
                        save_training_state, verify_checkpoint)
from conftest import ROOT, FullDisk


class Tied(torch.nn.Module):
    """A tiny model whose output matrix is its embedding, as GPT-2's: one storage under two names."""

    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(64, 16)
        self.ln = torch.nn.LayerNorm(16)
        self.lm_head = torch.nn.Linear(16, 64, bias=False)
        self.lm_head.weight = self.wte.weight


def trained(seed=0):
    """A model and an AdamW that has taken a step (so it has state: exp_avg, exp_avg_sq, step)."""
    torch.manual_seed(seed)
    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sum((p * p).sum() for p in model.parameters()).backward()
    optimizer.step()
    return model, optimizer


def run_state(step):
    return {"step": step, "loader": {"epoch": 0, "shard": 1, "pos": 4096}, "evals": {"val_loss": 3.5},
            "ema": {"sigma_rels": [0.05], "averages": [{"w": torch.ones(8)}]}, "finished": False}


def save_sync(ckpt_dir, state, model, optimizer, keep=3):
    return save_training_state(str(ckpt_dir), state, model, optimizer, keep, rank=0, world_size=1, writer=True,
                               fsdp=False)


def save_async(saver, ckpt_dir, state, model, optimizer, keep=3):
    return saver.save(str(ckpt_dir), state, model, optimizer, keep, rank=0, world_size=1, writer=True, fsdp=False)


def gated_writes(monkeypatch):
    """Hold every background write until the test opens the gate; log when each starts and ends."""
    gate, log, real = threading.Event(), [], checkpoint.save_checkpoint

    def save_checkpoint(ckpt_dir, state, keep, volume=None):
        log.append(("start", state["step"]))
        assert gate.wait(30)
        try:
            return real(ckpt_dir, state, keep, volume)
        finally:
            log.append(("end", state["step"]))

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_checkpoint)
    return gate, log


def test_background_checkpoint_is_the_synchronous_one_byte_for_byte(tmp_path):
    model, optimizer = trained()
    state = run_state(7)
    sync_path, problem = save_sync(tmp_path / "sync", state, model, optimizer)
    assert problem is None
    with BackgroundSaver() as saver:
        assert save_async(saver, tmp_path / "async", state, model, optimizer) is None  # nothing before it
        step, path, problem, seconds = saver.wait()
    assert (step, os.path.basename(path), problem) == (7, "step_000007.pt", None)
    assert 0 < seconds["stall_s"] and 0 < seconds["write_s"]  # the copy, and the write behind it
    assert open(path, "rb").read() == open(sync_path, "rb").read()  # tied weights still share one storage
    assert open(path.replace(".pt", ".json")).read() == open(sync_path.replace(".pt", ".json")).read()
    assert latest_checkpoint(str(tmp_path / "async")) == path and verify_checkpoint(path) is None
    loaded = torch.load(path, weights_only=True)
    assert loaded["model"]["wte.weight"].untyped_storage().data_ptr() == \
        loaded["model"]["lm_head.weight"].untyped_storage().data_ptr()


def test_training_on_after_save_returns_does_not_reach_the_file(monkeypatch, tmp_path):
    """The weights, the optimizer state and the other state change in place (on the CPU, where .cpu() is no
    copy) after save() returned and before the thread writes: the file holds them as they were."""
    model, optimizer = trained()
    state = run_state(3)
    save_sync(tmp_path / "before", state, model, optimizer)
    gate, log = gated_writes(monkeypatch)
    with BackgroundSaver() as saver:
        save_async(saver, tmp_path / "async", state, model, optimizer)
        with torch.no_grad():  # the next training step
            for p in model.parameters():
                p.add_(1.0)
            for s in optimizer.state.values():
                s["exp_avg"].mul_(2)
                s["step"] += 1
        state["evals"]["val_loss"] = 0.0
        state["ema"]["averages"][0]["w"].zero_()
        state["loader"]["pos"] = 0
        gate.set()
        _, path, problem, _ = saver.wait()
    assert problem is None and log == [("start", 3), ("end", 3)]
    before = open(tmp_path / "before" / "step_000003.pt", "rb").read()
    assert open(path, "rb").read() == before


KILLED_MID_WRITE = """
import os, sys, time, torch
sys.path.insert(0, {root!r})
import checkpoint
ckpt_dir, marker = sys.argv[1], sys.argv[2]
model = torch.nn.Linear(256, 256)
optimizer = torch.optim.AdamW(model.parameters())
checkpoint.save_training_state(ckpt_dir, {{"step": 1}}, model, optimizer, 3, 0, 1, True, False)
real_write = checkpoint._HashingWriter.write
def slow_disk(self, b):  # half the file is out, then the disk stalls: the kill comes now
    if self.size > 100_000:
        open(marker, "w").close()
        time.sleep(60)
    return real_write(self, b)
checkpoint._HashingWriter.write = slow_disk
model = torch.nn.Linear(256, 1024)  # a bigger state, about 1 MB
saver = checkpoint.BackgroundSaver()
saver.save(ckpt_dir, {{"step": 2}}, model, torch.optim.AdamW(model.parameters()), 3, 0, 1, True, False)
while True:  # training goes on
    with torch.no_grad():
        model.weight.add_(1.0)
"""


def test_a_kill_during_the_background_write_leaves_the_previous_checkpoint(tmp_path):
    ckpt_dir, marker = tmp_path / "ckpt", tmp_path / "writing"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_WRITE.format(root=ROOT))
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt_dir), str(marker)])
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "the background write never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    names = sorted(os.listdir(ckpt_dir))
    assert [n for n in names if not n.startswith(".")] == ["latest", "step_000001.json", "step_000001.pt"]
    assert any(re.fullmatch(r"\.step_000002\.pt\..*\.tmp", n) for n in names)  # killed mid-write, indeed
    first = str(ckpt_dir / "step_000001.pt")
    assert latest_checkpoint(str(ckpt_dir)) == first and list_checkpoints(str(ckpt_dir)) == [first]
    assert verify_checkpoint(first) is None
    assert find_resume_checkpoint(types.SimpleNamespace(resume="auto"), str(ckpt_dir)) == first
    assert sorted(os.listdir(ckpt_dir)) == ["latest", "step_000001.json", "step_000001.pt"]  # half a save: gone


def disk_full_at(monkeypatch, full_step):
    """The disk is full (1000 bytes of room) while step `full_step` is saved."""
    real_init, real_save, now = checkpoint._HashingWriter.__init__, checkpoint.save_checkpoint, {}

    def save_checkpoint(ckpt_dir, state, keep, volume=None):
        now["step"] = state["step"]  # (one save at a time)
        return real_save(ckpt_dir, state, keep, volume)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(checkpoint._HashingWriter, "__init__",
                        lambda self, f: real_init(self, FullDisk(f) if now["step"] == full_step else f))


def test_a_background_failure_is_reported_as_the_synchronous_one(monkeypatch, tmp_path):
    model, optimizer = trained()
    ckpt_dir = tmp_path / "ckpt"
    disk_full_at(monkeypatch, 2)
    save_sync(ckpt_dir, run_state(1), model, optimizer)
    path, sync_problem = save_sync(ckpt_dir, run_state(2), model, optimizer)
    assert path is None and sync_problem.startswith(f"could not save checkpoint step_000002 in {ckpt_dir}: No space")
    free = lambda p: re.sub(r"[\d.]+ GB are free", "N GB are free", p)  # noqa: E731  (other tests write too)
    with BackgroundSaver() as saver:
        save_async(saver, ckpt_dir, run_state(2), model, optimizer)
        step, path, problem, _ = saver.wait()  # at the end of a run, or a stop
        assert (step, path) == (2, None) and free(problem) == free(sync_problem)
        assert saver.wait() is None  # reported once
        save_async(saver, ckpt_dir, run_state(2), model, optimizer)
        step, path, problem, _ = save_async(saver, ckpt_dir, run_state(3), model, optimizer)  # at the next save
        assert (step, path) == (2, None) and free(problem) == free(sync_problem)
        assert saver.wait()[:3] == (3, str(ckpt_dir / "step_000003.pt"), None)
    assert sorted(os.listdir(ckpt_dir)) == ["latest", "step_000001.json", "step_000001.pt", "step_000003.json",
                                            "step_000003.pt"]  # nothing of step 2's


def test_an_unexpected_error_in_the_thread_is_raised_by_wait(monkeypatch, tmp_path):
    def bug(*args):
        raise ValueError("a bug")

    monkeypatch.setattr(checkpoint, "save_checkpoint", bug)
    model, optimizer = trained()
    saver = BackgroundSaver()
    save_async(saver, tmp_path, run_state(1), model, optimizer)
    with pytest.raises(ValueError, match="a bug"):
        saver.wait()
    assert saver.wait() is None


def test_never_two_saves_in_flight(monkeypatch, tmp_path):
    """A save started while the previous one still writes waits for it (and returns its outcome)."""
    model, optimizer = trained()
    gate, log = gated_writes(monkeypatch)
    with BackgroundSaver() as saver:
        save_async(saver, tmp_path, run_state(1), model, optimizer)
        returned = []
        second = threading.Thread(target=lambda: returned.append(save_async(saver, tmp_path, run_state(2), model,
                                                                            optimizer)))
        second.start()
        second.join(0.5)
        assert second.is_alive() and log == [("start", 1)]  # step 1 still writes: step 2 waits
        gate.set()
        second.join(30)
        assert returned[0][:3] == (1, str(tmp_path / "step_000001.pt"), None)
        assert saver.wait()[:3] == (2, str(tmp_path / "step_000002.pt"), None)
    assert log == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
