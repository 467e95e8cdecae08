"""export_hf.py and the transformers import/export behind it: GPT-2 as GPT2LMHeadModel, the gpt-oss family as
GptOssForCausalLM (both ways, against tiny random models made here), GPT-2's tokenizer files, the refusals."""

import os
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, GptOssConfig, GptOssForCausalLM, pipeline

import export_hf
from checkpoint import load_model
from conftest import ROOT, make_corpus
from data import EOT, write_hf_tokenizer
from model import GPT, GPTConfig

OSS = dict(block_size=32, vocab_size=300, n_layer=3, n_head=4, n_embd=48, norm="rmsnorm", pos="rope", mlp="swiglu",
           tie_embeddings=False)


def perturbed(module, seed=0, scale=0.1):
    """Every tensor moved off its initial value (zero biases and sinks, unit gains), so that a bias, gain or
    sink lost on the way shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def tokens(vocab, T, seed=0):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---- gpt-oss: ours -> GptOssForCausalLM -> ours ----

# each with what the import gives back differently (same logits): zero q, k, v biases are kept as biases; a
# dense SwiGLU width goes out rounded up to a multiple of 8 with zero units
EXPORTABLE = {
    "dense": ({}, {}),
    "dense_width_padded": (dict(n_embd=32), dict(mlp_hidden=88)),  # 8·32//3 = 85 units -> 88
    "moe_top2": (dict(moe_experts=4, moe_topk=2, mlp_hidden=24), {}),
    "moe_top1": (dict(moe_experts=3, moe_topk=1, mlp_hidden=16), {}),
    "windowed": (dict(window=5), {}),  # T = 32 > 5: the window hides keys on layers 0 and 2
    "window_every_3": (dict(window=5, window_every=3), {}),
    "window_every_1": (dict(window=4, window_every=1), {}),
    "sinks": (dict(sinks=True), {}),
    "gqa": (dict(n_kv_head=2), {}),
    "mqa_sinks_window": (dict(n_kv_head=1, sinks=True, window=6), {}),
    "no_qkv_bias": (dict(qkv_bias=False), dict(qkv_bias=True)),
    "tied": (dict(tie_embeddings=True), {}),
    "rope_theta": (dict(rope_theta=10000.0), {}),
    "yarn": (dict(block_size=512, rope_scaling=2.0), {}),
    "gpt_oss_like": (dict(moe_experts=4, moe_topk=2, mlp_hidden=32, n_kv_head=2, window=4, sinks=True), {}),
}


@pytest.mark.parametrize("name", EXPORTABLE)
def test_gpt_oss_export_and_back(tmp_path, name):
    switches, changed_back = EXPORTABLE[name]
    model = perturbed(GPT(GPTConfig(**{**OSS, **switches})))
    model.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf) is GptOssForCausalLM
    x = tokens(300, 32)
    back = GPT.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ours = model(x)[0]
        assert max_diff(ours, hf(x).logits) <= 1e-4
        assert max_diff(ours, back(x)[0]) <= 1e-5
    assert back.config == replace(model.config, **changed_back)


@pytest.mark.parametrize("switches", [{}, dict(moe_experts=4, moe_topk=2, mlp_hidden=24)], ids=["dense", "moe"])
def test_swiglu_clamps_agree(tmp_path, switches):
    # small random weights keep gate and up inside ±7, where the clamps do nothing: biases of ±12 push a
    # quarter of them past each side (gate clamped above only, up on both sides)
    model = perturbed(GPT(GPTConfig(**{**OSS, **switches})))
    with torch.no_grad():
        for block in model.transformer.h:
            bias = block.mlp.fc_bias if switches else block.mlp.c_fc.bias
            bias.copy_(12 * torch.randint(-1, 2, bias.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(300, 32)
    with torch.no_grad():
        assert max_diff(model(x)[0], hf(x).logits) <= 1e-4
        assert max_diff(model(x)[0], GPT.from_pretrained(tmp_path)(x)[0]) <= 1e-5


def test_padded_vocab_exports_the_real_rows(tmp_path):
    model = perturbed(GPT(GPTConfig(**OSS, vocab_pad_multiple=64)))
    model.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.vocab_size == 300 and hf.lm_head.weight.shape == (300, 48)
    back = GPT.from_pretrained(tmp_path, vocab_pad_multiple=64).eval()
    x = tokens(300, 32)
    with torch.no_grad():
        assert max_diff(model(x)[0], hf(x).logits) <= 1e-4
        assert max_diff(model(x)[0], back(x)[0]) <= 1e-5
    assert back.transformer.wte.weight[300:].abs().max() == 0  # padded rows zero


# ---- gpt-oss: a GptOssForCausalLM made by transformers -> ours ----

def tiny_gpt_oss(**changes):
    """transformers' own config: MoE top-2 of 4, GQA, its default layer_types (sliding on even layers)."""
    return GptOssConfig(**{**dict(num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2, vocab_size=300,
                                  hidden_size=32, intermediate_size=24, head_dim=8, num_attention_heads=4,
                                  num_key_value_heads=2, sliding_window=5, max_position_embeddings=64,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), **changes})


