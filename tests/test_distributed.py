"""distributed.py's decisions, checked on CPU for CUDA inputs too: which device a run gets (never a silent
CPU fallback), the process group's options, the GPUs' peak FLOP/s, and whether a run fits in memory."""

import datetime

import pytest
import torch

import distributed
from distributed import choose_device, cuda_unusable, memory_problem, peak_flops_per_device
from test_train_gpt2 import run_inprocess, tiny_args
from train_gpt2 import TrainConfig, parse_args

OLD_DRIVER = ("550.54.15", ["NVIDIA H100 80GB HBM3"] * 8)


def test_device_choice():
    # (requested, world_size, cuda available, mps available, NVIDIA driver found) -> device
    assert choose_device("auto", 1, True, False, None) == "cuda"
    assert choose_device("auto", 8, True, False, None) == "cuda"
    assert choose_device("auto", 1, False, False, None) == "cpu"  # a laptop, CI
    assert choose_device("auto", 1, False, True, None) == "mps"
    assert choose_device("cpu", 2, False, False, None) == "cpu"  # torchrun on CPU, asked for
    assert choose_device("cpu", 1, True, False, None) == "cpu"
    assert choose_device("cuda:1", 1, True, False, None) == "cuda:1"
    assert choose_device("mps", 1, False, True, None) == "mps"


