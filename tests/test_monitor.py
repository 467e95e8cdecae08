"""Watching a run from afar: W&B (offline), TensorBoard across a resume, and the missing-package errors."""
import glob
import json
import os
import sys

import pytest

from conftest import run_script
from test_train_gpt2 import events, losses_by_step, run_inprocess, tiny_args


def test_wandb_offline_and_resume(shard_dir, tmp_path):
    """WANDB_MODE=offline: the run's config and every train loss land in a local W&B run inside logs/<run>/,
    and a resumed run continues the same W&B run (its id is in the checkpoint), while TensorBoard hides the
    steps the resume repeats."""
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = tiny_args(tmp_path, shard_dir, "wb", "--val_every", "2", "--wandb_project", "gpt2-test")
    run_script("train_gpt2.py", *args, "--max_steps", "4", "--checkpoint_every", "2", env=env)
    # resume from step 2 (the step-4 checkpoint removed: as if killed after step 3), train on to 6
    ckpt_dir = tmp_path / "ckpt" / "wb"
    os.remove(ckpt_dir / "step_000004.pt")
    (ckpt_dir / "latest").write_text("step_000002.pt\n")
    run_script("train_gpt2.py", *args, "--max_steps", "6", "--checkpoint_every", "2", env=env)

    run_dir = tmp_path / "logs" / "wb"
    runs = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*")))
    assert len(runs) == 2
    ids = {os.path.basename(r).rsplit("-", 1)[1] for r in runs}
    assert len(ids) == 1  # one W&B run, resumed
    # the .wandb file is W&B's binary record log; its values are JSON strings inside it
    logged = b"".join(open(f, "rb").read() for r in runs for f in glob.glob(os.path.join(r, "*.wandb")))
    assert b"gpt2-test" in logged and b"train/loss" in logged and b"val/loss" in logged
    for loss in losses_by_step(run_dir).values():
        assert json.dumps(loss).encode() in logged
    assert b"total_batch_size" in logged  # the config

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(6))  # steps 2, 3 once, the resumed ones
    train = losses_by_step(run_dir)  # metrics.jsonl keeps both; the latest wins
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([train[s] for s in range(6)])
    assert [e["step"] for e in events(run_dir, "resume")] == [2]


