"""The fused output layer + cross-entropy (model.linear_cross_entropy) against the plain one it replaces:
F.linear, the real vocabulary's columns, F.cross_entropy in fp32."""

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from model import GPT, GPTConfig, linear_cross_entropy, loss_chunk_rows


def plain_loss(x, w, targets, vocab_size):
    logits = F.linear(x, w)[..., :vocab_size].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def inputs(N=40, C=16, V=72, vocab=67, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(V, C, generator=g) * 0.5).requires_grad_()
    t = torch.randint(0, vocab, (N,), generator=g)
    t[::7] = -1  # ignored rows
    return x, w, t


def grads(loss_fn, x, w, t, vocab):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = loss_fn(x, w, t, vocab)
    (3.0 * loss).backward()  # an upstream gradient that is not 1
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("chunk_bytes", [model_module.LOSS_CHUNK_BYTES, 8 * 72 * 4, 3 * 72 * 4])
def test_equals_plain_loss_and_gradients(monkeypatch, chunk_bytes):
    """One chunk, chunks that divide the rows, and a last chunk shorter than the others."""
    monkeypatch.setattr(model_module, "LOSS_CHUNK_BYTES", chunk_bytes)
    x, w, t = inputs()
    ref = grads(plain_loss, x, w, t, 67)
    ours = grads(linear_cross_entropy, x, w, t, 67)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours[2][67:].abs().max() == 0  # padded rows of the matrix: never predicted, never trained


def test_chunk_rows():
    assert loss_chunk_rows(65536, 50304) == 1024  # GPT-2: 1,024 rows × 50,304 fp32 logits ≈ 206 MB a chunk
    assert loss_chunk_rows(100, 50304) == 100
    assert loss_chunk_rows(4096, 64) == 4096


def test_no_grad_and_all_ignored():
    x, w, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t, 67), plain_loss(x, w, t, 67))
    none = torch.full_like(t, -1)
    assert torch.isnan(linear_cross_entropy(x, w, none, 67)) and torch.isnan(plain_loss(x, w, none, 67))


def test_bf16_autocast_close_to_plain():
    x, w, t = inputs(N=64, C=32, V=128, vocab=120)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = grads(linear_cross_entropy, x, w, t, 120)
        ref = grads(plain_loss, x, w, t, 120)
    assert ours[1].dtype == x.dtype and ours[2].dtype == w.dtype
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("switch", [{}, {"mp": True}, {"ngpt": True, "pos": "rope"}, {"tie_embeddings": False}])
def test_model_loss_is_cross_entropy_of_its_logits(switch):
    """Through GPT.forward (each output layer: tied, untied, EDM2's gained, nGPT's scaled by s_z) the loss and
    every parameter's gradient equal F.cross_entropy of the logits the model gives."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=60, vocab_pad_multiple=64, n_layer=1, n_head=2, n_embd=16, **switch)
    a, b = GPT(cfg), GPT(cfg)
    b.load_state_dict(a.state_dict())
    if cfg.mp:
        with torch.no_grad():
            a.out_gain.fill_(0.7), b.out_gain.fill_(0.7)  # a zero gain would zero the matrix's gradient
    x = torch.randint(0, 60, (2, 16))
    y = torch.randint(0, 60, (2, 16))
    _, loss = a(x, y)
    logits, _ = b(x)
    ref = F.cross_entropy(logits.reshape(-1, 60), y.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_equals_eager():
    x, w, t = inputs()
    eager = grads(linear_cross_entropy, x, w, t, 67)
    compiled = grads(torch.compile(linear_cross_entropy, fullgraph=True), x, w, t, 67)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fp16_keeps_the_small_gradients():
    """Under fp16 autocast the per-logit gradients, (softmax − one-hot) / rows, sit below fp16's smallest
    number once rows · vocabulary passes ~1.6e7: divided after the matmuls, in fp32, they survive."""
    g = torch.Generator().manual_seed(0)
    N, C, V = 8192, 16, 4096
    x = torch.randn(N, C, generator=g)
    w = torch.randn(V, C, generator=g) * 0.1
    t = torch.randint(0, V, (N,), generator=g)
    _, _, ref_w = grads(plain_loss, x, w, t, V)  # fp32
    with torch.autocast("cpu", dtype=torch.float16):
        _, _, ours_w = grads(linear_cross_entropy, x, w, t, V)
    assert (ours_w == 0).float().mean() < 0.01
    assert ((ours_w - ref_w).norm() / ref_w.norm()) < 1e-2
