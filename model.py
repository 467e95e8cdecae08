"""
GPT-2 in one file, read top to bottom: config, the layers, the model.

With every switch at its default this is exactly GPT-2. Parameter names follow OpenAI's checkpoint (as
Hugging Face stores it) so that importing and exporting weights is a rename-free copy; only HF's Conv1D
weights are stored transposed relative to nn.Linear. The switches bring in what gpt-oss changed on top
of GPT-2, one at a time (formulas from its reference implementation, gpt_oss/torch/model.py).
References: OpenAI's gpt-2 src/model.py, HF transformers modeling_gpt2.py, nanoGPT, gpt-oss.
"""

import functools
import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum context length
    vocab_size: int = 50257  # GPT-2's BPE: 50000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # Round the embedding/output matrices up to a multiple of this (64 -> 50304) for faster
    # GPU matmuls. The extra rows are never predicted: logits are cut back to vocab_size.
    vocab_pad_multiple: int = 1
    # gpt-oss switches; the defaults are GPT-2
    norm: str = "layernorm"  # layernorm | rmsnorm (fp32, eps 1e-5)
    pos: str = "learned"  # learned (wpe) | rope (rotary, half-split, no wpe)
    rope_theta: float = 150000.0  # gpt-oss's RoPE base
    mlp: str = "gelu"  # gelu | swiglu (gpt-oss's clamped form)
    mlp_hidden: int = 0  # 0: 4·n_embd for gelu, 8/3·n_embd for swiglu (the same parameter count)
    n_kv_head: int = 0  # 0: one key/value head per query head; fewer: grouped-query attention
    qkv_bias: bool = True
    window: int = 0  # sliding-window attention: a query sees only the last `window` tokens (0: all)
    window_every: int = 2  # layer i is windowed when i % window_every == 0 (gpt-oss: even layers)
    sinks: bool = False  # a learned extra softmax logit per head that can absorb attention
    # auto: per layer, FlexAttention on CUDA for a window or sinks, SDPA otherwise (see attention_kernel);
    # sdpa | flex (FlexAttention, CUDA training) | reference: that kernel on every layer and device
    attn_impl: str = "auto"
    moe_experts: int = 0  # 0: a dense MLP; more: a mixture of SwiGLU experts
    moe_topk: int = 4  # experts per token (gpt-oss: 4 of 32)
    moe_aux_loss: float = 0.0  # weight of the Switch-Transformer load-balance loss (gpt-oss: none)
    rope_scaling: float = 1.0  # YaRN: > 1 runs a rope model at rope_scaling × the context it was trained on
    # EDM2 switch: magnitude-preserving layers instead of norm layers (see MPLinear and Block)
    mp: bool = False
    mp_t: float = 0.3  # residual blend: x <- mp_sum(x, f(x), t) (EDM2's res_balance)
    # nGPT switch: the normalised transformer, every vector and weight row on the unit sphere (see Block)
    ngpt: bool = False
    tie_embeddings: bool = True  # GPT-2 shares wte with the output layer; gpt-oss does not

    def __post_init__(self):
        choices = {"norm": ("layernorm", "rmsnorm"), "pos": ("learned", "rope"), "mlp": ("gelu", "swiglu"),
                   "attn_impl": ("auto", "sdpa", "flex", "reference")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.n_kv_head < 0 or self.n_embd % self.n_head or self.n_head % self.kv_heads:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}), and "
                             f"n_head of n_kv_head ({self.kv_heads})")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rope rotates pairs of dimensions: the head size n_embd/n_head must be even")
        if self.rope_scaling != 1.0 and (self.pos != "rope" or self.rope_scaling < 1):
            raise ValueError("rope_scaling (YaRN) stretches rotary positions: it needs --pos rope and a value >= 1")
        if self.window < 0 or self.window_every < 1:
            raise ValueError("window must be >= 0 (0: full attention) and window_every >= 1")
        if self.moe_experts and self.mlp != "swiglu":
            raise ValueError("the experts are gpt-oss's clamped SwiGLUs: set --mlp swiglu with --moe_experts")
        if self.moe_aux_loss and not self.moe_experts:
            raise ValueError("moe_aux_loss balances experts: it needs --moe_experts")
        if self.moe_experts and not 1 <= self.moe_topk <= self.moe_experts:
            raise ValueError(f"moe_topk must be between 1 and moe_experts ({self.moe_experts}), not {self.moe_topk}")
        if self.mp and (self.norm, self.mlp, self.moe_experts, self.sinks) != ("layernorm", "gelu", 0, False):
            raise ValueError("mp replaces the norm layers and the MLP's activation, and normalises every head's "
                             "output (which would undo a sink): leave --norm, --mlp, --moe_experts, --sinks off")
        if self.ngpt and ((self.pos, self.norm, self.mlp, self.mp, self.moe_experts, self.sinks) !=
                          ("rope", "layernorm", "gelu", False, 0, False)):
            raise ValueError("ngpt brings its own norms and gated MLP and has no position embedding: use it with "
                             "--pos rope, without --norm, --mlp, --mp, --moe_experts or --sinks")
        if self.moe_experts and self.expert_hidden % 8:
            raise ValueError(f"expert hidden size {self.expert_hidden} must be a multiple of 8 (grouped matmul "
                             f"alignment): set --mlp_hidden")

    @property
    def padded_vocab_size(self):
        return math.ceil(self.vocab_size / self.vocab_pad_multiple) * self.vocab_pad_multiple

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def expert_hidden(self):
        """Each expert's SwiGLU width: by default the dense SwiGLU's split over the top-k experts (rounded
        to 8), so a token's active MLP parameters, and FLOPs, stay those of the dense model."""
        return self.mlp_hidden or 8 * round(8 * self.n_embd / 3 / self.moe_topk / 8)

    @property
    def is_gpt2(self):
        """Whether every switch is GPT-2's: only then do the weights fit Hugging Face's GPT2LMHeadModel."""
        return (self.norm, self.pos, self.mlp, self.mlp_hidden, self.kv_heads, self.qkv_bias, self.window,
                self.sinks, self.moe_experts, self.mp, self.ngpt, self.tie_embeddings) == \
            ("layernorm", "learned", "gelu", 0, self.n_head, True, 0, False, 0, False, False, True)


class RMSNorm(nn.Module):
    """x / rms(x) · scale, computed in fp32 (gpt-oss): no mean subtraction and no bias, unlike LayerNorm."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        t = x.float()
        t = t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (t * self.weight.float()).to(x.dtype)


def make_norm(config):
    if config.ngpt:  # the block normalises explicitly
        return nn.Identity()
    if config.mp:  # no learned norm: a parameter-free rescale to unit RMS (EDM2's "pixel norm")
        return UnitRMS()
    return RMSNorm(config.n_embd) if config.norm == "rmsnorm" else nn.LayerNorm(config.n_embd)


# ---- EDM2's magnitude-preserving pieces (Karras et al. 2024, training/networks_edm2.py) ----

def normalize(w, eps=1e-4):
    """Every row (a fan-in vector) scaled to unit RMS: w / (eps + ‖w‖/√fan_in)."""
    norm = torch.linalg.vector_norm(w, dim=-1, keepdim=True, dtype=torch.float32)
    return w / (eps + norm / math.sqrt(w.size(-1))).to(w.dtype)


def mp_silu(x):
    """SiLU rescaled so a unit-variance Gaussian input gives a unit-RMS output (E[silu(x)²]^½ = 0.596)."""
    return F.silu(x) / 0.596


def mp_sum(a, b, t):
    """(1−t)·a + t·b, divided by its RMS when a and b are independent and unit-RMS: stays unit-RMS.
    Under autocast a branch comes back in bf16 while the stream is fp32: the sum is taken in fp32."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype).lerp(b.to(dtype), t) / math.sqrt((1 - t) ** 2 + t ** 2)


