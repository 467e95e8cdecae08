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

This file is the story of a run; the machinery lives a floor down: checkpoint.py (save, find, resume),
runlog.py (the log files and monitors), distributed.py (processes, devices, DDP/FSDP, memory).
"""

import argparse
import contextlib
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

import hellaswag
from checkpoint import (BackgroundSaver, StopSignal, check_resume_settings, checkpoint_volume, data_fingerprint,
                        find_checkpoint, load_checkpoint, restore_training_state)
from data import DataLoader, Prefetcher, fail, gpt2_tokenizer
from distributed import (all_reduce_sum, autocast_for, check_memory, node_of, on_each_node, on_rank0,
                         peak_flops_per_device, resolve_dtype, sdpa_order, settle_micro_batch, setup_distributed,
                         shard_model, use_compile, wrap_ddp)
from ema import PowerEMA, list_snapshots, save_snapshot, sigma_rel_to_gamma
from model import GPT, GPTConfig
from optim import MATRIX_KINDS, build_optimizer, describe
from plot import BackgroundPlot, write_report_with_plot
from runlog import GpuStats, RunLog, check_monitors, hms, step_line


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
    cudnn_attention: bool = True  # SDPA tries cuDNN's attention first on Hopper and newer (distributed.sdpa_priority)
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
    # a 7M-parameter GPT-2 (4 layers × 128, context 256) that learns in minutes on a laptop or CPU box:
    # 300 steps of 16384 tokens, evaluated every 50 (HellaSwag on 200 examples)
    "laptop": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 256, "seq_len": 256, "micro_batch_size": 16,
               "total_batch_size": 16384, "max_steps": 300, "warmup_steps": 30, "max_lr": 1e-3, "val_every": 50,
               "val_steps": 2, "hellaswag_every": 100, "hellaswag_limit": 200, "sample_every": 100,
               "checkpoint_every": 100},
    # EDM2's magnitude-preserving network with the optimizer settings that go with it (section B)
    # (unit-RMS weight rows make the lr a relative step: it needs to be ~15x GPT-2's 6e-4, as EDM2's 1e-2)
    "edm2": {"mp": True, "beta2": 0.99, "weight_decay": 0.0, "lr_schedule": "inv_sqrt", "max_lr": 1e-2},
    # nGPT as NVIDIA/ngpt trains it: rope, untied embeddings, no weight decay, no warmup, lr 15e-4 decayed to
    # 0 (its train.py; section C)
    "ngpt": {"ngpt": True, "pos": "rope", "tie_embeddings": False, "weight_decay": 0.0, "warmup_steps": 0,
             "max_lr": 15e-4, "min_lr_frac": 0.0},
    # every gpt-oss change at GPT-2 124M's size: 12 query heads share 4 key/value heads, even layers
    # attend to the last 128 tokens, 8 experts of which each token uses 2 (the active MLP is the
    # dense one's size), untied output layer (SPEC-improvements.md, section A), and a small load-balance
    # loss: without one the router collapsed within 5 steps on the CPU proxy (results/README.md, moe_balance;
    # gpt-oss's released code is inference-only and says nothing of how it was trained)
    "gpt-oss": {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "n_kv_head": 4, "window": 128, "sinks": True,
                "moe_experts": 8, "moe_topk": 2, "moe_aux_loss": 0.01, "tie_embeddings": False},
    # the larger GPT-2s with llm.c's reproduction settings (scripts/run_gpt2_{350M,774M,1558M}.sh: lr, batch,
    # steps, warmup 700, decay to min_lr_frac); micro batches sized for an 80 GB GPU by estimate_memory()
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "max_lr": 3e-4, "min_lr_frac": 0.0,
                    "total_batch_size": 524288, "max_steps": 60000, "warmup_steps": 700, "micro_batch_size": 32},
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280, "max_lr": 2.5e-4, "min_lr_frac": 0.0,
                   "total_batch_size": 524288, "max_steps": 286102, "warmup_steps": 700, "micro_batch_size": 16},
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600, "max_lr": 6e-4, "min_lr_frac": 0.1,
                "total_batch_size": 1048576, "max_steps": 32000, "warmup_steps": 700, "micro_batch_size": 8},
}

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
# the parts of a run

def check_settings(cfg, model_cfg):
    """Refuse settings that cannot train, before any work; returns the σ_rel of the EMAs to track."""
    if cfg.seq_len > model_cfg.block_size:
        fail(f"seq_len {cfg.seq_len} is longer than the model's block_size {model_cfg.block_size}")
    if model_cfg.rope_scaling != 1.0:
        fail("--rope_scaling (YaRN) stretches a trained model's context at evaluation; train with 1")
    if cfg.lr_schedule not in ("cosine", "inv_sqrt"):
        fail(f"--lr_schedule {cfg.lr_schedule}: choose cosine or inv_sqrt")
    if cfg.lr_schedule == "inv_sqrt" and not (cfg.lr_ref_steps or cfg.warmup_steps):
        fail("--lr_schedule inv_sqrt with --warmup_steps 0 would decay from step 1 (max_lr/√step); "
             "set --lr_ref_steps to the step where the decay should start")
    if cfg.parallelism not in ("ddp", "fsdp"):
        fail(f"--parallelism {cfg.parallelism}: choose ddp or fsdp")
    if cfg.optimizer not in ("adamw", *MATRIX_KINDS) or cfg.muon_scale not in ("keller", "moonlight"):
        fail(f"--optimizer {cfg.optimizer} --muon_scale {cfg.muon_scale}: choose one of adamw, "
             f"{', '.join(MATRIX_KINDS)}, and keller or moonlight")
    try:
        ema_stds = [float(s) for s in cfg.ema_stds.split(",")] if cfg.ema_stds else []
        for s in ema_stds:
            sigma_rel_to_gamma(s)  # checks the range
    except ValueError as e:
        fail(f"--ema_stds {cfg.ema_stds}: {e}")
    if bool(ema_stds) != bool(cfg.ema_snapshot_every):
        fail("post-hoc EMA needs both --ema_stds (what to track) and --ema_snapshot_every (how often to save it)")
    return ema_stds


def build_model(cfg, model_cfg, device, ptdtype):
    """The model (FSDP-sharded with --parallelism fsdp), its optimizer and fp16's loss scaler."""
    # the same seed on every rank: identical initial weights (DDP also broadcasts them)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = GPT(model_cfg).to(device)
    if cfg.parallelism == "fsdp":
        shard_model(model, cfg, model_cfg, ptdtype)
    try:
        optimizer = build_optimizer(model, cfg, device.split(":")[0])
    except ValueError as e:
        fail(str(e))
    # fp16 needs loss scaling against underflow; for bf16/fp32 the scaler is a no-op
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=ptdtype == torch.float16)
    return model, optimizer, scaler


