"""
Do an ablation's results hold at longer horizons? Reads ablate.py's results.json from one study per
horizon (the same variant names, each against its own baseline) and reports, for every variant and horizon:
the final val loss, mean and 95% interval over seeds, and its difference from the baseline's with the
95% interval of the per-seed differences (seed s of the variant against seed s of the baseline); the
tokens and the training time at which the variant's mean curve reaches the baseline's final val loss, as
ratios of the baseline's budget; and one plot of both ratios against the horizon.

    python horizons.py results/horizon_30 results/horizon_120 results/horizon_480 --out results/horizons

Writes horizons.md (the table) and horizons.png (token ratio and time ratio against tokens trained) to --out.
"""

import argparse
import json
import math
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ablate import baseline_budget, mean_curve, reach
from data import atomic_write, fail

# Student's t at 97.5% for 1-9 degrees of freedom (any statistics table, 3 decimals); from 10 on, the expansion
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t975(df):
    """The two-sided 95% quantile of Student's t: the table, then Abramowitz & Stegun 26.7.5 (within 0.0002
    of the exact quantile from 10 degrees of freedom on)."""
    if df in T975:
        return T975[df]
    z = statistics.NormalDist().inv_cdf(0.975)
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def interval(xs):
    """Mean and the half-width of its 95% interval (None for one seed: no spread to estimate)."""
    if len(xs) < 2:
        return statistics.mean(xs), None
    return statistics.mean(xs), t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def seed_of(run):
    return run["config"]["train"]["seed"]


def horizon(study):
    """{variant: figures} for one study's results.json, and the data it trained on."""
    path = os.path.join(study, "results.json")
    try:
        with open(path) as f:
            variants = json.load(f)["variants"]
        baseline = variants["baseline"]
    except (OSError, ValueError, KeyError) as e:
        fail(f"{path}: not an ablate.py results.json with a baseline ({e}); run ablate.py --out {study} first")
    finals = {n: {seed_of(r): r["val"][-1][3] for r in runs} for n, runs in variants.items()}
    target, base_tokens, base_time = baseline_budget(baseline, study)
    out = {}
    for name, runs in variants.items():
        reached = reach(mean_curve(runs), target)
        paired = [finals[name][s] - finals["baseline"][s] for s in finals[name] if s in finals["baseline"]]
        out[name] = {"tokens": runs[0]["tokens"], "seeds": len(runs),
                     "final": interval(list(finals[name].values())), "vs_baseline": interval(paired),
                     "token_ratio": reached[0] / base_tokens if reached else None,
                     "time_ratio": reached[1] / base_time if reached else None}
    return out, baseline[0]["config"]["train"]["data_dir"]


def report(studies):
    """The table, and per variant [(tokens, token ratio, time ratio)] for the plot, the shortest horizon first."""
    found = [horizon(s) for s in studies]
    if len({data for _, data in found}) > 1:
        fail("the studies trained on different data (" + ", ".join(f"{s}: {d}" for s, (_, d) in
             zip(studies, found)) + "): compare horizons on one corpus")
    horizons = sorted((h for h, _ in found), key=lambda h: h["baseline"]["tokens"])
    names = list(dict.fromkeys(n for h in horizons for n in h))
    rows = ["| variant | tokens | seeds | final val loss (95% interval) | vs baseline (95% interval of the seeds' "
            "differences) | tokens to baseline's final val | time to it |", "|---|---|---|---|---|---|---|"]
    ratio = lambda r: f"{r:.2f}×" if r is not None else "not reached"  # noqa: E731
    pm = lambda m, h, fmt: f"{m:{fmt}}" + (f" ± {h:.3f}" if h is not None else "")  # noqa: E731
    for n in names:
        for h in horizons:
            if n in h:
                v = h[n]
                rows.append(f"| {n} | {v['tokens']:,} | {v['seeds']} | {pm(*v['final'], '.3f')} | "
                            f"{pm(*v['vs_baseline'], '+.3f')} | {ratio(v['token_ratio'])} | {ratio(v['time_ratio'])} |")
    curves = {n: [(h[n]["tokens"], h[n]["token_ratio"], h[n]["time_ratio"]) for h in horizons if n in h]
              for n in names}
    return "\n".join(rows), curves


def plot(curves, path):
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    ticks = sorted({p[0] for points in curves.values() for p in points})
    for ax, i, what in ((axes[0], 1, "tokens"), (axes[1], 2, "training time")):
        for n, points in curves.items():
            xy = [(p[0], p[i]) for p in points if p[i] is not None]
            line, = ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=n)
            missed = [p[0] for p in points if p[i] is None]  # drawn at the top, hollow: not reached
            ax.plot(missed, [1.05] * len(missed), ls="", marker="o", mfc="none", color=line.get_color())
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t / 1e3:,.0f}k" for t in ticks])
        ax.minorticks_off()
        ax.set(xlabel="tokens trained (the horizon)", title=f"{what} to reach the baseline's final val loss")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("÷ the baseline's budget\n(lower is better; hollow, at the top: not reached)")
    axes[1].legend(fontsize=8)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", help="ablate.py --out folders, one per horizon")
    parser.add_argument("--out", default="results/horizons")
    args = parser.parse_args(argv)
    table, curves = report(args.studies)
    os.makedirs(args.out, exist_ok=True)
    with atomic_write(os.path.join(args.out, "horizons.md"), "w") as f:
        f.write(f"Studies: {', '.join(args.studies)}\n\n{table}\n")
    plot(curves, os.path.join(args.out, "horizons.png"))
    print(table)
    print(f"wrote {args.out}/horizons.md, horizons.png")


if __name__ == "__main__":
    main()