class MPLinear(nn.Module):
    """A linear layer that keeps unit-variance inputs at unit variance: no bias, weight rows of unit RMS,
    scaled by gain/√fan_in. GPT.renormalize_ puts the stored rows back on unit RMS after every optimizer
    step (forced weight normalisation: the optimizer can only turn them, so no weight decay); normalising
    again here makes the gradient orthogonal to each row, as for classic weight normalisation."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))

    def forward(self, x, gain=1.0):
        w = normalize(self.weight.float()) * (gain / math.sqrt(self.weight.size(1)))
        return F.linear(x, w.to(x.dtype))


class UnitRMS(nn.Module):
    def forward(self, x):
        return normalize(x)


def make_linear(config, fan_in, fan_out, bias=True):
    if config.mp:
        return MPLinear(fan_in, fan_out)
    return nn.Linear(fan_in, fan_out, bias=bias and not config.ngpt)  # nGPT has no biases


# ---- nGPT's pieces (Loshchilov et al. 2024, arXiv 2410.01131) ----

def unit(x, dim=-1):
    """x scaled to unit L2 norm along dim (nGPT's Norm)."""
    return x / x.norm(dim=dim, keepdim=True, dtype=torch.float32).clamp_min(1e-6).to(x.dtype)


class ScaledVector(nn.Module):
    """A learned vector that starts at `init` but is stored as `scale`·(value/init): Adam moves a stored
    number by ~lr a step, so `scale` sets how fast the value itself learns (nGPT's s_init / s_scale)."""

    def __init__(self, dim, init, scale):
        super().__init__()
        self.ratio = init / scale
        self.param = nn.Parameter(torch.full((dim,), float(scale)))

    def forward(self):
        return self.param * self.ratio


def rope_cache(head_dim, max_len, theta, scaling=1.0):
    """cos and sin of the rotary angles, (max_len, head_dim/2): position t turns pair i by t·θ^(-2i/head_dim).

    scaling > 1 is YaRN (Peng et al. 2023, as gpt-oss uses it) for a model trained on max_len/scaling
    tokens: pairs that turn many times within that context (high frequency) keep their speed, pairs that
    turn less than once (low frequency) are slowed by `scaling` so the longer context maps onto angles
    they saw in training, with a linear ramp between (β = 32 and α = 1 turns); q and k are both scaled
    by 0.1·ln(scaling) + 1 to keep attention as sharp as it was."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    concentration = 1.0
    if scaling > 1.0:
        trained_len, alpha, beta = max_len / scaling, 1.0, 32.0
        # the pair index at which the trained context holds `turns` full rotations
        pair_at = lambda turns: head_dim / 2 * math.log(trained_len / (turns * 2 * math.pi)) / math.log(theta)
        low, high = pair_at(beta), pair_at(alpha)
        keep = 1 - ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        inv_freq = inv_freq * keep + inv_freq / scaling * (1 - keep)
        concentration = 0.1 * math.log(scaling) + 1.0
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos() * concentration, angles.sin() * concentration


def apply_rope(x, cos, sin):
    """Rotate (B, heads, T, head_dim) by position, half-split as in gpt-oss: dimension i pairs with
    i + head_dim/2. Dot products of rotated q and k then depend only on the distance between positions."""
    T = x.size(-2)
    cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def visible(T, window, device=None):
    """(T, T) bool: query i sees key j iff i - window < j <= i (window 0: every j <= i)."""
    i = torch.arange(T, device=device)
    dist = i[:, None] - i[None, :]
    return (dist >= 0) & (dist < window) if window else dist >= 0


def reference_attention(q, k, v, window=0, sinks=None):
    """Attention written out with plain matmuls: the definition the fast paths are tested against.
    q (B, H, T, d); k, v (B, H_kv, T, d); sinks (H,) or None: one extra logit per head in the
    softmax, not scaled by 1/√d, whose probability is then dropped (it attends to nothing)."""
    B, H, T, d = q.shape
    k, v = (t.repeat_interleave(H // t.size(1), dim=1) for t in (k, v))  # each kv head serves H/H_kv q heads
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(d)
    scores = scores.masked_fill(~visible(T, window, q.device), -math.inf)
    if sinks is not None:
        scores = torch.cat([scores, sinks.float().view(1, H, 1, 1).expand(B, H, T, 1)], dim=-1)
    probs = scores.softmax(dim=-1)[..., :T]
    return probs.to(v.dtype) @ v


def sdpa_attention(q, k, v, window=0, sinks=None):
    """The same attention through F.scaled_dot_product_attention. Plain causal attention is flash
    attention (GQA included); a window becomes a boolean mask; a sink becomes one more key whose value
    is zero and whose logit S_h the (float) mask supplies, so the softmax runs over T + 1 columns.
    A mask has a cost: flash attention takes none, and where no other fused kernel does, SDPA falls back
    to its math kernel, which keeps every layer's fp32 probabilities for backward (kernel_saves_scores)."""
    gqa = k.size(1) != q.size(1)
    if not window and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = visible(q.size(2), window, q.device)
    if sinks is not None:
        H, T = q.size(1), q.size(2)
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, -math.inf)
        mask = torch.cat([mask.expand(H, T, T), sinks.to(q.dtype).view(H, 1, 1).expand(H, T, 1)], dim=-1)
        k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))  # the sink's key and value: zeros
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def make_block_mask(T, window, device):
    """FlexAttention's block mask: which 128 × 128 tiles of the T × T scores hold a visible pair (and
    which hold only visible pairs), so its kernel skips the hidden tiles and masks only inside the rest."""
    from torch.nn.attention.flex_attention import create_block_mask

    causal = lambda b, h, i, j: j <= i
    banded = lambda b, h, i, j: (j <= i) & (i - j < window)
    return create_block_mask(banded if window else causal, None, None, T, T, device=device)


@functools.lru_cache(maxsize=16)
def cached_block_mask(T, window, device):
    return make_block_mask(T, window, device)


def block_mask(T, window, device):
    """make_block_mask, built once per (T, window, device) in eager mode: it evaluates the mask at all T²
    pairs, op by op, too slow to redo in every layer of every forward. Inside torch.compile it is traced
    into the graph instead, on purpose: Dynamo would not use a Python cache anyway (it traces through
    an lru_cache, with a warning, and guards on a dict and replays writes to it). Each layer then traces
    its own copy, a few small fused kernels beside attention itself; in a training graph, Inductor's
    common-subexpression pass merges the layers' identical copies into one per (T, window) a forward
    (an inference graph keeps one per layer)."""
    if torch.compiler.is_compiling():
        return make_block_mask(T, window, device)
    return cached_block_mask(T, window, device)


