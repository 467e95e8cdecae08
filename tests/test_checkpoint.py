"""A checkpoint that cannot be written (a full disk, no permission, a vanished mount): one clear line, the
earlier checkpoint intact, no partial files, and the same command resumes exactly once there is room."""

import errno
import os
import shutil
import subprocess
import sys

import pytest

import checkpoint
import runlog
from checkpoint import list_checkpoints, verify_checkpoint
from conftest import ROOT, FullDisk
from test_train_gpt2 import events, losses_by_step, run_inprocess, tiny_args


def leftovers(ckpt_dir, step):
    """Files of a failed save at `step`, or temporary files, left in ckpt_dir."""
    return sorted(n for n in os.listdir(ckpt_dir) if f"step_{step:06d}" in n or n.endswith(".tmp"))


def test_disk_full_mid_run_trains_on_then_stops_at_the_end(monkeypatch, small_shards, tmp_path, capsys):
    args = tiny_args(tmp_path, small_shards, "full", "--max_steps", "6", "--checkpoint_every", "2")
    ckpt_dir = tmp_path / "ckpt" / "full"
    real_init = checkpoint._HashingWriter.__init__

    def disk_fills_after_the_first_checkpoint(self, f):
        full = any(n.endswith(".json") for n in os.listdir(ckpt_dir))  # step 2's is written: then no more room
        real_init(self, FullDisk(f) if full else f)

    monkeypatch.setattr(checkpoint._HashingWriter, "__init__", disk_fills_after_the_first_checkpoint)
    with pytest.raises(SystemExit) as e:  # step 4's save fails (training goes on), the final one stops the run
        run_inprocess(args)
    message = str(e.value)
    assert message.startswith(f"error: could not save checkpoint step_000006 in {ckpt_dir}: No space left on device "
                              f"(it needs about ") and "\n" not in message
    assert "GB are free there); the newest earlier checkpoint, step_000002.pt, is intact and the same command " \
           "resumes from it" in message
    out = capsys.readouterr().out
    assert "warning: could not save checkpoint step_000004" in out and "tries again at the next checkpoint" in out
    assert losses_by_step(tmp_path / "logs" / "full").keys() == set(range(6))  # it trained on after step 4's failure
    failed = events(tmp_path / "logs" / "full", "checkpoint_failed")
    assert [e["step"] for e in failed] == [4, 6] and "No space left on device" in failed[0]["error"]
    runlog.write_report(str(tmp_path / "logs" / "full"))
    report = (tmp_path / "logs" / "full" / "report.md").read_text()
    assert "| failed checkpoint saves | 2, the last at step 6: could not save checkpoint step_000006" in report
    # nothing half-written; the step-2 checkpoint is the newest and verifies
    assert leftovers(ckpt_dir, 4) == [] and leftovers(ckpt_dir, 6) == []
    assert [os.path.basename(p) for p in list_checkpoints(ckpt_dir)] == ["step_000002.pt"]
    assert verify_checkpoint(str(ckpt_dir / "step_000002.pt")) is None

    # room again: the same command resumes from step 2, exactly as a run that never failed
    monkeypatch.setattr(checkpoint._HashingWriter, "__init__", real_init)
    run_inprocess(args)
    run_inprocess(tiny_args(tmp_path, small_shards, "ref", "--max_steps", "6", "--checkpoint_every", "2"))
    resumed, ref = losses_by_step(tmp_path / "logs" / "full"), losses_by_step(tmp_path / "logs" / "ref")
    assert resumed == ref
    assert [os.path.basename(p) for p in list_checkpoints(ckpt_dir)][0] == "step_000006.pt"


def test_unwritable_record_leaves_no_unrecorded_checkpoint(monkeypatch, small_shards, tmp_path):
    """The .pt is complete but its .json (size, sha256) cannot be written: the .pt goes too."""
    real = checkpoint.atomic_write
    ckpt_dir = tmp_path / "ckpt" / "rec"

    def no_json(path, mode="wb"):
        if str(path).endswith("step_000004.json"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, mode)

    monkeypatch.setattr(checkpoint, "atomic_write", no_json)
    run_inprocess(tiny_args(tmp_path, small_shards, "rec", "--max_steps", "6", "--checkpoint_every", "2"))
    assert [e["step"] for e in events(tmp_path / "logs" / "rec", "checkpoint_failed")] == [4]
    assert "Permission denied" in events(tmp_path / "logs" / "rec", "checkpoint_failed")[0]["error"]
    assert leftovers(ckpt_dir, 4) == []
    assert [os.path.basename(p) for p in list_checkpoints(ckpt_dir)] == ["step_000006.pt", "step_000002.pt"]


