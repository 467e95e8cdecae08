"""
What a run leaves in logs/<run>/ for people (and machines) to read, often from afar:

    log.txt        build-nanogpt's format, "{step} train {loss}", "{step} val {loss}", "{step} hella {acc}"
    metrics.jsonl  every event with every figure, one JSON object a line
    config.json    the settings and what ran them (commit, torch, host, device, ...)
    report.md      the run's summary against GPT-2/GPT-3 124M, at the end or on a graceful stop
    events.out.tfevents.*  TensorBoard (when installed), and W&B with --wandb_project

Lines are appended in single flushed writes, so a reader (or rsync) sees whole lines; readers skip a
half line left by a hard kill. plot.py draws plot.png from the same files.
"""

import json
import os
import socket
import subprocess
import time
from dataclasses import asdict

from data import atomic_write, fail

# torch is imported where it is used: plot.py reads runs through this module without it (~1.5 s)

GPT2_124M_VAL_LOSS = 3.2924  # OpenAI GPT-2 124M on the FineWeb-Edu val shard (build-nanogpt)
GPT2_124M_HELLASWAG = 0.2945  # OpenAI GPT-2 124M, acc_norm (build-nanogpt, llm.c)
GPT3_124M_HELLASWAG = 0.337  # GPT-3 paper, zero-shot, 124M

# metrics.jsonl field -> TensorBoard / W&B series, per event
SERIES = {
    "train": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "moe_max_load": "train/moe_max_load",
              "tokens_per_sec": "perf/tokens_per_sec", "mfu": "perf/mfu", "dt_ms": "perf/step_ms",
              "mem_gb": "gpu/mem_gb", "mem_reserved_gb": "gpu/mem_reserved_gb", "mem_used_gb": "gpu/mem_used_gb",
              "gpu_util": "gpu/util"},
    "val": {"val_loss": "val/loss"},
    "hella": {"acc_norm": "hellaswag/acc_norm"},
}


