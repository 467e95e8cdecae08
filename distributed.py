"""
Processes and devices: the process group, which rank does what, DDP and FSDP wrapping, the device and
dtype a run uses, the GPU's peak FLOP/s (for MFU), and how much memory a micro batch needs.

torchrun starts one process per GPU and sets RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE; plain
`python train_gpt2.py` is a world of one. Rank 0 writes the logs; every rank computes; collectives are
the only talk between ranks, so anything one rank decides alone (a file it found, an error it met)
is handed to the others with on_rank0 / on_each_node.
"""

import dataclasses
import datetime
import gc
import glob
import inspect
import os
import re
import subprocess
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import fail
from model import GPT, loss_chunk_rows
from optim import build_optimizer

# Dense bf16 tensor-core peak FLOP/s per GPU, from NVIDIA's datasheets (half their "with sparsity" figures;
# fp16 for V100/T4), matched as whole words of torch.cuda.get_device_name(), most specific first: "H100 PCIe"
# before "H100", and "H20" is not "H200" ("A10" is not "A10G", which stays unknown).
PEAK_FLOPS = {
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,  # the SXM part is "NVIDIA H100 80GB HBM3"
    "H200 NVL": 835e12, "H200": 989e12, "GH200": 989e12,
    "H800 PCIe": 756e12, "H800": 989e12, "H20": 148e12,  # H800 PCIe: taken as H100 PCIe's (same die), unverified
    "B200": 2250e12, "A100": 312e12, "A800": 312e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12, "V100": 125e12, "T4": 65e12,
}

# torchrun's ranks wait in a collective while rank 0 alone writes a checkpoint to slow storage, starts W&B or
# downloads HellaSwag: NCCL's default of 10 minutes can run out; a hung rank still ends the run, later
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)
# the CUDA versions torch is built for -> the oldest Linux driver that runs them (NVIDIA's CUDA release notes)
MIN_DRIVER = {"13": 580, "12.9": 575, "12.8": 570, "12.6": 560, "12.4": 550}


# ---------------------------------------------------------------------------
# devices and processes

