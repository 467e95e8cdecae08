"""preflight.py on CPU with a tiny config: every check's line, the FAILs that name their fix, the forecast
against the step time it measured; and its decisions, as plain functions, for GPU figures."""

import os
import re

import pytest
import torch

import preflight
from conftest import make_hellaswag_examples, run_script
from test_train_gpt2 import TINY
from train_gpt2 import parse_args

CHECKS = ["torch", "device", "/dev/shm", "disk", "data", "hellaswag", "memory", "all-reduce", "matmul", "attention",
          "sdpa", "steps", "compile", "evaluation", "checkpoint", "resume", "forecast"]


@pytest.fixture
def hellaswag_file(tmp_path):
    import json

    path = tmp_path / "hellaswag.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in make_hellaswag_examples(8)))
    return str(path)


def args_for(tmp_path, data_dir, *extra):
    return [*TINY, "--data_dir", data_dir, "--run_name", "real", "--log_dir", str(tmp_path / "logs"),
            "--checkpoint_dir", str(tmp_path / "ckpt" / "real"), "--max_steps", "100", "--val_every", "50",
            "--sample_every", "50", "--sample_tokens", "4", "--num_samples", "1", "--checkpoint_every", "40", *extra]


def lines(stdout):
    """{check: (status, detail)} from preflight's output."""
    found = {}
    for line in stdout.splitlines():
        if m := re.match(r"(PASS|WARN|FAIL|SKIP)  (\S+) +(.*)", line):
            found[m.group(2)] = (m.group(1), m.group(3))
    return found


def seconds(text):
    h, m, s = re.fullmatch(r"(\d+)h (\d+)m ([\d.]+)s", text).groups()
    return int(h) * 3600 + int(m) * 60 + float(s)


def run_preflight(capsys, *argv):
    """preflight.main in this process: (exit code, what it printed)."""
    code = preflight.main(list(argv))
    return code, capsys.readouterr().out


def test_preflight_end_to_end_on_cpu(shard_dir, tmp_path, hellaswag_file, capsys):
    code, stdout = run_preflight(capsys, *args_for(tmp_path, shard_dir, "--hellaswag_every", "50", "--hellaswag_file",
                                                   hellaswag_file, "--ema_stds", "0.05", "--ema_snapshot_every", "5"),
                                 "--steps", "4", "--price_per_hour", "30")
    assert code == 0
    checks = lines(stdout)
    assert list(checks) == CHECKS, stdout
    assert {name for name, (status, _) in checks.items() if status == "SKIP"} == {"all-reduce", "matmul", "sdpa", "compile"}
    assert all(status == "PASS" for name, (status, _) in checks.items()
               if name not in ("all-reduce", "matmul", "sdpa", "compile"))
    assert "no GPU" in checks["matmul"][1] and "one process" in checks["all-reduce"][1]
    assert checks["hellaswag"][1].startswith("8 examples") and "all 8:" in checks["evaluation"][1]
    assert "within 0.0e+00" in checks["resume"][1]  # on CPU a resume is exact
    assert re.search(r"preflight: 13 PASS, 0 WARN, 0 FAIL, 4 SKIP in .*the node is ready", stdout)
    # nothing in the run's own folders, and the scratch folder is gone
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ckpt" / "real").exists()
    assert os.listdir(tmp_path / "ckpt") == []
    assert "step     0 | loss" not in stdout  # the runs' own lines stay in the scratch folder

    # the forecast: the measured step time × max_steps, plus the parts, and the price
    step_ms = float(re.search(r"(\d+) ms a step", checks["steps"][1]).group(1))
    forecast = checks["forecast"][1]
    m = re.match(r"100 steps × (\d+) ms = (\S+ \S+ \S+) training, (.*): (\S+ \S+ \S+) in all, evaluations (\d+)% "
                 r"of it; at 30.00 an hour: ([\d.]+)$", forecast)
    assert m, forecast
    assert float(m.group(1)) == step_ms
    assert abs(seconds(m.group(2)) - 100 * step_ms / 1000) < 0.05 + 100 * 0.0005  # ms are rounded in the line
    parts = dict(re.fullmatch(r"(\S+) (\S+ \S+ \S+)", p).groups() for p in m.group(3).split(", "))
    assert set(parts) <= {"val", "hellaswag", "samples", "plots", "checkpoints", "start-up"} and "val" in parts
    total = seconds(m.group(4))
    assert abs(total - seconds(m.group(2)) - sum(seconds(v) for v in parts.values())) < 0.1 * (len(parts) + 1)
    assert abs(float(m.group(6)) - 30 * total / 3600) < 0.01


