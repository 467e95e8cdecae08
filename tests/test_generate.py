"""GPT.generate's KV cache: the same tokens and logits as re-running the whole context, for every attention
variant model.py has, on tiny random models."""

import pytest
import torch

from model import GPT, GPTConfig, KVCache

BLOCK, VOCAB = 48, 256
# windowed layers (0 and 2 of 3) see 4 tokens: the sequences here are far longer, so the window hides keys
GPT_OSS = dict(pos="rope", n_kv_head=2, window=4, sinks=True, norm="rmsnorm", mlp="swiglu", moe_experts=4,
               moe_topk=2, mlp_hidden=16, qkv_bias=False, tie_embeddings=False)
VARIANTS = {
    "gpt2": dict(),
    "rope": dict(pos="rope"),
    "yarn": dict(pos="rope", rope_scaling=4.0),
    "gqa": dict(n_kv_head=2),
    "mqa_rope": dict(pos="rope", n_kv_head=1),
    "window": dict(window=4),
    "window_every_3": dict(window=3, window_every=3, pos="rope"),
    "sinks": dict(sinks=True),
    "window_sinks_reference": dict(window=4, sinks=True, attn_impl="reference"),
    "moe": dict(mlp="swiglu", moe_experts=4, moe_topk=2, mlp_hidden=16),
    "mp": dict(mp=True, mp_t=0.5),  # EDM2's 0.3 lets a random model's greedy output loop on one token
    "mp_rope_gqa_window": dict(mp=True, mp_t=0.5, pos="rope", n_kv_head=2, window=4),
    # untied: a random nGPT's stream stays near its input token's embedding, which a tied head then repeats
    "ngpt": dict(ngpt=True, pos="rope", tie_embeddings=False),
    "ngpt_gqa_window": dict(ngpt=True, pos="rope", tie_embeddings=False, n_kv_head=2, window=4),
    "gpt_oss": GPT_OSS,
}