def build_data(cfg, rank, world_size, accum):
    """The train loader (each rank its own slice of every batch) and the val loader (None without val)."""
    try:
        train_loader = DataLoader(cfg.data_dir, "train", cfg.micro_batch_size, cfg.seq_len, rank, world_size,
                                  accum=accum, shuffle=cfg.shuffle, seed=cfg.seed)
        val_loader = DataLoader(cfg.data_dir, "val", cfg.micro_batch_size, cfg.seq_len, rank, world_size) \
            if cfg.val_every else None
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    return train_loader, val_loader


def load_hellaswag(cfg, rank, local_rank, world_size):
    """HellaSwag's examples: --hellaswag_file, or downloaded once by each node's first rank (nodes need
    not share a disk)."""
    def download():
        try:
            return hellaswag.download()
        except RuntimeError as e:
            fail(f"{e}; in training that is --hellaswag_file FILE (or --hellaswag_every 0 to skip HellaSwag)")

    path = cfg.hellaswag_file or on_each_node(download, rank, local_rank, world_size)[node_of(rank)]
    return hellaswag.load_examples(path, limit=cfg.hellaswag_limit or None)


def due(every, step, last_step):
    """Whether an event with cadence `every` (0 = off) happens at this step; all do at the last."""
    return bool(every) and (step % every == 0 or last_step)


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


def hellaswag_accuracy(raw_model, examples, device, rank, world_size, ptdtype, fsdp):
    if fsdp:  # evaluate calls model.features / model.head, not forward: gather the root's weights
        raw_model.unshard()
    res = hellaswag.evaluate(raw_model, examples, device=device, rank=rank, world_size=world_size,
                             autocast_dtype=None if ptdtype == torch.float32 else ptdtype, lockstep=fsdp)
    if fsdp:
        raw_model.reshard()
    return res


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


