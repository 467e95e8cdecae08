"""nGPT (--ngpt): hand-computed attention and block updates, unit norms through training, resume."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, ScaledVector
from test_model_switches import assert_compiled_equals_eager
from test_resume import train_and_resume_at_3
from test_train_gpt2 import final_weights, tiny_args
from train_gpt2 import parse_args


def ngpt_config(**kw):
    return GPTConfig(**{"block_size": 16, "vocab_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32, "ngpt": True,
                        "pos": "rope", "tie_embeddings": False, **kw})


def test_scaled_vector_starts_at_init_and_learns_faster_by_its_ratio():
    v = ScaledVector(3, 0.05, 1 / 8)
    torch.testing.assert_close(v(), torch.full((3,), 0.05))
    v().sum().backward()
    torch.testing.assert_close(v.param.grad, torch.full((3,), 0.4))  # d value / d param = 0.05 / (1/8)


def test_attention_and_block_by_hand():
    """One block, written out: cosine attention logits × s_qk² × √d, then x moves alpha of the way
    towards each normalised branch output, back onto the sphere."""
    torch.manual_seed(0)
    model = GPT(ngpt_config(n_layer=1))
    block = model.transformer.h[0]
    with torch.no_grad():
        block.attn.s_qk.param.uniform_(0.1, 0.3)
        block.alpha_attn.param.uniform_(0.0, 0.2)
    x = F.normalize(torch.randn(1, 5, 32), dim=-1)
    d, H = 16, 2
    q, k, v = block.attn.c_attn(x).split(32, dim=-1)
    heads = lambda t: t.view(1, 5, H, d).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    cos, sin = block.attn.rope_cos[:5], block.attn.rope_sin[:5]
    rot = lambda t: torch.cat((t[..., :8] * cos - t[..., 8:] * sin, t[..., 8:] * cos + t[..., :8] * sin), -1)  # noqa: E731
    q, k = F.normalize(rot(q), dim=-1), F.normalize(rot(k), dim=-1)
    s_qk = block.attn.s_qk.param * (1.0 / 32 ** -0.5)
    logits = (q * s_qk) @ (k * s_qk).transpose(-1, -2) * math.sqrt(d)
    logits = logits.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -math.inf)
    attn = block.attn.c_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(1, 5, 32))
    torch.testing.assert_close(block.attn(x), attn, rtol=1e-4, atol=1e-5)
    alpha = block.alpha_attn.param * (0.05 / 32 ** -0.5)
    h = F.normalize(x + alpha * (F.normalize(attn, dim=-1) - x), dim=-1)
    mlp = block.mlp(h)
    expected = F.normalize(h + 0.05 * (F.normalize(mlp, dim=-1) - h), dim=-1)  # alpha_mlp at its init
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_starts_on_the_sphere_and_has_no_norms_or_biases():
    model = GPT(ngpt_config())
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("bias") or ".ln_" in n or "wpe" in n for n in names)
    torch.testing.assert_close(model.transformer.wte.weight.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(model.transformer.h[0].attn.c_proj.weight.norm(dim=0), torch.ones(32))
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model.features(x).norm(dim=-1), torch.ones(2, 16))
    with pytest.raises(ValueError, match="ngpt"):
        ngpt_config(pos="learned")


def test_trains_keeps_unit_norms_and_resumes(small_shards, tmp_path):
    common = ["--preset", "ngpt", "--max_steps", "8", "--val_every", "4", "--keep_checkpoints", "0",
              "--max_lr", "1e-1"]
    losses = train_and_resume_at_3(tmp_path, small_shards, *common)
    assert losses[7] < losses[0] - 0.5
    weights = final_weights(tmp_path / "ckpt" / "ref")
    cfg = parse_args(tiny_args(tmp_path, small_shards, "x", *common))[1]
    model = GPT(cfg)
    model.load_state_dict(weights)
    constrained = model._constrained()
    assert len(constrained) == 2 + 4 * 2  # wte, lm_head, 4 matrices a block
    for w, dim in constrained:
        torch.testing.assert_close(w.norm(dim=dim), torch.ones(w.size(1 - dim if dim == 0 else 0)))


def test_ngpt_preset():
    cfg, model_cfg = parse_args(["--preset", "ngpt"])
    assert model_cfg.ngpt and model_cfg.pos == "rope" and not model_cfg.tie_embeddings
    assert cfg.weight_decay == 0 and cfg.warmup_steps == 0


def test_ngpt_compiled_and_bf16_equal_eager_fp32():
    torch.manual_seed(0)
    eager, compiled = GPT(ngpt_config(n_kv_head=1, window=8)), GPT(ngpt_config(n_kv_head=1, window=8))
    x = torch.randint(0, 64, (2, 16))
    loss_e = assert_compiled_equals_eager(eager, compiled, x, grad_atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16 = eager(x, x)[1]
    assert abs(loss_bf16.item() - loss_e.item()) < 0.02