YARN = {"rope_type": "yarn", "factor": 2.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        "original_max_position_embeddings": 2048, "rope_theta": 10000.0}
IMPORTABLE = {
    "moe_gqa_window_sinks": ({}, dict(moe_experts=4, moe_topk=2, n_kv_head=2, window=5, window_every=2, sinks=True)),
    "one_expert": (dict(num_local_experts=1, num_experts_per_tok=1), dict(moe_experts=0, mlp_hidden=24)),
    "no_attention_bias": (dict(attention_bias=False), dict(qkv_bias=False)),
    "tied": (dict(tie_word_embeddings=True), dict(tie_embeddings=True)),
    "mha": (dict(num_key_value_heads=4), dict(n_kv_head=0)),
    "yarn": (dict(rope_parameters=YARN, max_position_embeddings=4096), dict(rope_scaling=2.0, block_size=4096)),
    "no_windows": (dict(layer_types=["full_attention"] * 3), dict(window=0)),
    "first_layer_window": (dict(layer_types=["sliding_attention", "full_attention", "full_attention"]),
                           dict(window=5, window_every=3)),
}


@pytest.mark.parametrize("name", IMPORTABLE)
def test_gpt_oss_import(tmp_path, name):
    changes, expected = IMPORTABLE[name]
    torch.manual_seed(0)
    hf = perturbed(GptOssForCausalLM(tiny_gpt_oss(**changes)))
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path).eval()
    for field, value in expected.items():
        assert getattr(model.config, field) == value, field
    x = tokens(300, 40)  # longer than the window
    with torch.no_grad():
        assert max_diff(model(x)[0], hf(x).logits) <= 1e-4


def test_import_overrides_only_open_fields(tmp_path):
    GptOssForCausalLM(tiny_gpt_oss()).save_pretrained(tmp_path)
    assert GPT.from_pretrained(tmp_path, vocab_pad_multiple=64, attn_impl="reference").config.padded_vocab_size == 320
    with pytest.raises(ValueError, match="n_layer come from the model"):
        GPT.from_pretrained(tmp_path, n_layer=2)


# ---- refusals: never an export or import with other logits ----

REFUSED_EXPORTS = {
    "mp": (dict(mp=True), "EDM2's magnitude-preserving layers (--mp) have no transformers class"),
    "ngpt": (dict(ngpt=True, pos="rope"), "nGPT's normalised transformer (--ngpt) have no transformers class"),
    "rmsnorm_learned_positions": (dict(norm="rmsnorm", mlp="swiglu"), "--pos rope (this model: learned)"),
    "layernorm": (dict(pos="rope", mlp="swiglu"), "--norm rmsnorm (this model: layernorm)"),
    "gelu": (dict(norm="rmsnorm", pos="rope"), "--mlp swiglu (this model: gelu)"),
    "gpt2_untied": (dict(tie_embeddings=False), "GPT2LMHeadModel holds only GPT-2"),
    "gpt2_gqa": (dict(n_kv_head=2), "GPT2LMHeadModel holds only GPT-2"),
    "yarn_ramp_clamped": (dict(**OSS, rope_scaling=4.0), "YaRN over 8 trained tokens"),
    "n_embd_not_multiple_of_8": (dict(OSS, n_embd=36, n_head=2), "n_embd a multiple of 8, not 36"),
}


