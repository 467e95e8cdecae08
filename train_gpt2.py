"""
Train GPT-2 on token shards from fineweb_edu.py: one process, or many with torchrun (DDP).

    python train_gpt2.py                                     # CPU / Apple laptop / one GPU
    torchrun --standalone --nproc-per-node=8 train_gpt2.py   # 8 GPUs, one node
    python train_gpt2.py --n_layer 4 --n_head 4 --n_embd 128 --total_batch_size 16384 \
        --micro_batch_size 16 --seq_len 256 --max_steps 200   # a tiny model on a laptop

Every setting is a TrainConfig or GPTConfig field and a flag of the same name (--micro_batch_size 16);
--config file.json sets many at once (flags win). Defaults reproduce build-nanogpt's GPT-2 124M run:
10B tokens, 19073 steps of 524288 tokens.

Writes logs/<run_name>/{log.txt, metrics.jsonl, config.json, samples.txt, plot.png, report.md} and
TensorBoard event files (small: rsync it home) and checkpoints/<run_name>/step_NNNNNN.pt + latest (big: keep it on the node's volume).
"""

import argparse
import contextlib
import gc
import glob
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
from data import DataLoader, atomic_write, gpt2_tokenizer
from ema import PowerEMA, list_snapshots, save_snapshot, sigma_rel_to_gamma
from optim import MATRIX_KINDS, build_optimizer, describe
from model import GPT, GPTConfig
from plot import plot_runs, write_report


@dataclass
class TrainConfig:
    # data: shards written by fineweb_edu.py (or llm.c / build-nanogpt)
    data_dir: str = "data/fineweb_edu"
    shuffle: bool = False  # permute shard order and document chunks each epoch (seeded, same on every rank)
    # batch: total_batch_size = micro_batch_size · seq_len · world_size · grad_accum_steps
    total_batch_size: int = 524288  # 2**19 tokens, ~0.5M as in GPT-3 125M
    micro_batch_size: int = 64  # lower this on out-of-memory; accumulation keeps the total batch
    find_micro_batch: str = ""  # CUDA: find the largest micro batch that fits, then "print" it and exit, or "use" it
    seq_len: int = 1024
    # optimisation: AdamW, linear warmup then cosine decay to min_lr_frac · max_lr
    max_steps: int = 19073  # 10B tokens / 524288
    warmup_steps: int = 715  # 375M tokens (GPT-3 paper)
    max_lr: float = 6e-4
    min_lr_frac: float = 0.1
    lr_schedule: str = "cosine"  # cosine | inv_sqrt: max_lr / √max(step / lr_ref_steps, 1) after warmup (EDM2)
    lr_ref_steps: int = 0  # inv_sqrt: where the decay starts (0: warmup_steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    optimizer: str = "adamw"  # for the hidden matrices: adamw | muon | sphere | manifold_muon (optim.py)
    matrix_lr: float = 0.02  # their peak lr (follows the schedule), except muon with --muon_scale moonlight
    muon_momentum: float = 0.95  # momentum (Nesterov) of muon, sphere and manifold_muon
    muon_scale: str = "keller"  # keller: √max(1, rows/cols) | moonlight: 0.2·√max(rows, cols), AdamW's lr and decay
    manifold_dual_steps: int = 5  # manifold_muon: dual-ascent iterations per step
    # evaluation, every N steps and at the end (0 = off)
    val_every: int = 250
    val_steps: int = 20  # batches of total_batch_size tokens from the start of the val shard
    hellaswag_every: int = 250
    hellaswag_file: str = ""  # local hellaswag_val.jsonl; empty = download it once
    hellaswag_limit: int = 0  # evaluate the first N examples only (0 = all 10042)
    sample_every: int = 250
    sample_prompt: str = "Hello, I'm a language model,"
    num_samples: int = 4
    sample_tokens: int = 32
    # system
    parallelism: str = "ddp"  # ddp: every rank holds the whole model | fsdp: weights, grads, AdamW state sharded (FSDP2)
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dtype: str = "auto"  # auto: bfloat16 on CUDA with compute capability >= 8.0, float16 below, float32 elsewhere
    compile: bool | None = None  # torch.compile; default on for CUDA
    seed: int = 1337
    peak_flops: float = 0.0  # per device, for MFU; 0 = look the GPU up in PEAK_FLOPS
    # output
    log_dir: str = "logs"
    run_name: str = ""  # default: a timestamp
    checkpoint_dir: str = ""  # default: checkpoints/<run_name>
    checkpoint_every: int = 5000  # steps (0 = only at the end)
    checkpoint_every_minutes: float = 5.0  # bounds the work a hard kill loses (0 = off)
    keep_checkpoints: int = 3  # newest checkpoints kept (0 = all)
    # checkpoint_dir is each node's own disk: the first rank of every node writes (and resumes from) a full
    # copy. Off: one filesystem shared by all nodes (or a single node), written by global rank 0
    checkpoint_per_node: bool = False
    resume: str = "auto"  # auto: newest good checkpoint in checkpoint_dir, if any | none | a checkpoint file/folder
    # post-hoc EMA (EDM2; ema.py): power-function EMAs of the weights, snapshots to checkpoint_dir/ema/
    ema_stds: str = ""  # comma-separated σ_rel to track, e.g. 0.05,0.10 (empty: off)
    ema_snapshot_every: int = 0  # steps between snapshots (and one at the end); 0 = none
    # watching from afar (uv sync --extra monitor): TensorBoard event files in logs/<run>/, and W&B
    tensorboard: bool | None = None  # None: on when the tensorboard package is installed
    wandb_project: str = ""  # log to this W&B project (rank 0; WANDB_MODE=offline works without network)


# GPTConfig defaults that differ when training: GPT-2's 50257 rounded up to 50304 = 64·786 makes the
# embedding and output matmuls tile evenly on GPUs (build-nanogpt measured ~4% faster).
TRAIN_MODEL_DEFAULTS = {"vocab_pad_multiple": 64}

