"""--attn_impl auto: which attention kernel each layer runs on which device, FlexAttention's block masks
(built once per shape in eager mode, traced into the graph under torch.compile), and the memory the
chosen kernel keeps for backward, against torch's MemTracker. Everything runs on the CPU: the routing
for CUDA is a plain function of the device type."""

import contextlib
import dataclasses

import pytest
import torch

import model as model_py
from checkpoint import check_resume_settings
from distributed import estimate_memory
from model import GPT, GPTConfig, attention_kernel, block_mask, kernel_saves_scores
from train_gpt2 import parse_args

flex_eager = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def small(**switches):
    return GPTConfig(**{"block_size": 16, "vocab_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 32, **switches})


# ---- the routing decision ----

# "auto" for a layer by (device, the layer has a window that hides something, it has sinks)
AUTO = {
    ("cuda", False, False): "sdpa", ("cuda", True, False): "flex", ("cuda", False, True): "flex",
    ("cuda", True, True): "flex",
    **{(device, window, sinks): "sdpa" for device in ("cpu", "mps") for window in (False, True)
       for sinks in (False, True)},
}


@pytest.mark.parametrize("impl", ["auto", "sdpa", "flex", "reference"])
@pytest.mark.parametrize("device", ["cuda", "cpu", "mps"])
@pytest.mark.parametrize("window", [0, 4, 16, 100])  # 16 and 100 are >= T = 16: no window
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("n_kv_head", [0, 2])  # 2 of 4 heads: grouped-query attention
def test_routing_table(impl, device, window, sinks, n_kv_head):
    model = GPT(small(n_layer=1, window=window, window_every=1, sinks=sinks, n_kv_head=n_kv_head, attn_impl=impl))
    expected = AUTO[device, window == 4, sinks] if impl == "auto" else impl  # an explicit choice is obeyed
    assert model.attention_kernels(device, seq_len=16) == [expected]
    assert attention_kernel(impl, device, model.transformer.h[0].attn.effective_window(16), sinks) == expected
    # eager inference (no gradients, no torch.compile) has no backward to save memory for: SDPA
    assert attention_kernel(impl, device, 4, sinks, eager_inference=True) == ("sdpa" if impl == "auto" else impl)


def test_a_window_of_seq_len_or_more_is_no_window():
    model = GPT(small(window=8, window_every=1))
    assert model.attention_kernels("cuda", seq_len=8) == ["sdpa", "sdpa"]  # plain causal: flash
    assert model.attention_kernels("cuda", seq_len=9) == ["flex", "flex"]
    assert model.attention_kernels("cuda") == ["flex", "flex"]  # seq_len defaults to block_size 16


def test_which_kernels_keep_scores_for_backward():
    assert kernel_saves_scores("reference", "cuda") and kernel_saves_scores("reference", "cpu")
    assert not kernel_saves_scores("flex", "cuda", 128, True)  # a logsumexp per row only
    assert not kernel_saves_scores("sdpa", "cuda")  # unmasked: flash attention
    assert kernel_saves_scores("sdpa", "cuda", window=128)  # any mask on a GPU: the math kernel assumed
    assert kernel_saves_scores("sdpa", "cuda", sinks=True) and kernel_saves_scores("sdpa", "cpu", sinks=True)
    assert not kernel_saves_scores("sdpa", "cpu", window=128)  # the CPU's flash kernel takes a boolean mask


def test_forward_runs_the_kernel_the_routing_names(monkeypatch):
    """forward asks attention_kernel with its device type and whether it is eager inference, and runs
    what it answers."""
    asked, ran = [], []
    decide = model_py.attention_kernel
    monkeypatch.setattr(model_py, "attention_kernel", lambda *a: asked.append(a) or decide(*a))
    for name, fn in list(model_py.ATTENTION.items()):
        monkeypatch.setitem(model_py.ATTENTION, name, lambda *a, fn=fn, name=name: ran.append(name) or fn(*a))
    model = GPT(small(window=4, sinks=True, n_kv_head=2))
    x = torch.randint(0, 64, (1, 16))
    model(x)
    with torch.no_grad():
        model(x)
    assert asked == [("auto", "cpu", 4, True, False), ("auto", "cpu", 0, True, False),
                     ("auto", "cpu", 4, True, True), ("auto", "cpu", 0, True, True)]
    assert ran == ["sdpa"] * 4


def test_gpt_oss_preset_on_cuda_and_cpu():
    _, model_cfg = parse_args(["--preset", "gpt-oss"])
    assert model_cfg.attn_impl == "auto"  # the default
    with torch.device("meta"):
        model = GPT(model_cfg)
    assert model.attention_kernels("cuda", 1024) == ["flex"] * 12  # every layer has sinks
    assert model.attention_kernels("cpu", 1024) == model.attention_kernels("mps", 1024) == ["sdpa"] * 12
    assert model.describe_attention("cuda", 1024) == \
        "attention on cuda: flex on 6 layers (window 128 + sinks), flex on 6 layers (causal + sinks)"
    assert model.describe_attention("cpu", 1024) == (
        "attention on cpu: sdpa on 6 layers (window 128 + sinks; saves T×T scores for backward), "
        "sdpa on 6 layers (causal + sinks; saves T×T scores for backward)")
    # what `--attn_impl sdpa` would keep at micro batch 64 on a GPU: 4 bytes a score in each of the 12
    # layers (~38 GB), and 8 more for the layer in backward; auto keeps none of it
    _, sdpa_cfg = parse_args(["--preset", "gpt-oss", "--attn_impl", "sdpa"])
    scores = 64 * 12 * 1024 * 1025
    assert estimate_memory(sdpa_cfg, 64, 1024) - estimate_memory(model_cfg, 64, 1024) == (12 * 4 + 8) * scores
    assert 38e9 < 12 * 4 * scores < 39e9


def test_old_checkpoints_with_attn_impl_sdpa_still_resume():
    cfg, model_cfg = parse_args(["--preset", "gpt-oss"])
    old = {**dataclasses.asdict(model_cfg), "attn_impl": "sdpa"}  # what checkpoints before "auto" hold
    assert GPTConfig(**old).attn_impl == "sdpa"
    ckpt = {"train_config": vars(cfg).copy(), "model_config": old, "data": [["shard_000.bin", 1, "ab"]]}
    assert check_resume_settings(ckpt, cfg, model_cfg, [["shard_000.bin", 1, "ab"]]) == {}
    with pytest.raises(SystemExit, match="model differs"):  # the check itself still looks at the model
        check_resume_settings({**ckpt, "model_config": {**old, "window": 64}}, cfg, model_cfg, ckpt["data"])


# ---- FlexAttention's block masks ----

@pytest.fixture
def counted_block_masks(monkeypatch):
    """The (T, window) of every create_block_mask call, from an empty eager cache."""
    import torch.nn.attention.flex_attention as fa

    calls, create = [], fa.create_block_mask
    monkeypatch.setattr(fa, "create_block_mask", lambda *a, **k: calls.append((a[3], a[0])) or create(*a, **k))
    model_py.cached_block_mask.cache_clear()
    yield calls
    model_py.cached_block_mask.cache_clear()


@flex_eager
def test_block_masks_are_built_once_per_shape_and_window(counted_block_masks):
    model = GPT(small(n_layer=4, window=4, sinks=True, n_kv_head=2, attn_impl="flex"))  # windows on 2 of 4
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 64, (2, 16)))
        assert len(counted_block_masks) == 2  # (16, window 4) and (16, causal), for 3 forwards × 4 layers
        model(torch.randint(0, 64, (2, 12)))
        assert len(counted_block_masks) == 4  # a new T: two new masks
        model(torch.randint(0, 64, (2, 4)))
        assert len(counted_block_masks) == 5  # T = 4: the window hides nothing, one causal mask
    cpu = torch.device("cpu")
    assert block_mask(16, 4, cpu) is block_mask(16, 4, cpu) and block_mask(16, 4, cpu) is not block_mask(16, 0, cpu)
    assert len(counted_block_masks) == 5


