"""ablate.py end to end on a tiny model: table, plots, raw curves, determinism, refusals."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import ablate
import checkpoint
from conftest import ROOT

TINY = ("--n_layer 1 --n_head 2 --n_embd 32 --block_size 32 --seq_len 32 --micro_batch_size 4 "
        "--total_batch_size 128 --warmup_steps 2 --max_lr 3e-3 --val_every 3 --val_steps 1 "
        "--hellaswag_every 0 --sample_every 0 --checkpoint_every_minutes 0 --device cpu")


def test_ablation_end_to_end(small_shards, hellaswag_file, tmp_path, capsys):
    out = tmp_path / "res"
    args = ["--base", TINY, "--data_dir", small_shards, "--tokens", "1152", "--out", str(out),
            "--variant", "default_lr=--max_lr 6e-4 --warmup_steps 1",  # 6e-4 is the default, not the base's: a change
            "--seeds", "1", "2", "--hellaswag_file", hellaswag_file, "--parallel", "2"]
    ablate.main(args)  # in this process; each run is train_gpt2.py in a child, as always, two at a time
    first = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["checkpoints", "loss_vs_time.png", "loss_vs_tokens.png", "results.json",
                                       "results.md", "runs"]
    for png in ("loss_vs_time.png", "loss_vs_tokens.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads((out / "results.json").read_text())
    assert res["tokens"] == 1152 and list(res["variants"]) == ["baseline", "default_lr"]
    curves = {n: [[p[3] for p in r["val"]] for r in runs] for n, runs in res["variants"].items()}
    assert all(len(c) == 4 for runs in curves.values() for c in runs)  # val at steps 0, 3, 6, 9
    assert curves["default_lr"] != curves["baseline"]  # the runner really passes the settings through
    assert curves["baseline"][0] != curves["baseline"][1]  # and the seed
    for runs in res["variants"].values():
        assert runs[0]["config"]["train"]["max_steps"] == 9 and runs[0]["config"]["run"]["git_commit"]
        assert runs[0]["hellaswag"] is not None
    assert res["variants"]["default_lr"][0]["config"]["train"]["max_lr"] == 6e-4
    assert res["variants"]["default_lr"][0]["config"]["train"]["warmup_steps"] == 1

    table = (out / "results.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| variant")]
    assert [r.split("|")[1].strip() for r in rows] == ["baseline", "default_lr"]
    base = rows[0].split("|")
    assert "(1.00×)" in base[5] and "(1.00×)" in base[6] and "±" in base[4] and base[3].strip() == "1,152"
    assert "results.md" in first

    # rerunning the same command trains nothing again and writes the same table
    ablate.main(args)
    again = capsys.readouterr().out
    assert again.count("finished earlier, with these settings") == 4
    assert (out / "results.md").read_text().splitlines()[2:] == table[2:]


def test_a_failed_run_stops_the_study(small_shards, tmp_path, monkeypatch):
    popen = subprocess.Popen

    def crash_baseline_seed1(cmd, **kw):  # the run fails as a crash would (settings are checked up front)
        return popen([sys.executable, "-c", "raise SystemExit(3)"] if "baseline-seed1" in cmd else cmd, **kw)

    monkeypatch.setattr(ablate.subprocess, "Popen", crash_baseline_seed1)
    out = tmp_path / "res"
    with pytest.raises(SystemExit, match="run baseline-seed1 failed"):
        ablate.main(["--base", TINY, "--data_dir", small_shards, "--tokens", "384", "--out", str(out),
                     "--seeds", "1", "2", "--variant", "later=--max_lr 1e-3"])
    assert not (out / "runs" / "baseline-seed2").exists() and not (out / "runs" / "later-seed1").exists()


def test_a_seed_twice_is_refused(small_shards, tmp_path):
    with pytest.raises(SystemExit, match="a seed twice"):
        ablate.main(["--base", TINY, "--data_dir", small_shards, "--tokens", "384", "--seeds", "1", "1",
                     "--out", str(tmp_path)])


def test_a_signal_to_ablate_stops_its_runs(small_shards, tmp_path):
    # SIGTERM to ablate.py alone (not its process group): the run training hears it too, saves and stops,
    # ablate.py says so and exits non-zero, and the next run never starts
    out = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ablate.py"), "--base", TINY + " --val_every 100",
                             "--data_dir", small_shards, "--tokens", str(128 * 2000), "--seeds", "1", "--out",
                             str(out), "--variant", "later=--max_lr 1e-3"], cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        metrics = out / "runs" / "baseline-seed1" / "metrics.jsonl"
        deadline = time.time() + 60
        while '"train"' not in (metrics.read_text() if metrics.exists() else "") and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:  # whatever failed: nothing of it left running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "run baseline-seed1 stopped before its end" in err
    assert "SIGTERM: finishing this step" in (out / "runs" / "baseline-seed1.out").read_text()
    assert list(checkpoint.list_checkpoints(str(out / "checkpoints" / "baseline-seed1")))  # resumable
    assert not (out / "runs" / "later-seed1").exists()


def test_run_env():
    # on the CPU: the cores shared out as threads, unless the caller set them
    assert ablate.run_env(1, 2, 1, False, {}, cores=2)["OMP_NUM_THREADS"] == "1"
    assert ablate.run_env(0, 4, 1, False, {}, cores=16)["OMP_NUM_THREADS"] == "4"
    assert ablate.run_env(0, 2, 2, False, {}, cores=16)["OMP_NUM_THREADS"] == "4"  # 2 runs × 2 ranks
    assert ablate.run_env(0, 3, 1, False, {}, cores=2)["OMP_NUM_THREADS"] == "1"
    assert ablate.run_env(0, 2, 1, False, {"OMP_NUM_THREADS": "3"}, cores=16)["OMP_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in ablate.run_env(0, 1, 1, False, {}, cores=16)  # one at a time: as it is
    # on GPUs: each slot its own nproc of the visible ones
    assert ablate.run_env(1, 2, 4, True, {}, gpus=8)["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    assert ablate.run_env(0, 8, 1, True, {}, gpus=8)["CUDA_VISIBLE_DEVICES"] == "0"
    assert ablate.run_env(1, 2, 1, True, {"CUDA_VISIBLE_DEVICES": "3,5"}, gpus=2)["CUDA_VISIBLE_DEVICES"] == "5"
    with pytest.raises(SystemExit, match="needs 8 GPUs, and 4 are visible"):
        ablate.run_env(0, 4, 2, True, {}, gpus=4)


def test_reach():
    curve = [[0, 0, 0.0, 10.0], [1, 100, 3.0, 8.0], [2, 200, 7.0, 6.0]]  # step, tokens, time, val loss
    assert ablate.reach(curve, 7.0) == pytest.approx((150, 5.0))  # halfway from 8 to 6, in tokens and in time
    assert ablate.reach(curve, 7.5) == pytest.approx((125, 4.0))
    assert ablate.reach(curve, 8.0) == (100, 3.0)
    assert ablate.reach(curve, 10.0) == (0, 0.0)
    assert ablate.reach(curve, 5.0) is None


@pytest.mark.parametrize("variant,message", [
    ("x=--seq_len 16", "changes seq_len"),
    ("x=--data_dir /elsewhere", "changes data_dir"),
    ("x=--max_steps 3", "changes max_steps"),
    ("x=--val_every 5", "changes val_every"),
    ("x=--run_name mine", "changes run_name"),
    ("baseline=--max_lr 1", "a new NAME each"),
    ("Baseline=--max_lr 1", "a new NAME each"),
    ("nonsense", "NAME=CONFIG_FILE"),
    ("x=--n_embd 33", "x: n_embd .33. must be a multiple of n_head"),  # what train_gpt2.py would refuse
    ("x=--micro_batch_size 3", "x: total_batch_size 128 is not a multiple"),
])
def test_variants_that_change_the_comparison_are_refused(small_shards, tmp_path, variant, message):
    with pytest.raises(SystemExit, match=message):
        ablate.main(["--base", TINY, "--data_dir", small_shards, "--tokens", "1152", "--variant", variant,
                     "--out", str(tmp_path)])


def test_budget_must_be_whole_steps(small_shards, tmp_path):
    with pytest.raises(SystemExit, match="not a whole number of steps"):
        ablate.main(["--base", TINY, "--data_dir", small_shards, "--tokens", "1000", "--out", str(tmp_path)])