# --preset NAME: a set of settings under the --config file and the flags (both override it).
PRESETS = {
    # every gpt-oss change at GPT-2 124M's size: 12 query heads share 4 key/value heads, even layers
    # attend to the last 128 tokens, 8 experts of which each token uses 2 (the active MLP is the
    # dense one's size), untied output layer (SPEC-improvements.md, section A)
    # EDM2's magnitude-preserving network with the optimizer settings that go with it (section B)
    # (unit-RMS weight rows make the lr a relative step: it needs to be ~15x GPT-2's 6e-4, as EDM2's 1e-2)
    "edm2": {"mp": True, "beta2": 0.99, "weight_decay": 0.0, "lr_schedule": "inv_sqrt", "max_lr": 1e-2},
    # nGPT as its paper trains it: rope, untied embeddings, no weight decay, no warmup (section C)
    "ngpt": {"ngpt": True, "pos": "rope", "tie_embeddings": False, "weight_decay": 0.0, "warmup_steps": 0},
    "gpt-oss": {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "n_kv_head": 4, "window": 128, "sinks": True,
                "moe_experts": 8, "moe_topk": 2, "tie_embeddings": False},
    # the larger GPT-2s with llm.c's reproduction settings (scripts/run_gpt2_{350M,774M,1558M}.sh: lr, batch,
    # steps, warmup 700, decay to min_lr_frac); micro batches sized for an 80 GB GPU by estimate_memory()
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "max_lr": 3e-4, "min_lr_frac": 0.0,
                    "total_batch_size": 524288, "max_steps": 60000, "warmup_steps": 700, "micro_batch_size": 32},
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280, "max_lr": 2.5e-4, "min_lr_frac": 0.0,
                   "total_batch_size": 524288, "max_steps": 286102, "warmup_steps": 700, "micro_batch_size": 16},
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600, "max_lr": 6e-4, "min_lr_frac": 0.1,
                "total_batch_size": 1048576, "max_steps": 32000, "warmup_steps": 700, "micro_batch_size": 8},
}

# Dense bf16 tensor-core peak FLOP/s per GPU, from NVIDIA's datasheets (fp16 for V100/T4), matched
# as whole words of torch.cuda.get_device_name(), most specific first ("A10" is not "A10G").
PEAK_FLOPS = {
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
    "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12,
    "V100": 125e12, "T4": 65e12,
}


def fail(msg):
    """One clear line on stderr and a non-zero exit, instead of a traceback."""
    raise SystemExit(f"error: {msg}")


# ---------------------------------------------------------------------------
# configuration: flags generated from the dataclasses

def parse_settings(argv=None):
    """The settings argv sets explicitly, as {name: value}: a --config file's, then the flags'."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file of settings (flat, or a run's config.json); flags override it")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named set of model switches, under --config and flags")
    for cls in (TrainConfig, GPTConfig):
        group = parser.add_argument_group(cls.__name__)
        for f in fields(cls):
            if f.type in (bool, bool | None):
                group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
            else:
                group.add_argument(f"--{f.name}", type=f.type, default=argparse.SUPPRESS, metavar=f.type.__name__.upper())
    args = vars(parser.parse_args(argv))
    values = dict(PRESETS.get(args.pop("preset", None), {}))
    if config_file := args.pop("config", None):
        try:
            with open(config_file) as f:
                loaded = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"cannot read --config {config_file}: {e}")
        if "train" in loaded or "model" in loaded:  # a run's config.json: its settings, not its identity
            loaded = {**loaded.get("train", {}), **loaded.get("model", {})}
            for key in ("run_name", "checkpoint_dir", "resume"):
                loaded.pop(key, None)
        types = {f.name: f.type for cls in (TrainConfig, GPTConfig) for f in fields(cls)}
        if unknown := sorted(set(loaded) - set(types)):
            parser.error(f"--config {config_file}: unknown settings {', '.join(unknown)}")
        for key, value in loaded.items():
            expected = {bool: bool, bool | None: (bool, type(None)), float: (float, int)}.get(types[key], types[key])
            if not isinstance(value, expected) or (types[key] is int and isinstance(value, bool)):
                parser.error(f"--config {config_file}: {key} must be {types[key]}, not {value!r}")
        values.update(loaded)
    values.update(args)
    return values


def parse_args(argv=None):
    """(TrainConfig, GPTConfig) from command-line flags and an optional --config file."""
    values = parse_settings(argv)
    train_names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in train_names})
    try:
        model_cfg = GPTConfig(**{**TRAIN_MODEL_DEFAULTS, **{k: v for k, v in values.items() if k not in train_names}})
    except ValueError as e:
        fail(str(e))
    return cfg, model_cfg


def grad_accum_steps(cfg, world_size):
    per_step = cfg.micro_batch_size * cfg.seq_len * world_size
    if cfg.total_batch_size % per_step:
        fail(f"total_batch_size {cfg.total_batch_size} is not a multiple of micro_batch_size·seq_len·world_size "
             f"= {cfg.micro_batch_size}·{cfg.seq_len}·{world_size} = {per_step}; change --micro_batch_size "
             f"or --total_batch_size")
    return cfg.total_batch_size // per_step


def estimate_memory(model_cfg, micro_batch_size, seq_len, world_size=1):
    """Bytes of GPU memory one rank needs to train (DDP, AdamW, bf16 autocast, no recompute), estimated:
    16 per parameter for fp32 weights, grads and AdamW's two moments, 2 for autocast's bf16 weight copies,
    4 for DDP's gradient buckets (more than one rank); per layer 42 per token per n_embd of activations
    saved for backward, and 14 per logit (bf16 logits, fp32 loss, their grad). The last two were measured
    for this model.py with torch's MemTracker (tests check the whole estimate against it); torch.compile
    fuses some of it away, and the CUDA allocator's caching adds some."""
    with torch.device("meta"):  # the parameter count without allocating anything
        params = GPT(model_cfg).num_params(non_embedding=False)
    tokens = micro_batch_size * seq_len
    per_param = 18 + (4 if world_size > 1 else 0)
    return per_param * params + 42 * tokens * model_cfg.n_embd * model_cfg.n_layer \
        + 14 * tokens * model_cfg.padded_vocab_size