def train_step(model, ddp, raw_model, optimizer, scaler, batches, step, cfg, accum, autocast, device):
    """One optimizer step over `accum` micro-batches (from a Prefetcher: already on the device) through
    `model` (the compiled and/or DDP-wrapped raw_model; ddp: its DDP module, or None): (this rank's mean
    loss, on the device; the gradient norm before clipping; the learning rate)."""
    fsdp = cfg.parallelism == "fsdp"
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(accum):
        x, y = batches.next_batch()
        # (FSDP reduce-scatters every micro-step: skipping it would keep whole fp32 gradients on each rank)
        if ddp:  # all-reduce gradients only once, after the last micro-step
            ddp.require_backward_grad_sync = micro_step == accum - 1
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
    return loss_accum, norm, lr


def step_record(step, loss, lr, norm, dt, cfg, elapsed, gpu, flops_per_token, peak_flops, raw_model):
    """What the log says about one optimizer step; peak_flops: all ranks' together (None: unknown, no MFU)."""
    tokens_per_sec = cfg.total_batch_size / dt
    rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm.item(), "dt_ms": dt * 1000,
           "tokens_per_sec": tokens_per_sec, "tokens": (step + 1) * cfg.total_batch_size,
           "elapsed_s": elapsed, **gpu.read()}
    if peak_flops:
        rec["mfu"] = flops_per_token * tokens_per_sec / peak_flops
    if raw_model.config.moe_experts:  # per layer, the share of this rank's last micro-batch each expert got
        rec["moe_load"] = [block.mlp.load.tolist() for block in raw_model.transformer.h]
        rec["moe_max_load"] = max(max(load) for load in rec["moe_load"]) * raw_model.config.moe_experts
    return rec


# ---------------------------------------------------------------------------
# the training run