def test_missing_monitor_packages_are_clear_errors(shard_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(SystemExit) as e:
        run_inprocess(tiny_args(tmp_path, shard_dir, "nowb", "--max_steps", "2", "--wandb_project", "p"))
    assert "wandb is not installed: uv sync --extra monitor" in str(e.value)
    with pytest.raises(SystemExit) as e:
        run_inprocess(tiny_args(tmp_path, shard_dir, "notb", "--max_steps", "2", "--tensorboard"))
    assert "tensorboard is not installed: uv sync --extra monitor" in str(e.value)
    assert not (tmp_path / "logs").exists()  # refused before anything was written
    # left at its default, TensorBoard is skipped when missing and the run goes on
    run_inprocess(tiny_args(tmp_path, shard_dir, "auto", "--max_steps", "2"))
    assert not glob.glob(str(tmp_path / "logs" / "auto" / "events.out.tfevents.*"))
    assert (tmp_path / "logs" / "auto" / "report.md").exists()


def test_report_of_a_run_that_died(tmp_path, capsys):
    """plot.py --report on a hand-made log: a run resumed once, then killed. Steps the resume repeated
    count once, wall time is the sum of the sessions, MFU is weighted by step time."""
    import plot
    import runlog

    run = tmp_path / "r"
    run.mkdir()
    config = {"train": {"max_steps": 100, "total_batch_size": 1000, "micro_batch_size": 2, "seq_len": 500,
                        "max_lr": 6e-4, "warmup_steps": 10, "weight_decay": 0.1},
              "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 500, "pos": "rope"},
              "run": {"run_name": "r", "git_commit": "abc123", "device": "cuda:0", "world_size": 8,
                      "dtype": "bfloat16", "compile": True, "grad_accum_steps": 1, "num_params": 2_500_000}}
    (run / "config.json").write_text(json.dumps(config))

    def train(step, t, dt_ms, mfu, loss=5.0):
        return {"event": "train", "time": t, "step": step, "loss": loss, "dt_ms": dt_ms, "mfu": mfu,
                "tokens": (step + 1) * 1000}

    log = [{"event": "start", "time": 100.0, "step": 0}, {"event": "val", "time": 101.0, "step": 0, "val_loss": 9.0},
           train(0, 102.0, 1000, 0.2), train(1, 103.0, 1000, 0.2), train(2, 104.0, 1000, 0.2),
           {"event": "val", "time": 105.0, "step": 3, "val_loss": 6.0},  # then killed; resumed from step 2
           {"event": "resume", "time": 200.0, "step": 2}, train(2, 201.0, 3000, 0.6), train(3, 202.0, 1000, 0.4),
           {"event": "val", "time": 210.0, "step": 4, "val_loss": 6.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log) + '{"event": "tra')
    plot.main(["--report", str(run)])
    report = (run / "report.md").read_text()
    assert "incomplete: the log ends at step 4 of 100" in report
    assert "| tokens | 4,000 |" in report  # steps 0-3, step 2 once
    assert "| wall time | 0h 00m 15.0s |" in report  # 100 -> 105, then 200 -> 210
    assert "| training time | 0h 00m 06.0s" in report  # 1 + 1 + 3 (the resumed step 2) + 1
    assert "| mean tokens/s | 667 " in report
    assert "| mean MFU | 43.3% |" in report  # (0.2·1 + 0.2·1 + 0.6·3 + 0.4·1) / 6
    # the step-3 val came before the kill: the resume from step 2 discards it (its future was redone)
    assert "| final val loss | 6.5000 (step 4) |" in report and "| best val loss | 6.5000 (step 4) |" in report
    assert "cuda:0 × 8, bfloat16, compile True" in report and "pos=rope" in report
    assert (run / "plot.png").read_bytes()[:4] == b"\x89PNG"

    # it is rewound to its step-3 checkpoint and stopped by a signal; then resumed again and dies:
    # incomplete, not "stopped"
    log += [{"event": "resume", "time": 300.0, "step": 3}, train(3, 301.0, 1000, 0.4), train(4, 302.0, 1000, 0.4),
            {"event": "stop", "time": 303.0, "step": 5}, {"event": "resume", "time": 400.0, "step": 5},
            train(5, 401.0, 1000, 0.4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    report = runlog.write_report(str(run)) and (run / "report.md").read_text()
    assert "incomplete: the log ends at step 6 of 100" in report
    assert "| final val loss | 9.0000 (step 0) |" in report  # the step-4 val came before the rewind to 3
    log.append({"event": "stop", "time": 402.0, "step": 6})
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    assert "stopped by a signal at step 6 of 100" in (runlog.write_report(str(run)) and (run / "report.md").read_text())

    # a run seeded from another's step-90 checkpoint: the model has seen 96,000 tokens, this run trained 6,000
    seeded = [{"event": "resume", "time": 0.0, "step": 90}, *[train(s, 1.0 + s, 1000, 0.5) for s in range(90, 96)],
              {"event": "end", "time": 100.0, "step": 96}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in seeded))
    report = runlog.write_report(str(run)) and (run / "report.md").read_text()
    assert "finished: 96 of 100 steps" in report and "| tokens | 96,000 |" in report
    assert "| mean tokens/s | 1,000 " in report  # 6 steps × 1000 tokens in 6 s

    with pytest.raises(SystemExit, match="has no config.json; is it a run folder"):
        plot.main(["--report", str(tmp_path)])


def test_background_plot_draws_beside_the_caller(tmp_path):
    """plot.png is drawn by a child process (training goes on meanwhile); a request while it draws is
    dropped, and leaving the context waits for the drawing."""
    import plot

    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"event": "train", "step": s, "loss": 5.0 - s / 10})
                                               + "\n" for s in range(5)))
    with plot.BackgroundPlot(str(run)) as background:
        assert background.request()
        assert not background.request()  # a Python process takes well over a millisecond to start
        child = background.child
    assert child.returncode == 0 and (run / "plot.png").read_bytes()[:4] == b"\x89PNG"
