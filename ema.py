"""
Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
section 3 and appendix C): choose how long to average the weights after training, not before.

During training (train_gpt2.py --ema_stds 0.05,0.10 --ema_snapshot_every N) two power-function
EMAs of the weights are kept and saved every N steps. A power-function EMA at step t weights the
weights of step τ ≤ t by ∝ τ^γ: its relative width σ_rel (std of that profile / t) is a function of γ
alone, so it averages over a fixed fraction of the run however long the run is. Any profile, at any
σ_rel, is close to a linear combination of the saved snapshots' profiles; least squares on their inner
products gives the coefficients, and the same combination of the snapshots' weights is the EMA.

    python ema.py checkpoints/RUN                         # val loss over a sweep of σ_rel -> logs/RUN/ema.*
    python ema.py checkpoints/RUN --sigma_rels 0.02,0.05,0.1,0.2 --hellaswag_file hellaswag_val.jsonl
    python ema.py checkpoints/RUN --save 0.08             # checkpoints/RUN/ema_0.080.pt (+ --hf_out DIR)
"""

import argparse
import glob
import json
import math
import os
import re

import numpy as np
import torch

import hellaswag
from data import DataLoader, atomic_write, fail, write_hf_tokenizer
from distributed import default_autocast_dtype, default_device
from model import GPT, GPTConfig, hf_refusal

# ---------------------------------------------------------------------------
# the power-function profile


