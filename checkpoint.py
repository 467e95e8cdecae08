"""
Checkpoints: runs that survive preemption, and "a model from anything" for the tools that read them.

checkpoints/<run>/step_NNNNNN.pt holds everything a resumed run needs (weights, optimizer, loader position,
every rank's RNG state, the EMAs, the settings); step_NNNNNN.json beside it records its size and sha256,
written only after the .pt is complete; `latest` names the newest. All three are written atomically, so
a kill at any moment leaves the previous checkpoint usable. The training loop saves with BackgroundSaver:
the state is copied to CPU memory and written by a thread while training goes on. FSDP runs write
step_NNNNNN.dcp/ folders (torch.distributed.checkpoint: every rank its shards, synchronously) with the same
.json and `latest`.
A checkpoint holds plain tensors, dicts and lists only: torch.load(weights_only=True) reads it.
"""

import contextlib
import copy
import errno
import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from data import atomic_write, fail
from distributed import node_of, on_each_node, on_rank0
from model import GPT, HF_MODEL_NAMES, GPTConfig

# settings that fix the data order or the model's shape: a resumed run must keep them
RESUME_FIXED = ("seq_len", "total_batch_size", "shuffle", "seed")


# ---------------------------------------------------------------------------
# saving: every rank calls save_training_state (or BackgroundSaver.save); the writers write

def save_training_state(ckpt_dir, state, model, optimizer, keep, rank, world_size, writer, fsdp, volume=None):
    """Save a training run: `state` (the step, settings, loader position, ...) with every rank's RNG state,
    the weights and the optimizer state. Called on every rank: FSDP ranks each write their shards, DDP's
    `writer` (rank 0, or each node's first rank) the whole .pt; `volume` (checkpoint_volume's, on the
    writers) is the filesystem ckpt_dir must still be on.

    Returns (path, None) (the path on the writers), or (None, what went wrong in one line) on every rank
    when the save failed on any: a full disk, no permission, a vanished mount. Then no part of the new
    checkpoint is left, and the earlier ones are untouched."""
    state = {**state, "rng": rng_states(world_size)}
    path = problem = None
    errors = (OSError, SystemExit)  # a write that failed; rank 0's error, handed to every rank by on_rank0
    if fsdp:  # every rank raises it when one rank's write failed (a BaseException, imported only here: 0.4 s)
        from torch.distributed.checkpoint.api import CheckpointException

        errors += (CheckpointException,)
    try:
        if fsdp:
            path = save_sharded_checkpoint(ckpt_dir, state, model, optimizer, keep, rank, world_size, volume)
        elif writer:
            path = save_checkpoint(ckpt_dir, whole_state(state, model, optimizer), keep, volume)
    except errors as e:
        problem = save_problem(ckpt_dir, f"step_{state['step']:06d}", e, state_bytes([model, optimizer]))
    return agree(path, problem, world_size)


class BackgroundSaver:
    """save_training_state without the wait: save() copies the state to CPU memory (training changes the
    tensors in place at its next step, on the CPU too) and a thread writes, hashes, fsyncs and publishes it
    as save_checkpoint does, while training goes on. One save at a time: save() first waits for the one
    before. Its outcome, what save_training_state would have returned, comes from the next save() or
    wait(); a run's last save is waited for before the run ends.

    The thread only writes files: every collective (the RNG gather, the ranks' agreement on the outcome)
    stays on the caller's thread, so ranks cannot deadlock on it. FSDP's save stays synchronous: dcp.save
    is a collective of its own, which a thread could only run on a second process group."""

    def __init__(self):
        self.step = self.outcome = self.thread = None  # the save in flight: its step, result, writer thread
        self.world_size = 1
        self.stall_s = self.write_s = 0.0  # the save in flight: how long save() held training up, the write took

    def save(self, ckpt_dir, state, model, optimizer, keep, rank, world_size, writer, fsdp, volume=None):
        """Start saving (save_training_state's arguments; every rank calls it). Returns the previous save's
        outcome, as wait() does."""
        previous, step = self.wait(), state["step"]
        t0 = time.perf_counter()
        if fsdp:  # written now; wait() hands on its outcome
            self.outcome = save_training_state(ckpt_dir, state, model, optimizer, keep, rank, world_size, writer,
                                               fsdp, volume)
            self.stall_s = self.write_s = time.perf_counter() - t0
        else:
            state = {**state, "rng": rng_states(world_size)}
            self.outcome = (None, None)  # a rank that does not write has nothing to report
            if writer:  # the copy (and the room a failed save reports) taken now: the thread never sees the model
                state, needed = cpu_copy(whole_state(state, model, optimizer)), state_bytes([model, optimizer])
                self.stall_s, self.write_s = time.perf_counter() - t0, 0.0  # (the thread sets write_s)
                self.thread = threading.Thread(target=self._write, args=(ckpt_dir, state, keep, volume, needed),
                                               name="checkpoint")
                self.thread.start()
        self.step, self.world_size = step, world_size  # in flight (once it has started)
        return previous

    def _write(self, ckpt_dir, state, keep, volume, needed):
        t0 = time.perf_counter()
        try:
            self.outcome = save_checkpoint(ckpt_dir, state, keep, volume), None
            self.write_s = time.perf_counter() - t0
        except (OSError, SystemExit) as e:
            self.outcome = None, save_problem(ckpt_dir, f"step_{state['step']:06d}", e, needed)
        except BaseException as e:  # anything else is a bug: raised by wait(), on the caller's thread
            self.outcome = e

    def wait(self):
        """Wait for the save in flight; return (step, path, problem, seconds), path and problem as
        save_training_state returns them (every rank the same), seconds {"stall_s": how long save() held
        training up, "write_s": how long the write took (this rank's)}, or None when no save was started.
        Every rank calls it."""
        if self.step is None:
            return None
        self.close()
        step, outcome, self.step, self.outcome = self.step, self.outcome, None, None
        if isinstance(outcome, BaseException):
            raise outcome
        return (step, *agree(*outcome, self.world_size), {"stall_s": self.stall_s, "write_s": self.write_s})

    def close(self):
        """Let the write in flight finish, on this rank alone and reporting nothing: how a run that ends on
        an error leaves (the save is atomic either way)."""
        if self.thread:
            self.thread.join()
            self.thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def rng_states(world_size):
    """Every rank's generators, gathered (though one rank per node writes them)."""
    if world_size == 1:
        return [rng_state()]
    rngs = [None] * world_size
    dist.all_gather_object(rngs, rng_state())
    return rngs


