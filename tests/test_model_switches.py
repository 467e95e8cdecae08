"""The gpt-oss switches of model.py, each against an independent reference, and through training."""

import math

import pytest
import torch
from torch.nn import functional as F

from model import (GPT, MLP, GPTConfig, MoE, RMSNorm, apply_rope, flex_attention, reference_attention, rope_cache,
                   sdpa_attention, visible)
from train_gpt2 import parse_args
from test_resume import train_and_resume_at_3
from test_train_gpt2 import events


def small(**switches):
    return GPTConfig(**{"block_size": 16, "vocab_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 32, **switches})


def test_rmsnorm_hand_computed():
    norm = RMSNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    rms = math.sqrt((1 + 4 + 9 + 16) / 4 + 1e-5)
    expected = torch.tensor([[1 / rms, 2 * 2 / rms, 0.5 * 3 / rms, 4 / rms]])
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.to(torch.bfloat16)).dtype == torch.bfloat16  # computed in fp32, returned as given


def test_clamped_swiglu_hand_computed():
    mlp = MLP(GPTConfig(n_embd=2, n_head=1, mlp="swiglu", mlp_hidden=2))
    with torch.no_grad():  # c_fc: identity-like, so h = [g0, u0, g1, u1] = [x0, x1, 10, -10]
        mlp.c_fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
        mlp.c_fc.bias.copy_(torch.tensor([0.0, 0.0, 10.0, -10.0]))
        mlp.c_proj.weight.copy_(torch.eye(2))
        mlp.c_proj.bias.zero_()
    x = torch.tensor([[0.5, -2.0]])
    g0, u0 = 0.5, -2.0
    g1, u1 = 7.0, -7.0  # clamped: gate at most 7, up within ±7
    swish = lambda g: g / (1 + math.exp(-1.702 * g))  # noqa: E731
    expected = torch.tensor([[swish(g0) * (u0 + 1), swish(g1) * (u1 + 1)]])
    torch.testing.assert_close(mlp(x), expected)


def test_swiglu_keeps_gpt2_parameter_count():
    assert GPT(GPTConfig(mlp="swiglu")).num_params() == pytest.approx(GPT(GPTConfig()).num_params(), rel=1e-3)


def test_rope_rotates_pairs_by_hand():
    # head_dim 4: dims (0, 2) turn by t·θ^0 = t, dims (1, 3) by t·θ^(-1/2)
    cos, sin = rope_cache(4, 8, theta=100.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4).expand(1, 1, 3, 4)
    out = apply_rope(x, cos, sin)
    for t in range(3):
        a, b = t * 1.0, t * 100 ** -0.5
        expected = [1 * math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
                    3 * math.cos(a) + 1 * math.sin(a), 4 * math.cos(b) + 2 * math.sin(b)]
        torch.testing.assert_close(out[0, 0, t], torch.tensor(expected))


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    cos, sin = rope_cache(8, 64, theta=150000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    T = 40
    seq_q, seq_k = q.expand(1, 1, T, 8), k.expand(1, 1, T, 8)
    rq, rk = apply_rope(seq_q, cos, sin), apply_rope(seq_k, cos, sin)
    scores = (rq[0, 0] @ rk[0, 0].T)  # scores[i, j]: q at position i, k at position j
    for offset in (1, 7, 20):  # shifting both positions by the same offset leaves the score unchanged
        torch.testing.assert_close(scores[3 + offset, 1 + offset], scores[3, 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scores[10 + offset, 10 + offset], scores[10, 10], rtol=1e-5, atol=1e-5)


def test_rope_model_has_no_wpe():
    model = GPT(small(pos="rope"))
    assert not hasattr(model.transformer, "wpe") and "transformer.wpe.weight" not in model.state_dict()
    assert model.num_params() == model.num_params(non_embedding=False)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """Grouped-query attention is multi-head attention whose key/value heads are shared: build the MHA
    model with each kv head's weights copied to the query heads it serves, and compare."""
    torch.manual_seed(0)
    gqa = GPT(small(n_kv_head=2)).eval()
    mha = GPT(small()).eval()
    sd = gqa.state_dict()
    d, hd, groups = 32, 8, 2  # 4 query heads share 2 kv heads: each kv head serves 2 query heads
    for i, block in enumerate(mha.transformer.h):
        w, b = sd[f"transformer.h.{i}.attn.c_attn.weight"], sd[f"transformer.h.{i}.attn.c_attn.bias"]
        wq, wk, wv = w.split([d, 2 * hd, 2 * hd])
        bq, bk, bv = b.split([d, 2 * hd, 2 * hd])
        rep = lambda t: t.view(2, hd, *t.shape[1:]).repeat_interleave(groups, dim=0).reshape(d, *t.shape[1:])  # noqa: E731
        sd[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([wq, rep(wk), rep(wv)])
        sd[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat([bq, rep(bk), rep(bv)])
    mha.load_state_dict(sd)
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(gqa(x)[0], mha(x)[0], rtol=1e-5, atol=1e-5)
    assert gqa.transformer.h[0].attn.c_attn.weight.shape == (32 + 2 * 2 * 8, 32)


def attention_by_hand(attn, x, allowed):
    """A layer's attention written out: q, k and v from c_attn's weights, each key/value head repeated
    (repeat_interleave) for the n_head / n_kv_head query heads it serves, softmax over the keys
    allowed[i][j] lets query i see, then c_proj."""
    B, T, C = x.shape
    H, H_kv, d = attn.n_head, attn.n_kv_head, C // attn.n_head
    q, k, v = F.linear(x, attn.c_attn.weight, attn.c_attn.bias).split([C, H_kv * d, H_kv * d], dim=-1)
    q = q.view(B, T, H, d).transpose(1, 2)
    k, v = (t.view(B, T, H_kv, d).transpose(1, 2).repeat_interleave(H // H_kv, dim=1) for t in (k, v))
    scores = (q @ k.mT / math.sqrt(d)).masked_fill(~torch.tensor(allowed), -math.inf)
    return attn.c_proj((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, C))


IMPLS = [pytest.param("flex", marks=pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")),
         "sdpa", "reference"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_gqa_layer_equals_mha_with_kv_heads_repeated_by_hand(impl, n_kv_head):
    """4 query heads over fewer key/value heads: plain multi-head attention in which query head h uses
    key/value head h // (4 / n_kv_head), built from the same weights."""
    torch.manual_seed(0)
    attn = GPT(small(n_kv_head=n_kv_head, attn_impl=impl)).transformer.h[0].attn
    x = torch.randn(2, 16, 32)
    causal = [[j <= i for j in range(16)] for i in range(16)]
    with torch.no_grad():
        torch.testing.assert_close(attn(x), attention_by_hand(attn, x, causal), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window", [1, 4, 15])  # T = 16: each window hides keys
def test_windowed_layer_equals_a_hand_built_band(impl, window):
    """A windowed (even) layer: query i sees key j iff i − window < j ≤ i, with GQA."""
    torch.manual_seed(0)
    attn = GPT(small(window=window, n_kv_head=2, attn_impl=impl)).transformer.h[0].attn
    assert attn.window == window
    x = torch.randn(2, 16, 32)
    band = [[i - window < j <= i for j in range(16)] for i in range(16)]
    with torch.no_grad():
        torch.testing.assert_close(attn(x), attention_by_hand(attn, x, band), rtol=1e-5, atol=1e-5)


def test_untied_embeddings_and_no_qkv_bias():
    model = GPT(small(tie_embeddings=False, qkv_bias=False))
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.transformer.h[0].attn.c_attn.bias is None
    # the output layer counts as compute, the wte lookup does not
    assert model.num_params() == model.num_params(non_embedding=False) - 64 * 32 - 16 * 32


def test_bad_switch_values():
    with pytest.raises(ValueError, match="norm must be one of"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=12, n_kv_head=5)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=12, n_kv_head=-1)
    with pytest.raises(ValueError, match="swiglu"):
        GPTConfig(moe_experts=4)
    with pytest.raises(ValueError, match="needs --moe_experts"):
        GPTConfig(moe_aux_loss=0.01)
    with pytest.raises(ValueError, match="GPT-2"):
        GPT(small(norm="rmsnorm")).save_pretrained("/tmp/never-written")


# ---- sliding window and sinks ----

def qkv(B=2, H=4, H_kv=2, T=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, d, generator=g), torch.randn(B, H_kv, T, d, generator=g),
            torch.randn(B, H_kv, T, d, generator=g))


def explicit_attention(q, k, v, allowed, sinks=None):
    """Written out one query at a time: softmax over the allowed keys plus the sink logit, by exp/sum."""
    B, H, T, d = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kh = h * k.size(1) // H  # the kv head this query head uses
            for i in range(T):
                keys = [j for j in range(T) if allowed[i][j]]
                logits = torch.stack([q[b, h, i] @ k[b, kh, j] / math.sqrt(d) for j in keys])
                extra = sinks[h].exp() if sinks is not None else 0.0
                w = logits.exp() / (logits.exp().sum() + extra)
                out[b, h, i] = sum(w[n] * v[b, kh, j] for n, j in enumerate(keys))
    return out


def test_window_mask_matches_hand_built_band():
    T, W = 7, 3
    hand = [[i - W < j <= i for j in range(T)] for i in range(T)]
    assert visible(T, W).tolist() == hand
    assert visible(T, 0).tolist() == [[j <= i for j in range(T)] for i in range(T)]
    assert visible(T, 1).tolist() == [[j == i for j in range(T)] for i in range(T)]  # only itself


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("attend", [reference_attention, sdpa_attention, flex_attention],
                         ids=["reference", "sdpa", "flex"])
@pytest.mark.parametrize("window,use_sinks", [(0, False), (4, False), (0, True), (4, True)])
def test_attention_paths_equal_explicit_softmax(attend, window, use_sinks):
    """Every path, against a softmax written out per query with the band and the extra sink column."""
    q, k, v = qkv()
    T = q.size(2)
    sinks = torch.tensor([-1.0, 0.0, 0.5, 2.0]) if use_sinks else None
    allowed = [[(j <= i) and (not window or i - j < window) for j in range(T)] for i in range(T)]
    expected = explicit_attention(q.double(), k.double(), v.double(), allowed,
                                  sinks.double() if use_sinks else None).float()
    with torch.no_grad():  # PyTorch has no FlexAttention backward on CPU
        torch.testing.assert_close(attend(q, k, v, window, sinks), expected, rtol=1e-4, atol=1e-5)


def test_sdpa_path_gradients_equal_reference():
    q, k, v = (t.requires_grad_() for t in qkv())
    sinks = torch.tensor([-1.0, 0.0, 0.5, 2.0], requires_grad=True)
    g = torch.randn(2, 4, 12, 8)
    grads = [torch.autograd.grad((f(q, k, v, 5, sinks) * g).sum(), (q, k, v, sinks))
             for f in (sdpa_attention, reference_attention)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_banded_path_with_window_of_sequence_length_is_causal():
    q, k, v = qkv()
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for attend in (reference_attention, sdpa_attention):
        for window in (12, 50):  # T = 12: the band hides nothing
            torch.testing.assert_close(attend(q, k, v, window), causal, rtol=1e-5, atol=1e-6)


def test_sinks_at_minus_infinity_are_plain_attention():
    q, k, v = qkv()
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for attend in (reference_attention, sdpa_attention):
        torch.testing.assert_close(attend(q, k, v, 0, torch.full((4,), -math.inf)), plain, rtol=1e-5, atol=1e-6)


def test_sinks_absorb_attention():
    """A large sink takes almost all the probability: the output shrinks towards zero."""
    q, k, v = qkv()
    out = sdpa_attention(q, k, v, 0, torch.full((4,), 30.0))
    assert out.abs().max() < 1e-6


def test_window_of_sequence_length_is_causal_and_layers_alternate():
    """A window of T or more is plain causal attention (below T: test_windowed_layer_equals_a_hand_built_band)."""
    torch.manual_seed(0)
    full = GPT(small())
    x = torch.randint(0, 64, (2, 16))
    for window in (16, 100):
        windowed = GPT(small(window=window))
        windowed.load_state_dict(full.state_dict())
        assert torch.equal(windowed(x)[0], full(x)[0])
    model = GPT(small(window=4, n_layer=4))
    assert [b.attn.window for b in model.transformer.h] == [4, 0, 4, 0]  # gpt-oss: even layers
    assert [b.attn.window for b in GPT(small(window=4, window_every=1)).transformer.h] == [4, 4]
    short = GPT(small(window=4))
    short.load_state_dict(full.state_dict())
    assert not torch.allclose(short(x)[0], full(x)[0])  # a real window changes the output...
    torch.testing.assert_close(short(x[:, :4])[0], full(x[:, :4])[0])  # ...but not within its reach


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_model_attention_impls_equal_reference(impl):
    torch.manual_seed(0)
    ref = GPT(small(window=4, sinks=True, n_kv_head=2, attn_impl="reference"))
    with torch.no_grad():
        for b in ref.transformer.h:
            b.attn.sinks.normal_()
    fast = GPT(small(window=4, sinks=True, n_kv_head=2, attn_impl=impl))
    fast.load_state_dict(ref.state_dict())
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(fast(x)[0], ref(x)[0], rtol=1e-4, atol=1e-4)


# ---- YaRN ----

def test_yarn_scaling_one_is_plain_rope_and_keeps_fast_pairs():
    cos, sin = rope_cache(64, 64, 150000.0)
    cos1, sin1 = rope_cache(64, 64, 150000.0, scaling=1.0)
    assert torch.equal(cos, cos1) and torch.equal(sin, sin1)
    s, T_train = 4.0, 1024
    cos_y, sin_y = rope_cache(64, int(s * T_train), 150000.0, scaling=s)
    cos_p, sin_p = rope_cache(64, int(s * T_train), 150000.0)
    m = 0.1 * math.log(s) + 1  # attention concentration (gpt-oss / YaRN)
    angle = lambda c, si, t, i: math.atan2(si[t, i] / m, c[t, i] / m)  # noqa: E731
    # by hand, with θ = 150000, d = 64 and the trained 1024 tokens: the ramp runs from pair
    # 32·ln(1024/(32·2π))/ln θ ≈ 4.37 to 32·ln(1024/(2π))/ln θ ≈ 13.7
    low = 32 * math.log(T_train / (32 * 2 * math.pi)) / math.log(150000.0)
    high = 32 * math.log(T_train / (2 * math.pi)) / math.log(150000.0)
    assert 4.3 < low < 4.4 and 13.6 < high < 13.8
    inv = lambda i: 150000.0 ** (-2 * i / 64)  # noqa: E731
    torch.testing.assert_close(cos_y[:, 0] / m, cos_p[:, 0])  # pair 0 turns fastest: untouched
    for i in (0, 4, 10, 20, 31):
        keep = 1 - min(max((i - low) / (high - low), 0), 1)
        expected = inv(i) * keep + inv(i) / s * (1 - keep)
        assert math.isclose(angle(cos_y, sin_y, 1, i), expected, rel_tol=1e-4)
    assert math.isclose(cos_y[0, 0].item(), m, rel_tol=1e-6)


def test_yarn_model_reads_a_longer_context_with_the_trained_weights():
    torch.manual_seed(0)
    trained = GPT(small(pos="rope"))
    longer = GPT(GPTConfig(**{**small(pos="rope").__dict__, "block_size": 64, "rope_scaling": 4.0}))
    longer.load_state_dict(trained.state_dict())  # no position parameters: the same weights fit
    idx = torch.randint(0, 64, (1, 64))
    logits, _ = longer(idx)
    _, loss = longer(idx, idx)
    assert logits.shape == (1, 64, 64) and torch.isfinite(loss)


# ---- mixture of experts ----

def naive_moe(moe, x):
    """Token by token: route, take the top-k experts, weight by softmax over their logits."""
    out = torch.zeros_like(x)
    for n, token in enumerate(x):
        logits = moe.router(token)
        top = sorted(range(logits.numel()), key=lambda e: -logits[e].item())[: moe.topk]
        weights = torch.softmax(logits[top], dim=0)
        for w, e in zip(weights, top):
            h = token @ moe.w_fc[e] + moe.fc_bias[e]
            gate, up = h[::2].clamp(max=7), h[1::2].clamp(-7, 7)
            out[n] += w * ((gate * torch.sigmoid(1.702 * gate) * (up + 1)) @ moe.w_proj[e] + moe.proj_bias[e])
    return out


def test_moe_equals_token_by_token_routing_and_counts_load():
    torch.manual_seed(0)
    model = GPT(small(mlp="swiglu", moe_experts=4, moe_topk=2, mlp_hidden=16))
    moe = model.transformer.h[0].mlp
    with torch.no_grad():
        moe.fc_bias.normal_()
        moe.router.bias.normal_()
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        out = moe(x)
        torch.testing.assert_close(out.view(-1, 32), naive_moe(moe, x.view(-1, 32)), rtol=1e-4, atol=1e-5)
        top = moe.router(x.view(-1, 32)).topk(2, dim=-1).indices
        hand_load = torch.stack([(top == e).sum() for e in range(4)]).float() / top.numel()
        torch.testing.assert_close(moe.load, hand_load)
        probs = moe.router(x.view(-1, 32)).softmax(-1).mean(0)
        torch.testing.assert_close(moe.aux_loss, 4 * (hand_load * probs).sum())


def test_moe_with_one_expert_and_k1_is_the_dense_mlp():
    torch.manual_seed(0)
    config = small(mlp="swiglu", mlp_hidden=24)
    dense = MLP(config)
    moe = MoE(small(mlp="swiglu", mlp_hidden=24, moe_experts=1, moe_topk=1))
    with torch.no_grad():
        moe.w_fc[0].copy_(dense.c_fc.weight.t())
        moe.fc_bias[0].copy_(dense.c_fc.bias)
        moe.w_proj[0].copy_(dense.c_proj.weight.t())
        moe.proj_bias[0].copy_(dense.c_proj.bias)
        x = torch.randn(2, 7, 32)
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-6)


def test_expert_biases_are_not_decayed():
    model = GPT(small(mlp="swiglu", moe_experts=4, moe_topk=2, mlp_hidden=16))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for g in opt.param_groups if g["weight_decay"] for p in g["params"])
    assert decayed == sorted(["transformer.wte.weight", "transformer.wpe.weight"] + [
        f"transformer.h.{i}.{w}" for i in range(2) for w in
        ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.router.weight", "mlp.w_fc", "mlp.w_proj")])


def test_moe_active_and_total_parameters():
    model = GPT(small(mlp="swiglu", moe_experts=8, moe_topk=2))
    hidden = model.config.expert_hidden
    assert hidden == 8 * round(8 * 32 / 3 / 2 / 8)  # the dense SwiGLU's 85 split over 2 experts, to 8s
    per_expert = 32 * 2 * hidden + 2 * hidden + hidden * 32 + 32
    dense_part = GPT(small(mlp="swiglu")).num_params() - 2 * sum(
        p.numel() for p in MLP(small(mlp="swiglu")).parameters())
    router = 32 * 8 + 8
    assert model.num_params() == dense_part + 2 * (router + 8 * per_expert)
    assert model.num_params(active=True) == dense_part + 2 * (router + 2 * per_expert)


def test_moe_bf16_autocast_runs_its_matmuls_in_bf16():
    torch.manual_seed(0)
    model = GPT(small(mlp="swiglu", moe_experts=4, moe_topk=2, mlp_hidden=16))
    x = torch.randint(0, 64, (2, 16))
    ref = model(x, x)[1]
    ref.backward()
    ref_grad = model.transformer.h[0].mlp.w_fc.grad.clone()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.transformer.h[0].mlp(torch.randn(2, 16, 32))
        loss = model(x, x)[1]
    assert out.dtype == torch.bfloat16
    loss.backward()
    assert abs(loss.item() - ref.item()) < 0.05
    grad = model.transformer.h[0].mlp.w_fc.grad
    assert torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0) > 0.99


def test_compiled_model_with_every_switch_equals_eager():
    """Window, sinks, MoE (sort, grouped matmul, index_add) and rope under torch.compile, in one graph."""
    torch.manual_seed(0)
    config = small(norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_head=2, window=4, sinks=True,
                   moe_experts=4, moe_topk=2, mlp_hidden=16, moe_aux_loss=0.01, tie_embeddings=False)
    eager, compiled = GPT(config), GPT(config)
    assert_compiled_equals_eager(eager, compiled, torch.randint(0, 64, (2, 16)), grad_atol=1e-5)
    torch.testing.assert_close(compiled.transformer.h[1].mlp.load, eager.transformer.h[1].mlp.load)


def assert_compiled_equals_eager(eager, compiled, x, grad_atol):
    """compiled (given eager's weights) under torch.compile in one graph: the same loss and gradients.
    Returns eager's loss."""
    compiled.load_state_dict(eager.state_dict())
    loss_e = eager(x, x)[1]
    loss_c = torch.compile(compiled, fullgraph=True)(x, x)[1]
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=grad_atol, msg=name)
    return loss_e


def test_aux_loss_only_in_training():
    torch.manual_seed(0)
    with_aux = GPT(small(mlp="swiglu", moe_experts=4, moe_topk=2, mlp_hidden=16, moe_aux_loss=0.5))
    without = GPT(small(mlp="swiglu", moe_experts=4, moe_topk=2, mlp_hidden=16))
    without.load_state_dict(with_aux.state_dict())
    x = torch.randint(0, 64, (2, 16))
    loss = with_aux(x, x)[1]
    aux = sum(block.mlp.aux_loss for block in with_aux.transformer.h) / 2  # the mean over layers
    torch.testing.assert_close(loss, without(x, x)[1] + 0.5 * aux)
    with torch.no_grad():  # validation reports the plain cross-entropy
        torch.testing.assert_close(with_aux(x, x)[1], without(x, x)[1])


def test_gpt_oss_preset_and_its_size():
    cfg, model_cfg = parse_args(["--preset", "gpt-oss", "--moe_topk", "4"])
    assert (model_cfg.norm, model_cfg.pos, model_cfg.mlp, model_cfg.n_kv_head, model_cfg.window, model_cfg.sinks,
            model_cfg.moe_experts, model_cfg.moe_topk, model_cfg.tie_embeddings) == \
        ("rmsnorm", "rope", "swiglu", 4, 128, True, 8, 4, False)  # flags override the preset
    assert model_cfg.moe_aux_loss == 0.01  # results/README.md, moe_balance
    model = GPT(parse_args(["--preset", "gpt-oss"])[1])
    gpt2 = GPT(parse_args([])[1])
    # the same per-token work as GPT-2 124M, to within the 4/8 kv heads and the SwiGLU rounding
    assert abs(model.num_params(active=True) - gpt2.num_params()) / gpt2.num_params() < 0.1


ALL = ["--norm", "rmsnorm", "--pos", "rope", "--mlp", "swiglu", "--n_kv_head", "1", "--no-qkv_bias",
       "--window", "8", "--sinks", "--moe_experts", "4", "--moe_topk", "2", "--mlp_hidden", "16",
       "--moe_aux_loss", "0.01", "--no-tie_embeddings"]


@pytest.mark.parametrize("switch", [["--norm", "rmsnorm"], ["--pos", "rope"], ["--mlp", "swiglu"],
                                    ["--n_kv_head", "1"], ["--no-qkv_bias"], ["--no-tie_embeddings"],
                                    ["--window", "8"], ["--sinks"], ["--mlp", "swiglu", "--moe_experts", "4", "--moe_topk", "2"], ALL],
                         ids=["rmsnorm", "rope", "swiglu", "gqa", "no_qkv_bias", "untied", "window", "sinks", "moe",
                              "all"])
def test_switch_trains_and_resumes_exactly(small_shards, tmp_path, switch):
    losses = train_and_resume_at_3(tmp_path, small_shards, *switch, "--max_steps", "8", "--val_every", "4",
                                   "--keep_checkpoints", "0", "--max_lr", "1e-2")
    assert losses[7] < losses[0] - 0.5  # it learns
    if "--moe_experts" in switch:  # the load-balance metric: each layer's expert shares sum to 1
        last = events(tmp_path / "logs" / "ref", "train")[-1]
        assert len(last["moe_load"]) == 2 and all(sum(layer) == pytest.approx(1) for layer in last["moe_load"])
        assert last["moe_max_load"] == pytest.approx(max(max(layer) for layer in last["moe_load"]) * 4)