@flex_eager
@pytest.mark.filterwarnings("error:Dynamo detected a call to a:UserWarning")  # e.g. tracing into the lru_cache
def test_compiled_flex_forward_has_no_graph_breaks_and_compiles_once():
    """Under torch.compile the mask is traced into the graph: no graph break, one compile for repeated
    calls, and the eager cache is neither read nor grown (a cache that grows would make Dynamo recompile).
    The CPU's Inductor cannot compile FlexAttention's logsumexp (which the sinks need), so this graph runs
    under aot_eager: Dynamo and AOTAutograd as in training, without Inductor's kernels."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = small(n_layer=2, window=4, sinks=True, n_kv_head=2, block_size=32)
    model = GPT(dataclasses.replace(cfg, attn_impl="flex")).eval()
    reference = GPT(dataclasses.replace(cfg, attn_impl="reference")).eval()
    with torch.no_grad():
        for b in model.transformer.h:
            b.attn.sinks.normal_()
    reference.load_state_dict(model.state_dict())
    x = torch.randint(0, 64, (2, 32))
    model_py.cached_block_mask.cache_clear()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
        for _ in range(3):
            out = compiled(x)[0]
        assert counter.frame_count == 1
        model(x[:, :20])  # an eager call with a new T grows the cache...
        compiled(x)
        assert counter.frame_count == 1  # ...which the compiled graph does not guard on
        # the compiled path built its own masks: the cache holds only the eager call's two
        assert model_py.cached_block_mask.cache_info().currsize == 2
        torch.testing.assert_close(out, reference(x)[0], rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_inductor_compiles_flex_windows_on_cpu():
    """Without sinks no logsumexp is asked for, and Inductor compiles FlexAttention on the CPU (inference)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = small(n_layer=1, window=4, n_kv_head=2, block_size=32)  # one windowed layer: a quicker compile
    model = GPT(dataclasses.replace(cfg, attn_impl="flex")).eval()
    reference = GPT(dataclasses.replace(cfg, attn_impl="reference")).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randint(0, 64, (2, 32))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        out = compiled(x)[0]
        compiled(x)
        assert counter.frame_count == 1
        torch.testing.assert_close(out, reference(x)[0], rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


# ---- the memory the chosen kernel keeps ----

def peak_training_memory(cfg, micro_batch, seq_len, context=contextlib.nullcontext):
    """What MemTracker counts in a second training step (bf16 autocast, CPU), as in tests/test_scale.py."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    model = GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len))

    def step():
        with context(), torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def math_kernel():
    """SDPA's math kernel, what CUDA falls back to for a mask no fused kernel takes, forced on the CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@pytest.mark.parametrize("switches, device_type, context", [
    (dict(attn_impl="reference", window=64), "cpu", contextlib.nullcontext),
    (dict(attn_impl="reference", sinks=True, n_kv_head=2, n_layer=3), "cpu", contextlib.nullcontext),
    (dict(attn_impl="sdpa", sinks=True), "cpu", contextlib.nullcontext),  # the float mask: math on the CPU too
    (dict(attn_impl="sdpa", window=64, n_kv_head=2), "cuda", math_kernel),  # as CUDA's fallback keeps it
    (dict(attn_impl="sdpa", window=64, n_kv_head=2), "cpu", contextlib.nullcontext),  # CPU flash: no scores
])
def test_memory_estimate_counts_the_scores_attention_keeps(switches, device_type, context):
    """T large against n_embd, so that the kept scores are most of the memory where they are kept: the
    estimate is never below MemTracker's peak and at most 30% above (the bounds of tests/test_scale.py)."""
    micro_batch, seq_len = 4, 512
    cfg = GPTConfig(**{"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": seq_len, "vocab_size": 512,
                       "vocab_pad_multiple": 64, "window_every": 1, **switches})
    measured = peak_training_memory(cfg, micro_batch, seq_len, context)
    estimate = estimate_memory(cfg, micro_batch, seq_len, device_type=device_type)
    without_scores = estimate_memory(dataclasses.replace(cfg, attn_impl="flex"), micro_batch, seq_len)
    assert measured <= estimate <= 1.3 * measured
    if kernel_saves_scores(cfg.attn_impl, device_type, cfg.window, cfg.sinks):
        assert estimate - without_scores > 0.6 * estimate  # the new term dominates
    else:
        assert estimate == without_scores


