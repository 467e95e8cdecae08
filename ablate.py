"""
Equal-compute ablations: train a baseline and variants on the same data, the same token budget and the
same eval cadence, then compare val loss against tokens and against training time, as modded-nanogpt
judges its records.

    python ablate.py --preset cpu-proxy --data_dir data/proxy --variant lr2x="--max_lr 2e-3" --out results/lr
    python ablate.py --base base.json --variant rope=rope.json --variant wide="--n_embd 384" \
        --data_dir data/fineweb_edu --tokens 1000000000 --seeds 1 2 3 --nproc 8 --out results/rope

--base is a train_gpt2.py --config file (or a --preset); each --variant NAME=... is a config file or a
string of train_gpt2.py flags applied on top of the base. A variant may change the model and the
optimisation, not the data, the token budget or the evaluation (those are refused). Every run is
train_gpt2.py itself in a subprocess (torchrun when --nproc > 1), --parallel of them at a time (on a CPU
each with its share of the cores, on GPUs each on its own --nproc GPUs); rerunning the same command skips
finished runs and resumes interrupted ones. Writes to --out:
    results.md            one row per variant: params, tokens, final val loss (mean ± std over seeds),
                          the tokens and the training time to reach the baseline's final val loss, training
                          time, tokens/s, HellaSwag
    loss_vs_tokens.png    val loss of every variant against tokens, and
    loss_vs_time.png      against training time (the sum of step times: evaluation excluded)
    results.json          the raw curves and every run's full config (with its git commit)
    runs/<variant>-seed<S>/   each run's logs; checkpoints in checkpoints/
"""

import argparse
import concurrent.futures
import io
import json
import math
import os
import queue
import shlex
import signal
import statistics
import subprocess
import sys
import threading

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from data import atomic_write, fail
from runlog import GPT2_124M_VAL_LOSS
from train_gpt2 import check_settings, grad_accum_steps, parse_args, parse_settings

# A model and corpus small enough for 2 CPU cores (a few minutes a run), and GPT-2 124M on FineWeb-Edu.
PRESETS = {
    "cpu-proxy": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 256, "seq_len": 256,
                  "micro_batch_size": 16, "total_batch_size": 8192, "warmup_steps": 6, "max_lr": 2e-3,
                  "val_every": 10, "val_steps": 4, "hellaswag_every": 0, "sample_every": 0, "device": "cpu",
                  "tokens": 491_520},  # 60 steps, ~7 min a run on 2 cores; data: scripts/proxy_corpus.sh
    "gpu-124m": {"total_batch_size": 524288, "warmup_steps": 190, "val_every": 250, "val_steps": 20,
                 "hellaswag_every": 500, "sample_every": 0, "tokens": 1_000_341_504},  # 1908 steps, ~1B tokens
}
# What makes two runs comparable: a variant may not change these
FIXED = ("data_dir", "seq_len", "total_batch_size", "max_steps", "shuffle", "seed", "val_every", "val_steps",
         "hellaswag_every", "hellaswag_file", "hellaswag_limit")
# What ablate.py sets itself for every run
OWNED = ("run_name", "log_dir", "checkpoint_dir", "resume", "checkpoint_every")


def load_settings(spec):
    """The settings a config file (flat, or a run's config.json) or a string of flags sets."""
    if os.path.isfile(spec):
        argv = ["--config", spec]
    elif spec.strip().startswith("--") or not spec.strip():
        argv = shlex.split(spec)
    else:
        fail(f"{spec!r} is neither a config file nor train_gpt2.py flags")
    try:
        return parse_settings(argv)
    except SystemExit as e:
        fail(f"{spec!r}: not valid train_gpt2.py settings ({e})")