def test_missing_data_and_too_small_corpus_fail_with_the_fix(small_shards, tmp_path, capsys):
    out = run_script("preflight.py", *args_for(tmp_path, str(tmp_path / "nowhere")), check=False)  # the real exit
    assert out.returncode == 1
    checks = lines(out.stdout)
    assert checks["data"][0] == "FAIL" and "does not exist; make shards first: python fineweb_edu.py" in checks["data"][1]
    assert checks["run"] == ("SKIP", "not started: fix the FAILs above first") and "steps" not in checks
    assert "1 FAIL" in out.stdout

    code, stdout = run_preflight(capsys, *args_for(tmp_path, small_shards, "--max_steps", "100000"))
    assert code == 1
    status, detail = lines(stdout)["data"]
    assert status == "FAIL" and "fewer than --max_steps 100000" in detail
    assert "tokenise more (python fineweb_edu.py" in detail and "or lower --max_steps" in detail
    assert not (tmp_path / "ckpt").exists() or os.listdir(tmp_path / "ckpt") == []


def test_preflight_on_two_cpu_ranks(shard_dir, tmp_path):
    """Under torchrun the checks agree over the process group: an all-reduce's bandwidth, then both runs."""
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "preflight.py",
           *args_for(tmp_path, shard_dir), "--steps", "2"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    checks = lines(out.stdout)
    assert checks["all-reduce"][0] == "PASS" and re.search(r"GB/s bus bandwidth over 2 ranks \(gloo\)",
                                                           checks["all-reduce"][1])
    assert checks["resume"][0] == "PASS" and out.stdout.count("preflight: ") == 1  # rank 0 prints, once


# ---- decisions ----

def test_steps_in_shards_skip_short_tails():
    # shards of 1000 and 300 tokens, steps of 256 (+1 for the last target): 3 + 1
    assert preflight.steps_in_shards([1000, 300], 256) == 4
    assert preflight.steps_in_shards([257], 256) == 1 and preflight.steps_in_shards([256], 256) == 0


def test_gpu_health():
    assert preflight.gpu_health(1980, 1980, 0, 0, 60)[0] == "PASS"
    status, detail = preflight.gpu_health(1200, 1980, 0x4, 0, 89)  # NVML's power-cap bit
    assert status == "WARN" and "SM clock 1200/1980 MHz" in detail and "0x4" in detail
    assert preflight.gpu_health(1980, 1980, 0, 3, 60)[0] == "FAIL"


def test_bus_bandwidth_and_event_counts():
    assert preflight.bus_bandwidth(8e9, 0.1, 8) == pytest.approx(2 * 7 / 8 * 8e9 / 0.1)  # nccl-tests' busbw
    assert preflight.event_count(250, 19073) == 78  # steps 0, 250, ..., 19000, and 19073
    assert preflight.event_count(250, 500) == 3 and preflight.event_count(0, 500) == 0


def test_forecast_adds_up():
    cfg, _ = parse_args(["--max_steps", "1000", "--val_every", "250", "--hellaswag_every", "500", "--sample_every", "0",
                         "--checkpoint_every", "400", "--checkpoint_every_minutes", "1"])
    total, parts = preflight.forecast(cfg, step_s=0.15, val_s=2.0, hella_s=20.0, sample_s=1.0, plot_s=0.5,
                                      ckpt_s=4.0, startup_s=60.0)
    # val at 0, 250, 500, 750, 1000; HellaSwag at 0, 500, 1000; the plot drawn at the end (the others are
    # drawn beside training); saves at 400, 800, the end, and 2 by the minute (150 s of training)
    assert parts == pytest.approx({"training": 150.0, "val": 10.0, "hellaswag": 60.0, "samples": 0.0, "plots": 0.5,
                                   "checkpoints": 20.0, "start-up": 60.0})
    assert total == pytest.approx(300.5)


def test_matmul_status():
    assert preflight.matmul_status([700, 710, 690, 705], 989)[0] == "PASS"
    status, detail = preflight.matmul_status([700, 710, 450, 705], 989)  # one GPU at 64% of its peers
    assert status == "WARN" and detail.startswith("bf16 8192³: 450 TFLOP/s on the slowest GPU, 702 median")
    assert preflight.matmul_status([400, 400], 989)[0] == "WARN"  # all alike, but under half the datasheet
    assert preflight.matmul_status([400, 400], 0)[0] == "PASS"  # an unknown part: peers only