def test_no_silent_cpu_fallback(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    with pytest.raises(SystemExit) as e:  # a GPU torch cannot use: the driver is older than its CUDA needs
        choose_device("auto", 8, False, False, OLD_DRIVER)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg
    assert "NVIDIA H100 80GB HBM3 × 8 (driver 550.54.15)" in msg and "CUDA 13.2 needs driver >= 580" in msg
    assert "--index-url https://download.pytorch.org/whl/cu126" in msg
    with pytest.raises(SystemExit, match="driver 550.54.15"):
        choose_device("cuda", 1, False, False, OLD_DRIVER)
    with pytest.raises(SystemExit, match="torchrun started 8 processes.*pass --device cpu"):
        choose_device("auto", 8, False, False, None)  # no GPU at all, but 8 ranks: CPU only when asked
    with pytest.raises(SystemExit, match="--device cuda: torch finds no CUDA GPU"):
        choose_device("cuda", 1, False, False, None)
    assert "CUDA 12.8 needs driver >= 570" in cuda_unusable(("535.1", []), "12.8")
    assert "CPU-only build" in cuda_unusable(("535.1", []), None)
    # a driver new enough for torch's CUDA: something else hides the GPU, and the line says what to check
    new = cuda_unusable(("580.95.05", ["NVIDIA H100 80GB HBM3"] * 8), "13.2", visible="5")
    assert "though the driver is new enough" in new and "CUDA_VISIBLE_DEVICES (5)" in new
    assert "nvidia-fabricmanager" in new and "Update the driver" not in new and "--device cpu" in new
    with pytest.raises(SystemExit, match="--device gpu: choose auto, cuda, cuda:N, mps or cpu"):
        choose_device("gpu", 1, True, False, None)
    with pytest.raises(SystemExit, match="--device cuda:0 under torchrun would put every rank on one GPU"):
        choose_device("cuda:0", 8, True, False, None)


def test_training_stops_when_the_gpu_is_unusable(monkeypatch, small_shards, tmp_path):
    """The guard in a real run: a faked NVIDIA GPU that torch cannot see stops train_gpt2 before any work."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "nvidia_driver", lambda: OLD_DRIVER)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(SystemExit, match="driver 550.54.15"):
        run_inprocess(tiny_args(tmp_path, small_shards, "gpu", "--device", "auto"))
    assert not (tmp_path / "logs" / "gpu").exists()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden on purpose: CPU it is
    assert distributed.default_device() in ("cpu", "mps")


def test_nvidia_driver_probe(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed.glob, "glob", lambda pattern: [])
    assert distributed.nvidia_driver() is None  # no /dev/nvidia*: no GPU, nvidia-smi is not even asked
    monkeypatch.setattr(distributed.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '550.54.15, NVIDIA H100 80GB HBM3'\necho '550.54.15, NVIDIA H100 80GB HBM3'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert distributed.nvidia_driver() == ("550.54.15", ["NVIDIA H100 80GB HBM3"] * 2)


def test_process_group_options(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.setup_distributed(TrainConfig(device="cpu")) == (1, 1, 2, "cpu")
    assert calls[-1] == {"backend": "gloo", "timeout": datetime.timedelta(minutes=30)}
    assert distributed.PROCESS_GROUP_TIMEOUT > datetime.timedelta(minutes=10)  # NCCL's default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    distributed.setup_distributed(TrainConfig(device="auto"))
    assert calls[-1]["backend"] == "nccl" and calls[-1]["device_id"] == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # 2 processes on a 1-GPU machine
    with pytest.raises(SystemExit, match="cuda:1: this machine has 1 GPU.*--nproc-per-node"):
        distributed.setup_distributed(TrainConfig(device="auto"))


# what torch.cuda.get_device_name() says on each part -> its dense bf16 peak (NVIDIA's datasheets)
DEVICE_NAMES = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12,
    "NVIDIA H800": 989e12, "NVIDIA H800 PCIe": 756e12, "NVIDIA H20": 148e12, "NVIDIA B200": 2250e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA A800-SXM4-80GB": 312e12, "NVIDIA L40S": 362e12,
    "NVIDIA L4": 121e12, "NVIDIA A10": 125e12, "Tesla V100-SXM2-16GB": 125e12, "Tesla T4": 65e12,
    "NVIDIA A10G": None, "NVIDIA GeForce RTX 4090": None,  # unknown: no MFU rather than a wrong one
}


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_peak_flops_of_real_device_names(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert peak_flops_per_device(TrainConfig(), "cuda") == DEVICE_NAMES[name]


def test_memory_check():
    cfg, model_cfg = parse_args([])  # GPT-2 124M at micro batch 64 × 1024: ~27 GiB by the estimate
    assert memory_problem(cfg, model_cfg, "cuda", 80 * 2**30, 8) is None  # an H100
    problem = memory_problem(cfg, model_cfg, "cpu", 16 * 2**30, 1)  # a 16 GiB laptop
    assert problem.startswith("micro batch 64 × 1024 tokens needs about 26.5 GiB") and "16.0 GiB this cpu" in problem
    fits = int(problem.split("--micro_batch_size ")[1].split()[0])
    assert distributed.estimate_memory(model_cfg, fits, 1024) <= 16 * 2**30
    assert distributed.estimate_memory(model_cfg, 2 * fits, 1024) > 16 * 2**30  # the largest divisor that fits
    assert "--preset laptop" in problem
    assert "--find_micro_batch use" in memory_problem(cfg, model_cfg, "cuda", 24 * 2**30, 8)  # an L4
    assert "not even --micro_batch_size 1 fits" in memory_problem(cfg, model_cfg, "cpu", 2**30, 1)
    laptop, laptop_model = parse_args(["--preset", "laptop"])
    assert memory_problem(laptop, laptop_model, "cpu", 8 * 2**30, 1) is None


def test_cpu_default_run_that_cannot_fit_is_one_line(shard_dir, tmp_path):
    """train_gpt2.py with GPT-2 124M's shape on a machine with less memory than it needs: one line
    (SystemExit's message, which Python prints alone), before anything is written."""
    import train_gpt2

    args = ["--data_dir", shard_dir, "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path / "c"),
            "--device", "cpu", "--micro_batch_size", "512", "--total_batch_size", "524288"]
    with pytest.raises(SystemExit) as e:  # 512 × 1024 needs ~550 GiB: more than any CI box
        train_gpt2.main(args)
    assert str(e.value).startswith("error: micro batch 512 × 1024 tokens needs about") and "\n" not in str(e.value)
    assert not (tmp_path / "c").exists() and not (tmp_path / "logs").exists()


def test_cpu_out_of_memory_mid_run_is_one_line(monkeypatch, small_shards, tmp_path):
    import train_gpt2
    from model import GPT

    def oom(self, idx, targets=None):  # what torch's CPU allocator raises when the OS refuses it memory
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 13174571008 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(GPT, "forward", oom)
    with pytest.raises(SystemExit) as e:
        train_gpt2.main(tiny_args(tmp_path, small_shards, "oom"))
    assert str(e.value).startswith("error: CPU out of memory at micro_batch_size 4; lower --micro_batch_size")
    monkeypatch.setattr(GPT, "forward", lambda self, idx, targets=None: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # any other error keeps its traceback
        train_gpt2.main(tiny_args(tmp_path, small_shards, "other"))


def test_cpu_run_says_how_long_it_will_take(small_shards, tmp_path, capsys):
    from test_train_gpt2 import events

    run_inprocess(tiny_args(tmp_path, small_shards, "eta", "--max_steps", "4"))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("one step takes"))
    dt = events(tmp_path / "logs" / "eta", "train")[1]["dt_ms"] / 1000  # the second step's time
    assert line.startswith(f"one step takes {dt:.1f} s on this cpu: the 2 steps left would take about ")
    h, m, s = line.rsplit("about ", 1)[1].split()
    assert abs(int(h[:-1]) * 3600 + int(m[:-1]) * 60 + float(s[:-1]) - 2 * dt) < 0.1