def whole_state(state, model, optimizer):
    """What a .pt checkpoint holds: state, the weights and the optimizer state."""
    return {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()}  # unwrapped: plain names


def agree(path, problem, world_size):
    """The writers' outcome, to every rank: all go on, or all stop, together."""
    problems = [problem]
    if world_size > 1:
        problems = [None] * world_size
        dist.all_gather_object(problems, problem)
    problem = next((p for p in problems if p), None)
    return (None, problem) if problem else (path, None)


def cpu_copy(obj, storages=None):
    """obj with every tensor copied into new CPU memory (.cpu() of a CPU tensor is no copy). Tensors that
    share memory (tied embeddings: two names, one storage) share their copy, so torch.save writes the same
    bytes from the copy as from obj."""
    storages = {} if storages is None else storages
    if torch.is_tensor(obj):
        src = obj.untyped_storage()
        key = (src.device, src.data_ptr()) if src.nbytes() else object()  # empty storages share no memory
        if key not in storages:
            storages[key] = torch.UntypedStorage(src.nbytes()).copy_(src)
        return torch.empty(0, dtype=obj.dtype).set_(storages[key], obj.storage_offset(), obj.size(), obj.stride())
    if isinstance(obj, dict):
        out = copy.copy(obj)  # its type and attributes: a state_dict's OrderedDict keeps its _metadata
        for k, v in obj.items():
            out[k] = cpu_copy(v, storages)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(cpu_copy(v, storages) for v in obj)
    return copy.deepcopy(obj)


