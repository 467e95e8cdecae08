"""EDM2's magnitude preservation (--mp) and the inverse-sqrt schedule: hand-computed values, the
magnitudes it promises, forced weight normalisation through training, resume and DDP."""

import math

import pytest
import torch

from model import GPT, GPTConfig, MPLinear, mp_silu, mp_sum, normalize
from test_model_switches import assert_compiled_equals_eager
from test_resume import train_and_resume_at_3
from test_train_gpt2 import events, final_weights, losses_by_step, run_inprocess, tiny_args, torchrun
from train_gpt2 import TrainConfig, get_lr, parse_args


def mp_config(**kw):
    return GPTConfig(**{"block_size": 32, "vocab_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64, "mp": True, **kw})


def test_mp_functions_by_hand():
    assert mp_sum(torch.tensor(1.0), torch.tensor(3.0), 0.3).item() == pytest.approx((0.7 + 0.9) / math.sqrt(0.58))
    assert mp_silu(torch.tensor(1.0)).item() == pytest.approx(1 / (1 + math.exp(-1)) / 0.596)
    # rows [3, 4] and [0, 2] have RMS √12.5 and √2; eps 1e-4 is added to the RMS
    torch.testing.assert_close(normalize(torch.tensor([[3.0, 4.0], [0.0, 2.0]])),
                               torch.tensor([[3 / (1e-4 + 12.5 ** 0.5), 4 / (1e-4 + 12.5 ** 0.5)],
                                             [0.0, 2 / (1e-4 + 2 ** 0.5)]]))
    # the constants do what they claim on unit-variance Gaussians
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1_000_000, generator=g)
    assert mp_silu(a).pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=0.005)
    assert mp_sum(a, b, 0.3).pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=0.005)


def rms(x):
    return x.pow(2).mean().sqrt().item()


def test_magnitudes_stay_at_one_layer_by_layer_at_init():
    torch.manual_seed(0)
    model = GPT(mp_config(n_layer=12, n_head=12, n_embd=768, block_size=64))  # GPT-2 124M's shape
    x = torch.randn(4, 64, 768)
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            assert rms(block.attn(x)) == pytest.approx(1, abs=0.05), f"layer {i} attention"
            assert rms(block.mlp(x)) == pytest.approx(1, abs=0.05), f"layer {i} MLP"
            out = block(x)
            assert rms(out) == pytest.approx(1, abs=0.05), f"layer {i} output"
            # a stream that drifted in scale is brought back by the block's unit-RMS main path
            torch.testing.assert_close(block(1.5 * x), out, rtol=1e-3, atol=1e-4)
            x = out
        idx = torch.randint(0, 64, (2, 32))
        assert rms(model.features(idx)) == pytest.approx(1, abs=0.05)
        assert model(idx, idx)[1].item() == pytest.approx(math.log(64), abs=1e-6)  # out gain 0: uniform logits


def test_effective_weight_has_unit_row_norms_times_gain():
    layer = MPLinear(48, 16)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(16, 1) * 5 + 0.5)  # stored rows of other lengths
        effective = layer(torch.eye(48)).t()  # row j: the weights output j applies
        row_rms = layer.weight.pow(2).mean(dim=1).sqrt()
        expected = row_rms / (1e-4 + row_rms)  # unit L2 norm, but for normalize's eps
        torch.testing.assert_close(effective.norm(dim=1), expected)
        torch.testing.assert_close(layer(torch.eye(48), gain=3.0).t().norm(dim=1), 3 * expected)


def test_forced_weight_norm_through_training(small_shards, tmp_path):
    run_inprocess(tiny_args(tmp_path, small_shards, "mp", "--mp", "--max_steps", "6", "--max_lr", "3e-1",
                            "--val_every", "3", "--keep_checkpoints", "0"))
    weights = final_weights(tmp_path / "ckpt" / "mp")
    model = GPT(parse_args(tiny_args(tmp_path, small_shards, "x", "--mp"))[1])
    model.load_state_dict(weights)
    names = {id(p): n for n, p in model.named_parameters()}
    normalized = model.normalized_params()
    assert len(normalized) == 2 * 4 + 2  # 4 MP linears a block, wte, wpe
    for p in normalized:
        row_rms = p.pow(2).mean(dim=1).sqrt()
        assert torch.allclose(row_rms, torch.ones_like(row_rms), atol=1e-3), names[id(p)]
    assert weights["out_gain"].item() != 0  # learned
    losses = losses_by_step(tmp_path / "logs" / "mp")
    assert losses[5] < losses[0] - 0.3


