"""The gpt-oss switches of model.py, each against an independent reference, and through training."""

import math

import pytest
import torch
from torch.nn import functional as F

from model import GPT, MLP, GPTConfig, RMSNorm, apply_rope, rope_cache
from test_resume import assert_same_run, assert_same_weights
from test_train_gpt2 import events, run_inprocess, tiny_args


def small(**switches):
    return GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32, **switches)


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


def test_gqa_with_all_heads_is_mha_exactly():
    torch.manual_seed(0)
    a = GPT(small(n_kv_head=4))
    b = GPT(small())
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 64, (1, 16))
    assert torch.equal(a(x)[0], b(x)[0])


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
    with pytest.raises(ValueError, match="GPT-2"):
        GPT(small(norm="rmsnorm")).save_pretrained("/tmp/never-written")


ALL = ["--norm", "rmsnorm", "--pos", "rope", "--mlp", "swiglu", "--n_kv_head", "1", "--no-qkv_bias",
       "--no-tie_embeddings"]


@pytest.mark.parametrize("switch", [["--norm", "rmsnorm"], ["--pos", "rope"], ["--mlp", "swiglu"],
                                    ["--n_kv_head", "1"], ["--no-qkv_bias"], ["--no-tie_embeddings"], ALL],
                         ids=["rmsnorm", "rope", "swiglu", "gqa", "no_qkv_bias", "untied", "all"])
def test_switch_trains_and_resumes_exactly(small_shards, tmp_path, switch):
    common = [*switch, "--max_steps", "8", "--val_every", "4", "--keep_checkpoints", "0", "--max_lr", "1e-2"]
    run_inprocess(tiny_args(tmp_path, small_shards, "ref", *common, "--checkpoint_every", "3"))
    losses = {e["step"]: e["loss"] for e in events(tmp_path / "logs" / "ref", "train")}
    assert losses[7] < losses[0] - 0.5  # it learns
    run_inprocess(tiny_args(tmp_path, small_shards, "resumed", *common,
                            "--resume", str(tmp_path / "ckpt" / "ref" / "step_000003.pt")))
    assert_same_run(tmp_path / "logs" / "ref", tmp_path / "logs" / "resumed", 3)
    assert_same_weights(tmp_path / "ckpt" / "ref", tmp_path / "ckpt" / "resumed")
