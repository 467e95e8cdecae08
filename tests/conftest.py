import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts live at the top level, not in a package

# never let a test reach the network: the HF hub and datasets read local files only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random Hugging Face GPT2LMHeadModel saved to disk (config.json + model.safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**TINY))
    path = tmp_path_factory.mktemp("tiny_hf")
    hf.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def enc():
    from data import gpt2_tokenizer

    return gpt2_tokenizer()