def train(cfg, model_cfg):
    """Run (or resume) one training run; returns the run's folders and final evaluation figures."""
    own_group = not dist.is_initialized()  # (preflight.py trains inside a process group of its own)
    rank, local_rank, world_size, device = setup_distributed(cfg)
    check_monitors(cfg)
    if cfg.find_micro_batch:
        with sdpa_order(cfg, device):  # searched with the attention kernels the run will use
            found, cfg = settle_micro_batch(cfg, model_cfg, rank, world_size, device)
        if cfg is None:  # --find_micro_batch print: the search was the job
            if own_group and dist.is_initialized():
                dist.destroy_process_group()
            return {"micro_batch_size": found}
    stop = StopSignal()
    try:
        with contextlib.ExitStack() as closing:  # the run's log writers, closed however the run ends
            return run(cfg, model_cfg, rank, local_rank, world_size, device, stop, closing)
    finally:
        stop.restore()
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def run(cfg, model_cfg, rank, local_rank, world_size, device, stop, closing):
    device_type = device.split(":")[0]
    master = rank == 0  # writes the logs
    writer = local_rank == 0 if cfg.checkpoint_per_node else master  # writes checkpoints
    log = print if master else (lambda *a, **k: None)
    accum = grad_accum_steps(cfg, world_size)
    ema_stds = check_settings(cfg, model_cfg)
    ptdtype = resolve_dtype(cfg, device_type)
    autocast = autocast_for(device_type, ptdtype)
    compiled = use_compile(cfg, device_type)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+ (no effect on CPU)
    fsdp = cfg.parallelism == "fsdp"
    check_memory(cfg, model_cfg, device, world_size)

    # rank 0's clock names the run, so every rank writes to the same place
    run_name = cfg.run_name or on_rank0(lambda: time.strftime("%Y%m%d-%H%M%S"), rank, world_size)
    run_dir = os.path.join(cfg.log_dir, run_name)
    ckpt_dir = cfg.checkpoint_dir or os.path.join("checkpoints", run_name)
    ema_dir = os.path.join(ckpt_dir, "ema")
    closing.enter_context(sdpa_order(cfg, device))  # which SDPA kernel attention tries first, for the whole run
    runlog = closing.enter_context(RunLog(run_dir, enabled=master))
    plot = closing.enter_context(BackgroundPlot(run_dir))  # plot.png redrawn beside the run, not in its way

    # the model and its optimizer; the post-hoc EMAs of its weights on the checkpoint writers alone
    raw_model, optimizer, scaler = build_model(cfg, model_cfg, device, ptdtype)
    ema = PowerEMA(raw_model, ema_stds) if ema_stds and writer else None
    train_loader, val_loader = build_data(cfg, rank, world_size, accum)
    fingerprint = data_fingerprint(train_loader)

    # resume from this run's newest good checkpoint (or the one --resume names), if any
    start_step, evals, wandb_id = 0, {}, None
    ckpt_path = find_checkpoint(cfg, ckpt_dir, rank, local_rank, world_size)
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
        restore_training_state(ckpt, ckpt_path, raw_model, optimizer, scaler, train_loader, ema, ema_stds, rank)
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
    volume = checkpoint_volume(ckpt_dir) if writer else None  # the filesystem every save must still find
    if writer:  # snapshots past the start belong to a discarded future (a rewind, or a start over)
        for step, path in list_snapshots(ema_dir):
            if step > start_step:
                os.remove(path)

    # DDP inside torch.compile, not around it: the compiled backward is then split at DDP's gradient buckets
    # and each bucket's all-reduce overlaps the rest of the backward (torch._dynamo's DDPOptimizer)
    ddp = wrap_ddp(raw_model, local_rank, device_type) if world_size > 1 and not fsdp else None
    model = torch.compile(ddp or raw_model) if compiled else ddp or raw_model  # what a training step runs
    # evaluations run the bare model: DDP's forward would only add gradient-sync bookkeeping
    eval_model = model if not ddp else torch.compile(raw_model) if compiled else raw_model
    batches = Prefetcher(train_loader, device)  # the loader's batches, on the device ahead of their step
    raw_model.train()  # (evaluations put it back in training mode when they end)
    hella_examples = load_hellaswag(cfg, rank, local_rank, world_size) if cfg.hellaswag_every else None
    enc = gpt2_tokenizer() if cfg.sample_every else None
    flops_per_token = raw_model.flops_per_token(cfg.seq_len)
    peak = peak_flops_per_device(cfg, device_type)
    gpu = GpuStats(device)

    num_params, active = raw_model.num_params(non_embedding=False), raw_model.num_params(non_embedding=False, active=True)
    runlog.start(cfg, model_cfg, start_step, wandb_id, run_name=run_name,
                 device=torch.cuda.get_device_name() if device_type == "cuda" else device, world_size=world_size,
                 dtype=str(ptdtype).removeprefix("torch."), compile=compiled, grad_accum_steps=accum,
                 argv=sys.argv, num_params=num_params, active_params=active, resumed_from=ckpt_path)
    log(f"run {run_name}: {num_params / 1e6:.2f}M parameters"
        + (f" ({active / 1e6:.2f}M active per token)" if model_cfg.moe_experts else "") + f", device {device}"
        f" × {world_size}, dtype {str(ptdtype).removeprefix('torch.')}, compile {compiled}")
    log(f"batch {cfg.total_batch_size} tokens = {cfg.micro_batch_size} × {cfg.seq_len} × {world_size} ranks"
        f" × {accum} accumulation steps; logs in {run_dir}, checkpoints in {ckpt_dir}")
    log(raw_model.describe_attention(device_type, cfg.seq_len))
    for line in describe(raw_model, optimizer):
        log(f"  {line}")
    if not ckpt_path:
        runlog.event("start", step=0, world_size=world_size)

    saver = closing.enter_context(BackgroundSaver())  # checkpoints written while training goes on

    def checkpoint(step, finished=False, last_chance=False):
        """Start a save; the one before it finishes first. The last chance (the end of the run, or a stop)
        also waits for this one, so the run ends only once it is on disk."""
        state = {"step": step,  # optimizer steps done: training continues at this step
                 "model_config": asdict(model_cfg), "train_config": asdict(cfg), "scaler": scaler.state_dict(),
                 "loader": batches.state_dict(), "data": fingerprint, "evals": evals, "finished": finished,
                 "world_size": world_size, "ema": ema.state_dict() if ema else None, "wandb_id": wandb_id}
        report(saver.save(ckpt_dir, state, raw_model, optimizer, cfg.keep_checkpoints, rank, world_size, writer,
                          fsdp, volume))
        if last_chance:
            report(saver.wait(), last_chance=True)
        return time.time()

    def report(saved, last_chance=False):
        """A finished save (step, path, problem, seconds), if any; a failed one (disk full...) is retried at the
        next checkpoint, unless it was the last chance: then the run stops with the reason."""
        if saved is None:
            return
        step, path, problem, seconds = saved
        if problem:
            runlog.event("checkpoint_failed", step=step, error=problem)
            if last_chance:
                fail(problem)
            log(f"warning: {problem}; training goes on and tries again at the next checkpoint")
        else:
            log(f"saved {path}")
            runlog.event("checkpoint", step=step, path=path, **seconds)

    last_save = t_start = time.time()
    for step in range(start_step, cfg.max_steps + 1):
        last_step = step == cfg.max_steps

        # evaluate: val loss, HellaSwag, samples (each every N steps and at the end), then redraw the plot
        if due(cfg.val_every, step, last_step):
            loss = val_loss(eval_model, val_loader, cfg.val_steps * accum, autocast, device, world_size)
            evals["val_loss"] = loss
            evals["best_val_loss"] = min(loss, evals.get("best_val_loss", loss))
            log(f"step {step:5d} | val loss {loss:.4f}")
            runlog.event("val", step=step, val_loss=loss)
        if due(cfg.hellaswag_every, step, last_step):
            res = hellaswag_accuracy(raw_model, hella_examples, device, rank, world_size, ptdtype, fsdp)
            evals["hellaswag"] = res["acc_norm"]
            log(f"step {step:5d} | hellaswag acc_norm {res['acc_norm']:.4f} ({res['correct_norm']}/{res['n']})")
            runlog.event("hella", step=step, **res)
        if due(cfg.sample_every, step, last_step) and (master or fsdp):  # FSDP: every rank, in step
            samples = write_samples(raw_model, enc, cfg, step, device, autocast)
            for i, s in enumerate(samples):
                log(f"sample {i}: {s}")
            runlog.samples(step, samples)
        evaluated = due(cfg.val_every, step, last_step) or due(cfg.hellaswag_every, step, last_step)
        if master and evaluated and not last_step:  # (the end of the run draws it with the report)
            plot.request()
        if last_step:
            break

        # train one step
        t0 = time.time()
        loss, norm, lr = train_step(model, ddp, raw_model, optimizer, scaler, batches, step, cfg, accum, autocast,
                                    device)
        # one all-reduce carries the loss and what every rank must agree on: stop now? save now?
        save_due = master and cfg.checkpoint_every_minutes > 0 and \
            time.time() - last_save > 60 * cfg.checkpoint_every_minutes
        flags = torch.tensor([float(stop.requested is not None), float(save_due)]).to(device)
        sync = torch.cat([loss.view(1), flags])
        loss_sum, stop_now, save_now = all_reduce_sum(sync, world_size).tolist()  # waits for the GPU too
        dt = time.time() - t0

        # log it
        rec = step_record(step, loss_sum / world_size, lr, norm, dt, cfg, time.time() - t_start, gpu,
                          flops_per_token, peak and peak * world_size, raw_model)
        log(step_line(rec))
        runlog.event("train", **rec)
        if device_type != "cuda" and step == start_step + 1:  # the first step warms up: time the second
            log(f"one step takes {dt:.1f} s on this {device_type}: the {cfg.max_steps - step - 1} steps left "
                f"would take about {hms(dt * (cfg.max_steps - step - 1))}")

        # the EMAs, then a checkpoint when due (the last step's follows the final evaluations)
        done = step + 1
        if ema:
            ema.update(raw_model, done)
            if done % cfg.ema_snapshot_every == 0 or done == cfg.max_steps:
                save_snapshot(ema_dir, done, ema, asdict(model_cfg))
        periodic = save_now or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
        if stop_now or (periodic and done < cfg.max_steps):
            last_save = checkpoint(done, last_chance=bool(stop_now))
        if stop_now:
            log(f"stopped at step {done} by a signal; run the same command again to resume")
            runlog.event("stop", step=done)
            if master:
                plot.wait()
                write_report_with_plot(run_dir)
            return {"run_dir": run_dir, "checkpoint_dir": ckpt_dir, "stopped": True, **evals}

    checkpoint(cfg.max_steps, finished=True, last_chance=True)
    runlog.event("end", step=cfg.max_steps, elapsed_s=time.time() - t_start, **evals)
    if master:
        plot.wait()
        log(f"wrote {write_report_with_plot(run_dir)}")
    return {"run_dir": run_dir, "checkpoint_dir": ckpt_dir, "stopped": False, **evals}


def main(argv=None):
    cfg, model_cfg = parse_args(argv)
    try:
        train(cfg, model_cfg)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        # CUDA's has a class of its own; the CPU's and Apple's are RuntimeErrors naming their allocator
        if not isinstance(e, torch.OutOfMemoryError) and not re.search(r"can't allocate memory|out of memory", str(e)):
            raise
        where = "CUDA" if isinstance(e, torch.OutOfMemoryError) else "MPS" if "MPS" in str(e) else "CPU"
        fail(f"{where} out of memory at micro_batch_size {cfg.micro_batch_size}; lower --micro_batch_size "
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