class RunLog:
    """The run's log files and monitors; a no-op on every rank but the one that writes (enabled)."""

    CLASSIC = {"train": "loss", "val": "val_loss", "hella": "acc_norm"}

    def __init__(self, run_dir, enabled):
        self.run_dir, self.enabled = run_dir, enabled
        self.tb = self.wandb = None
        self.files = {}  # name -> open file: kept open (on network storage an open costs a round trip a step)
        if enabled:
            os.makedirs(run_dir, exist_ok=True)

    def start(self, cfg, model_cfg, start_step, wandb_id, **run):
        """Write config.json (cfg, model_cfg and what describes this run: `run`), then start TensorBoard's
        writer and the W&B run. A resumed run repeats the steps after its checkpoint: TensorBoard hides the
        old ones (purge_step), W&B plots against our own step."""
        if not self.enabled:
            return
        import torch

        config = {"train": asdict(cfg), "model": asdict(model_cfg),
                  "run": {"run_name": run.pop("run_name"), "git_commit": git_commit(), "torch": torch.__version__,
                          "host": socket.gethostname(), **run}}
        with atomic_write(os.path.join(self.run_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
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
        """Record one event: metrics.jsonl, log.txt for train/val/hella, TensorBoard and W&B series."""
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

    def samples(self, step, samples):
        """samples.txt (one repr'd line each) and a sample event."""
        if not self.enabled:
            return
        self._append("samples.txt", "".join(f"step {step} sample {i}: {s!r}\n" for i, s in enumerate(samples)))
        self.event("sample", step=step, samples=samples)

    def close(self, failed=False):
        for f in self.files.values():
            f.close()
        self.files = {}
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
        if name not in self.files:
            self.files[name] = open(os.path.join(self.run_dir, name), "a")
        self.files[name].write(text)
        self.files[name].flush()  # each line reaches the file at once: `rsync logs/` mid-run sees it


def step_line(rec):
    """The console line of one training step (its train event's fields)."""
    return (f"step {rec['step']:5d} | loss {rec['loss']:.6f} | lr {rec['lr']:.4e} | norm {rec['grad_norm']:.4f} | "
            f"dt {rec['dt_ms']:.1f}ms | tok/s {rec['tokens_per_sec']:,.0f}"
            + (f" | mfu {rec['mfu'] * 100:.1f}%" if "mfu" in rec else "")
            + (f" | mem {rec['mem_gb']:.1f}GiB (reserved {rec['mem_reserved_gb']:.1f})" if "mem_gb" in rec else "")
            + (f" | util {rec['gpu_util']}%" if "gpu_util" in rec else "")
            + (f" | moe max load {rec['moe_max_load']:.2f}" if "moe_max_load" in rec else ""))


def import_monitor(name, required):
    """The tensorboard / wandb module; None if it is not installed and not required."""
    try:
        return __import__(name)
    except ImportError:
        if required:
            fail(f"{name} is not installed: uv sync --extra monitor (or pip install {name})")
        return None


def check_monitors(cfg):
    """Monitors asked for explicitly must be installed: checked on every rank, before any work."""
    if cfg.tensorboard:
        import_monitor("tensorboard", required=True)
    if cfg.wandb_project:
        import_monitor("wandb", required=True)


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class GpuStats:
    """GPU memory from torch: the peak allocated by tensors, and the peak the caching allocator reserved (what
    an out-of-memory error is about). With nvidia-ml-py (uv sync --extra gpu), NVML adds the GPU's utilisation
    and its memory in use by every process, CUDA context and NCCL buffers included."""

    def __init__(self, device):
        import torch

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
        import torch

        stats = {"mem_gb": torch.cuda.max_memory_allocated() / 2**30,
                 "mem_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
        if self.nvml is not None:
            try:
                stats["mem_used_gb"] = self.pynvml.nvmlDeviceGetMemoryInfo(self.nvml).used / 2**30
                stats["gpu_util"] = self.pynvml.nvmlDeviceGetUtilizationRates(self.nvml).gpu
            except Exception:  # not supported on some vGPU / MIG set-ups: stop asking
                self.nvml = None
        return stats


# ---------------------------------------------------------------------------
# reading a run back: its figures, and report.md

def read_events(run_dir):
    """metrics.jsonl's events, a half-written last line skipped."""
    events = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def run_summary(run_dir):
    """The figures of a run, from its metrics.jsonl. A resume at step s discards what the log holds from
    step s on (a repeat, or a future that a rewind abandoned), as a start from scratch discards all."""
    events = read_events(run_dir)
    train, val, hella, samples, status, failed_saves = {}, {}, {}, None, "incomplete", []
    for e in events:
        kind = e["event"]
        if kind in ("start", "resume"):
            for series in (train, val, hella):
                for step in [s for s in series if s >= e["step"]]:
                    del series[step]
            samples = samples if samples and samples[0] < e["step"] else None
            status = "incomplete"
        elif kind == "train":
            train[e["step"]] = e
        elif kind == "val":
            val[e["step"]] = e["val_loss"]
        elif kind == "hella":
            hella[e["step"]] = e["acc_norm"]
        elif kind == "sample":
            samples = (e["step"], e["samples"])
        elif kind == "checkpoint_failed":
            failed_saves.append((e["step"], e["error"]))
        elif kind in ("end", "stop"):
            status = kind
    train_time = sum(e["dt_ms"] for e in train.values()) / 1000
    last_step = max(train, default=None)
    tokens = train[last_step]["tokens"] if train else 0  # seen by the model (a checkpoint it started from too)
    trained = len(train) * tokens // (last_step + 1) if train else 0  # by this run: steps it logged × batch
    # wall time: each session (a start or a resume) from its first event to its last
    wall, session_start, last = 0.0, None, None
    for e in events:
        if e["event"] in ("start", "resume") and session_start is not None:
            wall += last - session_start
            session_start = None
        session_start = e["time"] if session_start is None else session_start
        last = e["time"]
    wall += (last - session_start) if session_start is not None else 0.0
    mfu = [(e["mfu"], e["dt_ms"]) for e in train.values() if "mfu" in e]
    best_step = min(val, key=val.get) if val else None
    return {
        "status": status, "last_step": last_step + 1 if train else 0, "tokens": tokens,
        "wall_s": wall, "train_s": train_time, "tokens_per_sec": trained / train_time if train_time else 0.0,
        # the time-weighted mean of per-step MFU: the MFU of the mean throughput
        "mfu": sum(m * dt for m, dt in mfu) / sum(dt for _, dt in mfu) if mfu else None,
        "final_val": (max(val), val[max(val)]) if val else None, "best_val": (best_step, val[best_step]) if val else None,
        "final_hella": (max(hella), hella[max(hella)]) if hella else None,
        "samples": samples, "failed_saves": failed_saves,
    }


def hms(seconds):
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m {seconds % 60:04.1f}s"


def write_report(run_dir):
    """logs/<run>/report.md: what ran, where, how fast, and how good against GPT-2/GPT-3 124M, with the
    plot (plot.png beside it: draw it first) and the last samples. Written at the end of a run (and on a
    graceful stop); returns its path."""
    if not os.path.exists(os.path.join(run_dir, "config.json")):
        raise FileNotFoundError(f"{run_dir} has no config.json; is it a run folder under logs/?")
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    t, m, run = config["train"], config["model"], config["run"]
    s = run_summary(run_dir)
    status = {"end": f"finished: {s['last_step']} of {t['max_steps']} steps",
              "stop": f"stopped by a signal at step {s['last_step']} of {t['max_steps']}; the same command resumes it",
              "incomplete": f"incomplete: the log ends at step {s['last_step']} of {t['max_steps']} "
                            f"(the run died, or is still running)"}[s["status"]]
    switches = ", ".join(f"{k}={m[k]}" for k in ("norm", "pos", "mlp", "n_kv_head", "window", "sinks", "moe_experts",
                                                  "mp", "ngpt") if k in m and m[k] not in (None, False, 0, "layernorm",
                                                                                            "learned", "gelu"))
    params = f"{run['num_params'] / 1e6:.1f}M" + (f" ({run['active_params'] / 1e6:.1f}M active)"
                                                   if run.get("active_params", run["num_params"]) != run["num_params"] else "")
    fmt = (lambda x: f"{x[1]:.4f} (step {x[0]})")
    rows = [
        ("status", status), ("git commit", run.get("git_commit") or "unknown"), ("torch", run.get("torch", "?")),
        ("hardware", f"{run['device']} × {run['world_size']}, {run['dtype']}, compile {run['compile']}"
                     + (f"; rank 0 on {run['host']}" if run.get("host") else "")),
        ("model", f"{params} parameters: {m['n_layer']} layers, {m['n_head']} heads, {m['n_embd']} wide, "
                  f"context {m['block_size']}" + (f"; {switches}" if switches else "")),
        ("batch", f"{t['total_batch_size']:,} tokens ({t['micro_batch_size']} × {t['seq_len']} × "
                  f"{run['world_size']} ranks × {run['grad_accum_steps']} accumulation steps)"),
        ("optimisation", f"{t.get('optimizer', 'adamw')}, max lr {t['max_lr']:g}, {t.get('lr_schedule', 'cosine')} "
                         f"schedule, warmup {t['warmup_steps']}, weight decay {t['weight_decay']:g}"),
        ("tokens", f"{s['tokens']:,}"), ("wall time", hms(s["wall_s"])),
        ("training time", f"{hms(s['train_s'])} (the sum of step times: evaluation excluded)"),
        ("mean tokens/s", f"{s['tokens_per_sec']:,.0f} (tokens / training time, compile warm-up included)"),
        ("mean MFU", f"{s['mfu'] * 100:.1f}%" if s["mfu"] is not None else "- (no peak FLOP/s known for this device)"),
    ]
    if s["failed_saves"]:  # a disk that filled up, a mount that went away: the run trained on without them
        step, error = s["failed_saves"][-1]
        rows.append(("failed checkpoint saves", f"{len(s['failed_saves'])}, the last at step {step}: {error}"))
    lines = [f"# Run {run['run_name']}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
             "## Evaluation", "", "| | this run | OpenAI GPT-2 124M | OpenAI GPT-3 124M |", "|---|---|---|---|",
             f"| final val loss | {fmt(s['final_val']) if s['final_val'] else '-'} | {GPT2_124M_VAL_LOSS} | - |",
             f"| best val loss | {fmt(s['best_val']) if s['best_val'] else '-'} | | |",
             f"| HellaSwag acc_norm | {fmt(s['final_hella']) if s['final_hella'] else '-'} | {GPT2_124M_HELLASWAG} "
             f"| {GPT3_124M_HELLASWAG} |", "",
             "Val loss on the val shard (FineWeb-Edu's for the reference); HellaSwag as build-nanogpt scores it.", "",
             "![loss and HellaSwag](plot.png)", ""]
    if s["samples"]:
        lines += [f"## Samples at step {s['samples'][0]}", "", "```", *s["samples"][1], "```", ""]
    lines += ["<details><summary>full configuration</summary>", "", "```json", json.dumps(config, indent=2),
              "```", "</details>", ""]
    path = os.path.join(run_dir, "report.md")
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines))
    return path


