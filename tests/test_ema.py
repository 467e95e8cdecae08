"""Post-hoc EMA (ema.py): the power-function profile against the EDM2 paper's figures and hand-derived
discrete weights, reconstruction from snapshots, and the training / CLI round trip."""

import json
import math
import os

import numpy as np
import pytest
import torch

import ema
from checkpoint import load_model
from test_train_gpt2 import events, run_inprocess, tiny_args


def test_sigma_rel_and_gamma_match_the_paper_and_round_trip():
    # EDM2, section 3.1: σ_rel 0.05 is γ = 16.97, σ_rel 0.10 is γ = 6.94
    assert ema.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert ema.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma in (0.01, 0.03, 0.05, 0.1, 0.2, 0.28):
        assert ema.gamma_to_sigma_rel(ema.sigma_rel_to_gamma(sigma)) == pytest.approx(sigma, rel=1e-9)
    for bad in (0.0, 0.29, -0.1):
        with pytest.raises(ValueError, match="sigma_rel"):
            ema.sigma_rel_to_gamma(bad)


def test_beta_formula_by_hand():
    assert ema.ema_beta(1, 6.94) == 0.0  # the first step copies the weights
    assert ema.ema_beta(2, 6.94) == pytest.approx(0.5 ** 7.94)
    assert ema.ema_beta(100, 16.97) == pytest.approx(0.99 ** 17.97)


class Vector(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))


def test_power_ema_weights_each_step_as_derived_by_hand():
    """With β_t = (1 − 1/t)^(γ+1), step τ's weight in the average at step t telescopes to
    (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1): feed one-hot weights and read the profile off the average."""
    t, sigma = 40, 0.1
    model = Vector(t)
    tracker = ema.PowerEMA(model, [sigma])
    for step in range(1, t + 1):
        with torch.no_grad():
            model.w.zero_()
            model.w[step - 1] = 1.0
        tracker.update(model, step)
    g = ema.sigma_rel_to_gamma(sigma)
    expected = [(tau ** (g + 1) - (tau - 1) ** (g + 1)) / t ** (g + 1) for tau in range(1, t + 1)]
    np.testing.assert_allclose(tracker.averages[0]["w"].double().numpy(), expected, rtol=1e-4, atol=1e-7)


def exact_power_average(weights, sigma):
    """The σ EMA at the last step, from the hand-derived per-step weights above (float64)."""
    t, g = len(weights), ema.sigma_rel_to_gamma(sigma)
    coef = np.array([(tau ** (g + 1) - (tau - 1) ** (g + 1)) / t ** (g + 1) for tau in range(1, t + 1)])
    return coef @ np.stack(weights)


