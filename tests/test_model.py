import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from model import GPT, GPTConfig


def hf_model(path):
    return GPT2LMHeadModel.from_pretrained(path).eval()


def batch(vocab=50257, B=2, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


@pytest.mark.parametrize("pad", [1, 64])
def test_from_pretrained_matches_hf(tiny_hf_dir, pad):
    hf = hf_model(tiny_hf_dir)
    model = GPT.from_pretrained(tiny_hf_dir, vocab_pad_multiple=pad).eval()
    assert model.config.padded_vocab_size == (50257 if pad == 1 else 50304)
    x, y = batch()
    with torch.no_grad():
        (ours, _), (_, loss) = model(x), model(x, y)
        ref = hf(x, labels=None).logits
    assert ours.shape == ref.shape  # padded columns never reach the caller
    assert (ours - ref).abs().max().item() <= 1e-5  # an exact-erf GELU instead of tanh would be ~2e-5 off
    ref_loss = torch.nn.functional.cross_entropy(ref.view(-1, ref.size(-1)), y.view(-1))
    assert abs(loss.item() - ref_loss.item()) <= 1e-5


def test_hf_labels_loss_matches(tiny_hf_dir):
    # HF shifts labels inside; feeding it x with labels=x must equal our loss on (x[:-1], x[1:])
    hf = hf_model(tiny_hf_dir)
    model = GPT.from_pretrained(tiny_hf_dir).eval()
    x, _ = batch(T=33)
    with torch.no_grad():
        _, loss = model(x[:, :-1], x[:, 1:])
        ref = hf(x, labels=x).loss
    assert abs(loss.item() - ref.item()) <= 1e-5


@pytest.mark.parametrize("pad", [1, 64])
def test_save_pretrained_round_trip(tiny_hf_dir, tmp_path, pad):
    model = GPT.from_pretrained(tiny_hf_dir, vocab_pad_multiple=pad).eval()
    # perturb every tensor, biases and gains too, so the export is not just the file we loaded
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    model.save_pretrained(out)
    model.save_pretrained(out)  # overwriting an export works, leaves no temp folders, keeps other files
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                     "model.safetensors", "notes.txt"]
    hf = hf_model(out)
    x, _ = batch()
    with torch.no_grad():
        assert (model(x)[0] - hf(x).logits).abs().max().item() <= 1e-5
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # still tied


@pytest.mark.parametrize("change", [dict(tie_word_embeddings=False), dict(layer_norm_epsilon=0.1),
                                    dict(n_inner=128), dict(activation_function="relu")])
def test_from_pretrained_refuses_other_architectures(tmp_path, change):
    from transformers import GPT2Config

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=8, vocab_size=100, **change)) \
        .save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT-2"):
        GPT.from_pretrained(tmp_path)


def test_generate_rejects_bad_arguments():
    model = GPT(GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=1, n_embd=8))
    idx = torch.tensor([[1, 2]])
    for kwargs in (dict(top_k=0), dict(temperature=-1.0)):
        with pytest.raises(ValueError):
            model.generate(idx, 2, **kwargs)
    with pytest.raises(ValueError):
        model.generate(idx[:, :0], 2)
    assert model.generate(idx, 12, top_k=1000).shape == (1, 14)  # top_k above the vocab, past block_size


def test_random_init_round_trip(tmp_path):
    # a model trained from scratch (padded vocab, odd sizes) exports too
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=3, n_head=2, n_embd=32, vocab_pad_multiple=128)).eval()
    model.save_pretrained(tmp_path / "m")
    back = GPT.from_pretrained(tmp_path / "m", vocab_pad_multiple=128).eval()
    x, _ = batch(T=16)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], back(x)[0], rtol=0, atol=1e-6)


def test_init_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, n_layer=8, n_head=4, n_embd=256, vocab_pad_multiple=64)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 1e-3
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for block in model.transformer.h:
        for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
            assert abs(w.std().item() - resid_std) < 0.1 * resid_std
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() == 0


def test_flops_per_token_hand_computed():
    cfg = GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=8)
    model = GPT(cfg)
    d, L, V, T = 8, 2, 100, 16
    # per block: 2 LayerNorms (2d each), c_attn (d*3d + 3d), attn c_proj (d*d + d),
    # c_fc (d*4d + 4d), mlp c_proj (4d*d + d)
    per_block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    n = L * per_block + 2 * d + V * d  # + ln_f + wte (the tied output layer); wpe excluded
    assert model.num_params() == n == 2 * 872 + 16 + 800
    assert model.num_params(non_embedding=False) == n + T * d
    head_dim = d // 2
    assert model.flops_per_token() == 6 * n + 12 * L * 2 * head_dim * T
    assert model.flops_per_token(seq_len=8) == 6 * n + 12 * L * 2 * head_dim * 8
    assert model.estimate_mfu(1000, 1e9) == pytest.approx(model.flops_per_token() * 1000 / 1e9)


def test_gpt2_124m_size():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    assert model.num_params(non_embedding=False) == 124_439_808  # OpenAI GPT-2 small


def test_generate_deterministic_and_never_padded(tiny_hf_dir):
    model = GPT.from_pretrained(tiny_hf_dir, vocab_pad_multiple=64).eval()
    # make the padded rows attractive: if they were ever scored, sampling would pick them
    with torch.no_grad():
        model.transformer.wte.weight[50257:] = 10.0
    idx = torch.tensor([[15496, 11, 314, 1101]])
    runs = [model.generate(idx, 20, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(42))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][:, :4], idx)
    assert runs[0].shape == (1, 24)
    assert runs[0].max().item() < 50257
    hot = model.generate(idx, 50, temperature=2.0, generator=torch.Generator().manual_seed(1))
    assert hot.max().item() < 50257


def test_top_k_one_is_greedy(tiny_hf_dir):
    model = GPT.from_pretrained(tiny_hf_dir).eval()
    idx = torch.tensor([[464, 2068, 7586]])
    sampled = model.generate(idx, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampled, model.generate(idx, 10, temperature=0))


def test_greedy_matches_hf_generate(tiny_hf_dir):
    hf = hf_model(tiny_hf_dir)
    model = GPT.from_pretrained(tiny_hf_dir).eval()
    idx = torch.tensor([[15496, 11, 314, 1101, 257]])
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=15, do_sample=False,
                      pad_token_id=50256, eos_token_id=None)
    assert torch.equal(model.generate(idx, 15, temperature=0), ref)


def test_configure_optimizers_decay_groups():
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=8))
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # every parameter exactly once (tied wte/lm_head counted once)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=32))
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.95), device_type="cpu")
    x, y = batch(vocab=128, B=4, T=32)
    losses = []
    for _ in range(40):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(128), rel=0.1)  # a fresh model predicts ~uniformly
    assert losses[-1] < 0.5 * losses[0]  # it starts memorising the fixed batch
    assert all(b < a for a, b in zip(losses[::10], losses[10::10]))


def test_ignore_index_targets():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=1, n_embd=8))
    x, y = batch(vocab=50, B=1, T=8)
    logits, _ = model(x)
    _, loss = model(x, y)
    y2 = y.clone()
    y2[0, 4:] = -1
    _, loss2 = model(x, y2)
    ref = torch.nn.functional.cross_entropy(logits[0, :4], y[0, :4])
    assert loss2.item() == pytest.approx(ref.item(), rel=1e-6)
    assert loss.item() != pytest.approx(loss2.item())
