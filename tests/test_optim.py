"""Muon (optim.py): Newton–Schulz against the SVD, the AdamW half against torch's AdamW, and Muon
through training: DDP, checkpoint → resume, param groups."""

import pytest
import torch

from optim import (MATRIX_KINDS, MatrixOptimizer, describe, manifold_muon_direction, msign, muon_scale, newton_schulz,
                   stiefel_scale)
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


@pytest.mark.parametrize("fused_ref", [None, True])  # torch's default on the CPU (a loop), and its fused kernel
def test_adamw_half_equals_torch_adamw(fused_ref):
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s)) for s in [(5, 3), (7, 4), (4,), (3,)]]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = MatrixOptimizer([{"params": a[:2], "weight_decay": 0.1}, {"params": a[2:]}], lr=1e-2, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([{"params": b[:2], "weight_decay": 0.1}, {"params": b[2:], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=fused_ref)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(ours.state[p][key], ref.state[q][key], rtol=0, atol=1e-6)


def test_state_dict_resumes_exactly():
    """Muon's and AdamW's state through state_dict → torch.save → load_state_dict into a new optimizer: the
    same steps as never stopping. The format is the one checkpoints have always had (a momentum per
    matrix; step, exp_avg, exp_avg_sq per AdamW tensor, step a float32 scalar: on the CPU for CPU weights)."""
    import io

    shapes = [(8, 16), (8, 16), (16,)]
    grads = [[torch.randn(s, generator=torch.Generator().manual_seed(i)) for s in shapes] for i in range(4)]

    def run(steps, state=None):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = MatrixOptimizer([{"params": params[:2], "kind": "muon"}, {"params": params[2:]}], lr=0.05)
        if state:
            with torch.no_grad():
                for p, w in zip(params, state["model"]):
                    p.copy_(w)
            opt.load_state_dict(state["optimizer"])
        for g in steps:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        return params, opt

    params, opt = run(grads[:2])
    state = opt.state_dict()
    adam = ["exp_avg", "exp_avg_sq", "step"]
    assert [sorted(s) for s in state["state"].values()] == [["momentum"], ["momentum"], adam]
    assert state["state"][2]["step"].dtype == torch.float32 and state["state"][2]["step"].device.type == "cpu"
    buffer = io.BytesIO()
    torch.save({"model": [p.detach() for p in params], "optimizer": state}, buffer)
    buffer.seek(0)
    resumed, _ = run(grads[2:], torch.load(buffer, weights_only=True))
    for p, q in zip(resumed, run(grads)[0]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("per_call", [None, 2])  # whole stacks (the CPU's choice for small matrices), and 2 + 1
def test_stacked_step_equals_one_matrix_at_a_time(per_call, monkeypatch):
    """A group's same-shape matrices go through batched calls; the same matrices each in a group of its
    own (a stack of one, as before stacking) end with the same weights and momentum, for every kind, tall
    and wide, a batch of experts stored (experts, in, out), and a GQA c_attn's q, k and v blocks."""
    import optim

    if per_call:
        monkeypatch.setattr(optim, "matrices_per_call", lambda shape, device_type: per_call)
    shapes = [(16, 32), (48, 16), (16, 32), (48, 16), (16, 32), (2, 12, 8), (2, 12, 8), (64, 32)]
    for kind in MATRIX_KINDS:
        runs = []
        for stacked in (True, False):
            torch.manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
            for p in params[5:7]:
                p.IN_OUT = True
            params[7].ROW_BLOCKS = (32, 16, 16)
            hyper = {"kind": kind, "weight_decay": 0.1}
            groups = [{"params": params, **hyper}] if stacked else [{"params": [p], **hyper} for p in params]
            opt = MatrixOptimizer(groups, lr=0.05, momentum=0.9, dual_steps=2)
            g = torch.Generator().manual_seed(1)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
            runs.append([(p.detach(), opt.state[p]["momentum"]) for p in params])
        for (w, m), (w1, m1) in zip(*runs):
            torch.testing.assert_close(w, w1, msg=kind)
            torch.testing.assert_close(m, m1, msg=kind)


def test_matrices_per_call():
    """Whole stacks on a GPU; on the CPU, stacks of at most 2**20 elements (a 124M model's matrices one by
    one, the cpu-proxy's 128-wide ones all together), never none."""
    from optim import matrices_per_call

    assert matrices_per_call((3072, 768), "cuda") >= 48
    assert [matrices_per_call(s, "cpu") for s in [(3072, 768), (768, 768), (128, 512), (4, 128, 128)]] == [1, 1, 16, 16]


def test_weights_without_gradients_are_left_alone():
    """A weight with no gradient this step (unused, frozen) is neither stepped nor given state, even when
    none of its group has one."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(8, 8), (8, 8), (4, 4), (8,), (3,)]]
    before = [p.detach().clone() for p in params]
    opt = MatrixOptimizer([{"params": params[:2], "kind": "muon"}, {"params": params[2:3], "kind": "muon"},
                           {"params": params[3:4]}, {"params": params[4:]}], lr=0.1)
    params[0].grad, params[3].grad = torch.randn(8, 8), torch.randn(8)
    opt.step()
    assert [not torch.equal(p, b) for p, b in zip(params, before)] == [True, False, False, True, False]
    assert [p in opt.state for p in params] == [True, False, False, True, False]


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


@pytest.fixture
def fp32_newton_schulz(monkeypatch):
    """Newton–Schulz in fp32, ours and torch.optim.Muon's (which casts to bf16 by name), so the two can agree
    to float precision: in bf16 their different rounding alone differs by ~2% after a few steps."""
    import functools

    import optim
    import torch.optim._muon as torch_muon

    class Fp32Torch:
        bfloat16 = torch.float32

        def __getattr__(self, name):
            return getattr(torch, name)

    monkeypatch.setattr(torch_muon, "torch", Fp32Torch())
    monkeypatch.setattr(optim, "newton_schulz", functools.partial(newton_schulz, dtype=torch.float32))


TORCH_SCALE = {"keller": "original", "moonlight": "match_rms_adamw"}  # torch.optim.Muon's adjust_lr_fn


@pytest.mark.parametrize("scale", ["keller", "moonlight"])
@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32), (2, 16, 48)])  # tall, wide, square, experts
def test_muon_equals_torch_muon(shape, scale, fp32_newton_schulz):
    """Three steps of ours against torch.optim.Muon: Keller's coefficients, momentum 0.95, Nesterov, decoupled
    weight decay, either scaling rule. torch keeps an EMA of the gradients where we keep their sum: the
    same direction, which Newton–Schulz normalises away. (2, 16, 48) is a batch of experts stored
    (experts, in, out): torch steps each expert's (out, in) = (48, 16) matrix, a tall one, so a scale taken
    from the stored orientation (wide, keller 1 instead of √3) fails here."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) for _ in range(3)]
    experts = len(shape) == 3
    out_in = (lambda t: list(t.mT)) if experts else (lambda t: [t])  # what torch sees: 2-D (out, in) matrices
    p = torch.nn.Parameter(w0.clone())
    p.IN_OUT = experts
    ours = MatrixOptimizer([{"params": [p], "kind": "muon", "weight_decay": 0.1}], lr=0.05, scale=scale)
    refs = [torch.nn.Parameter(w.clone()) for w in out_in(w0)]
    torch_opt = torch.optim.Muon(refs, lr=0.05, weight_decay=0.1, momentum=0.95, nesterov=True,
                                 adjust_lr_fn=TORCH_SCALE[scale])
    for grad in grads:
        p.grad = grad.clone()
        for q, gq in zip(refs, out_in(grad)):
            q.grad = gq.clone()
        ours.step()
        torch_opt.step()
    for w, q in zip(out_in(p.detach()), refs):
        torch.testing.assert_close(w, q.detach(), rtol=0, atol=2e-6)


def test_muon_in_bf16_is_close_to_torch_muon():
    """The default, bf16 Newton–Schulz on both sides: the same update up to rounding (measured ~2%)."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(48, 16, generator=g)
    p, q = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = MatrixOptimizer([{"params": [p], "kind": "muon"}], lr=0.05)
    ref = torch.optim.Muon([q], lr=0.05, weight_decay=0.0, adjust_lr_fn="original")
    for _ in range(3):
        p.grad = torch.randn(48, 16, generator=g)
        q.grad = p.grad.clone()
        ours.step()
        ref.step()
    assert ((p - q).norm() / (q - w0).norm()).item() < 0.05


def gqa_model(n_head=4, n_kv_head=2, n_embd=32):
    from model import GPT, GPTConfig

    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd))


@pytest.mark.parametrize("scale", ["keller", "moonlight"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])  # (n_head, n_kv_head): MHA, GQA, MQA
def test_muon_orthogonalises_q_k_and_v_apart(heads, scale, fp32_newton_schulz):
    """c_attn's update is the row-concatenation of q's, k's and v's, each stepped by torch.optim.Muon as a
    matrix of its own (its own Newton–Schulz, its own shape's scale); with GQA k and v have fewer rows.
    Fused, keller would scale the whole tall matrix by √(rows/32), moonlight by 0.2·√rows."""
    from optim import build_optimizer
    from train_gpt2 import parse_args

    n_head, n_kv_head = heads
    model = gqa_model(n_head, n_kv_head)
    cfg = parse_args(["--optimizer", "muon", "--muon_scale", scale])[0]
    opt = build_optimizer(model, cfg, "cpu")
    c_attn = model.transformer.h[0].attn.c_attn.weight
    (group,) = [g for g in opt.param_groups if any(p is c_attn for p in g["params"])]
    group["lr"] = 0.05
    rows = [32, 8 * n_kv_head, 8 * n_kv_head]  # head_dim 8
    blocks = [torch.nn.Parameter(b.detach().clone()) for b in c_attn.split(rows)]
    ref = torch.optim.Muon(blocks, lr=0.05, weight_decay=group["weight_decay"], adjust_lr_fn=TORCH_SCALE[scale])
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        for b, gb in zip(blocks, c_attn.grad.split(rows)):
            b.grad = gb.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(c_attn.detach(), torch.cat([b.detach() for b in blocks]), rtol=0, atol=2e-6)


def keller_newton_schulz(G, steps=5, eps=1e-7):
    """Keller Jordan's zeropower_via_newtonschulz5 (KellerJordan/Muon, muon.py) for one matrix, in bf16."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    if G.size(0) > G.size(1):
        X = X.T
    X = X / (X.norm() + eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if G.size(0) > G.size(1) else X).float()


def test_split_gives_q_k_and_v_updates_of_one_size():
    """The issue's figure, n_embd 256: with ‖G_q‖/‖G_v‖ = ‖G_k‖/‖G_v‖ = 0.01, Newton–Schulz on the fused
    (768, 256) matrix (keller's √3) gives q and k updates of RMS ~0.0066 and v's 0.098: v's gradient takes
    the spectrum. Muon's update instead has the RMS of one orthogonalised (256, 256) block, ~0.057, in each."""
    from optim import build_optimizer
    from train_gpt2 import parse_args

    model = gqa_model(n_head=4, n_kv_head=4, n_embd=256)
    opt = build_optimizer(model, parse_args(["--optimizer", "muon"])[0], "cpu")
    c_attn = model.transformer.h[0].attn.c_attn.weight
    g = torch.Generator().manual_seed(0)
    G = torch.cat([0.01 * torch.randn(256, 256, generator=g), 0.01 * torch.randn(256, 256, generator=g),
                   torch.randn(256, 256, generator=g)])
    for group in opt.param_groups:
        group["lr"] = 1.0
    c_attn.grad = G.clone()
    before = c_attn.detach().clone()
    opt.step()
    rms = [u.pow(2).mean().sqrt().item() for u in (before - c_attn.detach()).split(256)]
    assert rms == pytest.approx([0.057] * 3, abs=0.002)
    fused = [u.pow(2).mean().sqrt().item() for u in (3 ** 0.5 * keller_newton_schulz(G)).split(256)]
    assert fused == pytest.approx([0.0066, 0.0066, 0.098], abs=0.001)


@pytest.mark.parametrize("kind", MATRIX_KINDS)
def test_fused_blocks_step_as_separate_matrices(kind):
    """A weight with ROW_BLOCKS (GQA's c_attn: 32, 16 and 16 rows) ends as three separate weights do: for muon
    and manifold_muon each block has its own Newton–Schulz / Stiefel manifold (each block's singular
    values at its own scale, the whole's not); for sphere, row by row, splitting changes nothing."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 32, generator=g)
    fused = torch.nn.Parameter(w0.clone())
    fused.ROW_BLOCKS = (32, 16, 16)
    apart = [torch.nn.Parameter(b.clone()) for b in w0.split([32, 16, 16])]
    opts = [MatrixOptimizer([{"params": ps, "kind": kind, "weight_decay": 0.1}], lr=0.05, dual_steps=2)
            for ps in ([fused], apart)]
    for _ in range(3):
        fused.grad = torch.randn(64, 32, generator=g)
        for b, gb in zip(apart, fused.grad.split([32, 16, 16])):
            b.grad = gb.clone()
        for opt in opts:
            opt.step()
    torch.testing.assert_close(fused.detach(), torch.cat([b.detach() for b in apart]))
    if kind == "manifold_muon":
        for b in fused.detach().split([32, 16, 16]):
            assert (torch.linalg.svdvals(b) - 1).abs().max() < 5e-3
        assert (torch.linalg.svdvals(fused.detach()) - stiefel_scale((64, 32))).abs().max() > 0.1


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
    """Identical gradients on 3 ranks: each shape's stack of muon/sphere/manifold_muon matrices (a fused
    c_attn's blocks among them) is split (one rank with none of a shape) and all-gathered, one collective
    per shape and step; the ranks update similar shares and end with identical weights, the ones one
    process computes."""
    import os
    import subprocess
    import sys

    from muon_ranks import SHAPES, STEPS, run

    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                          "tests/muon_ranks.py", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    alone = run()
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(3)]
    for rank, saved in enumerate(ranks):
        assert len(saved["weights"]) == len(alone) == len(SHAPES), rank
        for i, (a, b) in enumerate(zip(saved["weights"], alone)):
            assert torch.equal(a, ranks[0]["weights"][i]), (rank, i)  # every rank the same, to the bit
            torch.testing.assert_close(a, b)  # and one process's result (its stacks are taller)
        # 7 shapes (5 muon, 1 sphere, 1 manifold_muon): one all-gather each per step, no other collective
        collectives = {k: v for k, v in saved["counts"].items() if k != "matrices"}
        assert collectives == {"all_gather_into_tensor": 7 * STEPS}, (rank, collectives)
    shares = [saved["counts"].get("matrices", 0) for saved in ranks]  # 14 matrices a step (c_attn is 3): 5, 5, 4
    assert sum(shares) == 14 * STEPS and max(shares) - min(shares) <= STEPS, shares


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