def test_mp_optimizer_groups_and_config_checks():
    model = GPT(mp_config())
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == set()  # every matrix is forced-normalised: nothing left to decay
    plain = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=64))
    assert plain.normalized_params() == []
    with pytest.raises(ValueError, match="mp replaces"):
        mp_config(norm="rmsnorm")
    with pytest.raises(ValueError, match="mp replaces"):
        mp_config(sinks=True)


def test_inverse_sqrt_schedule_by_hand():
    cfg = TrainConfig(max_lr=1e-2, warmup_steps=10, lr_schedule="inv_sqrt", max_steps=1000)
    assert get_lr(0, cfg) == pytest.approx(1e-3)  # warmup as before
    assert get_lr(10, cfg) == pytest.approx(1e-2)
    assert get_lr(40, cfg) == pytest.approx(1e-2 / 2)  # √(40/10) = 2
    assert get_lr(1000, cfg) == pytest.approx(1e-3)  # √100 = 10, and no end point
    cfg = TrainConfig(max_lr=1e-2, warmup_steps=10, lr_schedule="inv_sqrt", lr_ref_steps=100)
    assert get_lr(50, cfg) == pytest.approx(1e-2) and get_lr(400, cfg) == pytest.approx(5e-3)


def test_edm2_preset():
    cfg, model_cfg = parse_args(["--preset", "edm2"])
    assert model_cfg.mp and cfg.beta2 == 0.99 and cfg.weight_decay == 0 and cfg.lr_schedule == "inv_sqrt"
    with pytest.raises(SystemExit, match="lr_schedule"):
        run_inprocess(["--lr_schedule", "linear", "--data_dir", "nowhere"])


def test_mp_resumes_exactly(small_shards, tmp_path):
    common = ["--preset", "edm2", "--pos", "rope", "--max_steps", "8", "--val_every", "4", "--keep_checkpoints", "0",
              "--max_lr", "1e-2"]
    train_and_resume_at_3(tmp_path, small_shards, *common)


def test_mp_ddp_matches_single_process(small_shards, tmp_path):
    """The renormalisation runs on every rank after the step: 2 ranks keep identical weights, so they
    log the losses and end with the weights of one process doing both halves of the batch."""
    args = ["--mp", "--max_steps", "6", "--val_every", "3", "--max_lr", "1e-2"]
    torchrun(2, *tiny_args(tmp_path, small_shards, "ddp", *args))
    run_inprocess(tiny_args(tmp_path, small_shards, "single", *args))
    a, b = losses_by_step(tmp_path / "logs" / "ddp"), losses_by_step(tmp_path / "logs" / "single")
    assert sorted(a) == sorted(b)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step
    assert len(events(tmp_path / "logs" / "ddp", "val")) == 3
    for k, v in final_weights(tmp_path / "ckpt" / "single").items():
        torch.testing.assert_close(final_weights(tmp_path / "ckpt" / "ddp")[k], v, rtol=1e-4, atol=1e-5)


def test_mp_compiled_equals_eager():
    torch.manual_seed(0)
    config = mp_config(pos="rope", n_kv_head=2, window=8)
    eager, compiled = GPT(config), GPT(config)
    with torch.no_grad():
        eager.out_gain.fill_(0.5)  # gain 0 would zero every gradient but its own
    assert_compiled_equals_eager(eager, compiled, torch.randint(0, 64, (2, 32)), grad_atol=1e-6)


def test_mp_under_bf16_autocast():
    """Branches come back in bf16 while the stream is fp32: the sums must still work, and match fp32."""
    torch.manual_seed(0)
    model = GPT(mp_config(pos="rope"))
    with torch.no_grad():
        model.out_gain.fill_(0.5)
    x = torch.randint(0, 64, (2, 32))
    ref = model(x, x)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, x)[1]
    loss.backward()
    assert abs(loss.item() - ref.item()) < 0.02 and model.out_gain.grad is not None
