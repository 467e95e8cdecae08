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
import os
import subprocess
import sys

from data import atomic_write
from runlog import GPT2_124M_HELLASWAG, GPT2_124M_VAL_LOSS, GPT3_124M_HELLASWAG, read_events, write_report


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


class BackgroundPlot:
    """Redraws a run's plot.png in a child process (`python plot.py RUN`) while training goes on: matplotlib
    takes about a second, which on rank 0 would keep every other GPU waiting at the next collective. At most
    one drawing at a time: a request while one is drawing is dropped (the next evaluation's redraws it).
    Leaving the context waits for the drawing in progress."""

    def __init__(self, run_dir):
        self.run_dir, self.child = run_dir, None

    def request(self):
        """Start a redraw, unless one is still drawing; returns whether it started."""
        if self.child is not None and self.child.poll() is None:
            return False
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot.py")
        # its own session: a Ctrl-C meant for training does not reach it (the run finishes its own plot)
        self.child = subprocess.Popen([sys.executable, script, self.run_dir], stdout=subprocess.DEVNULL,
                                      start_new_session=True)
        return True

    def wait(self, timeout=120):
        """Wait for the drawing in progress; one that hangs is killed (the run's end draws its own)."""
        if self.child is not None:
            try:
                self.child.wait(timeout)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.wait()


def write_report_with_plot(run_dir):
    """report.md (runlog.write_report) and the plot.png it shows, both redrawn; returns the report's path."""
    path = write_report(run_dir)
    plot_runs([run_dir], os.path.join(run_dir, "plot.png"))
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
                print(f"wrote {write_report_with_plot(run_dir)}")
            return
        out = args.out or (os.path.join(args.runs[0], "plot.png") if len(args.runs) == 1 else "plot.png")
        plot_runs(args.runs, out)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
