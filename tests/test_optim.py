"""Muon (optim.py): Newton–Schulz against the SVD, the AdamW half against torch's AdamW, and Muon
through training: DDP, checkpoint → resume, param groups."""

import pytest
import torch

from optim import MatrixOptimizer, describe, manifold_muon_direction, msign, muon_scale, newton_schulz, stiefel_scale
from test_resume import train_and_resume_at_3
from test_train_gpt2 import ROOT, losses_by_step, run_inprocess, tiny_args, torchrun


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (256, 768), (4, 16, 48)])
def test_newton_schulz_singular_values_in_band(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(newton_schulz(G).float())
    assert s.min() > 0.65 and s.max() < 1.2, (s.min(), s.max())


def test_newton_schulz_is_close_to_the_polar_factor():
    """A square matrix with singular values spread over [0.1, 1]: the output's singular vectors are
    the input's, its singular values in the band, i.e. close to U·Vᵀ from the SVD."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    G = U @ torch.diag(torch.linspace(0.1, 1.0, 64)) @ V.T
    X = newton_schulz(G).float()
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.65 and s.max() < 1.2
    polar = U @ V.T
    cos = (X * polar).sum() / (X.norm() * polar.norm())
    assert cos > 0.98


def test_muon_scales_by_hand():
    assert muon_scale((3072, 768), "keller") == 2.0  # √(3072/768)
    assert muon_scale((768, 3072), "keller") == 1.0
    assert muon_scale((768, 3072), "moonlight") == pytest.approx(0.2 * 3072 ** 0.5)


def test_adamw_half_equals_torch_adamw():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = MatrixOptimizer([{"params": [a[0]], "weight_decay": 0.1}, {"params": [a[1]]}], lr=1e-2, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([{"params": [b[0]], "weight_decay": 0.1}, {"params": [b[1]], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)


def test_muon_step_by_hand():
    """Two steps on one matrix: momentum buf = g1, then buf = β·g1 + g2; Nesterov update g + β·buf,
    orthogonalised (checked against the SVD polar factor), times √max(1, rows/cols), times lr."""
    torch.manual_seed(0)
    w0 = torch.randn(48, 16)
    p = torch.nn.Parameter(w0.clone())
    opt = MatrixOptimizer([{"params": [p], "kind": "muon"}], lr=0.1, momentum=0.9)
    g1, g2 = torch.randn(48, 16), torch.randn(48, 16)
    p.grad = g1
    opt.step()
    p.grad = g2
    opt.step()
    buf2 = 0.9 * g1 + g2
    updates = [g1 + 0.9 * g1, g2 + 0.9 * buf2]
    expected = w0 - 0.1 * 3 ** 0.5 * sum(newton_schulz(u) for u in updates)
    torch.testing.assert_close(p.detach(), expected)
    U, _, Vh = torch.linalg.svd(updates[1], full_matrices=False)
    step2 = newton_schulz(updates[1])
    assert (step2 * (U @ Vh)).sum() / (step2.norm() * (U @ Vh).norm()) > 0.95


MUON = ["--optimizer", "muon", "--matrix_lr", "0.05"]


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (64, 64)])
def test_msign_singular_values_are_one(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    if shape[0] == shape[1]:  # a square Gaussian has singular values near 0; a retraction sees near-orthogonal ones
        G = msign(G) + 0.3 * G / shape[0] ** 0.5
    s = torch.linalg.svdvals(msign(G))
    assert (s - 1).abs().max() < 2e-3, (s.min(), s.max())
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(msign(G), U @ Vh, atol=5e-3, rtol=0)


def fit(kind, W0, target, steps=60, lr=0.05):
    """Least squares towards `target` with one matrix on `kind`'s manifold; returns (W, first, last loss)."""
    X = torch.randn(W0.size(1), 256, generator=torch.Generator().manual_seed(1))
    W = torch.nn.Parameter(W0.clone())
    opt = MatrixOptimizer([{"params": [W], "kind": kind}], lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = ((W @ X - target @ X) ** 2).mean()
        losses.append(loss.item())
        W.grad = torch.autograd.grad(loss, W)[0]
        opt.step()
    return W.detach(), losses[0], losses[-1]


def test_sphere_keeps_unit_rows_and_learns():
    g = torch.Generator().manual_seed(0)
    target = torch.nn.functional.normalize(torch.randn(16, 32, generator=g), dim=1)
    W, first, last = fit("sphere", torch.randn(16, 32, generator=g), target)
    torch.testing.assert_close(W.norm(dim=1), torch.ones(16))
    assert last < 0.05 * first


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_manifold_muon_keeps_singular_values_and_learns(shape):
    g = torch.Generator().manual_seed(0)
    s = stiefel_scale(shape)
    target = s * msign(torch.randn(*shape, generator=g))
    W, first, last = fit("manifold_muon", torch.randn(*shape, generator=g), target)
    sv = torch.linalg.svdvals(W)
    assert (sv / s - 1).abs().max() < 5e-3, sv
    assert last < 0.1 * first


def test_manifold_muon_dual_ascent_moves_towards_the_tangent_space():
    """The step's violation of the tangent condition QᵀA + AᵀQ = 0 shrinks with dual steps, while it
    still points along the gradient."""
    g = torch.Generator().manual_seed(0)
    Q = msign(torch.randn(48, 16, generator=g))
    G = torch.randn(48, 16, generator=g)
    G = G / (G.norm() / 4)
    violations = []
    for steps in (0, 5, 50):
        A = manifold_muon_direction(Q, G, steps)
        violations.append((Q.T @ A + A.T @ Q).norm().item())
        assert (G * A).sum() > 0
    assert violations[2] < violations[1] < violations[0]


def test_muon_trains_resumes_and_prints_its_groups(small_shards, tmp_path, capsys):
    common = [*MUON, "--max_steps", "8", "--val_every", "4", "--keep_checkpoints", "0", "--max_lr", "1e-2"]
    losses = train_and_resume_at_3(tmp_path, small_shards, *common)
    out = capsys.readouterr().out
    groups = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  ")}
    assert "transformer.h.*.attn.c_attn.weight" in groups["muon lr×5 wd 0"]  # 0.05 / 1e-2
    assert "transformer.wte.weight" in groups["adamw lr×1 wd 0.1"]
    assert losses[7] < losses[0] - 0.5
    with pytest.raises(SystemExit, match="trained with muon"):
        run_inprocess(tiny_args(tmp_path, small_shards, "ref", "--max_steps", "10"))


def test_matrix_work_split_across_ranks_is_exact(tmp_path):
    """Identical gradients on 3 ranks: the muon/sphere/manifold_muon updates are split and broadcast,
    and every rank ends with exactly the weights one process computes."""
    import os
    import subprocess
    import sys

    from muon_ranks import run

    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                          "tests/muon_ranks.py", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    alone = run()
    for rank in range(3):
        ranked = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(ranked) == len(alone) and all(torch.equal(a, b) for a, b in zip(ranked, alone)), rank


def test_muon_ddp_matches_single_process(small_shards, tmp_path):
    """2 ranks split the orthogonalisations (each matrix done by one rank, then broadcast) and log the
    losses of one process doing them all."""
    args = [*MUON, "--max_steps", "5", "--val_every", "0"]
    torchrun(2, *tiny_args(tmp_path, small_shards, "ddp", *args))
    run_inprocess(tiny_args(tmp_path, small_shards, "single", *args))
    a, b = losses_by_step(tmp_path / "logs" / "ddp"), losses_by_step(tmp_path / "logs" / "single")
    for step in b:
        assert a[step] == pytest.approx(b[step], rel=1e-4), step
    # (the weights are not compared: Newton–Schulz maps even tiny singular values to ~1, so the
    # all-reduce's last-bit differences grow into percent-level ones in weak directions of the update;
    # test_matrix_work_split_across_ranks_is_exact shows the split itself is exact)


@pytest.mark.parametrize("kind", ["sphere", "manifold_muon"])
def test_manifold_optimizers_train_and_resume(small_shards, tmp_path, kind):
    common = ["--optimizer", kind, "--matrix_lr", "0.05", "--max_steps", "8", "--val_every", "4",
              "--keep_checkpoints", "0", "--max_lr", "1e-2"]
    losses = train_and_resume_at_3(tmp_path, small_shards, *common)
    assert losses[7] < losses[0] - 0.5
    w = torch.load(tmp_path / "ckpt" / "ref" / "step_000008.pt", weights_only=True)["model"]["transformer.h.1.mlp.c_fc.weight"]
    if kind == "sphere":
        torch.testing.assert_close(w.norm(dim=1), torch.ones(w.size(0)))
    else:
        sv = torch.linalg.svdvals(w)
        assert (sv / stiefel_scale(w.shape) - 1).abs().max() < 5e-3
    with pytest.raises(SystemExit, match="not with --mp or --ngpt"):
        run_inprocess(tiny_args(tmp_path, small_shards, "mp", "--optimizer", kind, "--mp"))


def test_describe_lists_every_parameter_once():
    from model import GPT, GPTConfig
    from train_gpt2 import parse_args

    cfg = parse_args([*MUON])[0]
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    from optim import build_optimizer

    opt = build_optimizer(model, cfg, "cpu")
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(seen) == len(set(seen))
    assert len(describe(model, opt)) == len(opt.param_groups)


@pytest.mark.parametrize("kind", ["muon", "sphere", "manifold_muon"])
def test_expert_weights_are_treated_as_in_out(kind):
    """MoE experts store (experts, in, out): a matrix optimizer must see each expert as nn.Linear's
    (out, in), so sphere normalises fan-in rows and manifold_muon's scale follows rows/cols."""
    from model import GPT, GPTConfig
    from train_gpt2 import parse_args

    cfg = parse_args(["--optimizer", kind])[0]
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32, mlp="swiglu",
                          moe_experts=4, moe_topk=2, mlp_hidden=40))
    from optim import build_optimizer

    opt = build_optimizer(model, cfg, "cpu")
    moe = model.transformer.h[0].mlp
    assert not any(p is moe.router.weight for g in opt.param_groups if g["kind"] != "adamw" for p in g["params"])
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    x = torch.randn(4096, 32)
    for w in (moe.w_fc, moe.w_proj):  # per expert, used as x @ w
        w = w.detach()
        if kind == "sphere":  # unit fan-in rows: columns of the stored (in, out) slices
            torch.testing.assert_close(w.norm(dim=1), torch.ones(4, w.size(2)))
        elif kind == "manifold_muon":  # unit-RMS outputs for unit-RMS inputs, as a dense layer
            xin = torch.randn(4096, w.size(1))
            for e in range(4):
                assert (xin @ w[e]).pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=0.05)
    del x


def test_resume_uses_this_commands_optimizer_settings(small_shards, tmp_path):
    common = ["--optimizer", "muon", "--max_steps", "4", "--val_every", "0", "--keep_checkpoints", "0"]
    run_inprocess(tiny_args(tmp_path, small_shards, "r", *common, "--checkpoint_every", "2"))
    run_inprocess(tiny_args(tmp_path, small_shards, "r", *common[:-2], "--max_steps", "6", "--muon_momentum", "0.8",
                            "--weight_decay", "0.05", "--keep_checkpoints", "0"))
    state = torch.load(tmp_path / "ckpt" / "r" / "step_000006.pt", weights_only=True)["optimizer"]
    kinds = {g["kind"]: g for g in state["param_groups"]}
    assert kinds["muon"]["momentum"] == 0.8
    assert sorted(g["weight_decay"] for g in state["param_groups"] if g["kind"] == "adamw") == [0.0, 0.05]