def largest_fitting(candidates, fits):
    """The largest of the ascending candidates for which fits() is true, by binary search (whatever fits
    with a micro batch also fits with a smaller one); None if none does."""
    best, lo, hi = None, 0, len(candidates) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def find_micro_batch(cfg, model_cfg, device, world_size):
    """The largest micro batch that trains on this device: a divisor of the tokens each rank handles per
    step, searched with two real training steps each (model, optimizer, autocast; eager, which needs more
    memory than compiled: a safe side), with DDP's gradient buckets and 5% of the GPU (for NCCL and the
    evaluations) held back. Every rank searches its own GPU; they settle on the smallest answer."""
    if cfg.total_batch_size % (cfg.seq_len * world_size):
        fail(f"total_batch_size {cfg.total_batch_size} is not a multiple of seq_len·world_size = "
             f"{cfg.seq_len}·{world_size}; change --total_batch_size")
    per_rank = cfg.total_batch_size // (cfg.seq_len * world_size)
    candidates = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
    device_type = device.split(":")[0]
    ptdtype = resolve_dtype(cfg, device_type)
    autocast = torch.autocast(device_type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()

    headroom = torch.cuda.get_device_properties(device).total_memory // 20 if device_type == "cuda" else 0

    def fits(micro_batch):
        model = optimizer = reserve = x = loss = None
        try:
            model = GPT(model_cfg).to(device)
            optimizer = build_optimizer(model, cfg, device_type)
            buckets = 4 * model.num_params(non_embedding=False) if world_size > 1 else 0
            reserve = torch.empty(buckets + headroom, dtype=torch.uint8, device=device)
            x = torch.randint(0, model_cfg.vocab_size, (micro_batch, cfg.seq_len), device=device)
            for _ in range(2):  # the second step has the optimizer's state
                with autocast:
                    _, loss = model(x, x)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del model, optimizer, reserve, x, loss  # and the autograd graph an error left behind
            gc.collect()
            if device_type == "cuda":
                torch.cuda.empty_cache()

    best = largest_fitting(candidates, fits) or 0
    if world_size > 1:
        t = torch.tensor(best, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        best = int(t)
    if not best:
        fail(f"not even micro batch 1 of {cfg.seq_len} tokens fits on {device}; use a smaller model or --seq_len")
    return best


def get_lr(step, cfg):
    """Linear warmup to max_lr, then cosine decay to min_lr_frac·max_lr at max_steps (GPT-3 paper), or
    EDM2's inverse square root, which needs no end point: a run can be extended without a new schedule."""
    min_lr = cfg.max_lr * cfg.min_lr_frac
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "inv_sqrt":
        return cfg.max_lr / math.sqrt(max(step / (cfg.lr_ref_steps or cfg.warmup_steps or 1), 1))
    if step >= cfg.max_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - min_lr)


# ---------------------------------------------------------------------------
# devices and processes

def setup_distributed(cfg):
    """(rank, local_rank, world_size, device). torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; plain python doesn't."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = cfg.device
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per process on each node (local_rank 0 without torchrun)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if world_size > 1:
        dist.init_process_group(backend=backend)
    elif cfg.parallelism == "fsdp":  # FSDP shards over a process group, even a group of one
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, local_rank, world_size, device


def resolve_dtype(cfg, device_type):
    if cfg.dtype != "auto":
        if cfg.dtype not in ("float32", "bfloat16", "float16"):
            fail(f"--dtype {cfg.dtype}: choose auto, float32, bfloat16 or float16")
        return getattr(torch, cfg.dtype)
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    return torch.float32  # CPU and MPS autocast are slower or less complete than plain fp32


def peak_flops_per_device(cfg, device_type):
    if cfg.peak_flops:
        return cfg.peak_flops
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, flops in PEAK_FLOPS.items():
            if re.search(rf"\b{key}\b", name):
                return flops
    return None  # unknown: MFU is not reported


def all_reduce_sum(t, world_size):
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG: sum, then divide where needed
    return t


class GpuStats:
    """GPU memory from torch; utilisation from NVML when nvidia-ml-py is installed (uv sync --extra gpu)."""

    def __init__(self, device):
        self.cuda = device.startswith("cuda")
        self.nvml = None
        if self.cuda:
            try:
                import pynvml

                pynvml.nvmlInit()
                # by UUID: NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES, torch does not
                uuid = torch.cuda.get_device_properties(torch.cuda.current_device()).uuid
                self.nvml = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
                self.pynvml = pynvml
            except Exception:  # not installed, or no NVML driver: skip utilisation
                self.nvml = None

    def read(self):
        if not self.cuda:
            return {}
        stats = {"mem_gb": torch.cuda.max_memory_allocated() / 2**30}
        if self.nvml is not None:
            try:
                stats["gpu_util"] = self.pynvml.nvmlDeviceGetUtilizationRates(self.nvml).gpu
            except Exception:  # not supported on some vGPU / MIG set-ups: stop asking
                self.nvml = None
        return stats


# ---------------------------------------------------------------------------
# logs: log.txt in build-nanogpt's format, metrics.jsonl with everything, both appended line by line;
# the same events to TensorBoard event files (logs/<run>/) and W&B when those are on

# metrics.jsonl field -> TensorBoard / W&B series, per event
SERIES = {
    "train": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "moe_max_load": "train/moe_max_load",
              "tokens_per_sec": "perf/tokens_per_sec", "mfu": "perf/mfu", "dt_ms": "perf/step_ms",
              "mem_gb": "gpu/mem_gb", "gpu_util": "gpu/util"},
    "val": {"val_loss": "val/loss"},
    "hella": {"acc_norm": "hellaswag/acc_norm"},
}


class RunLog:
    CLASSIC = {"train": "loss", "val": "val_loss", "hella": "acc_norm"}

    def __init__(self, run_dir, enabled):
        self.run_dir, self.enabled = run_dir, enabled
        self.tb = self.wandb = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)

    def open_monitors(self, cfg, config, start_step, wandb_id):
        """Start TensorBoard's writer and the W&B run (rank 0). A resumed run repeats the steps after its
        checkpoint: TensorBoard hides the old ones (purge_step), W&B plots against our own step."""
        if not self.enabled:
            return
        if cfg.tensorboard is not False and import_monitor("tensorboard", required=cfg.tensorboard):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(self.run_dir, purge_step=start_step, flush_secs=30)
        if cfg.wandb_project:
            wandb = import_monitor("wandb", required=True)
            self.wandb = wandb.init(project=cfg.wandb_project, name=config["run"]["run_name"], id=wandb_id,
                                    resume="allow", config=config, dir=self.run_dir)
            self.wandb.define_metric("step")
            self.wandb.define_metric("*", step_metric="step")

    def event(self, event, **fields):
        """Record one event. Each line goes out in a single write, flushed, so a reader (or rsync)
        sees whole lines; plot.py skips a half line left by a hard kill."""
        if not self.enabled:
            return
        rec = {"event": event, "time": time.time(), **fields}
        self._append("metrics.jsonl", json.dumps(rec) + "\n")
        if event in self.CLASSIC:
            value = fields[self.CLASSIC[event]]
            self._append("log.txt", f"{fields['step']} {event} {value:.6f}\n" if event == "train"
                         else f"{fields['step']} {event} {value:.4f}\n")
        series = {tag: fields[k] for k, tag in SERIES.get(event, {}).items() if k in fields}
        if self.tb:
            for tag, value in series.items():
                self.tb.add_scalar(tag, value, fields["step"])
            if event == "sample":
                self.tb.add_text("samples", "\n\n".join(f"    {s}" for s in fields["samples"]), fields["step"])
            if event != "train":  # evaluations are rare: show them at once
                self.tb.flush()
        if self.wandb and (series or event == "sample"):
            if event == "sample":
                import wandb

                series["samples"] = wandb.Table(columns=["sample"], data=[[s] for s in fields["samples"]])
            self.wandb.log({"step": fields["step"], **series})

    def close(self, failed=False):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish(exit_code=1 if failed else 0)
        self.tb = self.wandb = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(failed=exc_type is not None)

    def _append(self, name, text):
        with open(os.path.join(self.run_dir, name), "a") as f:
            f.write(text)


def import_monitor(name, required):
    """The tensorboard / wandb module; None if it is not installed and not required."""
    try:
        return __import__(name)
    except ImportError:
        if required:
            fail(f"{name} is not installed: uv sync --extra monitor (or pip install {name})")
        return None


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------
# checkpoints: resumable runs that survive preemption
#
# checkpoints/<run>/step_NNNNNN.pt holds everything a resumed run needs; step_NNNNNN.json beside it
# records its size and sha256, written only after the .pt is complete; `latest` names the newest.
# All three are written atomically, so a kill at any moment leaves the previous checkpoint usable.

# settings that fix the data order or the model's shape: a resumed run must keep them
RESUME_FIXED = ("seq_len", "total_batch_size", "shuffle", "seed")


def rng_state():
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),  # plain lists: loadable with weights_only
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class _HashingWriter:
    """Hashes the bytes torch.save streams out, so the checksum costs no second read of the file."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, b):
        self.sha256.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def save_checkpoint(ckpt_dir, state, keep):
    """Write state as step_NNNNNN.pt + .json, point `latest` at it, then prune to the `keep` newest."""
    name = f"step_{state['step']:06d}"
    path = os.path.join(ckpt_dir, name + ".pt")
    with atomic_write(path) as f:
        writer = _HashingWriter(f)
        torch.save(state, writer)
    with atomic_write(os.path.join(ckpt_dir, name + ".json"), "w") as f:
        json.dump({"file": name + ".pt", "step": state["step"], "bytes": writer.size,
                   "sha256": writer.sha256.hexdigest()}, f)
    publish_checkpoint(ckpt_dir, name + ".pt", keep)
    return path


def publish_checkpoint(ckpt_dir, name, keep):
    """Point `latest` at a complete checkpoint, then prune to the `keep` newest (only now that the new
    one is safe; it is the first in the list, never pruned)."""
    with atomic_write(os.path.join(ckpt_dir, "latest"), "w") as f:
        f.write(name + "\n")
    if keep:
        for old in list_checkpoints(ckpt_dir)[keep:]:
            remove_checkpoint(old)


def save_sharded_checkpoint(ckpt_dir, state, model, optimizer, keep, rank, world_size):
    """FSDP: every rank writes its shards of the weights and optimizer state with torch.distributed.checkpoint
    into step_NNNNNN.dcp/ (a folder, resumable on any number of ranks); rank 0 adds the rest of `state`
    as train_state.pt and records every file's size and sha256 in step_NNNNNN.json. Written under a
    temporary name and renamed whole, so a kill leaves no half checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"step_{state['step']:06d}"
    final, tmp = os.path.join(ckpt_dir, name + ".dcp"), os.path.join(ckpt_dir, f".{name}.dcp.tmp")

    def prepare():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)

    def finish():
        with atomic_write(os.path.join(tmp, "train_state.pt")) as f:
            torch.save(state, f)
        files = {n: file_digest(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again after a rewind
        os.replace(tmp, final)
        with atomic_write(os.path.join(ckpt_dir, name + ".json"), "w") as f:
            json.dump({"file": name + ".dcp", "step": state["step"], "files": files}, f)
        publish_checkpoint(ckpt_dir, name + ".dcp", keep)
        return final

    on_rank0(prepare, rank, world_size)  # rank 0's file work, its errors told to every rank
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    return on_rank0(finish, rank, world_size)


def load_sharded_checkpoint(path, model, optimizer):
    """Load an FSDP checkpoint folder into this run's sharded model and optimizer (any number of ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_checkpoint(path, weights=True):
    """A checkpoint as one dict ("model", "step", configs, ...), from a step_NNNNNN.pt file (with "optimizer")
    or an FSDP step_NNNNNN.dcp folder (its weights gathered whole on the CPU, not its optimizer state;
    weights=False skips them)."""
    if not os.path.isdir(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    state = torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=True)
    if weights:
        import torch.distributed.checkpoint as dcp

        with torch.device("meta"):  # the names and shapes to read, nothing allocated
            names = GPT(GPTConfig(**state["model_config"])).state_dict()
        model = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in names.items()}
        dcp.load({"model": model}, checkpoint_id=path, no_dist=True)  # one process reads every shard
        state["model"] = model
    return state


