"""
Prove a rented node in a few minutes, before the real run: the machine, the chips and the interconnect,
then a few dozen real steps of the configured run (compiled, with an evaluation, a checkpoint and a resume
from it), then the forecast of the whole run's time and cost. One PASS / WARN / FAIL / SKIP line per check.

    torchrun --standalone --nproc-per-node=8 preflight.py --run_name gpt2-124m --data_dir /mnt/vol/fineweb_edu \
        --checkpoint_dir /mnt/vol/checkpoints/gpt2-124m --price_per_hour 25    # the flags of the real run
    python preflight.py --preset laptop --data_dir data/trial                   # one device; CPU skips the GPU checks

It takes train_gpt2.py's flags (the run it checks) and a few of its own. Exit 0 when nothing FAILs. It writes
nothing into the run's log or checkpoint folders: its own runs go to a scratch folder beside the checkpoint
folder (the same disk, so checkpoint timings are real), removed at the end.
"""

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.distributed as dist

import hellaswag
import train_gpt2
from data import list_shards, read_shard
from distributed import (default_device, nvidia_driver, on_rank0, peak_flops_per_device, run_memory, sdpa_priority,
                         setup_distributed, use_compile)
from model import GPT
from plot import plot_runs
from runlog import hms, read_events

STATUSES = ("PASS", "SKIP", "WARN", "FAIL")  # from best to worst
WARN_BUS_GB_S = 50  # all-reduce bus bandwidth below this on GPUs: PCIe-class, or NCCL on the wrong interface
REPEAT_FAIL = 0.9  # data for fewer steps than this share of max_steps FAILs; a little repetition only WARNs


class Checks:
    """Prints one line per check on rank 0 as it comes; a check run on every rank shows its worst rank."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size, self.lines = rank, world_size, []

    def add(self, status, name, detail, gather=False):
        if gather and self.world_size > 1:  # every rank's own (status, detail): the worst one is reported
            results = [None] * self.world_size
            dist.all_gather_object(results, (status, detail))
            worst = max(range(self.world_size), key=lambda r: (STATUSES.index(results[r][0]), -r))
            status, detail = results[worst]
            detail += f" (rank {worst})" if worst else ""
        self.lines.append((status, name, detail))
        if self.rank == 0:
            print(f"{status}  {name:<12} {detail}", flush=True)
        return status

    def count(self, status):
        return sum(s == status for s, _, _ in self.lines)


# ---------------------------------------------------------------------------
# decisions: plain functions of what was measured, so CPU tests can check them for GPU figures too

def steps_in_shards(lengths, step_tokens):
    """Optimizer steps one pass over shards of these lengths gives (a shard's tail too short for a whole
    step is skipped, as the DataLoader does)."""
    return sum(max(n - 1, 0) // step_tokens for n in lengths)


def gpu_health(sm_clock, max_clock, throttle_reasons, ecc_errors, temperature):
    """(status, detail) of a GPU from NVML's figures; throttle_reasons without the idle and
    application-clock bits (those are normal)."""
    detail = f"SM clock {sm_clock}/{max_clock} MHz, {temperature} °C, {ecc_errors} uncorrected ECC errors"
    if ecc_errors:
        return "FAIL", detail + ": this GPU's memory is failing, ask the provider for another node"
    if throttle_reasons:
        return "WARN", detail + f": throttled (NVML reasons 0x{throttle_reasons:x}: power, heat or a slowdown)"
    return "PASS", detail


def matmul_status(tflops, peak):
    """(status, detail) from every GPU's measured bf16 TFLOP/s and the datasheet's (0: unknown)."""
    low, median = min(tflops), statistics.median(tflops)
    slow = low < 0.7 * median or (peak and low < 0.5 * peak)
    return ("WARN" if slow else "PASS"), (f"bf16 8192³: {low:.0f} TFLOP/s on the slowest GPU, {median:.0f} median"
                                          + (f" (datasheet {peak:.0f})" if peak else "")
                                          + (": a GPU is throttled or slower than its peers" if slow else ""))


def bus_bandwidth(nbytes, seconds, world_size):
    """An all-reduce's bus bandwidth (nccl-tests' definition): 2·(n-1)/n of the buffer over the time."""
    return 2 * (world_size - 1) / world_size * nbytes / seconds


def event_count(every, max_steps):
    """How many times an event with this cadence happens in a run: the training loop's own rule (due)."""
    return sum(train_gpt2.due(every, step, step == max_steps) for step in range(max_steps + 1))