def test_reconstruction_from_snapshots(tmp_path):
    """Track σ 0.05 and 0.10 along a random walk of weights, snapshot every 50 of 2000 steps, and
    reconstruct other σ_rel: they match the exact averages computed from the whole sequence, and a
    tracked σ_rel comes back as itself."""
    rng = np.random.default_rng(0)
    steps, n = 2000, 16
    walk = np.cumsum(rng.normal(size=(steps, n)), axis=0) + 5 * np.sin(np.arange(steps) / 300)[:, None]
    model = Vector(n)
    tracker = ema.PowerEMA(model, [0.05, 0.10])
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.w.copy_(torch.tensor(walk[step - 1]))
        tracker.update(model, step)
        if step % 50 == 0:
            ema.save_snapshot(tmp_path, step, tracker, {})
    snaps = ema.list_snapshots(tmp_path)
    assert [s for s, _ in snaps] == list(range(50, 2001, 50))
    spread = walk[steps // 2:].std()
    for sigma in (0.05, 0.07, 0.10, 0.15):
        rebuilt = ema.reconstruct(snaps, [sigma])[0]["w"].double().numpy()
        exact = exact_power_average(list(walk), sigma)
        assert np.abs(rebuilt - exact).max() < 0.02 * spread, sigma
    torch.testing.assert_close(ema.reconstruct(snaps, [0.10])[0]["w"], tracker.averages[1]["w"], rtol=0,
                               atol=0.01 * spread)
    # as of an earlier step, only the snapshots up to it are used
    early = ema.reconstruct(snaps, [0.07], at_step=1000)[0]["w"].double().numpy()
    assert np.abs(early - exact_power_average(list(walk[:1000]), 0.07)).max() < 0.02 * spread
    with pytest.raises(ValueError, match="no EMA snapshot"):  # between snapshots: would extrapolate
        ema.reconstruct(snaps, [0.07], at_step=1010)


def test_coefficients_pick_a_tracked_profile_out():
    """Asking for exactly a tracked profile (σ 0.1 at step 200) puts all the weight on that snapshot."""
    X = ema.solve_coefficients([100, 100, 200, 200], [0.05, 0.1, 0.05, 0.1], [200, 100], [0.1, 0.05])
    np.testing.assert_allclose(X, [[0, 1], [0, 0], [0, 0], [1, 0]], atol=1e-8)


def test_profile_inner_product_by_numerical_integration():
    ga, gb, ta, tb = 3.0, 7.0, 60.0, 100.0
    tau = np.linspace(0, ta, 200001)
    pa = (ga + 1) * tau ** ga / ta ** (ga + 1)
    pb = (gb + 1) * tau ** gb / tb ** (gb + 1)
    numeric = np.trapezoid(pa * pb, tau)
    assert ema.profile_inner_product(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-6)
    assert ema.profile_inner_product(tb, gb, ta, ga) == pytest.approx(numeric, rel=1e-6)


# ---- through training ----

EMA_FLAGS = ["--ema_stds", "0.05,0.10", "--ema_snapshot_every", "4", "--max_steps", "10", "--val_every", "5",
             "--keep_checkpoints", "0"]


def test_training_snapshots_resume_exactly_and_the_cli_sweeps(small_shards, tmp_path):
    run_inprocess(tiny_args(tmp_path, small_shards, "ref", *EMA_FLAGS, "--checkpoint_every", "3"))
    ckpt = tmp_path / "ckpt" / "ref"
    assert [s for s, _ in ema.list_snapshots(ckpt / "ema")] == [4, 8, 10]  # every 4, and the end
    final = torch.load(ckpt / "step_000010.pt", weights_only=True)
    assert final["ema"]["sigma_rels"] == [0.05, 0.10]

    # resumed from step 3 (before the first snapshot), the EMAs and snapshots are the same
    run_inprocess(tiny_args(tmp_path, small_shards, "resumed", *EMA_FLAGS,
                            "--resume", str(ckpt / "step_000003.pt")))
    resumed = torch.load(tmp_path / "ckpt" / "resumed" / "step_000010.pt", weights_only=True)
    for a, b in zip(final["ema"]["averages"], resumed["ema"]["averages"]):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    snap_a = torch.load(ckpt / "ema" / "step_000008.pt", weights_only=True)
    snap_b = torch.load(tmp_path / "ckpt" / "resumed" / "ema" / "step_000008.pt", weights_only=True)
    assert all(torch.equal(snap_a["averages"][1][k], snap_b["averages"][1][k]) for k in snap_a["averages"][1])

    # the sweep: the "no EMA" row is the run's own final val loss, recomputed from the checkpoint
    ema.main([str(ckpt), "--sigma_rels", "0.05,0.1,0.2", "--device", "cpu"])
    out = tmp_path / "logs" / "ref"
    rows = json.loads((out / "ema.json").read_text())["rows"]
    assert [r["sigma_rel"] for r in rows] == [0.05, 0.1, 0.2, 0.0]
    final_val = events(out, "val")[-1]
    assert final_val["step"] == 10 and rows[-1]["val_loss"] == pytest.approx(final_val["val_loss"], rel=1e-5)
    assert all(math.isfinite(r["val_loss"]) for r in rows)
    assert "| 0.05 |" in (out / "ema.md").read_text() and (out / "ema.png").stat().st_size > 0

    # a chosen σ_rel saved as a checkpoint that hellaswag.py / GPT load
    ema.main([str(ckpt), "--save", "0.1", "--device", "cpu", "--hf_out", str(tmp_path / "hf")])
    model = load_model(str(ckpt / "ema_0.100.pt"), "cpu")
    torch.testing.assert_close(model.transformer.h[0].mlp.c_fc.weight,
                               ema.reconstruct(ema.list_snapshots(ckpt / "ema"), [0.1])[0]["transformer.h.0.mlp.c_fc.weight"])
    # and as a Hugging Face folder, with the tokenizer, as export_hf.py writes it
    exported = load_model(str(tmp_path / "hf"), "cpu")
    x = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(exported(x)[0], model(x)[0], rtol=1e-4, atol=1e-4)
    assert (tmp_path / "hf" / "tokenizer.json").exists()

    # a rewind to step 3 with another learning rate: the old future's snapshots go
    old4 = torch.load(ckpt / "ema" / "step_000004.pt", weights_only=True)["averages"][0]
    run_inprocess(tiny_args(tmp_path, small_shards, "ref", *EMA_FLAGS[:4], "--max_steps", "6", "--max_lr", "1e-3",
                            "--resume", str(ckpt / "step_000003.pt")))
    assert [s for s, _ in ema.list_snapshots(ckpt / "ema")] == [4, 6]
    new4 = torch.load(ckpt / "ema" / "step_000004.pt", weights_only=True)["averages"][0]
    assert not torch.equal(new4["transformer.h.0.mlp.c_fc.weight"], old4["transformer.h.0.mlp.c_fc.weight"])


def test_ngpt_ema_is_put_back_on_the_sphere(small_shards, tmp_path):
    """nGPT's forward reads its weights' norms as stored: the averaged weights, whose unit rows average to
    shorter ones, are renormalised before they are evaluated or saved."""
    run_inprocess(tiny_args(tmp_path, small_shards, "ngpt", "--preset", "ngpt", "--max_lr", "1e-1", *EMA_FLAGS))
    ckpt = tmp_path / "ckpt" / "ngpt"
    averaged = ema.reconstruct(ema.list_snapshots(ckpt / "ema"), [0.1])[0]["transformer.wte.weight"]
    assert averaged.norm(dim=1).min() < 1 - 1e-4  # the average left the sphere: the test can tell
    with pytest.raises(SystemExit, match="--hf_out: nGPT's normalised transformer .* no transformers class"):
        ema.main([str(ckpt), "--save", "0.1", "--device", "cpu", "--hf_out", str(tmp_path / "hf")])
    ema.main([str(ckpt), "--save", "0.1", "--device", "cpu"])
    model = load_model(str(ckpt / "ema_0.100.pt"), "cpu")
    for w, dim in model._constrained():
        torch.testing.assert_close(w.norm(dim=dim), torch.ones(w.size(1 - dim % 2)))
    torch.testing.assert_close(model.transformer.wte.weight, averaged / averaged.norm(dim=1, keepdim=True))


def test_ema_bad_input(small_shards, tmp_path):
    with pytest.raises(SystemExit, match="ema_stds"):
        run_inprocess(tiny_args(tmp_path, small_shards, "bad", "--ema_stds", "0.5"))
    with pytest.raises(SystemExit, match="no EMA snapshots"):
        ema.main([str(tmp_path)])
    run_inprocess(tiny_args(tmp_path, small_shards, "plain", "--max_steps", "2", "--checkpoint_every", "1"))
    with pytest.raises(SystemExit, match="EMAs are for --ema_stds \\(none\\)"):
        run_inprocess(tiny_args(tmp_path, small_shards, "plain", "--max_steps", "4", *EMA_FLAGS[:4]))
    with pytest.raises(SystemExit, match="needs both"):
        run_inprocess(tiny_args(tmp_path, small_shards, "half", "--ema_stds", "0.1"))
    assert not os.path.exists(tmp_path / "ckpt" / "bad" / "ema")


def test_ema_under_ddp_equals_single_process(small_shards, tmp_path):
    """Rank 0 alone keeps the EMAs; with 2 ranks they average the same weights as 1 process."""
    from test_train_gpt2 import torchrun

    flags = ["--ema_stds", "0.1", "--ema_snapshot_every", "3", "--max_steps", "6", "--val_every", "0"]
    torchrun(2, *tiny_args(tmp_path, small_shards, "ddp", *flags))
    run_inprocess(tiny_args(tmp_path, small_shards, "single", *flags))
    for step in (3, 6):
        a = torch.load(tmp_path / "ckpt" / "ddp" / "ema" / f"step_{step:06d}.pt", weights_only=True)
        b = torch.load(tmp_path / "ckpt" / "single" / "ema" / f"step_{step:06d}.pt", weights_only=True)
        for name, w in b["averages"][0].items():
            torch.testing.assert_close(a["averages"][0][name], w, rtol=1e-4, atol=1e-5)