def plan(args):
    """[(variant, settings)] for every variant, the baseline first, each with the full run settings."""
    base = dict(PRESETS[args.preset]) if args.preset else {}
    tokens = args.tokens or base.pop("tokens", None)
    base.pop("tokens", None)
    if args.base:
        base.update(load_settings(args.base))
    if not tokens:
        fail("give the token budget: --tokens N (or a --preset)")
    base["data_dir"] = args.data_dir
    if args.hellaswag_file:
        base.update(hellaswag_file=args.hellaswag_file, hellaswag_every=base.get("hellaswag_every") or
                    base.get("val_every", 250))
    cfg, model_cfg = parse_args(flags(base))
    effective = {**vars(cfg), **vars(model_cfg)}  # the base with every default filled in
    if tokens % cfg.total_batch_size:
        fail(f"--tokens {tokens} is not a whole number of steps of total_batch_size {cfg.total_batch_size}")
    base["max_steps"] = tokens // cfg.total_batch_size
    variants = [("baseline", dict(base))]
    for spec in args.variant:
        name, sep, settings = spec.partition("=")
        if not sep or not name or name.lower() in {n.lower() for n, _ in variants}:  # (one folder on macOS)
            fail(f"--variant {spec!r}: write NAME=CONFIG_FILE or NAME='--flag value ...', a new NAME each")
        changes = load_settings(settings)
        if bad := sorted(k for k in changes if (k in FIXED and changes[k] != effective[k]) or k in OWNED):
            fail(f"variant {name} changes {', '.join(bad)}: variants must share the data, the token budget and "
                 f"the evaluation (set those for all runs in --base)")
        variants.append((name, {**base, **changes}))
    for name, settings in variants:  # what train_gpt2.py would refuse, refused now rather than hours in
        try:
            cfg, model_cfg = parse_args(flags(settings))
            check_settings(cfg, model_cfg)
            grad_accum_steps(cfg, args.nproc)
        except SystemExit as e:
            fail(f"{name}: {str(e).removeprefix('error: ')}")
    return variants, tokens


def flags(settings):
    out = []
    for k, v in settings.items():
        if isinstance(v, bool):
            out.append(f"--{k}" if v else f"--no-{k}")
        else:
            out += [f"--{k}", str(v)]
    return out


RUNNING = set()  # the train_gpt2.py processes training now: a signal to ablate.py is passed on to them


def run_one(name, seed, settings, args, env=None):
    """Train one run with train_gpt2.py (resuming it if a previous ablate.py was interrupted), in the
    environment env (run_env's; None: this process's)."""
    run = f"{name}-seed{seed}"
    run_dir = os.path.join(args.out, "runs", run)
    if finished(run_dir, {**settings, "seed": seed}):
        print(f"=== {run}: finished earlier, with these settings")
        return run_dir
    cmd = [*flags({**settings, "seed": seed}), "--run_name", run, "--log_dir", os.path.dirname(run_dir),
           "--checkpoint_dir", os.path.join(args.out, "checkpoints", run), "--resume", "auto",
           "--checkpoint_every", "0"]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "train_gpt2.py", *cmd]
    else:
        cmd = [sys.executable, "train_gpt2.py", *cmd]
    where = "".join(f" [{k}={env[k]}]" for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
                    if env and args.parallel > 1 and k in env)
    print(f"=== {run}{where}: {shlex.join(cmd[2:] if args.nproc == 1 else cmd[4:])}", flush=True)
    here = os.path.dirname(os.path.abspath(__file__))
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    with open(run_dir + ".out", "a") as out:
        proc = subprocess.Popen(cmd, cwd=here, stdout=out, stderr=subprocess.STDOUT, env=env)
        RUNNING.add(proc)
        try:
            rc = proc.wait()
        finally:
            RUNNING.discard(proc)
    if rc != 0:
        fail(f"run {run} failed (exit {rc}); its output is in {run_dir}.out")
    if not finished(run_dir, {**settings, "seed": seed}):  # train_gpt2.py saves and exits 0 on a signal
        fail(f"run {run} stopped before its end (a signal?); rerun the same command to resume it")
    return run_dir


def run_env(slot, parallel, nproc, on_gpu, environ=os.environ, cores=None, gpus=None):
    """The environment of the run in `slot` (0 .. parallel-1) when `parallel` runs train at a time. On the
    CPU each gets its share of the cores as threads (an OMP_NUM_THREADS already set is kept): two 1-thread
    runs on 2 cores do as much work as one 2-thread run, and a many-threaded run on cores that other work
    shares waits at every op (results/README.md, benchmarks). On GPUs each gets its own nproc of the
    visible GPUs (gpus: how many CUDA sees)."""
    env = dict(environ)
    if parallel == 1:
        return env
    if not on_gpu:
        cores = cores or len(os.sched_getaffinity(0))
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // (parallel * nproc))))
        return env
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",")[:gpus] if visible else [str(i) for i in range(gpus)]  # (CUDA stops at a bad id)
    if parallel * nproc > len(ids):
        fail(f"--parallel {parallel} × --nproc {nproc} needs {parallel * nproc} GPUs, and {len(ids)} are visible: "
             f"lower --parallel")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[slot * nproc:(slot + 1) * nproc])
    return env