def forecast(cfg, step_s, val_s, hella_s, sample_s, plot_s, ckpt_s, startup_s):
    """(total seconds, {part: seconds}) for the configured run at the measured speeds."""
    train = cfg.max_steps * step_s
    saves = (cfg.max_steps - 1) // cfg.checkpoint_every + 1 if cfg.checkpoint_every else 1
    if cfg.checkpoint_every_minutes:
        saves += int(train // (60 * cfg.checkpoint_every_minutes))
    # the plot is redrawn after each val and HellaSwag by a child process, beside training: only the end's
    # (with report.md) is in the run's way
    plots = 1 if cfg.val_every or cfg.hellaswag_every else 0
    parts = {"training": train, "val": event_count(cfg.val_every, cfg.max_steps) * val_s,
             "hellaswag": event_count(cfg.hellaswag_every, cfg.max_steps) * hella_s,
             "samples": event_count(cfg.sample_every, cfg.max_steps) * sample_s, "plots": plots * plot_s,
             "checkpoints": saves * ckpt_s, "start-up": startup_s}
    return sum(parts.values()), parts


# ---------------------------------------------------------------------------
# the machine

def check_environment(checks, cfg, model_cfg, world_size):
    """torch, the device, the GPUs' health, /dev/shm, the disk, the data, HellaSwag, memory. Returns (the
    device or None, HellaSwag's number of examples, whether the run can start)."""
    checks.add("PASS", "torch", f"torch {torch.__version__}, CUDA {torch.version.cuda or '-'}, "
                                f"Python {sys.version.split()[0]}")
    try:
        device = default_device(cfg.device, world_size)
    except SystemExit as e:
        checks.add("FAIL", "device", str(e).removeprefix("error: "))
        return None, 0, False
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        count, name = torch.cuda.device_count(), torch.cuda.get_device_name()
        driver = (nvidia_driver() or ("?", []))[0]
        status = "PASS" if count >= local else "FAIL"
        checks.add(status, "device", f"cuda: {count} × {name}, driver {driver}"
                   + ("" if status == "PASS" else f"; {local} processes per node need {local} GPUs"))
        check_gpu_health(checks)
    else:
        checks.add("PASS", "device", f"{device} (no GPU: the GPU checks are skipped)")
    try:
        shm = shutil.disk_usage("/dev/shm").total
        small = shm < 2**30 and world_size > 1 and device.startswith("cuda")
        checks.add("WARN" if small else "PASS", "/dev/shm", f"{shm / 2**30:.1f} GiB" + (
            ": NCCL needs more between GPUs (docker run --ipc=host or --shm-size=16g)" if small else ""))
    except OSError:
        checks.add("SKIP", "/dev/shm", "not mounted")
    disk_ok = check_disk(checks, cfg, model_cfg) != "FAIL"
    data_ok = check_data(checks, cfg, world_size)
    examples = check_hellaswag(checks, cfg)
    need, available, problem = run_memory(cfg, model_cfg, device, world_size)  # the check train_gpt2.py makes
    if need is None:
        checks.add("SKIP", "memory", "FSDP or --find_micro_batch: the estimate counts the model whole")
    else:
        checks.add("FAIL" if problem else "PASS", "memory", problem or
                   f"micro batch {cfg.micro_batch_size} × {cfg.seq_len}: about {need / 2**30:.1f} GiB of "
                   f"{available / 2**30:.1f} (estimate_memory)")
    runnable = disk_ok and data_ok and not problem and (examples or not cfg.hellaswag_every)
    return device, examples, runnable


def check_gpu_health(checks):
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = torch.cuda.get_device_properties(torch.cuda.current_device()).uuid
        h = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        clock = pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
        max_clock = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
        normal = pynvml.nvmlClocksThrottleReasonGpuIdle | pynvml.nvmlClocksThrottleReasonApplicationsClocksSetting
        reasons = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h) & ~normal
        try:
            ecc = pynvml.nvmlDeviceGetTotalEccErrors(h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                                     pynvml.NVML_VOLATILE_ECC)
        except pynvml.NVMLError:  # ECC off or not reported (consumer GPUs)
            ecc = 0
        temperature = pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
        status, detail = gpu_health(clock, max_clock, reasons, ecc, temperature)
        checks.add(status, "gpu health", detail, gather=True)
    except ImportError:
        checks.add("SKIP", "gpu health", "clocks, throttling and ECC need nvidia-ml-py: uv sync --extra gpu",
                   gather=True)
    except Exception as e:  # an NVML that answers nothing (some vGPU / MIG set-ups)
        checks.add("WARN", "gpu health", f"NVML could not be read: {e}", gather=True)