def nvidia_driver():
    """(driver version, [GPU names]) when this machine has an NVIDIA GPU, whether or not torch can use it;
    None without one. Read from nvidia-smi, or the kernel module's version file when nvidia-smi is missing.
    (WSL2 shows GPUs as /dev/dxg, whatever their maker: there nvidia-smi must answer.)"""
    devices = glob.glob("/dev/nvidia[0-9]*")
    if not devices and not os.path.exists("/dev/dxg"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
        rows = [line.split(", ", 1) for line in out.strip().splitlines() if ", " in line]
        if rows:
            return rows[0][0], [name for _, name in rows]
    except (OSError, subprocess.SubprocessError):
        pass
    if not devices:
        return None
    try:
        with open("/proc/driver/nvidia/version") as f:  # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15 ..."
            found = re.search(r"Kernel Module\s+([\d.]+)", f.read())
        return (found.group(1) if found else "unknown"), []
    except OSError:
        return "unknown", []


def cuda_unusable(driver, torch_cuda, visible=None):
    """Why torch (built for CUDA `torch_cuda`, e.g. "13.2"; None for a CPU-only build) cannot use this
    machine's NVIDIA GPU (`driver`: nvidia_driver()'s; `visible`: CUDA_VISIBLE_DEVICES), and what to do:
    one line."""
    version, names = driver
    gpus = f"{names[0]} × {len(names)}" if names else "an NVIDIA GPU"
    head = f"this machine has {gpus} (driver {version}) but torch {torch.__version__} cannot use it"
    cpu = "; or pass --device cpu to train on the CPU"
    if torch_cuda is None:
        return f"{head}: this torch is a CPU-only build; install the locked one again with uv sync{cpu}"
    major_minor = ".".join(torch_cuda.split(".")[:2])
    least = MIN_DRIVER.get(major_minor, MIN_DRIVER.get(torch_cuda.split(".")[0]))
    try:
        new_enough = least is not None and int(version.split(".")[0]) >= least
    except ValueError:  # "unknown"
        new_enough = False
    if new_enough:  # the driver is not it: what else hides a GPU from CUDA
        return (f"{head}, though the driver is new enough for its CUDA {torch_cuda}: check CUDA_VISIBLE_DEVICES "
                f"({visible if visible is not None else 'not set'}), that nvidia-smi lists the GPUs, and on NVSwitch "
                f"nodes (8 × H100/H200 SXM) that nvidia-fabricmanager is running{cpu}")
    need = f"its CUDA {torch_cuda} needs driver >= {least}" if least else f"it is built for CUDA {torch_cuda}"
    return (f"{head}: {need}. Update the driver, or put a torch built for your driver's CUDA into the venv, e.g. "
            f"uv pip install torch --index-url https://download.pytorch.org/whl/cu126 (README: Set up){cpu}")


def choose_device(requested, world_size, cuda_available, mps_available, driver):
    """The device a run uses: `requested` (auto, cuda, cpu, mps, cuda:N...), never a silent fallback. `auto`
    picks cuda, then mps, then cpu, but stops with the reason when an NVIDIA GPU is there and torch cannot
    use it (`driver`: nvidia_driver()'s), and under torchrun (world_size > 1) CPU processes must be asked for."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", requested):
        fail(f"--device {requested}: choose auto, cuda, cuda:N, mps or cpu")
    if requested.startswith("cuda:") and world_size > 1:
        fail(f"--device {requested} under torchrun would put every rank on one GPU: use --device cuda "
             f"(each rank takes the GPU of its LOCAL_RANK)")
    if requested.startswith("cuda") or requested == "auto":
        if cuda_available:
            return "cuda" if requested == "auto" else requested
        if driver is not None:
            fail(cuda_unusable(driver, torch.version.cuda, os.environ.get("CUDA_VISIBLE_DEVICES")))
        if requested != "auto":
            fail(f"--device {requested}: torch finds no CUDA GPU on this machine; use --device auto or cpu")
    if requested != "auto":
        return requested
    if world_size > 1:
        fail(f"torchrun started {world_size} processes, but this machine has no GPU torch can use: pass "
             f"--device cpu to train on CPU processes")
    return "mps" if mps_available else "cpu"


def default_device(requested="auto", world_size=1):
    """choose_device on this machine (the NVIDIA probe only runs when torch finds no GPU)."""
    cuda = torch.cuda.is_available()
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1", "NoDevFiles")  # on purpose (Slurm: no GPU asked)
    driver = None if cuda or hidden else nvidia_driver()
    return choose_device(requested, world_size, cuda, torch.backends.mps.is_available(), driver)


def setup_distributed(cfg):
    """(rank, local_rank, world_size, device). torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; plain python doesn't."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = default_device(cfg.device, world_size)
    if device == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per process on each node (local_rank 0 without torchrun)
    cuda = device.startswith("cuda")
    if cuda and int(device.split(":")[1]) >= torch.cuda.device_count():
        fail(f"{device}: this machine has {torch.cuda.device_count()} GPU(s) torch can see; start no more "
             f"processes per node than that (torchrun --nproc-per-node)")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    # device_id binds NCCL's communicator to this rank's GPU at once (no guessing, no extra GPU-0 context)
    options = {"timeout": PROCESS_GROUP_TIMEOUT, **({"device_id": torch.device(device)} if cuda else {})}
    if dist.is_initialized():  # a caller's group (preflight.py runs its own checks, then training in it)
        pass
    elif world_size > 1:
        dist.init_process_group(backend=backend, **options)
    elif cfg.parallelism == "fsdp":  # FSDP shards over a process group, even a group of one
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, **options)
    return rank, local_rank, world_size, device