def state_bytes(modules):
    """About how many bytes a checkpoint of these modules' (and optimizers') state takes (a tensor shared
    by two names, as tied embeddings are, once)."""
    tensors = {id(t): t for m in modules for t in _tensors(m.state_dict())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def checkpoint_volume(ckpt_dir):
    """Create ckpt_dir (at the start of a run, on the ranks that write) and return the filesystem it is on,
    which every save then checks (check_volume)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    return os.stat(ckpt_dir).st_dev


def check_volume(ckpt_dir, volume):
    """ckpt_dir must still be there, on the filesystem it was on at the start (volume: checkpoint_volume's).
    A volume that went away (an unmounted or lost network disk) would otherwise have the save recreate the
    folder on the disk below, and the checkpoints would vanish with the instance."""
    if volume is not None and (not os.path.isdir(ckpt_dir) or os.stat(ckpt_dir).st_dev != volume):
        raise OSError(errno.ENOENT, "the folder is gone or on another filesystem now (was its volume "
                                    "unmounted?)", ckpt_dir)


def _tensors(obj):
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def save_problem(ckpt_dir, name, error, needed):
    """The one line a failed save prints: what failed, where, the room it needs and has, what is left."""
    where = ckpt_dir
    while where and not os.path.isdir(where):  # a vanished mount: the nearest folder that is there
        where = os.path.dirname(where.rstrip(os.sep))
    free = shutil.disk_usage(where or ".").free
    if hasattr(error, "failures"):  # torch.distributed.checkpoint's: {rank: (exception, traceback)}
        error = next(iter(error.failures.values()))[0]
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    elif free < needed:
        reason = "the disk is full"
    else:
        reason = " ".join(str(error).removeprefix("error: ").split())[:200]
    earlier = list_checkpoints(ckpt_dir)
    kept = (f"the newest earlier checkpoint, {os.path.basename(earlier[0])}, is intact and the same command "
            f"resumes from it" if earlier else "there is no earlier checkpoint to resume from")
    return (f"could not save checkpoint {name} in {ckpt_dir}: {reason} (it needs about {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free there); {kept}")


def rng_state():
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),  # plain lists: loadable with weights_only
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def save_checkpoint(ckpt_dir, state, keep, volume=None):
    """Write state as step_NNNNNN.pt + .json, point `latest` at it, then prune to the `keep` newest."""
    name = f"step_{state['step']:06d}"
    path = os.path.join(ckpt_dir, name + ".pt")
    check_volume(ckpt_dir, volume)
    try:
        with atomic_write(path) as f:  # a failed write leaves nothing: atomic_write removes its temporary file
            writer = _HashingWriter(f)
            try:
                torch.save(state, writer)
            except RuntimeError:  # torch.save reports a failed write as "unexpected pos": say what failed
                if writer.error:
                    raise writer.error from None
                raise
        with atomic_write(os.path.join(ckpt_dir, name + ".json"), "w") as f:
            json.dump({"file": name + ".pt", "step": state["step"], "bytes": writer.size,
                       "sha256": writer.sha256.hexdigest()}, f)
        publish_checkpoint(ckpt_dir, name + ".pt", keep)
    except BaseException:  # a .pt without its record (or never published) is no checkpoint: remove it
        if latest_checkpoint(ckpt_dir) != path:
            remove_checkpoint(path)
        raise
    return path


class _HashingWriter:
    """Hashes the bytes torch.save streams out, so the checksum costs no second read of the file."""

    def __init__(self, f):
        self.f, self.sha256, self.size, self.error = f, hashlib.sha256(), 0, None

    def write(self, b):
        self.sha256.update(b)
        self.size += len(b)
        try:
            return self.f.write(b)
        except OSError as e:  # a full disk, a vanished mount: remembered, as torch.save hides it
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def save_sharded_checkpoint(ckpt_dir, state, model, optimizer, keep, rank, world_size, volume=None):
    """FSDP: every rank writes its shards of the weights and optimizer state with torch.distributed.checkpoint
    into step_NNNNNN.dcp/ (a folder, resumable on any number of ranks); rank 0 adds the rest of `state`
    as train_state.pt and records every file's size and sha256 in step_NNNNNN.json. Written under a
    temporary name and renamed whole, so a kill leaves no half checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"step_{state['step']:06d}"
    final, tmp = os.path.join(ckpt_dir, name + ".dcp"), os.path.join(ckpt_dir, f".{name}.dcp.tmp")

    def prepare():
        check_volume(ckpt_dir, volume)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)

    def finish():
        try:
            with atomic_write(os.path.join(tmp, "train_state.pt")) as f:
                torch.save(state, f)
            files = {n: file_digest(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
            shutil.rmtree(final, ignore_errors=True)  # the same step saved again after a rewind
            os.replace(tmp, final)
            with atomic_write(os.path.join(ckpt_dir, name + ".json"), "w") as f:
                json.dump({"file": name + ".dcp", "step": state["step"], "files": files}, f)
            publish_checkpoint(ckpt_dir, name + ".dcp", keep)
        except BaseException:  # no half checkpoint: neither the temporary folder nor an unrecorded one
            shutil.rmtree(tmp, ignore_errors=True)
            if latest_checkpoint(ckpt_dir) != final:
                remove_checkpoint(final)
            raise
        return final

    on_rank0(prepare, rank, world_size)  # rank 0's file work, its errors told to every rank
    model_state, optim_state = get_state_dict(model, optimizer)
    try:  # a rank's write error reaches every rank (dcp.save raises a CheckpointException on all)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return on_rank0(finish, rank, world_size)


def publish_checkpoint(ckpt_dir, name, keep):
    """Point `latest` at a complete checkpoint, then prune to the `keep` newest (only now that the new
    one is safe; it is the first in the list, never pruned)."""
    with atomic_write(os.path.join(ckpt_dir, "latest"), "w") as f:
        f.write(name + "\n")
    if keep:
        for old in list_checkpoints(ckpt_dir)[keep:]:
            remove_checkpoint(old)


def file_digest(path):
    """(size in bytes, sha256 hex) of a file."""
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha256.update(chunk)
    return os.path.getsize(path), sha256.hexdigest()


# ---------------------------------------------------------------------------
# listing, verifying, pruning

def list_checkpoints(ckpt_dir):
    """step_*.pt files (and FSDP's step_*.dcp folders) in ckpt_dir, newest first: the one `latest` names,
    then by time written (not by step: a run rewound to an earlier checkpoint writes lower steps after
    higher ones)."""
    if not os.path.isdir(ckpt_dir):
        return []
    paths = [os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if re.fullmatch(r"step_\d+\.(pt|dcp)", n)]
    paths.sort(key=lambda p: (os.path.getmtime(p), p), reverse=True)
    latest = latest_checkpoint(ckpt_dir)
    if latest in paths:
        paths.remove(latest)
        paths.insert(0, latest)
    return paths


def latest_checkpoint(ckpt_dir):
    """The path ckpt_dir's `latest` file names, or None."""
    try:
        with open(os.path.join(ckpt_dir, "latest")) as f:
            return os.path.join(ckpt_dir, f.read().strip())
    except OSError:
        return None


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


def remove_checkpoint(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.splitext(path)[0] + ".json")


# ---------------------------------------------------------------------------
# resuming: find the checkpoint, check it fits this run, put its state back

def find_checkpoint(cfg, ckpt_dir, rank, local_rank, world_size):
    """The checkpoint this rank resumes from, or None to start fresh. Rank 0 looks in ckpt_dir and tells
    the others; with --checkpoint_per_node every node looks on its own disk, and all must agree."""
    if not cfg.checkpoint_per_node:
        return on_rank0(lambda: find_resume_checkpoint(cfg, ckpt_dir), rank, world_size)
    found = on_each_node(lambda: find_resume_checkpoint(cfg, ckpt_dir), rank, local_rank, world_size)
    names = {node: os.path.basename(path) if path else "none" for node, path in found.items()}
    if len(set(names.values())) > 1:
        fail("--checkpoint_per_node: the nodes would resume from different checkpoints ("
             + ", ".join(f"node {node}: {name}" for node, name in sorted(names.items()))
             + f"); copy the newest checkpoint folder to every node's {ckpt_dir}, or start a new --run_name")
    return found[node_of(rank)]


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


def load_sharded_checkpoint(path, model, optimizer):
    """Load an FSDP checkpoint folder into this run's sharded model and optimizer (any number of ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


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


def restore_training_state(ckpt, path, model, optimizer, scaler, loader, ema, ema_stds, rank):
    """Put a checkpoint's state (read by load_checkpoint from `path`) back into this run's objects."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if os.path.isdir(path):  # FSDP: each rank reads its own shards (resharded if the number of ranks changed)
        load_sharded_checkpoint(path, model, optimizer)
    else:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    for group, now in zip(optimizer.param_groups, settings):  # the state is restored, the settings
        group.update(now)  # (lr, betas, weight decay...) are this command's: a changed flag takes effect
    if ckpt["scaler"]:  # empty when saved without fp16 loss scaling
        scaler.load_state_dict(ckpt["scaler"])
    loader.load_state_dict(ckpt["loader"])
    set_rng_state(ckpt["rng"][rank % len(ckpt["rng"])])
    # checked on every rank (each read the checkpoint), so no rank is left waiting for another
    saved_stds = ckpt["ema"]["sigma_rels"] if ckpt.get("ema") else []
    if saved_stds != ema_stds:
        fail(f"the checkpoint's post-hoc EMAs are for --ema_stds {','.join(map(str, saved_stds)) or '(none)'}; "
             f"resume with the same, or start a new --run_name")
    if ema:
        ema.load_state_dict(ckpt["ema"])


def set_rng_state(state):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------
# stopping on a signal

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
# a model from anything: what hellaswag.py (and the tools after training) evaluate

def load_model(spec, device):
    """A GPT from `spec`: a Hugging Face hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a local
    HF folder (config.json + weights), a checkpoint file (a dict with "model", the state dict, and
    "model_config", the GPTConfig fields), an FSDP checkpoint (step_NNNNNN.dcp/) or a checkpoint folder
    whose `latest` file names one."""
    if os.path.isfile(os.path.join(spec, "latest")):
        spec = latest_checkpoint(spec)
    if spec in HF_MODEL_NAMES or os.path.isfile(os.path.join(spec, "config.json")):
        model = GPT.from_pretrained(spec)
    elif os.path.isfile(spec) or os.path.isfile(os.path.join(spec, "train_state.pt")):  # a file, or FSDP's folder
        ckpt = load_checkpoint(spec)
        if not isinstance(ckpt, dict) or not {"model", "model_config"} <= ckpt.keys():
            raise ValueError(f"{spec}: a checkpoint must be a dict with 'model' and 'model_config'")
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    else:
        raise ValueError(f"--model {spec}: expected one of {', '.join(HF_MODEL_NAMES)}, a Hugging Face folder "
                         "(with config.json), a checkpoint file, or a checkpoint folder with a 'latest' file")
    return model.to(device)