def check_disk(checks, cfg, model_cfg):
    """Room for the checkpoints: one is fp32 weights and AdamW's two moments (12 bytes a parameter, plus 4
    per EMA), and a new one is written before the oldest is pruned."""
    folder = cfg.checkpoint_dir or os.path.join("checkpoints", cfg.run_name or "run")
    where = folder
    while not os.path.isdir(where):
        where = os.path.dirname(os.path.abspath(where))
    with torch.device("meta"):
        params = GPT(model_cfg).num_params(non_embedding=False)
    size = params * (12 + 4 * len([s for s in cfg.ema_stds.split(",") if s]))
    kept = cfg.keep_checkpoints or (cfg.max_steps // cfg.checkpoint_every + 1 if cfg.checkpoint_every else 1)
    need = size * (kept + 1)
    free = shutil.disk_usage(where).free
    try:  # free space is no use if nothing can be written there (read-only, no permission)
        os.remove(tempfile.mkstemp(prefix=".preflight-", dir=where)[1])
    except OSError as e:
        return checks.add("FAIL", "disk", f"cannot write in {where}: {e.strerror}; point --checkpoint_dir at a "
                                          f"writable volume", gather=True)
    status = "FAIL" if free < size else "WARN" if free < need else "PASS"
    return checks.add(status, "disk", f"{free / 1e9:.1f} GB free in {where}; a checkpoint is about "
                      f"{size / 1e9:.2f} GB" + {
                          "PASS": "", "WARN": f": {kept} kept + 1 being written need {need / 1e9:.1f} GB (the run "
                                             f"trains on when a save fails, but resumes from an older one)",
                          "FAIL": ": not even one fits; point --checkpoint_dir at a bigger volume"}[status],
                      gather=True)


def check_data(checks, cfg, world_size):
    """The shards are there, read back with a good header, and hold max_steps steps without repeating."""
    try:
        train = [read_shard(p) for p in list_shards(cfg.data_dir, "train")]
        val = [read_shard(p) for p in list_shards(cfg.data_dir, "val")] if cfg.val_every else []
    except (FileNotFoundError, ValueError) as e:
        checks.add("FAIL", "data", str(e))
        return False
    steps = steps_in_shards([len(t) for t in train], cfg.total_batch_size)
    tokens = sum(len(t) for t in train)
    detail = (f"{len(train)} train shards, {tokens:,} tokens: {steps:,} steps of {cfg.total_batch_size:,}"
              + (f"; val {sum(len(t) for t in val):,} tokens" if val else ""))
    if steps < REPEAT_FAIL * cfg.max_steps:
        checks.add("FAIL", "data", f"{detail}, far fewer than --max_steps {cfg.max_steps} (the run would repeat "
                   f"its data): tokenise more (python fineweb_edu.py --data_dir {cfg.data_dir}) or lower --max_steps")
        return False
    if steps < cfg.max_steps:  # sample-10BT's ~9.9B tokens: ~18,900 steps of 2**19, short of the default 19,073
        checks.add("WARN", "data", f"{detail}: the last {cfg.max_steps - steps:,} of --max_steps {cfg.max_steps:,} "
                   f"repeat the first shards (as build-nanogpt's 10B run did)")
        return True
    checks.add("PASS", "data", detail)
    return True


def check_hellaswag(checks, cfg):
    """The examples each HellaSwag evaluation of the run scores: the file is there (or downloads)."""
    if not cfg.hellaswag_every:
        checks.add("SKIP", "hellaswag", "--hellaswag_every 0")
        return 0
    try:
        path = cfg.hellaswag_file or hellaswag.download()
        examples = hellaswag.load_examples(path, limit=cfg.hellaswag_limit or None)
        checks.add("PASS", "hellaswag", f"{len(examples):,} examples in {path}")
        return len(examples)
    except (OSError, ValueError, RuntimeError) as e:
        checks.add("FAIL", "hellaswag", f"{e}; pass --hellaswag_file FILE, or --hellaswag_every 0")
        return 0


# ---------------------------------------------------------------------------
# the chips and the interconnect

def check_chips(checks, cfg, model_cfg, device, world_size):
    cuda = device.startswith("cuda")
    if world_size > 1:  # the gradient all-reduce of every step
        numel = (64 if cuda else 4) * 2**20
        buf = torch.ones(numel, dtype=torch.bfloat16 if cuda else torch.float32, device=device)
        for _ in range(3):
            dist.all_reduce(buf)
        sync(device)
        t0, reps = time.perf_counter(), 10
        for _ in range(reps):
            dist.all_reduce(buf)
        sync(device)
        seconds = (time.perf_counter() - t0) / reps
        gb_s = bus_bandwidth(buf.numel() * buf.element_size(), seconds, world_size) / 1e9
        with torch.device("meta"):
            grads = 4 * GPT(model_cfg).num_params(non_embedding=False)
        per_step = bus_bandwidth(grads, 1, world_size) / (gb_s * 1e9)
        slow = cuda and gb_s < WARN_BUS_GB_S
        checks.add("WARN" if slow else "PASS", "all-reduce",
                   f"{gb_s:.1f} GB/s bus bandwidth over {world_size} ranks ({dist.get_backend()}); this model's "
                   f"gradients: {per_step * 1000:.0f} ms a step" + (
                       f": below {WARN_BUS_GB_S} GB/s, PCIe-class or NCCL on the wrong network interface "
                       f"(NCCL_DEBUG=INFO shows which)" if slow else ""))
    else:
        checks.add("SKIP", "all-reduce", "one process")
    if cuda:  # a bf16 matmul on every GPU: a throttled or slower part shows here
        a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
        for _ in range(3):
            a @ a
        sync(device)
        t0, reps = time.perf_counter(), 20
        for _ in range(reps):
            a @ a
        sync(device)
        tflops = 2 * 8192**3 * reps / (time.perf_counter() - t0) / 1e12
        results = [tflops] * world_size
        if world_size > 1:
            dist.all_gather_object(results, tflops)
        status, detail = matmul_status(results, (peak_flops_per_device(cfg, "cuda") or 0) / 1e12)
        checks.add(status, "matmul", detail)
    else:
        checks.add("SKIP", "matmul", "no GPU")
    check_attention(checks, model_cfg, cfg.seq_len, device.split(":")[0], use_compile(cfg, device.split(":")[0]))
    check_sdpa(checks, cfg, model_cfg, device)


def check_attention(checks, model_cfg, seq_len, device_type, compiled):
    """Which attention kernel each layer gets on this device; on GPUs, one that keeps T × T scores for
    backward (a masked SDPA left its math kernel, uncompiled FlexAttention, the reference) is a WARN."""
    with torch.device("meta"):
        model = GPT(model_cfg)
    saves = device_type == "cuda" and any(b.attn.saves_scores("cuda", seq_len, compiled) for b in model.transformer.h)
    checks.add("WARN" if saves else "PASS", "attention", model.describe_attention(
        device_type, seq_len, compiled).removeprefix("attention ") + (
        "; --attn_impl auto with --compile sends those layers to FlexAttention" if saves else ""))


def time_sdpa(device, shape, dtype, order, reps=10):
    """(ms, output) of one causal SDPA forward+backward on random q, k, v of shape (B, H, T, head size), the
    kernels tried in `order` (a list of SDPBackend). q, k and v are laid out as the model's are: heads
    transposed out of one (B, T, 3·H·head size) c_attn output, not contiguous (a kernel may copy them)."""
    from torch.nn.attention import sdpa_kernel

    B, H, T, hs = shape
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, T, 3, H, hs, dtype=dtype, device=device, generator=g).requires_grad_()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    with sdpa_kernel(order, set_priority=True):
        for i in range(reps + 2):  # 2 warm-up calls
            if i == 2:
                sync(device)
                t0 = time.perf_counter()
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            y.backward(torch.ones_like(y))
        sync(device)
    return (time.perf_counter() - t0) / reps * 1000, y.detach().float()