@pytest.mark.parametrize("name", REFUSED_EXPORTS)
def test_export_refusals(tmp_path, name):
    switches, reason = REFUSED_EXPORTS[name]
    model = GPT(GPTConfig(**{**dict(block_size=32, vocab_size=300, n_layer=2, n_head=4, n_embd=32), **switches}))
    with pytest.raises(ValueError, match="cannot export to transformers") as e:
        model.save_pretrained(tmp_path / "out")
    assert reason in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_yarn_refusal_is_real(tmp_path, monkeypatch):
    # the reason for that refusal: transformers clamps the ramp that rope_cache extends, and the logits differ
    import model as model_module

    monkeypatch.setattr(model_module, "yarn_problem", lambda *args: None)
    model = perturbed(GPT(GPTConfig(**{**OSS, "rope_scaling": 4.0})))
    model.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(300, 32)
    with torch.no_grad():
        assert max_diff(model(x)[0], hf(x).logits) > 1e-4


REFUSED_IMPORTS = {
    "head_dim": (dict(head_dim=16), "head_dim 16 x 4 heads is not hidden_size 32"),
    "rms_norm_eps": (dict(rms_norm_eps=1e-6), "rms_norm_eps 1e-06"),
    "swiglu_limit": (dict(swiglu_limit=5.0), "swiglu_limit 5.0"),
    "linear_rope": (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "'linear'"),
    "yarn_truncate": (dict(rope_parameters={**YARN, "truncate": True}, max_position_embeddings=4096), "'truncate': True"),
    "yarn_beta": (dict(rope_parameters={**YARN, "beta_fast": 16.0}, max_position_embeddings=4096), "'beta_fast': 16.0"),
    "yarn_context": (dict(rope_parameters=YARN, max_position_embeddings=8192), "block_size / rope_scaling"),
    "yarn_clamped": (dict(rope_parameters={**YARN, "original_max_position_embeddings": 16}, max_position_embeddings=32),
                     "where transformers clamps it"),
    "layer_types": (dict(layer_types=["full_attention", "sliding_attention", "full_attention"]), "layer_types"),
}


@pytest.mark.parametrize("name", REFUSED_IMPORTS)
def test_import_refusals(tmp_path, name):
    changes, reason = REFUSED_IMPORTS[name]
    tiny_gpt_oss(**changes).save_pretrained(tmp_path)  # the config alone: it is refused before any weight is read
    with pytest.raises(ValueError, match="GPTConfig cannot represent that") as e:
        GPT.from_pretrained(tmp_path)
    assert reason in str(e.value)


def test_import_refuses_other_model_types(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=100).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="a 'llama' model; from_pretrained loads GPT-2"):
        GPT.from_pretrained(tmp_path)


# ---- GPT-2's tokenizer ----

TEXT = ("Hello, I'm a language model,  it's 2024: 12345 + 3.14159!\n\n  Ünïcödé 日本語 🤖 don't , it 's ?  "
        "<|endoftext|>Next document\tTabs   and trailing spaces   \n")


def test_tokenizer_matches_tiktoken(tmp_path, enc):
    write_hf_tokenizer(tmp_path, model_max_length=64)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.eos_token_id, tok.bos_token_id, tok.model_max_length, len(tok)) == (EOT, EOT, 64, 50257)
    ids = tok(TEXT)["input_ids"]
    # "<|endoftext|>" in the text is the special token, as tiktoken's allowed_special="all" makes it
    assert ids == enc.encode(TEXT, allowed_special="all") and EOT in ids
    assert ids != enc.encode_ordinary(TEXT)
    assert AutoTokenizer.from_pretrained(tmp_path, split_special_tokens=True)(TEXT)["input_ids"] == enc.encode_ordinary(TEXT)
    assert tok.decode(ids) == TEXT == enc.decode(ids)  # " ," and " 's" kept: no clean-up of spaces
    # tokenizer.json alone, as the `tokenizers` library and other tools read it (transformers 5 builds the
    # tokenizer from vocab.json, merges.txt and tokenizer_config.json)
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(TEXT).ids == ids
    corpus = " ".join(make_corpus(20, seed=5))
    assert tok(corpus)["input_ids"] == enc.encode_ordinary(corpus)


# ---- export_hf.py ----