def file_digest(path):
    """(size in bytes, sha256 hex) of a file."""
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha256.update(chunk)
    return os.path.getsize(path), sha256.hexdigest()


def remove_checkpoint(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.splitext(path)[0] + ".json")


def list_checkpoints(ckpt_dir):
    """step_*.pt files (and FSDP's step_*.dcp folders) in ckpt_dir, newest first: the one `latest` names,
    then by time written (not by step: a run rewound to an earlier checkpoint writes lower steps after
    higher ones)."""
    if not os.path.isdir(ckpt_dir):
        return []
    paths = [os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if re.fullmatch(r"step_\d+\.(pt|dcp)", n)]
    paths.sort(key=lambda p: (os.path.getmtime(p), p), reverse=True)
    pointer = os.path.join(ckpt_dir, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            latest = os.path.join(ckpt_dir, f.read().strip())
        if latest in paths:
            paths.remove(latest)
            paths.insert(0, latest)
    return paths


def verify_checkpoint(path):
    """None if the file (each file of a folder) matches the size and sha256 its .json recorded, else what
    is wrong."""
    meta_path = os.path.splitext(path)[0] + ".json"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        files = meta["files"] if os.path.isdir(path) else {"": (meta["bytes"], meta["sha256"])}
    except (OSError, ValueError, KeyError, TypeError):
        return "its .json (size and checksum) is missing or unreadable: the save did not finish"
    for name, (size, sha) in files.items():
        file = os.path.join(path, name) if name else path
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name or 'it'} holds {os.path.getsize(file)} bytes, {size} were written: truncated"
        if file_digest(file)[1] != sha:
            return f"the sha256 of {name or 'it'} differs from the one recorded when it was written: corrupt"
    return None