def check_sdpa(checks, cfg, model_cfg, device):
    """On GPUs where distributed.sdpa_priority puts cuDNN's attention first: one layer's attention at the run's
    shape, cuDNN first against flash alone, timed and compared."""
    from torch.nn.attention import SDPBackend

    cuda = device.startswith("cuda")
    order = sdpa_priority("cuda", torch.cuda.get_device_capability(device), cfg.cudnn_attention) if cuda else None
    if order is None:
        checks.add("SKIP", "sdpa", "torch's own kernel order (flash first)" if cuda else "no GPU")
        return
    shape = (cfg.micro_batch_size, model_cfg.n_head, cfg.seq_len, model_cfg.n_embd // model_cfg.n_head)
    first, y_first = time_sdpa(device, shape, torch.bfloat16, order)
    flash, y_flash = time_sdpa(device, shape, torch.bfloat16, [SDPBackend.FLASH_ATTENTION])
    diff = (y_first - y_flash).abs().max().item()
    bad = diff > 2e-2 or first > 1.02 * flash
    checks.add("WARN" if bad else "PASS", "sdpa",
               f"causal attention {'×'.join(map(str, shape))}, forward+backward: cuDNN first {first:.2f} ms, flash "
               f"{flash:.2f} ms, outputs within {diff:.0e}" + ("; train with --no-cudnn_attention" if bad else ""))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------
# the run itself

def check_run(checks, cfg, model_cfg, scratch, steps, world_size, rank, device, examples):
    """`steps` real steps of the configured run with an evaluation at the end and a checkpoint halfway, then
    a resume from that checkpoint to the same end: its losses must be the first run's. Returns the timings
    (HellaSwag's for all its `examples`). The runs' own output goes to the scratch folder."""
    half = max(steps // 2, 1)
    every = lambda n: steps if n else 0  # an evaluation that is on happens at step 0 and at the end
    first = replace(cfg, run_name="preflight", log_dir=os.path.join(scratch, "logs"),
                    checkpoint_dir=os.path.join(scratch, "checkpoints", "preflight"), max_steps=steps, resume="none",
                    val_every=every(cfg.val_every), hellaswag_every=every(cfg.hellaswag_every),
                    hellaswag_limit=min(cfg.hellaswag_limit or 10042, 500), sample_every=every(cfg.sample_every),
                    checkpoint_every=half, checkpoint_every_minutes=0, keep_checkpoints=0, wandb_project="",
                    tensorboard=False, ema_snapshot_every=cfg.ema_snapshot_every and half)
    counters = compile_counters()
    t0 = time.perf_counter()
    if not train_quietly(checks, "steps", first, model_cfg, os.path.join(scratch, f"train_{rank}.out"), world_size):
        return None
    run_s = time.perf_counter() - t0
    graphs, breaks = (now - before for now, before in zip(compile_counters(), counters))

    def timings():  # rank 0's log, and how long its plot takes to draw (after every val and HellaSwag)
        run_dir = os.path.join(first.log_dir, "preflight")
        m = measure(read_events(run_dir), examples)
        t = time.perf_counter()
        plot_runs([run_dir], os.path.join(scratch, "plot.png"))
        m["plot_s"] = time.perf_counter() - t
        return m

    m = on_rank0(timings, rank, world_size)
    memory = f", {m['mem_gb']:.1f} GiB allocated, {m['mem_reserved_gb']:.1f} reserved" if "mem_gb" in m else ""
    mfu = f", MFU {m['mfu'] * 100:.1f}%" if m.get("mfu") else ""
    checks.add("PASS", "steps", f"{steps} steps in {run_s:.0f} s: {m['step_s'] * 1000:.0f} ms a step, "
                                f"{cfg.total_batch_size / m['step_s']:,.0f} tokens/s{mfu}{memory}")
    if use_compile(cfg, device.split(":")[0]):
        checks.add("WARN" if breaks else "PASS", "compile", f"{graphs} graphs, {breaks} graph breaks"
                   + (": a graph break costs speed every step (TORCH_LOGS=graph_breaks shows where)" if breaks else ""))
    else:
        checks.add("SKIP", "compile", "--compile is off (the default off CUDA)")
    parts = [f"val {m['val_s']:.1f} s" if cfg.val_every else "",
             f"HellaSwag {m['hella_s']:.1f} s ({m['hella_n']} examples; all {examples}: "
             f"{m['hella_full_s']:.1f} s)" if cfg.hellaswag_every else "",
             f"samples {m['sample_s']:.1f} s" if cfg.sample_every else ""]
    checks.add("PASS" if any(parts) else "SKIP", "evaluation", ", ".join(p for p in parts if p) or "all off")
    if m["ckpt_error"]:  # the save at half failed (the run trained on): no resume to check either
        checks.add("FAIL", "checkpoint", m["ckpt_error"])
        return None
    checks.add("PASS", "checkpoint", f"{m['ckpt_s']:.1f} s of training held up to save one, "
                                     f"{m['ckpt_write_s']:.1f} s to write it beside training")

    resumed = replace(first, run_name="preflight-resume", resume=os.path.join(first.checkpoint_dir, f"step_{half:06d}"
                                                                                + (".dcp" if cfg.parallelism == "fsdp" else ".pt")),
                      checkpoint_dir=os.path.join(scratch, "checkpoints", "preflight-resume"), val_every=0,
                      hellaswag_every=0, sample_every=0, checkpoint_every=0)
    if not train_quietly(checks, "resume", resumed, model_cfg, os.path.join(scratch, f"resume_{rank}.out"),
                         world_size):
        return m

    def largest_difference():  # between the resumed run's losses and the first run's, step by step
        again = {e["step"]: e["loss"] for e in read_events(os.path.join(first.log_dir, "preflight-resume"))
                 if e["event"] == "train"}
        return max(abs(again[s] - m["losses"][s]) / abs(m["losses"][s]) for s in again)

    diff = on_rank0(largest_difference, rank, world_size)
    close = diff <= (1e-2 if torch.cuda.is_available() else 1e-6)  # GPUs: non-deterministic kernels
    checks.add("PASS" if close else "FAIL", "resume",
               f"from step {half}: steps {half}-{steps - 1} repeat the first run's losses within {diff:.1e}"
               + ("" if close else ": a resumed run would not continue where it stopped"))
    return m


def train_quietly(checks, name, cfg, model_cfg, out_path, world_size):
    """train_gpt2.train(cfg, model_cfg) with its printed lines in out_path (warnings and errors still reach
    stderr); True if it ran to the end. A failure FAILs the check `name`; under torchrun the failing rank
    says so and ends the job at once (torchrun then stops the others, which would otherwise wait in a
    collective for the process group's 30-minute timeout). A stop signal ends preflight."""
    try:
        with open(out_path, "w") as out, contextlib.redirect_stdout(out):
            result = train_gpt2.train(cfg, model_cfg)
    except (SystemExit, Exception) as e:
        message = f"the run failed: {' '.join(str(e).split())[:300]}"
        if world_size > 1:
            print(f"FAIL  {name:<12} {message} (rank {checks.rank}); stopping every rank", file=sys.stderr,
                  flush=True)
            os._exit(1)
        checks.add("FAIL", name, message)
        return False
    if result.get("stopped"):
        raise Stopped()
    return True


class Stopped(Exception):
    """A signal (Ctrl-C, SIGTERM) stopped one of preflight's runs: preflight stops too."""


def compile_counters():
    """(graphs compiled, graph breaks) so far in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def measure(events, examples):
    """Seconds per step, evaluation (HellaSwag: scaled to all its `examples`) and checkpoint from a run's
    metrics.jsonl: each event's time minus the time of the event before it."""
    train = {e["step"]: e for e in events if e["event"] == "train"}
    later = [train[s]["dt_ms"] / 1000 for s in sorted(train)[len(train) // 2:]]  # past compile and warm-up
    m = {"step_s": statistics.median(later), "losses": {s: e["loss"] for s, e in train.items()},
         "startup_s": max(train[min(train)]["dt_ms"] / 1000 - statistics.median(later), 0.0)}
    last = train[max(train)]
    for key in ("mfu", "mem_gb", "mem_reserved_gb"):
        if key in last:
            m[key] = last[key]
    took = {}  # the last occurrence of each event: warm (the first evaluation compiles its graph)
    for before, e in zip(events, events[1:]):
        took[e["event"]] = (e["time"] - before["time"], e)
    m["val_s"] = took.get("val", (0.0,))[0]
    m["sample_s"] = took.get("sample", (0.0,))[0]
    m["hella_s"], hella = took.get("hella", (0.0, {"n": 1}))
    m["hella_n"] = hella["n"]
    m["hella_full_s"] = m["hella_s"] / hella["n"] * examples
    saves = [e for e in events if e["event"].startswith("checkpoint")]
    # what a save holds training up (the copy to CPU memory; the write goes on beside training), the write
    m["ckpt_s"] = saves[0].get("stall_s", 0.0) if saves else 0.0
    m["ckpt_write_s"] = saves[0].get("write_s", 0.0) if saves else 0.0
    m["ckpt_error"] = saves[0].get("error") if saves else "no checkpoint was saved"  # None: it was
    return m


def make_scratch(cfg):
    """A folder of preflight's own beside the run's checkpoint folder, on the disk the checkpoints go to.
    One name per run: a preflight killed hard leaves it behind, and the next one clears it first."""
    folder = os.path.abspath(cfg.checkpoint_dir or os.path.join("checkpoints", cfg.run_name or "run"))
    scratch = os.path.join(os.path.dirname(folder), f".preflight-{os.path.basename(folder)}")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    return scratch


def check_forecast(checks, cfg, m, price_per_hour):
    total, parts = forecast(cfg, m["step_s"], m["val_s"], m["hella_full_s"], m["sample_s"], m["plot_s"], m["ckpt_s"],
                            m["startup_s"])
    evals = parts["val"] + parts["hellaswag"] + parts["samples"] + parts["plots"]
    detail = (f"{cfg.max_steps:,} steps × {m['step_s'] * 1000:.0f} ms = {hms(parts['training'])} training, "
              + ", ".join(f"{name} {hms(s)}" for name, s in parts.items() if name != "training" and s)
              + f": {hms(total)} in all, evaluations {evals / total * 100:.0f}% of it")
    if price_per_hour:
        detail += f"; at {price_per_hour:.2f} an hour: {price_per_hour * total / 3600:.2f}"
    checks.add("PASS", "forecast", detail)


# ---------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False)
    parser.add_argument("--price_per_hour", type=float, default=0.0, help="the node's price, for the forecast")
    parser.add_argument("--steps", type=int, default=30, help="real training steps to run (default 30)")
    parser.add_argument("-h", "--help", action="store_true")
    own, rest = parser.parse_known_args(argv)
    if own.help:
        parser.print_help()
        print("\nand every flag of train_gpt2.py (python train_gpt2.py --help): the run to check")
        return 0
    if own.steps < 2:
        parser.error("--steps must be at least 2 (a checkpoint halfway, and a resume from it)")
    cfg, model_cfg = train_gpt2.parse_args(rest)
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    checks = Checks(rank, world_size)
    t0 = time.time()
    if rank == 0:
        print(f"preflight of {cfg.max_steps:,} steps of {cfg.total_batch_size:,} tokens on {world_size} "
              f"process{'es' * (world_size > 1)}", flush=True)
    device, examples, runnable, stopped = None, 0, False, False
    if world_size == 1:
        device, examples, runnable = check_environment(checks, cfg, model_cfg, world_size)
    else:  # the checks need a process group to agree; the training runs reuse it
        try:
            setup_distributed(cfg)
        except SystemExit as e:  # this rank's exit ends the job (torchrun stops the others)
            checks.add("FAIL", "device", str(e).removeprefix("error: "))
        else:
            device, examples, runnable = check_environment(checks, cfg, model_cfg, world_size)
            every = [None] * world_size
            dist.all_gather_object(every, (device is not None, runnable))
            device = device if all(d for d, _ in every) else None
            runnable = all(r for _, r in every)
    if device is not None:
        check_chips(checks, cfg, model_cfg, device, world_size)
    if not runnable:
        checks.add("SKIP", "run", "not started: fix the FAILs above first")
    else:
        scratch = on_rank0(lambda: make_scratch(cfg), rank, world_size)
        try:
            m = check_run(checks, cfg, model_cfg, scratch, own.steps, world_size, rank, device, examples)
            if m:
                check_forecast(checks, cfg, m, own.price_per_hour)
        except Stopped:
            stopped = True
        finally:
            if world_size > 1:
                dist.barrier()
            if rank == 0:
                shutil.rmtree(scratch, ignore_errors=True)
    failed = checks.count("FAIL")
    if rank == 0:
        print(f"preflight: {checks.count('PASS')} PASS, {checks.count('WARN')} WARN, {failed} FAIL, "
              f"{checks.count('SKIP')} SKIP in {hms(time.time() - t0)}"
              + ("; stopped by a signal before the end" if stopped else "" if failed else
                 "; the node is ready: run train_gpt2.py with the same flags"), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 130 if stopped else 1 if failed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no Python shutdown under a process group: see the end of train_gpt2.py