def checkpoint(path, config, seed=0):
    """A checkpoint folder as train_gpt2.py leaves it: step_NNNNNN.pt (model + model_config) and `latest`."""
    torch.manual_seed(seed)
    model = perturbed(GPT(config), seed=seed, scale=0.02)
    path.mkdir()
    torch.save({"model": model.state_dict(), "model_config": asdict(config), "step": 10}, path / "step_000010.pt")
    (path / "latest").write_text("step_000010.pt\n")
    return model


GPT2_SMALL = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, vocab_pad_multiple=64)
OSS_SMALL = GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=32, norm="rmsnorm", pos="rope", mlp="swiglu",
                      n_kv_head=2, window=8, sinks=True, tie_embeddings=False, vocab_pad_multiple=64)


@pytest.mark.parametrize("config, cls", [(GPT2_SMALL, "GPT2LMHeadModel"), (OSS_SMALL, "GptOssForCausalLM")])
def test_cli_export_loads_everywhere(tmp_path, config, cls, enc, capsys):
    model = checkpoint(tmp_path / "ckpt", config)
    out = tmp_path / "hf"
    export_hf.main(["--model", str(tmp_path / "ckpt"), "--out", str(out)])
    assert f"as {cls}" in capsys.readouterr().out
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary folder left
    umask = os.umask(0)
    os.umask(umask)
    assert {os.stat(out / n).st_mode & 0o777 for n in os.listdir(out)} == {0o666 & ~umask}  # shareable
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == cls
    prompt = enc.encode("Hello, I'm a language model,")
    x = torch.tensor([prompt + list(range(100, 150))])
    with torch.no_grad():
        assert max_diff(model(x)[0], hf(x).logits) <= 1e-4
        assert max_diff(model(x)[0], load_model(str(out), "cpu")(x)[0]) <= 1e-5  # the shared loader takes it back
    # the pipeline, offline: tokenizer and generation config from the folder; greedy = our greedy (past the window)
    generate = pipeline("text-generation", model=str(out))
    result = generate("Hello, I'm a language model,", max_new_tokens=16, do_sample=False, return_tensors=True)
    ours = model.generate(torch.tensor([prompt]), 16, temperature=0)[0].tolist()
    assert result[0]["generated_token_ids"] == ours
    assert (hf.generation_config.eos_token_id, hf.generation_config.pad_token_id) == (EOT, EOT)


def run_main(*args):
    """export_hf.main's exit message (its one-line error), in-process: a subprocess costs seconds of imports."""
    with pytest.raises(SystemExit) as e:
        export_hf.main(list(args))
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message and message.startswith("error: ")
    return message


def test_cli_refuses_unexportable_model_writing_nothing(tmp_path):
    checkpoint(tmp_path / "ckpt", GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32, mp=True))
    message = run_main("--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"))
    assert "cannot export to transformers: EDM2's magnitude-preserving layers (--mp)" in message
    assert not (tmp_path / "hf").exists()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    run_main("--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"))
    assert os.listdir(tmp_path / "hf") == ["notes.txt"]


def test_cli_bad_inputs(tmp_path):
    message = run_main("--model", str(tmp_path / "no_such_model"), "--out", str(tmp_path / "hf"))
    assert "no_such_model" in message and "expected one of gpt2" in message
    (tmp_path / "file").write_text("")
    message = run_main("--model", str(tmp_path / "no_such_model"), "--out", str(tmp_path / "file"))
    assert "--out" in message and "is a file: pass a folder" in message
    checkpoint(tmp_path / "small_vocab", GPTConfig(**{**OSS, "vocab_size": 300}))
    message = run_main("--model", str(tmp_path / "small_vocab"), "--out", str(tmp_path / "hf"))
    assert "vocabulary of 300 tokens, GPT-2's tokenizer 50257" in message
    assert not (tmp_path / "hf").exists()


def test_cli_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    checkpoint(tmp_path / "ckpt", GPT2_SMALL)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")

    def half_a_tokenizer(folder, model_max_length):
        (open(os.path.join(folder, "vocab.json"), "w")).close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_hf, "write_hf_tokenizer", half_a_tokenizer)
    message = run_main("--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"))
    assert "No space left on device" in message
    assert os.listdir(tmp_path / "hf") == ["notes.txt"]  # no model, no tokenizer, no temporary folder


def test_cli_error_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "export_hf.py", "--model", str(tmp_path / "nothing"), "--out",
                          str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model") and "nothing" in lines[0], out.stderr