def resolve_dtype(cfg, device_type):
    if cfg.dtype != "auto":
        if cfg.dtype not in ("float32", "bfloat16", "float16"):
            fail(f"--dtype {cfg.dtype}: choose auto, float32, bfloat16 or float16")
        return getattr(torch, cfg.dtype)
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    return torch.float32  # CPU and MPS autocast are slower or less complete than plain fp32


def use_compile(cfg, device_type):
    """Whether the training step is torch.compile'd: --compile / --no-compile, by default on CUDA only."""
    return cfg.compile if cfg.compile is not None else device_type == "cuda"


def sdpa_priority(device_type, capability, cudnn_attention):
    """The order SDPA tries its kernels in, or None for torch's own (flash, memory-efficient, math, cuDNN).
    On Hopper and newer (compute capability 9.0+) cuDNN's attention is first: it is faster there than
    SDPA's flash kernel, which is FlashAttention-2 (torch 2.5 made it the default on H100 and 2.5.1 took
    that back over bugs since fixed). --no-cudnn_attention keeps torch's order; where cuDNN cannot take a
    call (a mask, a head size) SDPA goes on down the list."""
    from torch.nn.attention import SDPBackend

    if device_type != "cuda" or not cudnn_attention or capability < (9, 0):
        return None
    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_order(cfg, device):
    """The context the run's SDPA calls go through: sdpa_priority for this device, or nothing."""
    from torch.nn.attention import sdpa_kernel

    cuda = device.startswith("cuda")
    order = sdpa_priority(device.split(":")[0], torch.cuda.get_device_capability(device) if cuda else (0, 0),
                          cfg.cudnn_attention)
    return sdpa_kernel(order, set_priority=True) if order else nullcontext()


def autocast_for(device_type, ptdtype):
    """The context the forward passes run in: autocast to bf16/fp16, or nothing for fp32."""
    return torch.autocast(device_type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()


def default_autocast_dtype(device):
    """For evaluation and sampling: bfloat16 on GPUs that have fast bf16 (Ampere, compute capability 8.0,
    and later); else None (fp32)."""
    if torch.device(device).type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return None


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


# ---------------------------------------------------------------------------
# work one rank (or one rank per node) does for all

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


# ---------------------------------------------------------------------------
# data parallelism: DDP (a whole model per rank) or FSDP2 (weights, grads and AdamW state sharded)

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


def wrap_ddp(model, local_rank, device_type):
    """DDP: every rank holds the whole model; gradients are all-reduced in buckets during backward."""
    # no buffer broadcasts before each forward: the model's buffers are caches every rank computes itself
    # (and MoE's per-rank load figures). torch >= 2.13 calls it forward_sync_buffers, which still copies
    # rank 0's buffers once at start-up: harmless, they are equal then
    buffers = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else {"broadcast_buffers": False}
    # gradient_as_bucket_view: the gradients live in the all-reduce buckets, not copied into them each step
    return DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, gradient_as_bucket_view=True,
               **buffers)


# ---------------------------------------------------------------------------
# memory: how large a micro batch fits