def run_all(variants, args):
    """Every (variant, seed) run, `args.parallel` at a time, each in its own slot's environment; returns
    {variant: [its runs' curves, in seed order]}. A failed run, or a signal to ablate.py (Ctrl-C, SIGTERM,
    SIGHUP: passed on to the runs training, which save and stop), starts no more runs."""
    runs = [(name, seed, settings) for name, settings in variants for seed in args.seeds]
    parallel = min(args.parallel, len(runs))
    device = variants[0][1].get("device", "auto")
    if parallel > 1 and ":" in device:
        fail(f"--device {device} with --parallel: give --device cuda, and each run gets its own GPUs")
    on_gpu = device != "cpu" and (device.startswith("cuda") or torch.cuda.is_available())
    slots = queue.SimpleQueue()
    for slot in range(parallel):
        slots.put(run_env(slot, parallel, args.nproc, on_gpu, gpus=torch.cuda.device_count() if on_gpu else 0))
    stop = threading.Event()

    def train(run):
        if stop.is_set():
            return None
        env = slots.get()
        try:
            return run_one(*run, args, env)
        except BaseException as e:
            stop.set()
            if parallel > 1:  # now, not only once the runs still training end
                print(e, file=sys.stderr, flush=True)
            raise
        finally:
            slots.put(env)

    def pass_on(signum, frame):  # (a run that got it from the terminal too ignores a second within 1 s)
        stop.set()
        for proc in list(RUNNING):
            proc.send_signal(signum)

    handlers = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
                if signal.getsignal(sig) is not signal.SIG_IGN}  # (nohup's SIGHUP stays ignored)
    try:
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:  # each thread waits on one subprocess
            futures = [pool.submit(train, run) for run in runs]
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if errors := [f.exception() for f in futures if f.exception()]:
        raise errors[0]
    if stop.is_set():
        fail("stopped by a signal between runs; rerun the same command to go on")
    results = {name: [] for name, _ in variants}
    for (name, _, _), future in zip(runs, futures):
        results[name].append(read_curves(future.result()))
    return results


def finished(run_dir, settings):
    """Whether run_dir holds a run that ended, made with these settings."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            ended = any(json.loads(line).get("event") == "end" for line in f if line.strip())
    except (OSError, ValueError):
        return False
    saved = {**config["train"], **config["model"]}
    return ended and all(saved.get(k) == v for k, v in settings.items())


def read_curves(run_dir):
    """One run's curves from its metrics.jsonl: val loss by tokens and by training time, and its figures."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        events = [json.loads(line) for line in f if line.strip()]
    train = {e["step"]: e for e in events if e["event"] == "train"}  # a resumed run repeats some steps
    val = {e["step"]: e["val_loss"] for e in events if e["event"] == "val"}
    hella = {e["step"]: e["acc_norm"] for e in events if e["event"] == "hella"}
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    batch = config["train"]["total_batch_size"]
    steps = sorted(train)
    time_at = {0: 0.0}  # training time (the sum of step times) when step s begins
    for s in steps:
        time_at[s + 1] = time_at[s] + train[s]["dt_ms"] / 1000
    return {
        "val": [[s, s * batch, time_at.get(s, time_at[max(time_at)]), loss] for s, loss in sorted(val.items())],
        "hellaswag": hella[max(hella)] if hella else None,
        "train_time_s": time_at[max(time_at)],
        "tokens": len(steps) * batch,
        "tokens_per_sec": len(steps) * batch / time_at[max(time_at)] if steps else 0.0,
        "params": config["run"]["num_params"],
        "config": config,
    }