def test_gpu_health_reads_nvml(monkeypatch):
    """check_gpu_health's NVML calls, against a stand-in pynvml (no GPU here): the figures reach the line."""
    import sys
    import types

    import torch

    fake = types.SimpleNamespace(
        NVML_CLOCK_SM=1, NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1, NVML_VOLATILE_ECC=0, NVML_TEMPERATURE_GPU=0,
        nvmlClocksThrottleReasonGpuIdle=0x1, nvmlClocksThrottleReasonApplicationsClocksSetting=0x2,
        NVMLError=RuntimeError, nvmlInit=lambda: None, nvmlDeviceGetHandleByUUID=lambda uuid: uuid,
        nvmlDeviceGetClockInfo=lambda h, kind: 1410, nvmlDeviceGetMaxClockInfo=lambda h, kind: 1980,
        nvmlDeviceGetCurrentClocksThrottleReasons=lambda h: 0x1 | 0x4,  # idle (normal) and the power cap
        nvmlDeviceGetTotalEccErrors=lambda h, kind, counter: 0, nvmlDeviceGetTemperature=lambda h, kind: 71)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid="abc"))
    checks = preflight.Checks(rank=1, world_size=1)  # rank 1: nothing printed
    preflight.check_gpu_health(checks)
    assert checks.lines == [("WARN", "gpu health", "SM clock 1410/1980 MHz, 71 °C, 0 uncorrected ECC errors: "
                                                   "throttled (NVML reasons 0x4: power, heat or a slowdown)")]


def test_a_little_repetition_warns_a_lot_fails(small_shards):
    # small_shards' train shards hold 13 steps of 256 tokens
    def status(max_steps):
        cfg, _ = parse_args([*TINY, "--data_dir", small_shards, "--max_steps", str(max_steps)])
        checks = preflight.Checks(rank=1, world_size=1)
        ok = preflight.check_data(checks, cfg, 1)
        return ok, checks.lines[0][0], checks.lines[0][2]

    assert status(13)[:2] == (True, "PASS")
    ok, s, detail = status(14)  # as sample-10BT's ~18,900 steps against the default 19,073
    assert (ok, s) == (True, "WARN") and "the last 1 of --max_steps 14 repeat the first shards" in detail
    assert status(15)[:2] == (False, "FAIL")  # 13 < 0.9 × 15


def test_an_unwritable_checkpoint_volume_fails_the_disk_check(monkeypatch, tmp_path):
    cfg, model_cfg = parse_args([*TINY, "--checkpoint_dir", str(tmp_path / "c")])

    def read_only(**kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(preflight.tempfile, "mkstemp", read_only)
    checks = preflight.Checks(rank=1, world_size=1)
    assert preflight.check_disk(checks, cfg, model_cfg) == "FAIL"
    assert checks.lines[0][2] == f"cannot write in {tmp_path}: Read-only file system; point --checkpoint_dir at a " \
                                 f"writable volume"


def test_a_stop_signal_ends_preflight(monkeypatch, shard_dir, tmp_path, capsys):
    """Ctrl-C during preflight's run (train_gpt2 stops gracefully): preflight stops too, exit 130, and its
    scratch folder is gone."""
    import train_gpt2

    monkeypatch.setattr(train_gpt2, "train", lambda cfg, model_cfg: {"stopped": True})
    code, stdout = run_preflight(capsys, *args_for(tmp_path, shard_dir), "--steps", "2")
    assert code == 130 and "stopped by a signal before the end" in stdout and "steps" not in lines(stdout)
    assert os.listdir(tmp_path / "ckpt") == []


def test_a_failed_save_in_preflights_run_fails_the_checkpoint_check(monkeypatch, shard_dir, tmp_path, capsys):
    import errno

    import checkpoint

    real = checkpoint.save_checkpoint

    def no_room_halfway(folder, state, keep, volume=None):  # the save halfway fails, the final one works
        if state["step"] == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(folder, state, keep, volume)

    monkeypatch.setattr(checkpoint, "save_checkpoint", no_room_halfway)
    code, stdout = run_preflight(capsys, *args_for(tmp_path, shard_dir), "--steps", "2")
    status, detail = lines(stdout)["checkpoint"]
    assert code == 1 and status == "FAIL" and "No space left on device" in detail and "resume" not in lines(stdout)


def test_time_sdpa_compares_kernel_orders_on_the_cpu():
    """The GPU's cuDNN-against-flash check, run with the CPU's two kernels: same outputs, a time each."""
    from torch.nn.attention import SDPBackend

    ms_math, y_math = preflight.time_sdpa("cpu", (2, 2, 32, 8), torch.float32, [SDPBackend.MATH], reps=2)
    ms_flash, y_flash = preflight.time_sdpa("cpu", (2, 2, 32, 8), torch.float32, [SDPBackend.FLASH_ATTENTION], reps=2)
    assert ms_math > 0 and ms_flash > 0
    torch.testing.assert_close(y_math, y_flash, rtol=1e-5, atol=1e-5)


def test_time_sdpa_times_the_models_layout(monkeypatch):
    """The q, k, v it times have the shapes and strides the model's attention hands SDPA."""
    from torch.nn.attention import SDPBackend

    from model import GPT, GPTConfig

    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append([(t.shape, t.stride()) for t in (q, k, v)])
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=64))
    x = torch.randint(0, 64, (2, 32))
    model(x, x)[1].backward()
    assert len(seen) == 1  # the model's own call
    preflight.time_sdpa("cpu", (2, 2, 32, 8), torch.float32, [SDPBackend.MATH], reps=1)
    assert seen[-1] == seen[0]