def estimate_memory(model_cfg, micro_batch_size, seq_len, world_size=1, device_type="cuda", compiled=True):
    """Bytes of GPU memory one rank needs to train (DDP, AdamW, bf16 autocast, no recompute), estimated:
    16 per parameter for fp32 weights, grads and AdamW's two moments, 2 for autocast's bf16 weight copies,
    4 for DDP's gradient buckets (more than one rank); per layer 42 per token per n_embd of activations
    saved for backward, and the loss's (loss_memory). Attention that keeps its
    T × T probabilities for backward (model.kernel_saves_scores: the reference, and SDPA where a masked
    layer falls back to its math kernel on device_type; flash and FlexAttention keep a logsumexp per row)
    adds per score of each such layer 4 bytes for SDPA (fp32) and 6 for the reference (fp32 and a bf16
    copy), and once 8 (SDPA) or 6 (reference) for the score gradients of the layer in backward. These were
    measured for this model.py with torch's MemTracker (tests check the whole estimate against it);
    torch.compile fuses some of it away, and the CUDA allocator's caching adds some. device_type is the
    device whose choice of attention kernel counts (by default a GPU's), compiled whether the training step
    is (uncompiled FlexAttention keeps its scores: counted as SDPA's math kernel, an assumption)."""
    with torch.device("meta"):  # the parameter count and the attention kernels without allocating anything
        model = GPT(model_cfg)
    params = model.num_params(non_embedding=False)
    tokens = micro_batch_size * seq_len
    per_param = 18 + (4 if world_size > 1 else 0)
    scores = micro_batch_size * model_cfg.n_head * seq_len * (seq_len + 1 if model_cfg.sinks else seq_len)
    # bytes a score of a layer that keeps its probabilities: saved for backward, and briefly more while
    # that layer's backward runs (its score gradients; measured at most 6.1 for SDPA, 4.1 for the reference)
    bytes_per_score = {"sdpa": (4, 8), "reference": (6, 6), "flex": (4, 8)}
    kept = [bytes_per_score[attn.kernel(device_type, seq_len)] for attn in (block.attn for block in model.transformer.h)
            if attn.saves_scores(device_type, seq_len, compiled)]
    attention = (sum(saved for saved, _ in kept) + max((brief for _, brief in kept), default=0)) * scores
    return per_param * params + 42 * tokens * model_cfg.n_embd * model_cfg.n_layer \
        + loss_memory(model_cfg, tokens) + attention


def loss_memory(model_cfg, tokens):
    """Bytes the output layer and loss hold (model.linear_cross_entropy): 6 per logit of the one chunk
    buffer (bf16 logits and fp32 log-probabilities), 8 per feature of a chunk (its bf16 copies and its
    rows of the gradient before they are stored), the fp32 gradient of the features, and 8 per weight of
    the output matrix (its fp32 gradient kept for the backward, a bf16 copy for the matmuls and a bf16
    buffer for one chunk's share of its gradient). Measured with MemTracker, like estimate_memory."""
    V, C = model_cfg.padded_vocab_size, model_cfg.n_embd
    chunk = loss_chunk_rows(tokens, V)
    return 6 * chunk * V + 8 * chunk * C + 4 * tokens * C + 8 * V * C