def reach(curve, target):
    """(tokens, training time) at which a val curve [[step, tokens, time, loss]] first reaches target,
    interpolated between evaluations; None if it never does."""
    if curve and curve[0][3] <= target:
        return curve[0][1], curve[0][2]
    for (_, t0, s0, l0), (_, t1, s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            f = (l0 - target) / (l0 - l1)
            return t0 + (t1 - t0) * f, s0 + (s1 - s0) * f
    return None


def baseline_budget(runs, study=None):
    """What every variant is measured against: the baseline's final val loss (the mean over its seeds), and
    the tokens and training time it took (its mean curve's last point), the ratios' denominators."""
    target = statistics.mean(r["val"][-1][3] for r in runs)
    if math.isnan(target):
        fail(f"{study + ': ' if study else ''}the baseline's final val loss is NaN: it diverged, and no variant "
             f"can be measured against it")
    _, tokens, time_s, _ = mean_curve(runs)[-1]
    return target, tokens, time_s


def mean_std(xs):
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def write_results(out, results, tokens):
    names = list(results)
    final = {n: mean_std([r["val"][-1][3] for r in results[n]]) for n in names}
    target, base_tokens, base_time = baseline_budget(results["baseline"])
    rows = ["| variant | params | tokens | final val loss | tokens to baseline's final val | time to it | "
            "train time | tokens/s | HellaSwag |", "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        runs = results[n]
        reached = reach(mean_curve(runs), target)
        reach_s = (f"{reached[0]:,.0f} ({reached[0] / base_tokens:.2f}×) | {reached[1]:.1f} s "
                   f"({reached[1] / base_time:.2f}×)" if reached else "not reached | not reached")
        hella = [r["hellaswag"] for r in runs if r["hellaswag"] is not None]
        rows.append(f"| {n} | {runs[0]['params'] / 1e6:.2f}M | {runs[0]['tokens']:,} | "
                    f"{final[n][0]:.4f} ± {final[n][1]:.4f} | {reach_s} | "
                    f"{statistics.mean(r['train_time_s'] for r in runs):.1f} s | "
                    f"{statistics.mean(r['tokens_per_sec'] for r in runs):,.0f} | "
                    f"{f'{statistics.mean(hella):.4f}' if hella else '-'} |")
    run0 = results["baseline"][0]["config"]["run"]
    header = (f"{len(names)} variants × {len(results['baseline'])} seeds, {tokens:,} tokens each; "
              f"{run0['device']} × {run0['world_size']}, torch {run0['torch']}, git {run0['git_commit']}\n\n")
    with atomic_write(os.path.join(out, "results.md"), "w") as f:
        f.write(header + "\n".join(rows) + "\n")
    with atomic_write(os.path.join(out, "results.json"), "w") as f:
        json.dump({"tokens": tokens, "variants": results}, f, indent=1)
    for x, xlabel, name in ((1, "tokens", "loss_vs_tokens.png"), (2, "training time (s)", "loss_vs_time.png")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for n in names:
            curve = mean_curve(results[n])
            ax.plot([p[x] for p in curve], [p[3] for p in curve], marker=".", label=f"{n} ({final[n][0]:.4f})")
        if target < GPT2_124M_VAL_LOSS + 0.5:
            ax.axhline(GPT2_124M_VAL_LOSS, color="r", ls="--", label=f"OpenAI GPT-2 124M ({GPT2_124M_VAL_LOSS})")
        tail = [p[3] for n in names for p in mean_curve(results[n])[len(mean_curve(results[n])) // 4:]]
        ax.set_ylim(min(tail) - 0.05, max(tail) + 0.05)
        ax.set(xlabel=xlabel, ylabel="val loss", title=f"val loss against {xlabel}")
        ax.grid(alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        with atomic_write(os.path.join(out, name)) as f:
            f.write(buf.getvalue())
    return "\n".join(rows)


def mean_curve(runs):
    """The seeds' val curves averaged point by point (they must share the eval steps)."""
    if len({tuple(p[0] for p in r["val"]) for r in runs}) > 1:
        fail(f"seeds evaluated at different steps ({', '.join(str(len(r['val'])) for r in runs)} evaluations): "
             f"the runs of one variant must share the eval cadence and budget")
    return [[*runs[0]["val"][i][:2], statistics.mean(r["val"][i][2] for r in runs),
             statistics.mean(r["val"][i][3] for r in runs)] for i in range(min(len(r["val"]) for r in runs))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="train_gpt2.py config file (or flags) every variant starts from")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a base to start from (before --base)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=CONFIG_OR_FLAGS")
    parser.add_argument("--data_dir", required=True, help="shards from fineweb_edu.py, the same for every run")
    parser.add_argument("--tokens", type=int, help="training tokens per run (default: the preset's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun), e.g. GPUs")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at a time: on a CPU each gets cores/N threads, on GPUs its own --nproc GPUs")
    parser.add_argument("--hellaswag_file", help="local hellaswag_val.jsonl: adds HellaSwag to the table")
    parser.add_argument("--out", default="results/ablation")
    args = parser.parse_args(argv)
    variants, tokens = plan(args)
    if args.parallel < 1:
        fail(f"--parallel {args.parallel}: give 1 or more runs at a time")
    if len(set(args.seeds)) < len(args.seeds):
        fail(f"--seeds {' '.join(map(str, args.seeds))}: a seed twice would train one run twice")
    results = run_all(variants, args)
    print(write_results(args.out, results, tokens))
    print(f"wrote {args.out}/results.md, results.json, loss_vs_tokens.png, loss_vs_time.png")


if __name__ == "__main__":
    main()