def find_resume_checkpoint(cfg, ckpt_dir):
    """The checkpoint to resume from, or None to start fresh (decided on rank 0)."""
    for tmp in glob.glob(os.path.join(ckpt_dir, ".step_*.tmp")):  # half a save, left by a hard kill
        remove_checkpoint(tmp)
    own = list_checkpoints(ckpt_dir)
    if cfg.resume == "none":
        if own:
            fail(f"{ckpt_dir} already holds checkpoints and --resume none was given; pass another --run_name "
                 f"(or --checkpoint_dir) for a new run, or delete {ckpt_dir}")
        return None
    if cfg.resume == "auto":
        candidates = own
    elif not os.path.exists(cfg.resume):
        fail(f"--resume {cfg.resume}: no such file or folder (use auto, none, a checkpoint file or folder)")
    elif own and os.path.dirname(os.path.abspath(cfg.resume)) != os.path.abspath(ckpt_dir):
        # --resume PATH seeded this run earlier; re-running the same command continues the run itself
        print(f"{ckpt_dir} already holds this run's checkpoints: continuing from those, not from {cfg.resume}")
        candidates = own
    elif os.path.isdir(cfg.resume) and not os.path.isfile(os.path.join(cfg.resume, "train_state.pt")):
        candidates = list_checkpoints(cfg.resume)
        if not candidates:
            fail(f"--resume {cfg.resume}: no step_*.pt (or .dcp) checkpoints in that folder")
    else:
        candidates = [cfg.resume]  # a checkpoint file, possibly one of this run's own: a rewind
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        print(f"warning: skipping {path}: {problem}", file=sys.stderr)
    if candidates:
        fail(f"no usable checkpoint among {len(candidates)} in {os.path.dirname(candidates[0])}; "
             f"delete them (or pass --resume none with a new --run_name) to start over")
    return None


def data_fingerprint(loader):
    """The data a run trains on, whatever folder it sits in: each shard's name, size, and a hash of its
    first MiB (full shards all have the same size)."""
    fingerprint = []
    for p in loader.paths:
        with open(p, "rb") as f:
            head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
        fingerprint.append([os.path.basename(p), os.path.getsize(p), head])
    return fingerprint


def check_resume_settings(ckpt, cfg, model_cfg, fingerprint):
    """Refuse settings that would change the data order or the model; return the other changes."""
    saved_train, saved_model = ckpt["train_config"], ckpt["model_config"]
    diff = {k: (v, getattr(model_cfg, k)) for k, v in saved_model.items()
            if getattr(model_cfg, k) != v and k != "attn_impl"}  # the attention kernel does not change the model
    if diff:
        fail(f"the checkpoint's model differs: {diff} (checkpoint, now); resume with the same model flags "
             f"or start a new --run_name")
    if saved_train.get("parallelism", "ddp") != cfg.parallelism:
        fail(f"--parallelism {cfg.parallelism}: the checkpoint was saved with {saved_train.get('parallelism', 'ddp')}, "
             f"in its format; resume with it or start a new --run_name")
    if saved_train.get("optimizer", "adamw") != cfg.optimizer:
        fail(f"--optimizer {cfg.optimizer}: the checkpoint was trained with {saved_train.get('optimizer', 'adamw')}, "
             f"whose state it holds; resume with it or start a new --run_name")
    for key in RESUME_FIXED:
        if saved_train[key] != getattr(cfg, key):
            fail(f"--{key} {getattr(cfg, key)} differs from the checkpoint's {saved_train[key]}, which would "
                 f"change the data order; resume with --{key} {saved_train[key]} or start a new --run_name")
    if ckpt["data"] != fingerprint:
        fail(f"the shards in {cfg.data_dir} differ from the ones this run trained on "
             f"({len(ckpt['data'])} shards, first {ckpt['data'][0]}); point --data_dir at those shards")
    return {k: (v, getattr(cfg, k)) for k, v in saved_train.items()
            if k not in ("resume", "run_name") and getattr(cfg, k) != v}


class StopSignal:
    """SIGTERM (spot preemption), SIGINT (Ctrl-C) or SIGHUP (the terminal went away): finish the step,
    save, exit 0. A second signal exits at once, unless it comes within a second of the first: at
    shutdown the system signals every process and torchrun forwards the same signal again."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.requested = None  # time of the first signal
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested is not None:
            if time.time() - self.requested < 1.0:
                return  # the same shutdown, delivered twice
            print(f"{signal.Signals(signum).name} again: exiting now without a checkpoint", file=sys.stderr)
            os._exit(128 + signum)
        self.requested = time.time()
        print(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and exiting "
              f"(send it again to exit at once)", file=sys.stderr)


# ---------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def val_loss(model, loader, steps, autocast, device, world_size):
    """Mean loss over `steps` micro-batches per rank, read from the start of the val shard, so
    every evaluation of a run (and of runs with other world sizes) sees the same tokens."""
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = loader.next_batch()
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        total += loss.float()
    return (all_reduce_sum(total, world_size) / (steps * world_size)).item()


@torch.no_grad()
def write_samples(raw_model, enc, cfg, step, device, autocast):
    """num_samples continuations of sample_prompt, from a generator seeded by (seed, step): the same
    text for the same weights, and the training RNG stream is never touched."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed + step)
    idx = torch.tensor([enc.encode_ordinary(cfg.sample_prompt)] * cfg.num_samples, device=device)
    was_training = raw_model.training
    raw_model.eval()
    with autocast:
        out = raw_model.generate(idx, cfg.sample_tokens, temperature=1.0, top_k=50, generator=gen)
    raw_model.train(was_training)
    return [enc.decode(row.tolist()) for row in out]


# ---------------------------------------------------------------------------
# the training run

def attempt(fn):
    """("ok", fn()) or ("error", message): an error one rank meets must reach the others too, or they
    wait forever in the next collective."""
    try:
        return "ok", fn()
    except SystemExit as e:
        return "error", str(e)
    except Exception as e:
        return "error", f"error: {e}"