def test_uncompiled_flex_is_counted_as_keeping_its_scores():
    """FlexAttention outside torch.compile runs a dense version that keeps the scores (torch warns so):
    --no-compile on a GPU with windows or sinks is counted, and said, as such."""
    from distributed import estimate_memory
    from train_gpt2 import parse_args

    assert kernel_saves_scores("flex", "cuda", 128, True, compiled=False)
    assert not kernel_saves_scores("flex", "cuda", 128, True, compiled=True)
    _, cfg = parse_args(["--preset", "gpt-oss"])
    extra = estimate_memory(cfg, 8, 1024, compiled=False) - estimate_memory(cfg, 8, 1024, compiled=True)
    assert extra == (12 * 4 + 8) * 8 * 12 * 1024 * 1025  # every layer's fp32 scores, and one layer's gradient
    with torch.device("meta"):
        line = GPT(cfg).describe_attention("cuda", 1024, compiled=False)
    assert line.count("saves T×T scores for backward") == 2  # both groups of layers


def test_sdpa_tries_cudnn_first_on_hopper_and_newer():
    from torch.nn.attention import SDPBackend

    from distributed import sdpa_priority

    assert sdpa_priority("cuda", (9, 0), True)[0] == SDPBackend.CUDNN_ATTENTION  # H100, H200, H20
    assert sdpa_priority("cuda", (10, 0), True)[0] == SDPBackend.CUDNN_ATTENTION  # B200
    assert set(sdpa_priority("cuda", (9, 0), True)) >= {SDPBackend.FLASH_ATTENTION, SDPBackend.MATH}  # fallbacks
    assert sdpa_priority("cuda", (8, 0), True) is None  # A100: torch's own order (flash first)
    assert sdpa_priority("cuda", (9, 0), False) is None  # --no-cudnn_attention
    assert sdpa_priority("cpu", (0, 0), True) is None and sdpa_priority("mps", (0, 0), True) is None
