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


def justnorm(x):
    return x / x.norm(p=2, dim=-1, keepdim=True)


def half_split_rope(x, theta):
    """(B, T, H, d) rotated as model.py's rope does (gpt-oss's half-split pairs, base theta): the one place
    the port below departs from NVIDIA's code, whose rotary embedding pairs neighbouring dimensions with
    base 10,000. The two are the same function class up to a fixed permutation of each head's dimensions."""
    T, d = x.size(1), x.size(-1)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = angle.cos().float()[:, None], angle.sin().float()[:, None]  # (T, 1, d/2)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def nvidia_block(h, w, n_head, theta):
    """NVIDIA/ngpt's model.py Block.forward with use_nGPT=1, ported: separate query/key/value, sqk (one
    value per head and dimension) on both q and k, softmax scale √head_dim, |alpha|, suv·√n_embd on both
    halves of the gated MLP. w holds each parameter's effective value (the stored one × init/scaling)."""
    B, T, C = h.shape
    d = C // n_head
    q, k, v = ((h @ w[name].T).view(B, T, n_head, d) for name in ("query", "key", "value"))
    q, k = half_split_rope(q, theta), half_split_rope(k, theta)
    sqk = w["sqk"].view(1, 1, n_head, d)
    q, k = sqk * justnorm(q), sqk * justnorm(k)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * d ** 0.5
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, C)
    h_att = y @ w["att_c_proj"].T
    lr = w["attn_alpha"].abs()
    h = justnorm(justnorm(h) + lr * (justnorm(h_att) - justnorm(h)))
    uv = (h @ w["c_fc"].T) * (w["suv"] * C ** 0.5)
    u, v = uv.chunk(2, dim=-1)
    h_mlp = (u * F.silu(v)) @ w["mlp_c_proj"].T
    lr = w["mlp_alpha"].abs()
    return justnorm(justnorm(h) + lr * (justnorm(h_mlp) - justnorm(h)))


def set_value(vector, value):
    """Make a ScaledVector's effective value `value`."""
    with torch.no_grad():
        vector.param.copy_(value / vector.ratio)


def test_blocks_and_logits_match_nvidia_ngpt():
    """The whole model against the port of NVIDIA's Block and GPT.forward (logits = lm_head(x) · s_z, no
    final norm), with every learned scale moved off its init: s_qk different per head, alphas of both
    signs, s_u and s_v not 1, s_z per vocabulary entry."""
    torch.manual_seed(0)
    model = GPT(ngpt_config(n_layer=2))
    C, H = 32, 2
    with torch.no_grad():
        set_value(model.s_z, torch.rand(64) + 0.5)
        for block in model.transformer.h:
            set_value(block.attn.s_qk, torch.rand(block.attn.s_qk.param.numel()) + 0.5)
            set_value(block.alpha_attn, torch.rand(C) * 0.4 - 0.2)
            set_value(block.alpha_mlp, torch.rand(C) * 0.4 - 0.2)
            set_value(block.mlp.s_u, torch.rand(block.mlp.s_u.param.numel()) + 0.5)
            set_value(block.mlp.s_v, torch.rand(block.mlp.s_v.param.numel()) + 0.5)
    idx = torch.randint(0, 64, (2, 12))
    h = model.transformer.wte.weight[idx]
    for block in model.transformer.h:
        query, key, value = block.attn.c_attn.weight.split(C)
        w = {"query": query, "key": key, "value": value, "att_c_proj": block.attn.c_proj.weight,
             "sqk": block.attn.s_qk(), "attn_alpha": block.alpha_attn(), "c_fc": block.mlp.c_fc.weight,
             "suv": torch.cat((block.mlp.s_u(), block.mlp.s_v())), "mlp_c_proj": block.mlp.c_proj.weight,
             "mlp_alpha": block.alpha_mlp()}
        h = nvidia_block(h, w, H, model.config.rope_theta)
    logits = (h @ model.lm_head.weight.T) * model.s_z()
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], logits, rtol=1e-4, atol=1e-4)
        # the loss path (linear_cross_entropy from head_weight) scores the same logits
        expected = F.cross_entropy(logits.reshape(-1, 64), idx.reshape(-1))
        torch.testing.assert_close(model(idx, idx)[1], expected, rtol=1e-5, atol=1e-5)


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
    assert cfg.max_lr == 15e-4 and cfg.min_lr_frac == 0  # NVIDIA/ngpt's train.py: learning_rate, min_lr


def test_ngpt_compiled_and_bf16_equal_eager_fp32():
    torch.manual_seed(0)
    eager, compiled = GPT(ngpt_config(n_kv_head=1, window=8)), GPT(ngpt_config(n_kv_head=1, window=8))
    x = torch.randint(0, 64, (2, 16))
    loss_e = assert_compiled_equals_eager(eager, compiled, x, grad_atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16 = eager(x, x)[1]
    assert abs(loss_bf16.item() - loss_e.item()) < 0.02
