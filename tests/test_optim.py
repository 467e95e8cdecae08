"""Muon (optim.py): Newton–Schulz against the SVD, the AdamW half against torch's AdamW, and Muon
through training: DDP, checkpoint → resume, param groups."""

import pytest
import torch

from optim import MuonWithAdamW, describe, muon_scale, newton_schulz
from test_resume import assert_same_run, assert_same_weights
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
    ours = MuonWithAdamW([{"params": [a[0]], "weight_decay": 0.1}, {"params": [a[1]]}], lr=1e-2, betas=(0.9, 0.95))
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
    opt = MuonWithAdamW([{"params": [p], "use_muon": True}], lr=0.1, momentum=0.9)
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


MUON = ["--optimizer", "muon", "--muon_lr", "0.05"]


def test_muon_trains_resumes_and_prints_its_groups(small_shards, tmp_path, capsys):
    common = [*MUON, "--max_steps", "8", "--val_every", "4", "--keep_checkpoints", "0", "--max_lr", "1e-2"]
    run_inprocess(tiny_args(tmp_path, small_shards, "ref", *common, "--checkpoint_every", "3"))
    out = capsys.readouterr().out
    groups = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  ")}
    assert "transformer.h.*.attn.c_attn.weight" in groups["muon lr×5 wd 0"]  # 0.05 / 1e-2
    assert "transformer.wte.weight" in groups["adamw lr×1 wd 0.1"]
    losses = losses_by_step(tmp_path / "logs" / "ref")
    assert losses[7] < losses[0] - 0.5
    run_inprocess(tiny_args(tmp_path, small_shards, "resumed", *common,
                            "--resume", str(tmp_path / "ckpt" / "ref" / "step_000003.pt")))
    assert_same_run(tmp_path / "logs" / "ref", tmp_path / "logs" / "resumed", 3)
    assert_same_weights(tmp_path / "ckpt" / "ref", tmp_path / "ckpt" / "resumed")
    with pytest.raises(SystemExit, match="trained with muon"):
        run_inprocess(tiny_args(tmp_path, small_shards, "ref", "--max_steps", "10"))


def test_muon_split_across_ranks_is_exact(tmp_path):
    """Identical gradients on 3 ranks: the orthogonalisations are split and broadcast, and every rank
    ends with exactly the weights one process computes."""
    import os
    import subprocess
    import sys

    from muon_ranks import run

    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                          "tests/muon_ranks.py", str(tmp_path / "w.pt")], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    for a, b in zip(torch.load(tmp_path / "w.pt"), run()):
        assert torch.equal(a, b)


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
    # test_muon_split_across_ranks_is_exact shows the split itself is exact)


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