def on_rank0(fn, rank, world_size):
    """Run fn on rank 0 only and hand every rank its result, or its error, so all ranks agree."""
    result = [attempt(fn) if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(result, src=0)
    kind, value = result[0]
    if kind == "error":
        raise SystemExit(value)
    return value


def shard_model(model, cfg, model_cfg, ptdtype):
    """FSDP2: every block is one unit (its weights gathered just before its forward and backward, freed
    after), the embeddings, final norm and head the root unit. With bf16, weights are gathered in bf16 for
    the matmuls and gradients reduced in fp32; the fp32 master weights and AdamW state stay sharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    unsupported = {"--optimizer " + cfg.optimizer: cfg.optimizer != "adamw", "--ema_stds": bool(cfg.ema_stds),
                   "--mp": model_cfg.mp, "--ngpt": model_cfg.ngpt, "--dtype float16": ptdtype == torch.float16,
                   "--checkpoint_per_node": cfg.checkpoint_per_node}
    if used := [flag for flag, on in unsupported.items() if on]:
        fail(f"--parallelism fsdp does not support {', '.join(used)} yet (they need whole weight matrices or "
             f"a full copy per node); use --parallelism ddp")
    policy = MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32) \
        if ptdtype != torch.float32 else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    with torch.no_grad():  # FSDP sets itself up at the first forward, which must be the whole model's (not
        model(torch.zeros(1, 1, dtype=torch.long, device=model.lm_head.weight.device))  # HellaSwag's parts)
    model.reshard()  # the root keeps its weights gathered after a forward: the optimizer must get the shards


def node_of(rank):
    """The node a rank runs on: torchrun numbers ranks node by node, LOCAL_WORLD_SIZE per node."""
    return rank // int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def on_each_node(fn, rank, local_rank, world_size):
    """Run fn on the first rank of every node; every rank gets {node: result}, or every rank stops with
    the first node's error."""
    mine = (node_of(rank), *attempt(fn)) if local_rank == 0 else None
    results = [mine]
    if world_size > 1:
        results = [None] * world_size
        dist.all_gather_object(results, mine)
    results = [r for r in results if r is not None]
    for _, kind, value in results:
        if kind == "error":
            raise SystemExit(value)
    return {node: value for node, _, value in results}


def download_hellaswag():
    try:
        return hellaswag.download()
    except RuntimeError as e:
        fail(f"{e}; in training that is --hellaswag_file FILE (or --hellaswag_every 0 to skip HellaSwag)")


def train(cfg, model_cfg):
    """Run (or resume) one training run; returns the run's folders and final evaluation figures."""
    rank, local_rank, world_size, device = setup_distributed(cfg)
    if cfg.tensorboard:  # asked for explicitly: checked on every rank, before any work
        import_monitor("tensorboard", required=True)
    if cfg.wandb_project:
        import_monitor("wandb", required=True)
    if cfg.find_micro_batch:
        if cfg.find_micro_batch not in ("print", "use") or not device.startswith("cuda"):
            fail(f"--find_micro_batch {cfg.find_micro_batch}: takes print or use, and a CUDA GPU (elsewhere "
                 f"memory is rarely the limit: set --micro_batch_size)")
        found = find_micro_batch(cfg, model_cfg, device, world_size)
        if rank == 0:
            print(f"largest micro batch that fits: {found} × {cfg.seq_len} tokens "
                  f"({cfg.total_batch_size // (found * cfg.seq_len * world_size)} accumulation steps); "
                  f"--micro_batch_size {found}")
        if cfg.find_micro_batch == "print":
            if dist.is_initialized():
                dist.destroy_process_group()
            return {"micro_batch_size": found}
        cfg = replace(cfg, micro_batch_size=found)
        torch.cuda.reset_peak_memory_stats()  # the log's memory figures are the run's, not the search's
    stop = StopSignal()
    try:
        with contextlib.ExitStack() as closing:  # the run's log writers, closed however _train ends
            return _train(cfg, model_cfg, rank, local_rank, world_size, device, stop, closing)
    finally:
        stop.restore()
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, model_cfg, rank, local_rank, world_size, device, stop, closing):
    device_type = device.split(":")[0]
    master = rank == 0  # writes the logs
    writer = local_rank == 0 if cfg.checkpoint_per_node else master  # writes checkpoints
    log = print if master else (lambda *a, **k: None)

    accum = grad_accum_steps(cfg, world_size)
    if cfg.seq_len > model_cfg.block_size:
        fail(f"seq_len {cfg.seq_len} is longer than the model's block_size {model_cfg.block_size}")
    if model_cfg.rope_scaling != 1.0:
        fail("--rope_scaling (YaRN) stretches a trained model's context at evaluation; train with 1")
    if cfg.lr_schedule not in ("cosine", "inv_sqrt"):
        fail(f"--lr_schedule {cfg.lr_schedule}: choose cosine or inv_sqrt")
    if cfg.parallelism not in ("ddp", "fsdp"):
        fail(f"--parallelism {cfg.parallelism}: choose ddp or fsdp")
    ptdtype = resolve_dtype(cfg, device_type)
    autocast = torch.autocast(device_type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
    use_compile = cfg.compile if cfg.compile is not None else device_type == "cuda"
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+ (no effect on CPU)

    # rank 0's clock names the run, so every rank writes to the same place
    run_name = cfg.run_name or on_rank0(lambda: time.strftime("%Y%m%d-%H%M%S"), rank, world_size)
    run_dir = os.path.join(cfg.log_dir, run_name)
    ckpt_dir = cfg.checkpoint_dir or os.path.join("checkpoints", run_name)
    runlog = closing.enter_context(RunLog(run_dir, enabled=master))

    # the same seed on every rank: identical initial weights (DDP also broadcasts them)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    raw_model = GPT(model_cfg).to(device)
    fsdp = cfg.parallelism == "fsdp"
    if fsdp:
        shard_model(raw_model, cfg, model_cfg, ptdtype)
    if cfg.optimizer not in ("adamw", *MATRIX_KINDS) or cfg.muon_scale not in ("keller", "moonlight"):
        fail(f"--optimizer {cfg.optimizer} --muon_scale {cfg.muon_scale}: choose one of adamw, "
             f"{', '.join(MATRIX_KINDS)}, and keller or moonlight")
    try:
        optimizer = build_optimizer(raw_model, cfg, device_type)
    except ValueError as e:
        fail(str(e))
    # fp16 needs loss scaling against underflow; for bf16/fp32 the scaler is a no-op
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
    try:
        ema_stds = [float(s) for s in cfg.ema_stds.split(",")] if cfg.ema_stds else []
        for s in ema_stds:
            sigma_rel_to_gamma(s)  # checks the range
    except ValueError as e:
        fail(f"--ema_stds {cfg.ema_stds}: {e}")
    if bool(ema_stds) != bool(cfg.ema_snapshot_every):
        fail("post-hoc EMA needs both --ema_stds (what to track) and --ema_snapshot_every (how often to save it)")
    # every rank has the same weights: the checkpoint writers alone average and save them
    ema = PowerEMA(raw_model, ema_stds) if ema_stds and writer else None
    ema_dir = os.path.join(ckpt_dir, "ema")

    try:
        train_loader = DataLoader(cfg.data_dir, "train", cfg.micro_batch_size, cfg.seq_len, rank, world_size,
                                  accum=accum, shuffle=cfg.shuffle, seed=cfg.seed)
        val_loader = DataLoader(cfg.data_dir, "val", cfg.micro_batch_size, cfg.seq_len, rank, world_size) \
            if cfg.val_every else None
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    fingerprint = data_fingerprint(train_loader)

    start_step, evals, wandb_id = 0, {}, None
    if cfg.checkpoint_per_node:  # every node looks on its own disk, and all must find the same checkpoint
        found = on_each_node(lambda: find_resume_checkpoint(cfg, ckpt_dir), rank, local_rank, world_size)
        names = {node: os.path.basename(path) if path else "none" for node, path in found.items()}
        if len(set(names.values())) > 1:
            fail(f"--checkpoint_per_node: the nodes would resume from different checkpoints ("
                 + ", ".join(f"node {node}: {name}" for node, name in sorted(names.items()))
                 + f"); copy the newest checkpoint folder to every node's {ckpt_dir}, or start a new --run_name")
        ckpt_path = found[node_of(rank)]
    else:
        ckpt_path = on_rank0(lambda: find_resume_checkpoint(cfg, ckpt_dir), rank, world_size)
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path, weights=not fsdp)
        changes = check_resume_settings(ckpt, cfg, model_cfg, fingerprint)
        if ckpt.get("finished") and ckpt["step"] >= cfg.max_steps:
            log(f"run {run_name} already finished at step {ckpt['step']} ({ckpt_path}); "
                f"raise --max_steps to train longer, or pass a new --run_name")
            return {"run_dir": run_dir, "checkpoint_dir": ckpt_dir, **ckpt["evals"]}
        if ckpt["step"] > cfg.max_steps:
            fail(f"{ckpt_path} is at step {ckpt['step']}, beyond --max_steps {cfg.max_steps}; raise --max_steps, "
                 f"or resume from an earlier checkpoint with --resume PATH")
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        if fsdp:  # each rank reads its own shards (resharded if the number of ranks changed)
            load_sharded_checkpoint(ckpt_path, raw_model, optimizer)
        else:
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        for group, now in zip(optimizer.param_groups, settings):  # the state is restored, the settings
            group.update(now)  # (lr, betas, weight decay...) are this command's: a changed flag takes effect
        if ckpt["scaler"]:  # empty when saved without fp16 loss scaling
            scaler.load_state_dict(ckpt["scaler"])
        train_loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"][rank % len(ckpt["rng"])])
        # checked on every rank (each read the checkpoint), so no rank is left waiting for another
        saved_stds = ckpt["ema"]["sigma_rels"] if ckpt.get("ema") else []
        if saved_stds != ema_stds:
            fail(f"the checkpoint's post-hoc EMAs are for --ema_stds {','.join(map(str, saved_stds)) or '(none)'}; "
                 f"resume with the same, or start a new --run_name")
        if ema:
            ema.load_state_dict(ckpt["ema"])
        start_step, evals = ckpt["step"], ckpt["evals"]
        if os.path.dirname(os.path.abspath(ckpt_path)) == os.path.abspath(ckpt_dir):  # this run's own: the same
            wandb_id = ckpt.get("wandb_id")  # W&B run goes on (another run's checkpoint only seeds this one)
        del ckpt
        log(f"resumed from {ckpt_path} at step {start_step}"
            + "".join(f"\n  {k} changed: {old!r} -> {new!r}" for k, (old, new) in changes.items()))
        runlog.event("resume", step=start_step, checkpoint=ckpt_path, world_size=world_size,
                     changed={k: list(v) for k, v in changes.items()})

    if cfg.wandb_project and not wandb_id:  # one W&B run id, kept in every checkpoint copy
        wandb_id = on_rank0(lambda: os.urandom(4).hex(), rank, world_size)
    if writer:  # snapshots past the start belong to a discarded future (a rewind, or a start over)
        for step, path in list_snapshots(ema_dir):
            if step > start_step:
                os.remove(path)

    model = torch.compile(raw_model) if use_compile else raw_model
    if world_size > 1 and not fsdp:
        # no buffer broadcasts before each forward: the model's buffers are caches every rank computes itself
        # (and MoE's per-rank load figures). torch >= 2.13 calls it forward_sync_buffers, which still copies
        # rank 0's buffers once at start-up: harmless, they are equal then
        buffers = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else {"broadcast_buffers": False}
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, **buffers)

    hella_examples = None
    if cfg.hellaswag_every:
        # each node's first rank downloads it once (nodes need not share a disk)
        path = cfg.hellaswag_file or on_each_node(download_hellaswag, rank, local_rank, world_size)[node_of(rank)]
        hella_examples = hellaswag.load_examples(path, limit=cfg.hellaswag_limit or None)
    enc = gpt2_tokenizer() if cfg.sample_every else None
    flops_per_token = raw_model.flops_per_token(cfg.seq_len)
    peak = peak_flops_per_device(cfg, device_type)
    gpu = GpuStats(device)

    if master:
        resolved = {"train": asdict(cfg), "model": asdict(model_cfg),
                    "run": {"run_name": run_name, "git_commit": git_commit(), "torch": torch.__version__,
                            "host": socket.gethostname(),
                            "device": torch.cuda.get_device_name() if device_type == "cuda" else device,
                            "world_size": world_size, "dtype": str(ptdtype).removeprefix("torch."),
                            "compile": use_compile, "grad_accum_steps": accum, "argv": sys.argv,
                            "num_params": raw_model.num_params(non_embedding=False),
                            "active_params": raw_model.num_params(non_embedding=False, active=True),
                            "resumed_from": ckpt_path}}
        with atomic_write(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(resolved, f, indent=2)
        runlog.open_monitors(cfg, resolved, start_step, wandb_id)
    active = raw_model.num_params(non_embedding=False, active=True)
    log(f"run {run_name}: {raw_model.num_params(non_embedding=False) / 1e6:.2f}M parameters"
        + (f" ({active / 1e6:.2f}M active per token)" if model_cfg.moe_experts else "") + f", device {device}"
        f" × {world_size}, dtype {str(ptdtype).removeprefix('torch.')}, compile {use_compile}")
    log(f"batch {cfg.total_batch_size} tokens = {cfg.micro_batch_size} × {cfg.seq_len} × {world_size} ranks"
        f" × {accum} accumulation steps; logs in {run_dir}, checkpoints in {ckpt_dir}")
    for line in describe(raw_model, optimizer):
        log(f"  {line}")
    if not ckpt_path:
        runlog.event("start", step=0, world_size=world_size)

    last_save = time.time()

    def checkpoint(step, finished=False):
        nonlocal last_save
        rngs = [None] * world_size  # every rank's generators, though one rank (per node) writes
        if world_size > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        state = {"step": step,  # optimizer steps done: training continues at this step
                 "model_config": asdict(model_cfg), "train_config": asdict(cfg), "scaler": scaler.state_dict(),
                 "loader": train_loader.state_dict(), "rng": rngs,
                 "data": fingerprint, "evals": evals, "finished": finished, "world_size": world_size,
                 "ema": ema.state_dict() if ema else None, "wandb_id": wandb_id}
        if fsdp:  # every rank writes its shards
            path = save_sharded_checkpoint(ckpt_dir, state, raw_model, optimizer, cfg.keep_checkpoints, rank, world_size)
        elif writer:
            path = save_checkpoint(ckpt_dir, {**state, "model": raw_model.state_dict(),  # unwrapped: plain names
                                              "optimizer": optimizer.state_dict()}, cfg.keep_checkpoints)
        if master:
            log(f"saved {path}")
            runlog.event("checkpoint", step=step, path=path)
        last_save = time.time()

    t_start = time.time()
    for step in range(start_step, cfg.max_steps + 1):
        last_step = step == cfg.max_steps
        evaluated = False

        if cfg.val_every and (step % cfg.val_every == 0 or last_step):
            loss = val_loss(model_for_eval(model), val_loader, cfg.val_steps * accum, autocast, device, world_size)
            evals["val_loss"] = loss
            evals["best_val_loss"] = min(loss, evals.get("best_val_loss", loss))
            log(f"step {step:5d} | val loss {loss:.4f}")
            runlog.event("val", step=step, val_loss=loss)
            evaluated = True

        if cfg.hellaswag_every and (step % cfg.hellaswag_every == 0 or last_step):
            if fsdp:  # evaluate calls model.features / model.head, not forward: gather the root's weights
                raw_model.unshard()
            res = hellaswag.evaluate(raw_model, hella_examples, device=device, rank=rank, world_size=world_size,
                                     autocast_dtype=None if ptdtype == torch.float32 else ptdtype, lockstep=fsdp)
            if fsdp:
                raw_model.reshard()
            evals["hellaswag"] = res["acc_norm"]
            log(f"step {step:5d} | hellaswag acc_norm {res['acc_norm']:.4f} ({res['correct_norm']}/{res['n']})")
            runlog.event("hella", step=step, **res)
            evaluated = True

        if cfg.sample_every and (step % cfg.sample_every == 0 or last_step) and (master or fsdp):
            samples = write_samples(raw_model, enc, cfg, step, device, autocast)  # FSDP: every rank, in step
        if cfg.sample_every and (step % cfg.sample_every == 0 or last_step) and master:
            with open(os.path.join(run_dir, "samples.txt"), "a") as f:
                f.write("".join(f"step {step} sample {i}: {s!r}\n" for i, s in enumerate(samples)))
            for i, s in enumerate(samples):
                log(f"sample {i}: {s}")
            runlog.event("sample", step=step, samples=samples)

        if evaluated and master:
            plot_runs([run_dir], os.path.join(run_dir, "plot.png"))

        if last_step:
            break

        # ---- one optimizer step ----
        t0 = time.time()
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=device)
        for micro_step in range(accum):
            x, y = train_loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # (FSDP reduce-scatters every micro-step: skipping it would keep whole fp32 gradients on each rank)
            if world_size > 1 and not fsdp:  # all-reduce gradients only once, after the last micro-step
                model.require_backward_grad_sync = micro_step == accum - 1
            with autocast:
                _, loss = model(x, y)
            loss = loss / accum  # the mean over micro-steps, not the sum
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
        if fsdp:
            norm = norm.full_tensor()  # a DTensor: the norm over all shards
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)  # muon's matrices follow the schedule at their own lr
        scaler.step(optimizer)
        scaler.update()
        raw_model.renormalize_()  # mp: forced weight normalisation (a no-op otherwise)

        # one all-reduce carries the loss and what every rank must agree on: stop now? save now?
        save_due = master and cfg.checkpoint_every_minutes > 0 and \
            time.time() - last_save > 60 * cfg.checkpoint_every_minutes
        sync = torch.stack([loss_accum, torch.tensor(float(stop.requested is not None), device=device),
                            torch.tensor(float(save_due), device=device)])
        loss_sum, stop_now, save_now = all_reduce_sum(sync, world_size).tolist()  # waits for the GPU too
        train_loss = loss_sum / world_size
        dt = time.time() - t0

        tokens_per_sec = cfg.total_batch_size / dt
        rec = {"step": step, "loss": train_loss, "lr": lr, "grad_norm": norm.item(), "dt_ms": dt * 1000,
               "tokens_per_sec": tokens_per_sec, "tokens": (step + 1) * cfg.total_batch_size,
               "elapsed_s": time.time() - t_start, **gpu.read()}
        if peak:
            rec["mfu"] = flops_per_token * tokens_per_sec / (peak * world_size)
        if model_cfg.moe_experts:  # per layer, the share of this rank's last micro-batch each expert got
            rec["moe_load"] = [block.mlp.load.tolist() for block in raw_model.transformer.h]
            rec["moe_max_load"] = max(max(load) for load in rec["moe_load"]) * model_cfg.moe_experts
        log(f"step {step:5d} | loss {train_loss:.6f} | lr {lr:.4e} | norm {rec['grad_norm']:.4f} | "
            f"dt {dt * 1000:.1f}ms | tok/s {tokens_per_sec:,.0f}"
            + (f" | mfu {rec['mfu'] * 100:.1f}%" if peak else "")
            + (f" | mem {rec['mem_gb']:.1f}GiB" if "mem_gb" in rec else "")
            + (f" | util {rec['gpu_util']}%" if "gpu_util" in rec else "")
            + (f" | moe max load {rec['moe_max_load']:.2f}" if model_cfg.moe_experts else ""))
        runlog.event("train", **rec)

        done = step + 1
        if ema:
            ema.update(raw_model, done)
            if cfg.ema_snapshot_every and (done % cfg.ema_snapshot_every == 0 or done == cfg.max_steps):
                save_snapshot(ema_dir, done, ema, asdict(model_cfg))
        periodic = save_now or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
        if stop_now or (periodic and done < cfg.max_steps):  # the last step's checkpoint follows the final evals
            checkpoint(done)
        if stop_now:
            log(f"stopped at step {done} by a signal; run the same command again to resume")
            runlog.event("stop", step=done)
            if master:
                write_report(run_dir)
            return {"run_dir": run_dir, "checkpoint_dir": ckpt_dir, "stopped": True, **evals}

    checkpoint(cfg.max_steps, finished=True)
    runlog.event("end", step=cfg.max_steps, elapsed_s=time.time() - t_start, **evals)
    if master:
        log(f"wrote {write_report(run_dir)}")
    return {"run_dir": run_dir, "checkpoint_dir": ckpt_dir, "stopped": False, **evals}


def model_for_eval(model):
    """Val batches have the training shape, so the compiled module (without the DDP wrapper) serves
    them with no recompile; DDP's forward would only add gradient-sync bookkeeping."""
    return model.module if isinstance(model, DDP) else model


def main(argv=None):
    cfg, model_cfg = parse_args(argv)
    try:
        train(cfg, model_cfg)
    except torch.OutOfMemoryError:
        fail(f"CUDA out of memory at micro_batch_size {cfg.micro_batch_size}; lower --micro_batch_size "
             f"(gradient accumulation keeps total_batch_size {cfg.total_batch_size} the same)")


if __name__ == "__main__":
    main()
    # The run is done and every file is closed: leave without Python's shutdown. When a process group was
    # used (torchrun, or --parallelism fsdp), one of torch.distributed's threads may still be releasing the
    # last collective's tensors, which needs the interpreter, and torch aborts if it is being torn down then
    # ("terminate called without an active exception": rare, gloo on busy CPUs; a finished run would exit as
    # failed). destroy_process_group() does not join those threads: torch keeps another reference to the
    # group once torch._dynamo is imported after init_process_group, as the optimizer does.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