def gamma_to_sigma_rel(gamma):
    """σ_rel of the profile ∝ τ^γ on [0, 1]: its standard deviation, ((γ+1) / ((γ+2)²(γ+3)))^½."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel):
    """γ for a σ_rel: the largest real root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0, which is
    σ² = (γ+1)/((γ+2)²(γ+3)) multiplied out. σ_rel must be below 12^-½ ≈ 0.289 (γ > 0)."""
    if not 0 < sigma_rel < 12 ** -0.5:
        raise ValueError(f"sigma_rel must be between 0 and 0.288 (12^-1/2), not {sigma_rel}")
    s = sigma_rel ** -2
    return float(max(r.real for r in np.roots([1, 7, 16 - s, 12 - s]) if abs(r.imag) < 1e-9))


def ema_beta(t, gamma):
    """The EMA's decay after optimizer step t (1, 2, ...): averaging with β_t = (1 − 1/t)^(γ+1) gives
    the weights of steps τ = 1..t weights ∝ τ^γ (exactly, in the limit of many steps). β_1 = 0."""
    return (1 - 1 / t) ** (gamma + 1)


def profile_inner_product(t_a, gamma_a, t_b, gamma_b):
    """∫ p_a(τ) p_b(τ) dτ for the normalised profiles p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t]."""
    t_a, gamma_a, t_b, gamma_b = np.broadcast_arrays(*map(np.float64, (t_a, gamma_a, t_b, gamma_b)))
    a_first = t_a < t_b  # the integral runs to the shorter profile's end
    ratio = np.where(a_first, (t_a / t_b) ** gamma_b, (t_b / t_a) ** gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * ratio / np.maximum(t_a, t_b)


def solve_coefficients(snap_t, snap_sigma, out_t, out_sigma):
    """(snapshots, outputs) weights: the least-squares combination of the snapshot profiles closest
    to each output profile, normalised to sum to 1 (so a constant weight stays that constant)."""
    snap_g = np.array([sigma_rel_to_gamma(s) for s in snap_sigma])
    out_g = np.array([sigma_rel_to_gamma(s) for s in out_sigma])
    snap_t, out_t = np.float64(snap_t), np.float64(out_t)
    A = profile_inner_product(snap_t[:, None], snap_g[:, None], snap_t[None, :], snap_g[None, :])
    B = profile_inner_product(snap_t[:, None], snap_g[:, None], out_t[None, :], out_g[None, :])
    X = np.linalg.lstsq(A, B, rcond=None)[0]
    return X / X.sum(axis=0, keepdims=True)


# ---------------------------------------------------------------------------
# during training


class PowerEMA:
    """Power-function EMAs of a model's parameters, one per σ_rel, kept in fp32 on the model's device."""

    def __init__(self, model, sigma_rels):
        self.sigma_rels = list(sigma_rels)
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.averages = [{name: p.detach().float().clone() for name, p in model.named_parameters()}
                         for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, model, t):
        """After optimizer step t (counting from 1)."""
        params = dict(model.named_parameters())
        for gamma, avg in zip(self.gammas, self.averages):
            torch._foreach_lerp_(list(avg.values()), [params[name].float() for name in avg], 1 - ema_beta(t, gamma))

    def state_dict(self):
        return {"sigma_rels": self.sigma_rels, "averages": self.averages}

    def load_state_dict(self, state):
        if state["sigma_rels"] != self.sigma_rels:
            raise ValueError(f"the checkpoint's EMAs are for sigma_rels {state['sigma_rels']}, not {self.sigma_rels}")
        for avg, saved in zip(self.averages, state["averages"]):
            for name, a in avg.items():
                a.copy_(saved[name])


def save_snapshot(ema_dir, step, ema, model_config):
    """ema_dir/step_NNNNNN.pt: the EMAs after `step` optimizer steps (written atomically)."""
    os.makedirs(ema_dir, exist_ok=True)
    averages = [{name: w.cpu() for name, w in avg.items()} for avg in ema.averages]  # readable without a GPU
    state = {"step": step, "model_config": model_config, "sigma_rels": ema.sigma_rels, "averages": averages}
    with atomic_write(os.path.join(ema_dir, f"step_{step:06d}.pt")) as f:
        torch.save(state, f)


def list_snapshots(ema_dir):
    """[(step, path)] of the snapshots in ema_dir, oldest first."""
    found = []
    for path in glob.glob(os.path.join(ema_dir, "step_*.pt")):
        if m := re.fullmatch(r"step_(\d+)\.pt", os.path.basename(path)):
            found.append((int(m.group(1)), path))
    return sorted(found)


# ---------------------------------------------------------------------------
# after training


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def reconstruct(snapshots, sigma_rels, at_step=None):
    """[state dict of the σ_rel EMA at at_step for each σ_rel] from snapshots [(step, path)], reading each
    snapshot once. at_step (default the last) must be a snapshot's step: a profile reaching past the
    last snapshot covers steps no snapshot has seen, and least squares would extrapolate silently."""
    at_step = at_step or snapshots[-1][0]
    if at_step not in {step for step, _ in snapshots}:
        raise ValueError(f"step {at_step} has no EMA snapshot; choose one of {[step for step, _ in snapshots]}")
    used = [(step, path) for step, path in snapshots if step <= at_step]
    tracked = load(used[0][1])["sigma_rels"]
    snap_t = [step for step, _ in used for _ in tracked]
    snap_sigma = [s for _ in used for s in tracked]
    coef = solve_coefficients(snap_t, snap_sigma, [at_step] * len(sigma_rels), sigma_rels)  # (snapshots, outputs)
    out = [{} for _ in sigma_rels]
    i = 0
    for _, path in used:
        snap = load(path)
        if snap["sigma_rels"] != tracked:
            raise ValueError(f"{path} tracks σ_rel {snap['sigma_rels']}, not {tracked} like the others")
        for avg in snap["averages"]:
            for k, weights in enumerate(out):
                for name, w in avg.items():
                    weights[name] = weights.get(name, 0) + float(coef[i, k]) * w.float()
            i += 1
    return out


def main(argv=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", help="a run's checkpoint folder (with ema/ snapshots)")
    parser.add_argument("--sigma_rels", default="0.01,0.02,0.03,0.05,0.07,0.10,0.15,0.20",
                        help="comma-separated σ_rel to reconstruct and evaluate")
    parser.add_argument("--at_step", type=int, default=0, help="reconstruct the EMA as of this step (default: the last snapshot)")
    parser.add_argument("--data_dir", help="val shards (default: the run's data_dir)")
    parser.add_argument("--val_steps", type=int, default=0, help="val batches (default: the run's val_steps·accum)")
    parser.add_argument("--hellaswag_file", default="", help="also score HellaSwag on this jsonl")
    parser.add_argument("--hellaswag_limit", type=int, default=0)
    parser.add_argument("--device", default="")
    parser.add_argument("--out", default="", help="folder for ema.md/json/png (default: the run's logs folder)")
    parser.add_argument("--save", type=float, help="write this σ_rel's weights as a checkpoint ema_<σ>.pt")
    parser.add_argument("--hf_out", default="", help="with --save: also a Hugging Face folder (as export_hf.py writes)")
    args = parser.parse_args(argv)

    snapshots = list_snapshots(os.path.join(args.checkpoint_dir, "ema"))
    if not snapshots:
        fail(f"no EMA snapshots in {args.checkpoint_dir}/ema: train with --ema_stds and --ema_snapshot_every")
    ckpts = sorted(glob.glob(os.path.join(args.checkpoint_dir, "step_*.pt")))
    if not ckpts:
        fail(f"no checkpoint in {args.checkpoint_dir} to read the run's settings from")
    last = load(ckpts[-1])
    model_config, train = GPTConfig(**last["model_config"]), last["train_config"]
    if load(snapshots[-1][1])["model_config"] != last["model_config"]:
        fail(f"the snapshots in {args.checkpoint_dir}/ema are of another model than {ckpts[-1]}")
    device = args.device or default_device()
    dtype = default_autocast_dtype(device)  # bf16 on recent GPUs, as in training
    at_step = args.at_step or snapshots[-1][0]
    if at_step not in [step for step, _ in snapshots]:
        fail(f"--at_step {at_step}: reconstruct at a snapshot's step, one of {[step for step, _ in snapshots]}")

    try:
        sigmas = [float(s) for s in args.sigma_rels.split(",")]
        for s in sigmas + ([args.save] if args.save is not None else []):
            sigma_rel_to_gamma(s)
    except ValueError as e:
        fail(f"--sigma_rels / --save: {e}")

    model = GPT(model_config).to(device).eval()

    def load_weights(state):
        """Every parameter must come from `state`; only a tied lm_head (it is wte) may be absent."""
        missing, unexpected = model.load_state_dict(state, strict=False)
        allowed = {"lm_head.weight"} if model_config.tie_embeddings else set()
        if unexpected or not set(missing) <= allowed:
            fail(f"the EMA weights do not fit the model: missing {missing}, unexpected {unexpected}")
        # an average of unit-norm rows is shorter than 1, and nGPT's forward reads the norms as stored:
        # back onto the sphere, as training leaves its weights after every step (a no-op without --ngpt/--mp)
        model.renormalize_()

    if args.save is not None:
        if args.hf_out and hf_refusal(model_config):
            fail(f"--hf_out: {hf_refusal(model_config)}")
        load_weights(reconstruct(snapshots, [args.save], at_step)[0])
        path = os.path.join(args.checkpoint_dir, f"ema_{args.save:.3f}.pt")
        with atomic_write(path) as f:
            torch.save({"model": model.state_dict(), "model_config": last["model_config"], "step": at_step,
                        "ema_sigma_rel": args.save}, f)
        print(f"saved the σ_rel {args.save} EMA at step {at_step} to {path}")
        if args.hf_out:
            # as export_hf.py writes it: the model and GPT-2's tokenizer
            model.save_pretrained(args.hf_out, write_extra=lambda d: write_hf_tokenizer(d, model_config.block_size))
            print(f"saved a Hugging Face folder to {args.hf_out}")
        return

    B, T = train["micro_batch_size"], train["seq_len"]
    accum = train["total_batch_size"] // (B * T)
    try:
        loader = DataLoader(args.data_dir or train["data_dir"], "val", B, T)
    except (FileNotFoundError, ValueError) as e:
        fail(f"{e} (point --data_dir at the run's shards)")
    steps = args.val_steps or train["val_steps"] * accum
    examples = hellaswag.load_examples(args.hellaswag_file, limit=args.hellaswag_limit or None) \
        if args.hellaswag_file else None

    @torch.no_grad()
    def evaluate(state):
        load_weights(state)
        loader.reset()
        total = 0.0
        for _ in range(steps):
            x, y = loader.next_batch()
            with hellaswag.autocast(device, dtype):
                total += model(x.to(device), y.to(device))[1].item()
        row = {"val_loss": total / steps}
        if examples is not None:
            row["hellaswag"] = hellaswag.evaluate(model, examples, device=device, autocast_dtype=dtype)["acc_norm"]
        return row

    rows = []
    for s, state in zip(sigmas, reconstruct(snapshots, sigmas, at_step)):
        rows.append({"sigma_rel": s, **evaluate(state)})
        print(f"σ_rel {s:.3f}: val loss {rows[-1]['val_loss']:.4f}")
    raw = [c for c in ckpts if f"step_{at_step:06d}.pt" in c]
    if raw:  # the un-averaged weights of the same step, for comparison
        rows.append({"sigma_rel": 0.0, **evaluate(load(raw[0])["model"])})
        print(f"no EMA: val loss {rows[-1]['val_loss']:.4f}")
    best = min((r for r in rows if r["sigma_rel"]), key=lambda r: r["val_loss"])

    out = args.out or os.path.join(train["log_dir"], os.path.basename(os.path.normpath(args.checkpoint_dir)))
    os.makedirs(out, exist_ok=True)
    lines = [f"Post-hoc EMA at step {at_step} from {len(snapshots)} snapshots of σ_rel "
             f"{', '.join(str(s) for s in load(snapshots[0][1])['sigma_rels'])}; "
             f"val loss over {steps} batches. Best: σ_rel {best['sigma_rel']}.", "",
             "| σ_rel | val loss |" + (" HellaSwag |" if examples else ""),
             "|---|---|" + ("---|" if examples else "")]
    for r in rows:
        lines.append(f"| {r['sigma_rel'] or 'none (raw weights)'} | {r['val_loss']:.4f} |"
                     + (f" {r['hellaswag']:.4f} |" if examples else ""))
    with atomic_write(os.path.join(out, "ema.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with atomic_write(os.path.join(out, "ema.json"), "w") as f:
        json.dump({"at_step": at_step, "snapshots": [s for s, _ in snapshots], "rows": rows}, f, indent=2)
    fig, ax = plt.subplots(figsize=(6, 4))
    swept = [r for r in rows if r["sigma_rel"]]
    ax.plot([r["sigma_rel"] for r in swept], [r["val_loss"] for r in swept], "o-", label="post-hoc EMA")
    if raw:
        ax.axhline(rows[-1]["val_loss"], color="gray", ls="--", label="no EMA")
    ax.set_xscale("log")
    ax.set_xlabel("σ_rel")
    ax.set_ylabel("val loss")
    ax.set_title(f"post-hoc EMA at step {at_step}")
    ax.legend()
    fig.tight_layout()
    with atomic_write(os.path.join(out, "ema.png")) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    print(f"wrote {out}/ema.md, ema.json, ema.png")


if __name__ == "__main__":
    main()