def device_memory(device):
    """Bytes a run may use on `device`: the GPU's memory, or for cpu / mps (which shares it) the machine's
    RAM, or a container's memory limit when that is lower."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:  # cgroup v2: "max", or the limit in bytes
            limit = f.read().strip()
        return min(ram, int(limit)) if limit.isdigit() else ram
    except OSError:
        return ram


def memory_problem(cfg, model_cfg, device_type, available, world_size, compiled=True):
    """None if estimate_memory says the configured run fits in `available` bytes per rank; else one line
    naming the need, what the device has and what to run instead (the largest micro batch that fits)."""
    need = estimate_memory(model_cfg, cfg.micro_batch_size, cfg.seq_len, world_size, device_type, compiled)
    if need <= available:
        return None
    per_rank = cfg.total_batch_size // (cfg.seq_len * world_size)  # a multiple of micro_batch_size
    fitting = [m for m in range(1, per_rank + 1)
               if per_rank % m == 0 and estimate_memory(model_cfg, m, cfg.seq_len, world_size, device_type,
                                                        compiled) <= available]
    fix = f"--micro_batch_size {fitting[-1]} fits" if fitting else "not even --micro_batch_size 1 fits"
    if device_type == "cuda":
        fix += " (--find_micro_batch use measures what really does)"
    else:
        fix += "; a laptop or CPU box is for --preset laptop (a 7M-parameter GPT-2 in minutes)"
    return (f"micro batch {cfg.micro_batch_size} × {cfg.seq_len} tokens needs about {need / 2**30:.1f} GiB "
            f"(estimate_memory), more than the {available / 2**30:.1f} GiB this {device_type} has: {fix}")


def run_memory(cfg, model_cfg, device, world_size):
    """(bytes estimate_memory says a rank of this run needs, bytes it has, memory_problem's line or None).
    The need is None for FSDP (the estimate counts the model whole) and after --find_micro_batch (which
    measured): those are not checked."""
    device_type = device.split(":")[0]
    sharing = 1 if device_type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # ranks on one RAM
    available = device_memory(device) // sharing
    if cfg.parallelism == "fsdp" or cfg.find_micro_batch:
        return None, available, None
    compiled = use_compile(cfg, device_type)
    need = estimate_memory(model_cfg, cfg.micro_batch_size, cfg.seq_len, world_size, device_type, compiled)
    return need, available, memory_problem(cfg, model_cfg, device_type, available, world_size, compiled)


def check_memory(cfg, model_cfg, device, world_size):
    """Stop before the first step when the run cannot fit (run_memory), not an hour into it."""
    if problem := run_memory(cfg, model_cfg, device, world_size)[2]:
        fail(problem)


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
    step, searched with two real training steps each of the model as the run will train it (optimizer,
    autocast, torch.compile'd where the run is: eager needs more memory, and would pick too small), with
    DDP's gradient buckets and 5% of the GPU (for NCCL and the evaluations) held back. Every rank searches
    its own GPU; they settle on the smallest answer."""
    if cfg.total_batch_size % (cfg.seq_len * world_size):
        fail(f"total_batch_size {cfg.total_batch_size} is not a multiple of seq_len·world_size = "
             f"{cfg.seq_len}·{world_size}; change --total_batch_size")
    per_rank = cfg.total_batch_size // (cfg.seq_len * world_size)
    candidates = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
    device_type = device.split(":")[0]
    autocast = autocast_for(device_type, resolve_dtype(cfg, device_type))
    compiled = use_compile(cfg, device_type)

    headroom = torch.cuda.get_device_properties(device).total_memory // 20 if device_type == "cuda" else 0

    def fits(micro_batch):
        model = step_model = optimizer = reserve = x = loss = None
        try:
            model = GPT(model_cfg).to(device)
            optimizer = build_optimizer(model, cfg, device_type)
            buckets = 4 * model.num_params(non_embedding=False) if world_size > 1 else 0
            reserve = torch.empty(buckets + headroom, dtype=torch.uint8, device=device)
            x = torch.randint(0, model_cfg.vocab_size, (micro_batch, cfg.seq_len), device=device)
            step_model = torch.compile(model) if compiled else model
            for _ in range(2):  # the second step has the optimizer's state
                with autocast:
                    _, loss = step_model(x, x)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del model, step_model, optimizer, reserve, x, loss  # and the autograd graph an error left behind
            if compiled:
                torch._dynamo.reset()  # the compiled graphs hold on to this model's tensors
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


def settle_micro_batch(cfg, model_cfg, rank, world_size, device):
    """--find_micro_batch print|use: (the largest micro batch that fits, printed; the settings to train with:
    cfg with it for "use", None for "print", which ends there)."""
    if cfg.find_micro_batch not in ("print", "use") or not device.startswith("cuda"):
        fail(f"--find_micro_batch {cfg.find_micro_batch}: takes print or use, and a CUDA GPU (elsewhere "
             f"memory is rarely the limit: set --micro_batch_size)")
    found = find_micro_batch(cfg, model_cfg, device, world_size)
    if rank == 0:
        print(f"largest micro batch that fits: {found} × {cfg.seq_len} tokens "
              f"({cfg.total_batch_size // (found * cfg.seq_len * world_size)} accumulation steps); "
              f"--micro_batch_size {found}")
    if cfg.find_micro_batch == "print":
        return found, None
    torch.cuda.reset_peak_memory_stats()  # the log's memory figures are the run's, not the search's
    return found, dataclasses.replace(cfg, micro_batch_size=found)