def flex_attention(q, k, v, window=0, sinks=None):
    """FlexAttention (torch.compile'd on CUDA): a block mask skips the tiles a window hides, which an
    SDPA mask cannot, and backward keeps one logsumexp per row, never T × T scores. The sink rescales
    the output by its softmax share: out · sigmoid(lse - S_h). PyTorch has no FlexAttention backward on
    CPU, so train with it on GPUs only; outside torch.compile it runs an unfused, slow version."""
    from torch.nn.attention.flex_attention import AuxRequest
    from torch.nn.attention.flex_attention import flex_attention as flex

    mask, gqa = block_mask(q.size(2), window, q.device), k.size(1) != q.size(1)
    if sinks is None:  # no logsumexp asked for: compiled CPU FlexAttention cannot return one
        return flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    y, aux = flex(q, k, v, block_mask=mask, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
    return y * torch.sigmoid(aux.lse - sinks.view(1, -1, 1)).unsqueeze(-1).to(y.dtype)


ATTENTION = {"sdpa": sdpa_attention, "flex": flex_attention, "reference": reference_attention}


def attention_kernel(attn_impl, device_type, window=0, sinks=False, eager_inference=False):
    """Which of ATTENTION a layer runs, from --attn_impl, the device type ("cuda", "cpu", "mps") and the
    layer's window (0 if it hides nothing) and sinks. "sdpa", "flex" and "reference" are obeyed as given.
    "auto" sends a layer with a window or sinks on CUDA to FlexAttention: SDPA would need a mask, and a
    masked SDPA can be left only its math kernel, which keeps every layer's T × T fp32 probabilities for
    backward (for gpt-oss at micro batch 64, T = 1024: ~38 GB). Plain causal attention stays on SDPA,
    flash attention, which takes GQA without a mask, so GQA changes no choice. Except in eager inference
    (no gradients, no torch.compile: sampling, HellaSwag), where there is no backward to save memory for
    and FlexAttention is unfused, slow and recompiled for every new T. On other devices "auto" is SDPA:
    FlexAttention has no backward on the CPU or MPS."""
    if attn_impl != "auto":
        return attn_impl
    return "flex" if device_type == "cuda" and (window or sinks) and not eager_inference else "sdpa"


def kernel_saves_scores(kernel, device_type, window=0, sinks=False, compiled=True):
    """Whether the kernel keeps a layer's (B, H, T, T) probabilities for backward, not just one logsumexp
    per row as flash attention and compiled FlexAttention do (uncompiled, FlexAttention runs a dense
    reference that keeps them: torch warns so). The reference always does. SDPA does when its math
    kernel is left: for the sinks' float mask on every device, the CPU included (measured with
    MemTracker), and on GPUs for any mask: flash attention takes none, and whether the
    memory-efficient kernel takes one depends on GQA, dtype and the torch version, so the worst is assumed.
    The CPU's flash kernel takes a boolean (window) mask."""
    if kernel == "reference":
        return True
    if kernel == "flex":
        return not compiled
    return kernel == "sdpa" and (sinks or (bool(window) and device_type != "cpu"))


class KVCache:
    """What GPT.generate keeps between steps: every layer's keys and values so far, as attention uses
    them (normalised, rotated to their absolute positions, scaled), so that a step runs only its new
    token through the model instead of the whole sequence. Each layer's buffers hold max_len positions
    (block_size: generate never caches more) and are allocated at its first step, in the dtype its keys
    come in (autocast's)."""

    def __init__(self, n_layer, max_len):
        self.max_len = max_len
        self.pos = 0  # tokens cached so far: the absolute position of the next one (GPT.features moves it)
        self.k, self.v = [None] * n_layer, [None] * n_layer

    def update(self, layer, k, v):
        """Store the new tokens' k, v (B, H_kv, T, head_dim) at positions pos, pos+1, ... and return the
        layer's keys and values of every token so far, theirs last (views of the buffers)."""
        if self.k[layer] is None:
            B, H, _, d = k.shape
            self.k[layer], self.v[layer] = (t.new_empty(B, H, self.max_len, d) for t in (k, v))
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end], self.v[layer][:, :, self.pos:end] = k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def cached_attention(q, k, v, window=0, sinks=None):
    """A decode step's attention: the newest token's query q (B, H, 1, d) over the keys and values of
    every token so far, its own last (k, v (B, H_kv, L, d), from KVCache.update). All of them are in
    its past, so causality needs no mask; a window, by visible()'s rule (a query sees itself and the
    window - 1 tokens before it), keeps the last `window` keys. The sink joins the softmax as in
    sdpa_attention: one more key, of value zero, whose logit is S_h. SDPA whatever attn_impl says: a
    single query has no tiles for FlexAttention to skip, and nothing here is kept for a backward."""
    if window:
        k, v = k[:, :, -window:], v[:, :, -window:]
    gqa = k.size(1) != q.size(1)
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    H, L = q.size(1), k.size(2)
    mask = torch.cat([q.new_zeros(H, 1, L), sinks.to(q.dtype).view(H, 1, 1)], dim=-1)
    k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))  # the sink's key and value: zeros
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, window=0, layer=0):
        super().__init__()
        self.layer = layer  # this layer's slot in a KVCache
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_dim = config.n_embd // config.n_head
        self.window, self.attn_impl, self.mp = window, config.attn_impl, config.mp
        # q for every head, k and v for every key/value head, in one matmul
        self.c_attn = make_linear(config, config.n_embd, (config.n_head + 2 * self.n_kv_head) * self.head_dim,
                                  bias=config.qkv_bias)
        kv = self.n_kv_head * self.head_dim  # its row blocks, each its own matrix to Muon: see optim.matrices
        self.c_attn.weight.ROW_BLOCKS = (self.n_head * self.head_dim, kv, kv)
        self.c_proj = make_linear(config, config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJ = True  # scaled init, see GPT._init_weights
        self.sinks = nn.Parameter(torch.zeros(config.n_head)) if config.sinks else None
        # nGPT's scale of q and k: one value per head and dimension (NVIDIA/ngpt's sqk, n_embd of them)
        self.s_qk = ScaledVector(config.n_embd, 1.0, config.n_embd ** -0.5) if config.ngpt else None
        if config.pos == "rope":  # buffers, not parameters: recomputed, never saved
            cos, sin = rope_cache(self.head_dim, config.block_size, config.rope_theta, config.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = None

    def effective_window(self, T):
        """A window of T or more hides nothing: the layer is then plain causal (flash) attention."""
        return self.window if self.window < T else 0

    def kernel(self, device_type, T, eager_inference=False):
        """The attention function this layer runs for T tokens on device_type (see attention_kernel)."""
        return attention_kernel(self.attn_impl, device_type, self.effective_window(T), self.sinks is not None,
                                eager_inference)

    def saves_scores(self, device_type, T, compiled=True):
        """Whether that function keeps the layer's T × T probabilities for backward (estimate_memory)."""
        return kernel_saves_scores(self.kernel(device_type, T), device_type, self.effective_window(T),
                                   self.sinks is not None, compiled)

    def forward(self, x, cache=None):
        """x (B, T, C). With a KVCache (generate), x holds the tokens after the cache.pos cached ones:
        the whole prompt at the first step (cache.pos 0), then one token per step."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split([C, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=2)
        # (B, T, heads·head_dim) -> (B, heads, T, head_dim)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))
        if self.mp:  # unit-RMS q and k per head bound the logits (EDM2 normalises them, too)
            q, k = normalize(q), normalize(k)
        if self.rope_cos is not None:
            cos, sin = self.rope_cos, self.rope_sin
            if cache is not None:  # the new tokens sit at positions cache.pos, cache.pos + 1, ...
                cos, sin = cos[cache.pos:], sin[cache.pos:]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.s_qk is not None:
            # nGPT: q·k is a cosine weighted by s_qk² per dimension, times the softmax scale √head_dim (not
            # 1/√head_dim). Both of NVIDIA's s_qk factors go on q, so GQA's shared k needs none; head_dim
            # on q and attention's own 1/√head_dim leave √head_dim
            s_qk = self.s_qk().view(self.n_head, 1, self.head_dim)
            q, k = unit(q) * (s_qk.square() * self.head_dim), unit(k)
        if cache is not None and cache.pos:  # a decode step: one new token over every cached key, its own included
            assert T == 1, "after the prompt, a KVCache step takes one token"
            k, v = cache.update(self.layer, k, v)
            y = cached_attention(q, k, v, self.window, self.sinks)
        else:
            if cache is not None:  # the prompt: keep its keys and values, and attend exactly as without a cache
                cache.update(self.layer, k, v)
            eager_inference = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            kernel = self.kernel(q.device.type, T, eager_inference)
            y = ATTENTION[kernel](q, k, v, self.effective_window(T), self.sinks)
        if self.mp:  # an average of values is shorter than each of them: bring every head back to unit RMS
            y = normalize(y)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


def clamped_swiglu(h):
    """gpt-oss's SwiGLU on interleaved gate/up columns: clamp both to ±7 (gate from above only),
    swish(gate) with α = 1.702, times (up + 1)."""
    gate, up = h[..., ::2].clamp(max=7.0), h[..., 1::2].clamp(-7.0, 7.0)
    return gate * torch.sigmoid(1.702 * gate) * (up + 1)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.ngpt = config.ngpt
        hidden = config.mlp_hidden or (8 * config.n_embd // 3 if self.swiglu or self.ngpt else 4 * config.n_embd)
        if self.ngpt:  # a SiLU-gated MLP whose two branches have learned scales; the gate's also ×√n_embd
            self.c_fc = make_linear(config, config.n_embd, 2 * hidden)
            self.c_proj = make_linear(config, hidden, config.n_embd)
            self.s_u, self.s_v = ScaledVector(hidden, 1.0, 1.0), ScaledVector(hidden, 1.0, 1.0)
            self.gate_scale = config.n_embd ** 0.5
            return
        # swiglu: gate and up projections from one matmul, interleaved (gate = even columns, up = odd)
        self.c_fc = make_linear(config, config.n_embd, 2 * hidden if self.swiglu else hidden)
        # GPT-2 used GELU's tanh approximation ("gelu_new" in HF); mp uses EDM2's rescaled SiLU
        self.gelu = mp_silu if config.mp else nn.GELU(approximate="tanh")
        self.c_proj = make_linear(config, hidden, config.n_embd)
        self.c_proj.RESIDUAL_PROJ = True

    def forward(self, x):
        h = self.c_fc(x)
        if self.ngpt:
            u, v = h.chunk(2, dim=-1)
            return self.c_proj(u * self.s_u() * F.silu(v * (self.s_v() * self.gate_scale)))
        return self.c_proj(clamped_swiglu(h) if self.swiglu else self.gelu(h))


class MoE(nn.Module):
    """Mixture of experts (gpt-oss): a router with bias scores every expert, each token goes to its top-k,
    and their SwiGLU outputs are summed with weights softmax(the k chosen logits).

    The token→expert pairs are sorted by expert so each expert's tokens form one slice, and one grouped
    matmul runs every expert on its slice: every shape is fixed, so torch.compile sees no data-dependent
    sizes and no token is dropped. After each forward, `load` holds the fraction of the pairs each
    expert received and `aux_loss` Switch Transformer's balance loss E·Σ_e load_e·mean_prob_e (1 when
    balanced), which GPT.forward adds with weight moe_aux_loss."""

    def __init__(self, config):
        super().__init__()
        E, C, hidden = config.moe_experts, config.n_embd, config.expert_hidden
        self.topk = config.moe_topk
        self.router = nn.Linear(C, E)
        # expert weights stacked as (experts, in, out): one slice per expert for the grouped matmul
        self.w_fc = nn.Parameter(torch.empty(E, C, 2 * hidden))  # gate/up interleaved, as in MLP
        self.fc_bias = nn.Parameter(torch.zeros(E, 2 * hidden))
        self.w_proj = nn.Parameter(torch.empty(E, hidden, C))
        self.w_fc.IN_OUT = self.w_proj.IN_OUT = True  # transposed from nn.Linear's (out, in): see optim.py
        self.proj_bias = nn.Parameter(torch.zeros(E, C))
        self.register_buffer("load", torch.zeros(E), persistent=False)
        self.aux_loss = None

    def forward(self, x):
        shape, E = x.shape, self.router.out_features
        x = x.reshape(-1, shape[-1])
        logits = self.router(x).float()
        top_logits, expert = logits.topk(self.topk, dim=-1)  # (N, k)
        weight = top_logits.softmax(dim=-1)
        # sort the N·k (token, expert) pairs by expert; offs[e] is where expert e's slice ends
        expert, order = expert.flatten().sort(stable=True)
        token = order // self.topk
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, expert, torch.ones_like(expert))
        offs = counts.cumsum(0).to(torch.int32)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        h = F.grouped_mm(x[token].to(dtype), self.w_fc.to(dtype), offs=offs) + self.fc_bias[expert].to(dtype)
        y = F.grouped_mm(clamped_swiglu(h), self.w_proj.to(dtype), offs=offs) + self.proj_bias[expert].to(dtype)
        y = y.float() * weight.flatten()[order, None]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token, y)

        load = counts.float() / expert.numel()
        self.load.copy_(load.detach())
        self.aux_loss = E * (load * logits.softmax(dim=-1).mean(dim=0)).sum()
        return out.to(dtype).view(shape)


class Block(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        windowed = config.window and layer % config.window_every == 0
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, window=config.window if windowed else 0, layer=layer)
        self.ln_2 = nn.Identity() if config.mp else make_norm(config)
        self.mlp = MoE(config) if config.moe_experts else MLP(config)
        self.mp_t = config.mp_t if config.mp else None
        if config.ngpt:  # per-dimension step sizes towards each branch's output ("eigen learning rates")
            self.alpha_attn = ScaledVector(config.n_embd, 0.05, config.n_embd ** -0.5)
            self.alpha_mlp = ScaledVector(config.n_embd, 0.05, config.n_embd ** -0.5)
        self.ngpt = config.ngpt

    def forward(self, x, cache=None):
        """cache: generate's KVCache (see CausalSelfAttention.forward), or None."""
        if self.ngpt:
            # nGPT: x is a point on the sphere; each branch's output, normalised, is a target point, and
            # x moves a learned fraction alpha of the way there, back onto the sphere
            # (|alpha|, as NVIDIA's code takes it: a step never points away from the target)
            x = unit(x + self.alpha_attn().abs() * (unit(self.attn(x, cache)) - x))
            return unit(x + self.alpha_mlp().abs() * (unit(self.mlp(x)) - x))
        if self.mp_t is not None:
            # EDM2's encoder block: the main path itself is brought to unit RMS (ln_1 is parameter-free
            # here), then every branch output and every sum is unit-RMS by construction. Without it,
            # tokens grow correlated with depth and the sums drift below 1 (~5% by layer 12).
            x = self.ln_1(x)
            x = mp_sum(x, self.attn(x, cache), self.mp_t)
            return mp_sum(x, self.mlp(x), self.mp_t)
        # pre-norm residual stream (GPT-2 moved the LayerNorms to the block inputs)
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


# ---------------------------------------------------------------------------
# Hugging Face's names and shapes, for GPT.from_pretrained and GPT.hf_model

# Hugging Face stores these as Conv1D, i.e. (in_features, out_features): transpose on import/export.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# our names in block i -> transformers' GptOssForCausalLM's in model.layers.{i}. Both keep the experts' weights as
# (in, out) and gate/up interleaved (gate = even columns), as gpt-oss does; c_attn splits into q/k/v_proj, and a
# dense SwiGLU travels as a mixture of one expert (gpt_oss_state_dict)
GPT_OSS_NAMES = {
    "ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight", "attn.c_proj.bias": "self_attn.o_proj.bias",
    "attn.sinks": "self_attn.sinks", "mlp.router.weight": "mlp.router.weight", "mlp.router.bias": "mlp.router.bias",
    "mlp.w_fc": "mlp.experts.gate_up_proj", "mlp.fc_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.w_proj": "mlp.experts.down_proj", "mlp.proj_bias": "mlp.experts.down_proj_bias",
}
GPT_OSS_FAMILY = (("norm", "rmsnorm"), ("pos", "rope"), ("mlp", "swiglu"))


def yarn_problem(head_dim, trained_len, theta):
    """Why transformers' YaRN would turn pairs differently from rope_cache's (None if it would not): it clamps
    the ramp between full and slowed speed to pairs 0 .. head_dim - 1, which rope_cache does not (and gpt-oss's
    reference asserts 0 < start < end < head_dim/2 - 1)."""
    start, end = (head_dim / 2 * math.log(trained_len / (turns * 2 * math.pi)) / math.log(theta) for turns in (32, 1))
    if start < 0 or end > head_dim - 1:
        return (f"YaRN over {trained_len:g} trained tokens (block_size / rope_scaling) puts its ramp at pairs "
                f"{start:.2f}..{end:.2f}, outside 0..{head_dim - 1}, where transformers clamps it")
    return None


def hf_refusal(cfg):
    """Why no transformers class computes this model's logits, or None: GPT-2 fits GPT2LMHeadModel, the gpt-oss
    family (RMSNorm, RoPE, the clamped SwiGLU or its experts, any window, sinks, GQA, tying) GptOssForCausalLM."""
    if cfg.mp or cfg.ngpt:
        what = "EDM2's magnitude-preserving layers (--mp)" if cfg.mp else "nGPT's normalised transformer (--ngpt)"
        return f"{what} have no transformers class"
    if cfg.is_gpt2:
        return None
    off = [(k, v) for k, v in GPT_OSS_FAMILY if getattr(cfg, k) != v]
    if off:
        return ("GPT2LMHeadModel holds only GPT-2 (every gpt-oss switch off) and GptOssForCausalLM needs "
                + ", ".join(f"--{k} {v} (this model: {getattr(cfg, k)})" for k, v in off))
    if cfg.n_embd % 8:
        return f"transformers runs experts as grouped matmuls, whose rows need n_embd a multiple of 8, not {cfg.n_embd}"
    if cfg.rope_scaling > 1:
        return yarn_problem(cfg.n_embd // cfg.n_head, cfg.block_size / cfg.rope_scaling, cfg.rope_theta)
    return None


def gpt_oss_width(cfg):
    """The experts' width in GptOssForCausalLM: a dense SwiGLU's rounded up to a multiple of 8 for transformers'
    grouped matmuls, with zero units (gate 0 gives swish(0)·(up + 1) = 0, and their output rows are zero)."""
    return cfg.expert_hidden if cfg.moe_experts else math.ceil((cfg.mlp_hidden or 8 * cfg.n_embd // 3) / 8) * 8


def gpt_oss_config(cfg):
    """transformers' GptOssConfig for a gpt-oss-family GPTConfig (see hf_refusal)."""
    from transformers import GptOssConfig

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling > 1:  # rope_cache's YaRN: trained on block_size / rope_scaling tokens, β 32, α 1, unrounded
        trained = cfg.block_size / cfg.rope_scaling
        rope.update(rope_type="yarn", factor=cfg.rope_scaling, beta_fast=32.0, beta_slow=1.0, truncate=False,
                    original_max_position_embeddings=int(trained) if trained.is_integer() else trained)
    eot = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>
    return GptOssConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, head_dim=cfg.n_embd // cfg.n_head,
        intermediate_size=gpt_oss_width(cfg),
        num_local_experts=cfg.moe_experts or 1, num_experts_per_tok=cfg.moe_topk if cfg.moe_experts else 1,
        layer_types=["sliding_attention" if cfg.window and i % cfg.window_every == 0 else "full_attention"
                     for i in range(cfg.n_layer)],
        sliding_window=cfg.window or cfg.block_size,  # transformers needs one even where no layer slides
        max_position_embeddings=cfg.block_size, rope_parameters=rope, rms_norm_eps=1e-5,
        attention_bias=True,  # q, k, v and o_proj alike: without qkv_bias ours go as zero q, k, v biases
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eot, eos_token_id=eot)


def gpt_oss_state_dict(model):
    """model's weights under GptOssForCausalLM's names (fp32, the vocabulary padding dropped)."""
    cfg, V = model.config, model.config.vocab_size
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    q, kv = cfg.n_embd, cfg.kv_heads * (cfg.n_embd // cfg.n_head)
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"][:V],
           "model.norm.weight": sd["transformer.ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:V]
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        layer = {k.split(".", 3)[3]: v for k, v in sd.items() if k.startswith(f"transformer.h.{i}.")}
        w = layer.pop("attn.c_attn.weight")
        b = layer.pop("attn.c_attn.bias", torch.zeros(len(w)))
        for name, w_, b_ in zip("qkv", w.split([q, kv, kv]), b.split([q, kv, kv])):
            out[f"{p}self_attn.{name}_proj.weight"], out[f"{p}self_attn.{name}_proj.bias"] = w_, b_
        # no sinks: a sink logit of -inf takes no probability, and the softmax is over the keys alone
        layer.setdefault("attn.sinks", torch.full((cfg.n_head,), -math.inf))
        if not cfg.moe_experts:  # one expert, chosen by every token with weight softmax([router logit]) = 1
            extra = gpt_oss_width(cfg) - layer["mlp.c_proj.weight"].size(1)  # zero units, see gpt_oss_width
            layer.update({"mlp.w_fc": F.pad(layer.pop("mlp.c_fc.weight").t(), (0, 2 * extra))[None],
                          "mlp.fc_bias": F.pad(layer.pop("mlp.c_fc.bias"), (0, 2 * extra))[None],
                          "mlp.w_proj": F.pad(layer.pop("mlp.c_proj.weight").t(), (0, 0, 0, extra))[None],
                          "mlp.proj_bias": layer.pop("mlp.c_proj.bias")[None],
                          "mlp.router.weight": torch.zeros(1, cfg.n_embd), "mlp.router.bias": torch.zeros(1)})
        out.update({p + GPT_OSS_NAMES[k]: v for k, v in layer.items()})
    return {k: v.contiguous() for k, v in out.items()}


def gpt_oss_fields(c, where):
    """GPTConfig fields (all but sinks, which the weights decide) for transformers' GptOssConfig c; ValueError
    naming what GPTConfig cannot represent."""
    def refuse(why):
        raise ValueError(f"{where}: {why}; GPTConfig cannot represent that")

    n, C, H, E, k = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok
    if c.head_dim * c.num_attention_heads != C:
        refuse(f"head_dim {c.head_dim} x {c.num_attention_heads} heads is not hidden_size {C}")
    if c.rms_norm_eps != 1e-5 or (getattr(c, "swiglu_alpha", 1.702), getattr(c, "swiglu_limit", 7.0)) != (1.702, 7.0):
        refuse(f"rms_norm_eps {c.rms_norm_eps}, swiglu_alpha {getattr(c, 'swiglu_alpha', 1.702)}, swiglu_limit "
               f"{getattr(c, 'swiglu_limit', 7.0)} differ from gpt-oss's 1e-05, 1.702, 7.0")
    rope = {key: v for key, v in c.rope_parameters.items() if (key, v) != ("partial_rotary_factor", 1.0)}
    theta, kind, factor = rope.pop("rope_theta"), rope.pop("rope_type", "default"), rope.pop("factor", 1.0)
    trained = rope.pop("original_max_position_embeddings", None)
    if kind == "yarn":
        yarn = {"beta_fast": rope.pop("beta_fast", 32) or 32, "beta_slow": rope.pop("beta_slow", 1) or 1,
                "truncate": rope.pop("truncate", True)}
        if yarn != {"beta_fast": 32, "beta_slow": 1, "truncate": False} or any(v is not None for v in rope.values()):
            refuse(f"YaRN with {yarn | rope} (ours: beta_fast 32, beta_slow 1, truncate False, nothing else)")
        if factor != 1 and (factor < 1 or trained is None or factor * trained != c.max_position_embeddings):
            refuse(f"YaRN factor {factor} x original_max_position_embeddings {trained} is not max_position_embeddings "
                   f"{c.max_position_embeddings} (our YaRN is trained on block_size / rope_scaling tokens)")
        if factor != 1 and (why := yarn_problem(c.head_dim, trained, theta)):
            refuse(why)
    elif kind not in ("default", "yarn") or any(v is not None for v in rope.values()):
        refuse(f"rope {c.rope_parameters} (ours: plain RoPE or gpt-oss's YaRN)")
    sliding = [t == "sliding_attention" for t in c.layer_types]
    every = next((e for e in (2, *range(1, n + 1)) if sliding == [i % e == 0 for i in range(n)]), None)
    if set(c.layer_types) - {"sliding_attention", "full_attention"} or (any(sliding) and every is None):
        refuse(f"layer_types {c.layer_types} (ours: sliding on layers 0, e, 2e, ... for one window_every e)")
    fields = dict(block_size=c.max_position_embeddings, vocab_size=c.vocab_size, n_layer=n,
                  n_head=c.num_attention_heads, n_embd=C, norm="rmsnorm", pos="rope", rope_theta=theta,
                  rope_scaling=float(factor), mlp="swiglu",
                  n_kv_head=0 if c.num_key_value_heads == c.num_attention_heads else c.num_key_value_heads,
                  qkv_bias=getattr(c, "attention_bias", True), window=c.sliding_window if any(sliding) else 0,
                  window_every=every or 2, tie_embeddings=c.tie_word_embeddings)
    if E > 1:
        fields.update(moe_experts=E, moe_topk=k)
    try:  # 0 where H is GPTConfig's default width
        default_hidden = GPTConfig(**fields).expert_hidden if E > 1 else 8 * C // 3
    except ValueError:
        default_hidden = None
    fields["mlp_hidden"] = 0 if H == default_hidden else H
    return fields


def from_gpt_oss_state_dict(sd, cfg):
    """GptOssForCausalLM's weights sd under our names for cfg (the inverse of gpt_oss_state_dict)."""
    pad = lambda w: F.pad(w, (0, 0, 0, cfg.padded_vocab_size - cfg.vocab_size))  # padded rows are zero
    out = {"transformer.wte.weight": pad(sd["model.embed_tokens.weight"]),
           "lm_head.weight": pad(sd.get("lm_head.weight", sd["model.embed_tokens.weight"])),  # or tied
           "transformer.ln_f.weight": sd["model.norm.weight"]}
    ours = {v: k for k, v in GPT_OSS_NAMES.items()}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        layer = {ours[k[len(p):]]: v for k, v in sd.items() if k.startswith(p) and k[len(p):] in ours}
        layer["attn.c_attn.weight"] = torch.cat([sd[f"{p}self_attn.{n}_proj.weight"] for n in "qkv"])
        if cfg.qkv_bias:
            layer["attn.c_attn.bias"] = torch.cat([sd[f"{p}self_attn.{n}_proj.bias"] for n in "qkv"])
        layer.setdefault("attn.c_proj.bias", torch.zeros(cfg.n_embd))  # attention_bias False: no o_proj bias
        if not cfg.sinks:
            del layer["attn.sinks"]
        if not cfg.moe_experts:  # one expert: the router has nothing to choose
            del layer["mlp.router.weight"], layer["mlp.router.bias"]
            layer.update({"mlp.c_fc.weight": layer.pop("mlp.w_fc")[0].t(), "mlp.c_fc.bias": layer.pop("mlp.fc_bias")[0],
                          "mlp.c_proj.weight": layer.pop("mlp.w_proj")[0].t(),
                          "mlp.c_proj.bias": layer.pop("mlp.proj_bias")[0]})
        out.update({f"transformer.h.{i}.{k}": v for k, v in layer.items()})
    return out


# ---------------------------------------------------------------------------
# the loss: cross-entropy straight from the hidden states, a chunk of rows at a time

# a chunk's fp32 logits stay under this many bytes (1,024 rows of GPT-2's vocabulary); Liger-Kernel's
# fused linear cross-entropy picks chunks of about this size too
LOSS_CHUNK_BYTES = 256 * 2**20


def loss_chunk_rows(rows, vocab):
    """Rows per chunk: a power of two whose fp32 logits fit LOSS_CHUNK_BYTES (all rows, if they do)."""
    fit = max(1, LOSS_CHUNK_BYTES // (4 * vocab))
    return min(rows, 2 ** int(math.log2(fit)))


def chunked_cross_entropy(x, w, targets, vocab_size, grads):
    """(loss summed over the rows whose target is not -1, their count, and if grads the gradients of that
    sum's mean with respect to x (N, C) and w (V, C)), where logits = x·wᵀ over the first vocab_size of the
    V columns. A chunk's logits live only inside its loop turn: the (N, V) fp32 logits and their gradient,
    many GiB at GPT-2's batch, never exist at once. Padded columns get -inf: they never take probability,
    and the loss reads a contiguous tensor (a slice [:, :vocab_size] of it is much slower on CPU)."""
    # the matmuls' dtype: autocast's (cast here, as out= below is outside autocast's reach), else x's
    dev = x.device.type
    low = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    w_low = w.to(low)
    count = (targets != -1).sum()
    total = torch.zeros((), device=x.device)
    step = loss_chunk_rows(x.size(0), w.size(0))
    # every chunk reuses the same buffers: on the CPU a fresh 200 MB tensor costs ~50 ms of page faults
    z = torch.empty(step, w.size(0), dtype=low, device=x.device)  # logits, then the gradient in low
    logp = z if low == torch.float32 else torch.empty(z.shape, device=x.device)  # fp32 log-probabilities
    if grads:
        grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        grad_w_chunk = torch.empty(w.shape, dtype=low, device=w.device)
    for i in range(0, x.size(0), step):
        xc, tc = x[i:i + step].to(low), targets[i:i + step]
        n = len(xc)
        zc, logpc = z[:n], logp[:n]
        torch.mm(xc, w_low.t(), out=zc)
        zc[:, vocab_size:] = float("-inf")
        # in fp32 and in place (log_softmax's dtype= would make a hidden fp32 copy); more exact than
        # logsumexp(z) − z[target] when the loss is near 0
        torch.log_softmax(logpc.copy_(zc), dim=-1, out=logpc)
        valid, tc = tc != -1, tc.clamp(min=0)
        total = total - (logpc.gather(1, tc[:, None]).squeeze(1) * valid).sum()
        if grads:  # d(loss sum)/d(logits) = softmax − one-hot, in place of the log-probabilities
            p = logpc.exp_()
            p[torch.arange(n, device=p.device), tc] -= 1
            p = zc.copy_(p)  # in low for the matmuls (a no-op in fp32, where zc is p)
            # ignored rows masked on the small side of each matmul, not across p's V columns
            grad_x[i:i + n] = (p @ w_low).float() * valid[:, None]
            grad_w += torch.mm(p.t(), xc * valid[:, None].to(low), out=grad_w_chunk)
    if not grads:
        return total, count, None, None
    # ÷ count after the matmuls, in fp32: before them, fp16's would flush most of p to zero
    return total, count, grad_x.div_(count).to(x.dtype), grad_w.div_(count)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x·wᵀ against targets (-1: ignored) whose backward costs no recompute: the
    gradients are found chunk by chunk in the forward (as Liger-Kernel's fused linear cross-entropy does)
    and kept, the size of x and w, for backward to scale. The same FLOPs as nn.Linear + F.cross_entropy."""

    @staticmethod
    def forward(ctx, x, w, targets, vocab_size):
        total, count, grad_x, grad_w = chunked_cross_entropy(x, w, targets, vocab_size, grads=True)
        ctx.save_for_backward(grad_x, grad_w.to(w.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None


def linear_cross_entropy(x, w, targets, vocab_size):
    """F.cross_entropy(F.linear(x, w)[..., :vocab_size] in fp32, targets, ignore_index=-1), without the
    logits: x (..., C), w (V, C), targets (...): token ids below vocab_size, or -1 (ignored; unchecked,
    as a check would wait for the GPU)."""
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return LinearCrossEntropy.apply(x, w, targets, vocab_size)
    total, count, _, _ = chunked_cross_entropy(x, w, targets, vocab_size, grads=False)
    return total / count


HF_MODEL_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.pos == "learned":  # with rope, positions enter through the rotation of q and k
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying (GPT-2, Press & Wolf 2017)
        self.apply(self._init_weights)
        if config.mp:
            # the logits' scale, learned from 0 (EDM2's out_gain): training starts at uniform logits. Adam
            # moves a scalar ~lr a step, so it is stored divided by √n_embd (as nGPT stores its s_z):
            # otherwise the logits would stay near zero for hundreds of steps at language-model lrs
            self.out_gain = nn.Parameter(torch.zeros([]))
        if config.ngpt:  # nGPT's logit scale s_z, per vocabulary entry
            self.s_z = ScaledVector(config.padded_vocab_size, 1.0, config.n_embd ** -0.5)
        self.renormalize_()  # mp, ngpt: the constrained weights start on their sphere

    def _init_weights(self, module):
        # GPT-2 paper: scale the residual-path weights by 1/sqrt(N) for N residual adds (2 per block)
        residual_std = 0.02 * (2 * self.config.n_layer) ** -0.5
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=residual_std if getattr(module, "RESIDUAL_PROJ", False) else 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, MoE):  # experts start like the dense MLP's layers
            nn.init.normal_(module.w_fc, mean=0.0, std=0.02)
            nn.init.normal_(module.w_proj, mean=0.0, std=residual_std)

    def forward(self, idx, targets=None, cache=None):
        """(logits, None) without targets; (None, the mean loss) with them (targets -1 are ignored): the loss
        comes from the hidden states a chunk at a time, and the whole logits are never made. cache: a
        KVCache, for generate (see features); training never passes one."""
        x = self.features(idx, cache)
        if targets is None:
            return self.head(x), None
        loss = linear_cross_entropy(x, self.head_weight(), targets, self.config.vocab_size)
        if self.config.moe_aux_loss and torch.is_grad_enabled():  # in training only: val loss stays comparable
            aux = [block.mlp.aux_loss for block in self.transformer.h]
            loss = loss + self.config.moe_aux_loss * sum(aux) / len(aux)
        return None, loss

    def features(self, idx, cache=None):
        """The final hidden states (B, T, n_embd): everything but the output layer. With a KVCache, idx
        holds only the tokens after the cache.pos cached ones: their positions start at cache.pos, they
        attend to the cached keys too, and the cache keeps theirs for the next step."""
        B, T = idx.size()
        start = 0 if cache is None else cache.pos
        assert start + T <= self.config.block_size, \
            f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}"
        x = self.transformer.wte(idx)
        if self.config.pos == "learned":
            pos = self.transformer.wpe(torch.arange(start, start + T, dtype=torch.long, device=idx.device))
            x = mp_sum(normalize(x), normalize(pos), 0.5) if self.config.mp else x + pos
        elif self.config.mp:
            x = normalize(x)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.pos += T  # every layer has stored these tokens' keys and values
        return self.transformer.ln_f(x)

    def head_weight(self):
        """The output layer's matrix (padded_vocab_size, n_embd): logits = features · head_weight()ᵀ."""
        if self.config.mp:
            return normalize(self.lm_head.weight.float()) * self.out_gain  # gain·√n_embd / √fan_in
        if self.config.ngpt:  # a cosine per vocabulary entry, times its learned scale
            return self.lm_head.weight * self.s_z()[:, None]
        return self.lm_head.weight

    def head(self, x):
        """Logits over the real vocabulary. Callers that need only some positions (HellaSwag scores
        only the endings) pass just those rows of features(): the output layer is the costly part."""
        # the padded columns exist only to make the matmul fast: cut them so they are never predicted
        return F.linear(x, self.head_weight().to(x.dtype))[..., : self.config.vocab_size]

    def _constrained(self):
        """[(weight, dim)]: what renormalize_ keeps at unit size along dim (mp and ngpt only)."""
        embeddings = [self.transformer.wte.weight] + ([] if self.config.tie_embeddings else [self.lm_head.weight])
        embeddings += [self.transformer.wpe.weight] if self.config.pos == "learned" else []
        if self.config.mp:  # every fan-in row
            return [(m.weight, -1) for m in self.modules() if isinstance(m, MPLinear)] + [(w, -1) for w in embeddings]
        if self.config.ngpt:  # along the n_embd axis: rows of the matrices that read the stream, columns of those that write it
            found = [(w, -1) for w in embeddings]
            for block in self.transformer.h:
                found += [(block.attn.c_attn.weight, -1), (block.attn.c_proj.weight, 0),
                          (block.mlp.c_fc.weight, -1), (block.mlp.c_proj.weight, 0)]
            return found
        return []

    def normalized_params(self):
        """The weights kept at a fixed norm after every step (mp, ngpt): weight decay must skip them."""
        return [w for w, _ in self._constrained()]

    @torch.no_grad()
    def renormalize_(self):
        """Forced weight normalisation: every mp weight back on unit-RMS rows (EDM2), every ngpt weight
        and embedding back on unit L2 norm along n_embd (nGPT). The training loop runs it after each
        optimizer step, on the unwrapped model (outside torch.compile), identically on every rank, so
        checkpoints hold normalised weights. A no-op for the other models."""
        for w, dim in self._constrained():
            w.copy_(normalize(w.float()) if self.config.mp else unit(w.float(), dim))

    # ---- parameters, FLOPs, optimizer ----

    def num_params(self, non_embedding=True, active=False):
        """Parameter count. non_embedding drops the lookups, which cost no FLOPs: the position
        embedding, and wte unless it is tied to the output layer (then it does real work there).
        active counts, of a mixture of experts, only the top-k experts a token runs through."""
        n = sum(p.numel() for p in self.parameters())  # a tied wte/lm_head counts once
        if non_embedding:
            if self.config.pos == "learned":
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        if active and self.config.moe_experts:
            E, k = self.config.moe_experts, self.config.moe_topk
            experts = sum(p.numel() for b in self.transformer.h for p in (b.mlp.w_fc, b.mlp.fc_bias, b.mlp.w_proj, b.mlp.proj_bias))
            n -= experts * (E - k) // E
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token, 6N + 12·L·H·Q·T (PaLM appendix B; nanoGPT's estimate_mfu):
        6 per active weight for forward+backward matmuls, plus attention's QK^T and AV over T keys
        (`window` keys in a windowed layer); like PaLM, causal masking is not discounted."""
        cfg = self.config
        T = seq_len or cfg.block_size
        keys = sum(min(block.attn.window or T, T) for block in self.transformer.h)
        return 6 * self.num_params(active=True) + 12 * cfg.n_head * (cfg.n_embd // cfg.n_head) * keys

    def attention_kernels(self, device_type, seq_len=None):
        """Per layer, the attention function ("sdpa", "flex", "reference") that training (and compiled
        evaluation) runs on device_type for seq_len tokens (default block_size): asked on any machine."""
        T = seq_len or self.config.block_size
        return [block.attn.kernel(device_type, T) for block in self.transformer.h]

    def describe_attention(self, device_type, seq_len=None, compiled=True):
        """One line for the log, e.g. "attention on cuda: flex on 6 layers (window 128 + sinks), flex on 6
        layers (causal + sinks)"; a layer that keeps T × T scores for backward (in a compiled training step,
        or not) says so."""
        T = seq_len or self.config.block_size
        groups = {}  # (kernel, what the layer does) -> layers
        for block in self.transformer.h:
            attn = block.attn
            window = attn.effective_window(T)
            what = (f"window {window}" if window else "causal") + (" + sinks" if attn.sinks is not None else "")
            if attn.saves_scores(device_type, T, compiled):
                what += "; saves T×T scores for backward"
            key = (attn.kernel(device_type, T), what)
            groups[key] = groups.get(key, 0) + 1
        return f"attention on {device_type}: " + ", ".join(
            f"{kernel} on {n} layer{'s' if n > 1 else ''} ({what})" for (kernel, what), n in groups.items())

    def estimate_mfu(self, tokens_per_sec, peak_flops, seq_len=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak FLOP/s."""
        return self.flops_per_token(seq_len) * tokens_per_sec / peak_flops

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, eps=1e-8):
        """AdamW that decays only matrices (weights, embeddings), not biases (the experts' are 2-D) and
        norm gains, nor weights that forced weight normalisation keeps at a fixed norm."""
        params = [p for p in self.parameters() if p.requires_grad]
        fixed = {id(p) for p in self.normalized_params()}
        fixed |= {id(p) for name, p in self.named_parameters() if name.endswith("bias")}
        decay = [p for p in params if p.dim() >= 2 and id(p) not in fixed]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in {id(q) for q in decay}], "weight_decay": 0.0},
        ]
        # the fused kernel: one launch for all parameters on CUDA; on the CPU 3-8x faster than the default
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type in ("cuda", "cpu"))

    # ---- sampling ----

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """Extend idx (B, T) by max_new_tokens sampled tokens. temperature=0 decodes greedily.
        Pass a torch.Generator for reproducible samples that leave the global RNG untouched.

        With the KV cache (use_cache, the default) the prompt runs through the model once, then each step
        feeds only the token just sampled, which attends to the cached keys and values of those before
        it. Once the sequence outgrows block_size the context is its last block_size tokens, as without
        the cache: every token's position then shifts at each step, which invalidates everything cached
        (the keys, and the hidden states they came from), so each of those steps re-runs the cropped
        context uncached. The tokens are those of use_cache=False, which re-runs the context every step."""
        new = list(self.generate_tokens(idx, max_new_tokens, temperature, top_k, generator, use_cache))
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """generate, a step at a time: yields each new token (B, 1) as soon as it is sampled, for a caller
        that streams them (sample.py). A ValueError for bad arguments comes with the first token."""
        if idx.size(1) == 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError("generate needs a non-empty prompt, temperature >= 0 and top_k >= 1 (or None)")
        block_size = self.config.block_size
        cache = KVCache(self.config.n_layer, block_size) if use_cache else None
        for _ in range(max_new_tokens):
            # always through forward (self(...)): FSDP gathers the weights there
            if cache is not None and idx.size(1) <= block_size:
                logits, _ = self(idx[:, cache.pos:], cache=cache)  # the whole prompt at first, then one token
            else:
                logits, _ = self(idx[:, -block_size:])
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits[logits < kth] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
            yield next_id

    # ---- Hugging Face import / export ----

    @classmethod
    def from_pretrained(cls, name_or_dir, **overrides):
        """Load a transformers model with the same logits: GPT-2 from the HF hub (gpt2, gpt2-medium,
        gpt2-large, gpt2-xl) or a GPT2LMHeadModel folder, or a GptOssForCausalLM folder (as export_hf.py
        writes them) into the gpt-oss switches. overrides set GPTConfig fields the model leaves open, e.g.
        vocab_pad_multiple=64."""
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(name_or_dir)
        if hf_config.model_type == "gpt_oss":
            return cls._from_gpt_oss(name_or_dir, hf_config, overrides)
        if hf_config.model_type != "gpt2":
            raise ValueError(f"{name_or_dir}: a {hf_config.model_type!r} model; from_pretrained loads GPT-2 "
                             f"(GPT2LMHeadModel) and gpt-oss (GptOssForCausalLM) folders")
        from transformers import GPT2LMHeadModel

        if not GPTConfig(**overrides).is_gpt2:
            raise ValueError("from_pretrained loads GPT-2: leave the gpt-oss switches at their defaults")
        hf = GPT2LMHeadModel.from_pretrained(name_or_dir, config=hf_config)
        c = hf.config
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{name_or_dir}: activation {c.activation_function!r} is not GPT-2's tanh GELU")
        if c.scale_attn_by_inverse_layer_idx or c.reorder_and_upcast_attn or not c.scale_attn_weights:
            raise ValueError(f"{name_or_dir}: attention scaling options differ from GPT-2's")
        if not c.tie_word_embeddings or c.layer_norm_epsilon != 1e-5 or c.n_inner not in (None, 4 * c.n_embd):
            raise ValueError(f"{name_or_dir}: not GPT-2's shape (needs tied embeddings, layer_norm_epsilon 1e-5 "
                             f"and n_inner 4·n_embd)")
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd, **overrides)
        model = cls(config)
        sd = model.state_dict()
        sd_hf = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        sd_hf.pop("lm_head.weight", None)  # tied to wte
        with torch.no_grad():
            for k, v in sd_hf.items():
                if k.endswith(CONV1D_WEIGHTS):
                    v = v.t()
                if k == "transformer.wte.weight":  # padded rows, if any, stay zero
                    sd[k].zero_()
                    sd[k][: v.size(0)].copy_(v)
                    continue
                assert sd[k].shape == v.shape, f"{k}: {tuple(sd[k].shape)} vs HF {tuple(v.shape)}"
                sd[k].copy_(v)
        return model

    @classmethod
    def _from_gpt_oss(cls, name_or_dir, hf_config, overrides):
        from transformers import GptOssForCausalLM

        fields = gpt_oss_fields(hf_config, name_or_dir)  # refuses before the weights load
        hf = GptOssForCausalLM.from_pretrained(name_or_dir, config=hf_config)
        sd = {k: v.float() for k, v in hf.state_dict().items()}
        # sink logits of -inf, as a model without sinks is exported, take no probability: no sinks
        fields["sinks"] = not all(sd[f"model.layers.{i}.self_attn.sinks"].isneginf().all()
                                  for i in range(hf_config.num_hidden_layers))
        if clash := sorted(set(overrides) & set(fields)):
            raise ValueError(f"{name_or_dir}: {', '.join(clash)} come from the model; override only other fields")
        model = cls(GPTConfig(**fields, **overrides))
        model.load_state_dict(from_gpt_oss_state_dict(sd, model.config))
        return model

    def hf_model(self):
        """This model as a transformers model with the same logits: GPT2LMHeadModel for GPT-2, GptOssForCausalLM
        for the gpt-oss family; a ValueError with the reason for any other (see hf_refusal)."""
        cfg = self.config
        if why := hf_refusal(cfg):
            raise ValueError(f"cannot export to transformers: {why}")
        if cfg.is_gpt2:
            from transformers import GPT2Config, GPT2LMHeadModel

            hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                            n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
                                            tie_word_embeddings=True))
            sd = {}
            for k, v in self.state_dict().items():
                if k == "lm_head.weight":
                    continue
                v = v.detach().float().cpu()
                if k.endswith(CONV1D_WEIGHTS):
                    v = v.t()
                if k == "transformer.wte.weight":
                    v = v[: cfg.vocab_size]  # drop the padding rows
                sd[k] = v.contiguous()
        else:
            from transformers import GptOssForCausalLM

            hf, sd = GptOssForCausalLM(gpt_oss_config(cfg)), gpt_oss_state_dict(self)
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        hf.tie_weights()
        gen = hf.generation_config
        gen.pad_token_id = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id
        return hf.eval()

    def save_pretrained(self, out_dir, write_extra=None):
        """Write a folder that transformers' AutoModelForCausalLM.from_pretrained(out_dir) loads with the same
        logits (see hf_model). write_extra(folder), if given, adds files (the tokenizer) beside the model's.
        Everything is written into a temporary folder inside out_dir, then each file moved in, config.json
        last: a crash never leaves half a model, and whatever else out_dir holds is left alone."""
        hf = self.hf_model()  # refuses before anything is written
        created = not os.path.isdir(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=out_dir)
        try:
            hf.save_pretrained(tmp)
            if write_extra is not None:
                write_extra(tmp)
            umask = os.umask(0)
            os.umask(umask)
            for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):  # the config last
                os.chmod(os.path.join(tmp, name), 0o666 & ~umask)  # transformers writes its weights 0600
                os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if created and not os.listdir(out_dir):  # failed before any file was in: leave no folder either
                os.rmdir(out_dir)