def make_model(variant, seed=0):
    """A random model whose output depends on its context: GPT-2's init is close to uniform attention."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=3, n_head=4, n_embd=32,
                          **VARIANTS[variant])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for block in model.transformer.h:
            if block.attn.sinks is not None:  # big enough to take a real share of the softmax
                block.attn.sinks.copy_(torch.randn_like(block.attn.sinks) * 2)
            if model.config.ngpt:  # steps of ~0.1 towards each branch, not 0.05
                block.alpha_attn.param.mul_(2)
                block.alpha_mlp.param.mul_(2)
        if model.config.mp:
            model.out_gain.fill_(0.3)  # starts at 0: uniform logits
        if model.config.ngpt:
            model.s_z.param.mul_(3)  # cosines × 3: logits spread like the others'
        model.renormalize_()  # mp, ngpt: back on their sphere
    return model


def prompt(T, B=2, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def both(model, idx, n, **kwargs):
    """generate with and without the cache; a seeded generator for each when sampling."""
    runs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(7) if kwargs.get("temperature", 1.0) else None
        runs.append(model.generate(idx, n, generator=gen, use_cache=use_cache, **kwargs))
    return runs


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_logits_equal_uncached(variant):
    """Step by step, teacher-forced to block_size: the prefill's logits are the uncached forward's (the same
    kernels), and each cached step's last-token logits equal a full re-run of the sequence to 2e-5 of the
    largest logit: fp32 rounding, as large as the uncached path's own between two sequence lengths (up to
    ~6e-6 here, in ngpt). A wrong position, window or sink moves them by ~1e-1."""
    model = make_model(variant)
    seq = prompt(BLOCK)
    cache = KVCache(model.config.n_layer, BLOCK)
    with torch.no_grad():
        logits, _ = model(seq[:, :5], cache=cache)
        torch.testing.assert_close(logits, model(seq[:, :5])[0], rtol=0, atol=0)
        for t in range(5, BLOCK):
            step, _ = model(seq[:, t:t + 1], cache=cache)
            full, _ = model(seq[:, :t + 1])
            assert step.shape == (2, 1, VOCAB)
            scale = full[:, -1].abs().max()
            torch.testing.assert_close(step[:, -1], full[:, -1], rtol=0, atol=2e-5 * scale, msg=f"{variant}, position {t}")
    assert cache.pos == BLOCK


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generate_gives_the_same_tokens(variant):
    model = make_model(variant)
    idx = prompt(5)
    cached, uncached = both(model, idx, 35, temperature=0)
    assert torch.equal(cached, uncached)
    assert cached[:, 5:].unique().numel() >= 5  # a greedy output that does not just repeat one token
    cached, uncached = both(model, idx, 35, temperature=1.0, top_k=20)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached[0], cached[1])  # the rows sampled differently


@pytest.mark.parametrize("variant", ["gpt2", "window_sinks_reference", "ngpt", "gpt_oss"])
@pytest.mark.parametrize("T", [10, BLOCK, BLOCK + 3])
def test_past_block_size_the_crop_matches(variant, T):
    """A prompt shorter than, as long as and longer than block_size, run well past it: the cache serves
    up to block_size tokens, then the cropped context is re-run, and the tokens stay the uncached ones."""
    model = make_model(variant)
    idx = prompt(T)
    for kwargs in (dict(temperature=0), dict(temperature=0.8, top_k=50)):
        cached, uncached = both(model, idx, 60, **kwargs)
        assert cached.shape == (2, T + 60)
        assert torch.equal(cached, uncached), kwargs


def forward_lengths(model, fn):
    """The number of tokens each forward call received while fn ran."""
    lengths = []
    hook = model.register_forward_pre_hook(lambda m, args: lengths.append(args[0].size(1)))
    try:
        fn()
    finally:
        hook.remove()
    return lengths


def test_the_cache_is_used():
    model = make_model("gpt_oss")
    # after the prompt, one token per forward
    assert forward_lengths(model, lambda: model.generate(prompt(5), 10)) == [5] + [1] * 9
    # a 40-token prompt: 8 cached steps reach block_size (48), then every step re-runs the last 48 tokens
    assert forward_lengths(model, lambda: model.generate(prompt(40), 20)) == [40] + [1] * 8 + [BLOCK] * 11
    assert forward_lengths(model, lambda: model.generate(prompt(5), 4, use_cache=False)) == [5, 6, 7, 8]


def test_under_bf16_autocast():
    """Training samples under autocast: the cache then holds bf16 keys, and the tokens are those of the
    uncached path (bf16 may round the two paths' attention differently: the bound is loose, and only the
    first tokens must agree, before a near tie could part them)."""
    model = make_model("gpt_oss")
    idx = prompt(5)
    cache = KVCache(model.config.n_layer, BLOCK)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(idx, cache=cache)
        nxt = (idx[:, -1:] + 1) % VOCAB
        step, _ = model(nxt, cache=cache)
        full, _ = model(torch.cat([idx, nxt], dim=1))
        cached, uncached = both(model, idx, 20, temperature=0)
    assert cache.k[0].dtype == torch.bfloat16
    assert (step[:, -1].float() - full[:, -1].float()).abs().max() < 0.05  # 0 on the CPU; a wrong rope offset: 0.125
    assert cached.shape == (2, 25) and cached.max() < VOCAB
    assert torch.equal(cached[:, :10], uncached[:, :10])


def test_generate_tokens_streams_what_generate_returns():
    model = make_model("gpt_oss")
    idx = prompt(5)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].size(1)))
    stream = model.generate_tokens(idx, 6, temperature=0.8, top_k=30, generator=torch.Generator().manual_seed(3))
    first = next(stream)
    assert first.shape == (2, 1) and calls == [5]  # the first token comes before any later step runs
    tokens = [first, *stream]
    hook.remove()
    whole = model.generate(idx, 6, temperature=0.8, top_k=30, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat([idx, *tokens], dim=1), whole)
    with pytest.raises(ValueError):
        next(model.generate_tokens(idx, 2, top_k=0))
