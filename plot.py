"""
Plot training runs: loss (train and val) and HellaSwag accuracy against step, next to the OpenAI
GPT-2 124M and GPT-3 124M reference lines -- what build-nanogpt's notebook drew, without a notebook.

    python plot.py logs/<run>                       # writes logs/<run>/plot.png
    python plot.py logs/run_a logs/run_b --out cmp.png   # several runs overlaid
    python plot.py --report logs/<run>              # (re)writes logs/<run>/report.md and its plot

train_gpt2.py redraws logs/<run>/plot.png at every evaluation, so an rsynced logs/ folder always
holds an up-to-date picture. Reads metrics.jsonl, or log.txt for runs from build-nanogpt.
"""

import argparse
import io
import json
import os
import sys

from data import atomic_write

GPT2_124M_VAL_LOSS = 3.2924  # OpenAI GPT-2 124M on the FineWeb-Edu val shard (build-nanogpt)
GPT2_124M_HELLASWAG = 0.2945  # OpenAI GPT-2 124M, acc_norm (build-nanogpt, llm.c)
GPT3_124M_HELLASWAG = 0.337  # GPT-3 paper, zero-shot, 124M


def read_run(run_dir):
    """{'train': [(step, loss)], 'val': [...], 'hella': [...]} from metrics.jsonl or log.txt.
    A half-written last line (the run was killed mid-write) is skipped."""
    series = {"train": [], "val": [], "hella": []}
    jsonl, txt = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "log.txt")
    if os.path.exists(jsonl):
        key = {"train": "loss", "val": "val_loss", "hella": "acc_norm"}
        for rec in read_events(run_dir):
            if rec.get("event") in key:
                series[rec["event"]].append((rec["step"], rec[key[rec["event"]]]))
    elif os.path.exists(txt):  # build-nanogpt's "{step} {train|val|hella} {value}"
        with open(txt) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[1] in series:
                    try:
                        series[parts[1]].append((int(parts[0]), float(parts[2])))
                    except ValueError:
                        continue
    else:
        raise FileNotFoundError(f"{run_dir} has neither metrics.jsonl nor log.txt; is it a run folder under logs/?")
    # a resumed run repeats the steps after its last checkpoint: keep the latest value per step
    return {k: sorted(dict(v).items()) for k, v in series.items()}


def plot_runs(run_dirs, out_path):
    """Draw the runs into one PNG at out_path (written atomically)."""
    # imported here: matplotlib is slow to import (~0.4 s, ~1 s without compiled bytecode) and only the
    # process that draws needs it (rank 0 of a training run); a bare Figure (no pyplot) needs no display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 5))
    ax_loss, ax_hella = fig.subplots(1, 2)
    shown = [GPT2_124M_VAL_LOSS]  # loss values the y-axis must show
    for run_dir in run_dirs:
        s = read_run(run_dir)
        name = os.path.basename(os.path.normpath(run_dir))
        if s["train"]:
            steps, losses = zip(*s["train"])
            ax_loss.plot(steps, losses, alpha=0.5, lw=1, label=f"{name} train")
            shown += losses[len(losses) // 10:]  # not the first steps (~11): they would flatten the rest
        if s["val"]:
            steps, losses = zip(*s["val"])
            ax_loss.plot(steps, losses, marker=".", label=f"{name} val ({losses[-1]:.4f})")
            shown += losses[len(losses) // 10:]
        if s["hella"]:
            steps, accs = zip(*s["hella"])
            ax_hella.plot(steps, accs, marker=".", label=f"{name} ({accs[-1]:.4f})")
    ax_loss.axhline(GPT2_124M_VAL_LOSS, color="r", ls="--", label=f"OpenAI GPT-2 124M val ({GPT2_124M_VAL_LOSS})")
    ax_loss.set(xlabel="step", ylabel="loss", title="Loss")
    ax_loss.set_ylim(min(shown) - 0.1, max(shown) + 0.1)
    ax_hella.axhline(GPT2_124M_HELLASWAG, color="r", ls="--", label=f"OpenAI GPT-2 124M ({GPT2_124M_HELLASWAG})")
    ax_hella.axhline(GPT3_124M_HELLASWAG, color="g", ls="--", label=f"OpenAI GPT-3 124M ({GPT3_124M_HELLASWAG})")
    ax_hella.set(xlabel="step", ylabel="acc_norm", title="HellaSwag (acc_norm, mean loss per token)")
    for ax in (ax_loss, ax_hella):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    with atomic_write(out_path) as f:
        f.write(buf.getvalue())


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
    train, val, hella, samples, status = {}, {}, {}, None, "incomplete"
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
        "samples": samples,
    }


def hms(seconds):
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m {seconds % 60:04.1f}s"


def write_report(run_dir):
    """logs/<run>/report.md: what ran, where, how fast, and how good against GPT-2/GPT-3 124M, with the
    plot (redrawn) and the last samples. Written at the end of a run (and on a graceful stop); returns its path."""
    if not os.path.exists(os.path.join(run_dir, "config.json")):
        raise FileNotFoundError(f"{run_dir} has no config.json; is it a run folder under logs/?")
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    t, m, run = config["train"], config["model"], config["run"]
    s = run_summary(run_dir)
    plot_runs([run_dir], os.path.join(run_dir, "plot.png"))
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders, e.g. logs/<run>")
    parser.add_argument("--out", help="PNG to write (default: <run>/plot.png for one run, plot.png for several)")
    parser.add_argument("--report", action="store_true", help="write each run's report.md (and its plot.png)")
    args = parser.parse_args(argv)
    try:
        if args.report:
            for run_dir in args.runs:
                print(f"wrote {write_report(run_dir)}")
            return
        out = args.out or (os.path.join(args.runs[0], "plot.png") if len(args.runs) == 1 else "plot.png")
        plot_runs(args.runs, out)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