@pytest.mark.parametrize("where", ["shards", "train_state"])
def test_sharded_checkpoint_failure_leaves_no_folder(monkeypatch, small_shards, tmp_path, where):
    """FSDP (one process): the shards' write (torch.distributed.checkpoint) or rank 0's part of the save
    fails at step 4; no .dcp.tmp or half .dcp stays, and the run goes on."""
    import torch.distributed.checkpoint.filesystem as dcp_files

    def no_room(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "shards":  # _write_item(transforms, stream, ...): the stream's file is in step_000004's folder
        real = dcp_files._write_item
        monkeypatch.setattr(dcp_files, "_write_item", lambda *a: (no_room if "step_000004" in a[1].name else real)(*a))
    else:  # the record of every file's sha256, which rank 0 writes last
        real = checkpoint.file_digest
        monkeypatch.setattr(checkpoint, "file_digest", lambda path: (no_room if "step_000004" in path else real)(path))
    args = tiny_args(tmp_path, small_shards, "fs", "--max_steps", "6", "--checkpoint_every", "2",
                     "--parallelism", "fsdp")
    run_inprocess(args)
    ckpt_dir = tmp_path / "ckpt" / "fs"
    failed = events(tmp_path / "logs" / "fs", "checkpoint_failed")
    assert [e["step"] for e in failed] == [4] and "No space left on device" in failed[0]["error"]
    assert leftovers(ckpt_dir, 4) == []
    assert [os.path.basename(p) for p in list_checkpoints(ckpt_dir)] == ["step_000006.dcp", "step_000002.dcp"]


def can_mount_tmpfs(path):
    path.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True)
    if ok.returncode == 0:
        subprocess.run(["umount", str(path)], check=True)
    return ok.returncode == 0


def test_a_real_full_disk(small_shards, tmp_path):
    """A tmpfs that holds one checkpoint but not two, as a small volume on a rented node would."""
    mnt = tmp_path / "vol"
    if shutil.which("mount") is None or not can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    args = [sys.executable, "train_gpt2.py", *tiny_args(tmp_path, small_shards, "vol", "--max_steps", "6",
                                                        "--checkpoint_every", "2", "--checkpoint_dir", str(mnt / "c"))]
    probe = tmp_path / "probe"  # how big one checkpoint of this run is
    run_inprocess(tiny_args(tmp_path, small_shards, "probe", "--max_steps", "2", "--checkpoint_dir", str(probe)))
    size = os.path.getsize(probe / "step_000002.pt")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(mnt)], check=True)
    try:
        out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        assert out.returncode != 0
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: could not save checkpoint step_000006 in {mnt / 'c'}: ")
        assert "the newest earlier checkpoint, step_000002.pt, is intact" in last and "Traceback" not in out.stderr
        assert "warning: could not save checkpoint step_000004" in out.stdout
        assert sorted(os.listdir(mnt / "c")) == ["latest", "step_000002.json", "step_000002.pt"]
        subprocess.run(["mount", "-o", f"remount,size={size * 10}", str(mnt)], check=True)  # room again
        out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "resumed from" in out.stdout and "step_000002.pt at step 2" in out.stdout
    finally:
        subprocess.run(["umount", str(mnt)])


def test_a_vanished_volume_is_not_recreated_on_the_disk_below(monkeypatch, small_shards, tmp_path):
    """The checkpoint folder's volume goes away mid-run (here: the folder moves away, as an unmount leaves
    an empty mount point): saves fail with the reason instead of recreating the folder, and so the
    checkpoints, on whatever disk lies below."""
    ckpt_dir = tmp_path / "ckpt" / "gone"
    real = checkpoint.save_checkpoint

    def unmounted_before_step_4(folder, state, keep, volume=None):
        if state["step"] == 4:
            os.rename(folder, str(folder) + ".unmounted")
        return real(folder, state, keep, volume)

    monkeypatch.setattr(checkpoint, "save_checkpoint", unmounted_before_step_4)
    with pytest.raises(SystemExit) as e:  # step 4's save fails, and so does the final one at step 6
        run_inprocess(tiny_args(tmp_path, small_shards, "gone", "--max_steps", "6", "--checkpoint_every", "2"))
    assert "the folder is gone or on another filesystem now (was its volume unmounted?)" in str(e.value)
    assert [ev["step"] for ev in events(tmp_path / "logs" / "gone", "checkpoint_failed")] == [4, 6]
    assert not ckpt_dir.exists()  # nothing written where the volume was
    assert sorted(os.listdir(str(ckpt_dir) + ".unmounted")) == ["latest", "step_000002.json", "step_000002.pt"]
