"""
Optimizers beyond AdamW, chosen with train_gpt2.py --optimizer (SPEC-improvements.md, section C).

What the hidden matrices (every ≥2-D weight in the blocks) use; embeddings, the output layer, norm
gains and biases stay on AdamW in the same optimizer object (one state_dict, one GradScaler step,
one learning-rate schedule). All three take SGD momentum with Nesterov first. A fused weight counts as
its blocks: c_attn is three matrices, q, k and v (model.py tags it with ROW_BLOCKS); sphere, which works
row by row, is the same either way.

muon: Muon (Keller Jordan 2024, as in modded-nanogpt): the update is replaced by the nearest
    semi-orthogonal matrix (all singular values ~1) by 5 Newton–Schulz iterations, so every direction
    of the matrix moves by the same amount.
sphere: every weight row lives on the unit sphere (Bernstein, "Modular Manifolds", 2025): the update is
    projected onto the sphere's tangent space (g − (g·w)w), normalised per row, stepped, and the row
    renormalised, so each row turns by the learning rate (in radians) per step.
manifold_muon: every weight matrix lives on the (scaled) Stiefel manifold, all singular values equal
    (the same post): the steepest step under the spectral norm that stays in the tangent space, found by
    a few steps of dual ascent, then a retraction by the matrix sign function.
"""

import math
import re

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw

# Keller Jordan's coefficients: a quintic that pushes singular values in (0, 1] quickly towards ~1
# (to the band 0.7–1.2, not exactly 1: fast rather than precise)
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G, steps=5, eps=1e-7, dtype=torch.bfloat16):
    """Approximately U·Vᵀ for G = U·S·Vᵀ (the orthogonal polar factor): X ← aX + (bXXᵀ + c(XXᵀ)²)X on
    X = G/‖G‖_F (so every singular value starts ≤ 1), on the wide orientation (rows ≤ cols) so XXᵀ is the
    small Gram matrix. Works on a batch of matrices (the last two dimensions)."""
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


# Polar Express (Amsel et al. 2025, arXiv 2505.16932): a different odd quintic per iteration, optimal for
# mapping singular values in [ε, 1] to 1; divided by the paper's safety factor 1.01 (all but the last)
POLAR_EXPRESS = [(8.28721201814563, -23.595886519098837, 17.300387312530933),
                 (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
                 (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
                 (3.3184196573706015, -2.488488024314874, 0.51004894012372),
                 (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
                 (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
                 (1.8750014808534479, -1.2500016453999487, 0.3750001645474248)]
POLAR_EXPRESS = [(a / 1.01, b / 1.01 ** 3, c / 1.01 ** 5) for a, b, c in POLAR_EXPRESS] + [(1.875, -1.25, 0.375)]


def msign(G, steps=10):
    """The matrix sign (orthogonal polar factor U·Vᵀ of G = U·S·Vᵀ) to fp32 precision: singular values
    land within ~1e-3 of 1, unlike Muon's fast, rough Newton–Schulz. For manifold constraints."""
    X = G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-12)
    for i in range(steps):
        a, b, c = POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


def stiefel_scale(shape):
    """The singular value a manifold_muon matrix keeps: √max(1, rows/cols), so a unit-RMS input gives
    unit-RMS outputs whether the matrix is wide (W·Wᵀ = I) or tall (Wᵀ·W = (rows/cols)·I)."""
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


def sphere_step_(w, g, lr):
    """Hyperspherical descent on each row of w (unit norm): the tangent part of g, as a unit vector,
    times lr; then back onto the sphere."""
    tangent = g - w * (w * g).sum(dim=-1, keepdim=True)
    tangent = tangent / (tangent.norm(dim=-1, keepdim=True) + 1e-12)
    w.sub_(lr * tangent)
    w.div_(w.norm(dim=-1, keepdim=True))


def manifold_muon_direction(Q, G, dual_steps, dual_lr=0.1):
    """For Q on the Stiefel manifold (tall: QᵀQ = I): the A that maximises ⟨G, A⟩ with ‖A‖_spectral ≤ 1
    and A in the tangent space (QᵀA + AᵀQ = 0). Its dual is solved by ascent on the symmetric
    multiplier Λ, with A = msign(G + 2QΛ)."""
    dual = -0.25 * (Q.mT @ G + G.mT @ Q)
    for k in range(dual_steps):
        A = msign(G + 2 * Q @ dual)
        violation = Q.mT @ A + A.mT @ Q  # zero in the tangent space
        dual = dual - dual_lr * (1 - k / dual_steps) * violation
    return msign(G + 2 * Q @ dual)


def manifold_muon_step_(w, g, lr, dual_steps):
    """Manifold Muon on w = s·Q, Q on the Stiefel manifold: Q ← msign(Q − lr·A)."""
    s = stiefel_scale(w.shape)
    # each matrix's G at unit scale (a batch of experts: each its own), so the dual lr is scale-free
    Q, G = w / s, g / (g.norm(dim=(-2, -1), keepdim=True) / min(g.shape[-2:]) ** 0.5 + 1e-12)
    tall = Q.size(-2) >= Q.size(-1)
    if not tall:
        Q, G = Q.mT, G.mT
    Q = msign(Q - lr * manifold_muon_direction(Q, G, dual_steps))
    w.copy_(s * (Q if tall else Q.mT))


def project_(p, kind):
    """Put a matrix on its manifold (unit-norm rows, or the scaled Stiefel manifold)."""
    if kind == "sphere":
        p.div_(p.norm(dim=-1, keepdim=True))
    elif kind == "manifold_muon":  # more iterations than a step's: a random init has small singular values
        p.copy_(stiefel_scale(p.shape) * msign(p, steps=16))


def muon_scale(shape, kind):
    """Per-matrix update size. keller: √max(1, rows/cols), so tall matrices are not under-updated.
    moonlight (arXiv 2502.16982): 0.2·√max(rows, cols), which matches AdamW's typical update RMS so that
    AdamW's learning rate and weight decay can be reused."""
    rows, cols = shape[-2], shape[-1]
    if kind == "keller":
        return max(1.0, rows / cols) ** 0.5
    return 0.2 * max(rows, cols) ** 0.5


MATRIX_KINDS = ("muon", "sphere", "manifold_muon")


def as_out_in(t, p):
    """nn.Linear's (out, in) view of t, a weight p or its update: experts' weights are (experts, in, out)."""
    return t.mT if getattr(p, "IN_OUT", False) else t


def matrices(t, p):
    """t (the weight p, its gradient or momentum) as the matrices the optimizer updates each on its own:
    views, so that writes land in t. One per parameter, its (out, in) view (for experts, a batch of
    matrices), or of a fused weight one per row block (p.ROW_BLOCKS rows each, set by model.py: c_attn's q
    (n_head·head_dim rows), k and v (n_kv_head·head_dim each)), so each block is orthogonalised, scaled and
    kept on its manifold by its own shape. Orthogonalised as one matrix, the block with the largest gradient
    would take the spectrum (at init v's, so q and k barely move); modded-nanogpt splits grouped QKV before
    Newton–Schulz for this (its 2024-10-10 Muon record, each block at its own shape's scale)."""
    t = as_out_in(t, p)
    return list(t.split(p.ROW_BLOCKS, dim=-2)) if hasattr(p, "ROW_BLOCKS") else [t]


def matrices_per_call(shape, device_type):
    """How many of a stack's matrices one batched update takes: all of them on a GPU (fewer, bigger
    kernels); on the CPU as many as fit in 4 MB of fp32, which is one of GPT-2 124M's. Bigger stacks there
    make every elementwise pass stream memory instead of cache (and fault in fresh pages for each
    temporary): on 2 cores at 12 × (768, 3072), the whole stack at once was 1.3× (muon) to 5× (sphere)
    slower than one by one; the cpu-proxy's 128-wide matrices gain from whole stacks."""
    if device_type != "cpu":
        return 1 << 62
    return max(1, 2 ** 20 // math.prod(shape))


def matrix_step_(group, W, G):
    """One step of the group's kind on a stack of same-shape matrices W, in place; G: their Nesterov updates."""
    lr = group["lr"]
    if group["kind"] == "muon":
        W.mul_(1 - lr * group["weight_decay"])
        W.add_(newton_schulz(G) * muon_scale(W.shape, group["scale"]), alpha=-lr)
    elif group["kind"] == "sphere":
        sphere_step_(W, G, lr)
    else:
        manifold_muon_step_(W, G, lr, group["dual_steps"])


class MatrixOptimizer(torch.optim.Optimizer):
    """Each param group's "kind": muon, sphere or manifold_muon for matrices, adamw for the rest.

    A group's matrices of one shape are stacked and updated by batched calls (Newton–Schulz on a batch;
    see matrices_per_call). Under DDP every rank holds the same (all-reduced) gradients and momentum, and
    the work is split: each shape's matrices are dealt round-robin to the ranks, each rank updates its
    stack, and one all-gather per shape gives every rank all the results, so the matrix cost per rank
    falls with the number of ranks. Momentum stays on every rank, so rank 0's state_dict is the whole state and a
    checkpoint resumes on any number of ranks. sphere and manifold_muon matrices are put on their
    manifold here, at construction (identically on every rank)."""

    def __init__(self, param_groups, lr, momentum=0.95, scale="keller", betas=(0.9, 0.95), eps=1e-8,
                 dual_steps=5):
        defaults = dict(lr=lr, weight_decay=0.0, kind="adamw", momentum=momentum, scale=scale,
                        betas=betas, eps=eps, dual_steps=dual_steps)
        super().__init__(param_groups, defaults)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    for w in matrices(p, p):
                        project_(w, group["kind"])

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        gathers = []  # per shape, under DDP: (every rank's results, whose they are, the all-gather under way)
        dealt = 0  # the deal carries on from one shape to the next, so the ranks' shares even out
        for group in self.param_groups:
            if group["kind"] not in MATRIX_KINDS:
                self._adamw(group)
                continue
            for shape, todo in self._momentum(group).items():  # todo: (weight, gradient, momentum) views
                if not distributed:
                    for i, W in self._stacked_steps(group, todo):
                        torch._foreach_copy_([w for w, _, _ in todo[i:i + len(W)]], list(W))
                    continue
                ranks = [todo[(r - dealt) % world::world] for r in range(world)]  # todo[i]: rank (dealt + i) % world
                dealt += len(todo)
                stacks = todo[0][0].new_empty(world, max(map(len, ranks)), *shape)  # padded to one height
                for i, W in self._stacked_steps(group, ranks[rank]):
                    stacks[rank, i:i + len(W)] = W
                # the flat (world·height, ...) form, the one gloo takes too; stacks[rank] is sent in place
                work = dist.all_gather_into_tensor(stacks.flatten(0, 1), stacks[rank], async_op=True)
                gathers.append((stacks, ranks, work))
        # waited for last, so that each shape's all-gather overlaps the next shapes' work (the stacks, a copy
        # of the matrices, are held till then: fewer bytes than the activations freed before the step)
        for stacks, ranks, work in gathers:
            work.wait()
            torch._foreach_copy_([w for mine in ranks for w, _, _ in mine],
                                 [stacks[r, i] for r, mine in enumerate(ranks) for i in range(len(mine))])

    def _stacked_steps(self, group, todo):
        """Steps same-shape matrices (todo: their (weight, gradient, momentum) views) in stacks of
        matrices_per_call, one batched call each; yields (i, W): W the new todo[i:i + len(W)], stacked."""
        per_call = matrices_per_call(todo[0][0].shape, todo[0][0].device.type) if todo else 1
        for i in range(0, len(todo), per_call):
            chunk = todo[i:i + per_call]
            W = torch.stack([w for w, _, _ in chunk])
            G = torch.stack([g for _, g, _ in chunk])  # Nesterov: look one momentum step ahead
            G.add_(torch.stack([m for _, _, m in chunk]), alpha=group["momentum"])
            # a stack of one as the matrix itself: the CPU's bmm copies a transposed operand, its mm does not
            matrix_step_(group, W.squeeze(0), G.squeeze(0))
            yield i, W

    def _momentum(self, group):
        """m ← β·m + g for the group's parameters (on every rank), then their matrices by shape, biggest
        first: {shape: [(weight, gradient, momentum) views]}, in the same order on every rank."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:  # (torch's foreach ops refuse empty lists)
            return {}
        for p in params:
            if "momentum" not in self.state[p]:
                self.state[p]["momentum"] = torch.zeros_like(p)
        bufs = [self.state[p]["momentum"] for p in params]
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, [p.grad for p in params])
        shapes = {}
        for p, m in zip(params, bufs):
            for views in zip(matrices(p, p), matrices(p.grad, p), matrices(m, p)):
                shapes.setdefault(tuple(views[0].shape), []).append(views)
        return dict(sorted(shapes.items(), key=lambda kv: -math.prod(kv[0])))  # stable: ties keep their order

    def _adamw(self, group):
        """torch's AdamW (torch.optim.AdamW's own function), fused: one kernel for all of the group's
        tensors, on CUDA and on the CPU alike (on 2 CPU cores twice as fast as its foreach form)."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            # the fused kernel counts on the weight's device: checkpoints from before it hold the count on the CPU
            state["step"] = state["step"].to(p.device)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], fused=True, amsgrad=False, beta1=beta1, beta2=beta2,
              lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def hidden_matrix(name, p):
    """Muon's share: every ≥2-D weight inside the transformer blocks (not embeddings, the head, or a
    mixture of experts' router, whose rows are per-expert scores rather than a layer's map)."""
    return (name.startswith("transformer.h.") and p.dim() >= 2 and not name.endswith("bias")
            and ".router." not in name)


def build_optimizer(model, cfg, device_type):
    """The optimizer cfg.optimizer names, with the param groups printed by describe()."""
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return model.configure_optimizers(cfg.weight_decay, cfg.max_lr, betas, device_type, eps=cfg.eps)
    if cfg.optimizer not in MATRIX_KINDS:
        raise ValueError(f"--optimizer {cfg.optimizer}: choose adamw, {', '.join(MATRIX_KINDS)}")
    adam_groups = model.configure_optimizers(cfg.weight_decay, cfg.max_lr, betas, "cpu", eps=cfg.eps).param_groups
    named = list(model.named_parameters())
    muon = [p for n, p in named if hidden_matrix(n, p)]
    muon_ids = {id(p) for p in muon}
    fixed = {id(p) for p in model.normalized_params()}  # forced-normalised weights: no decay
    if cfg.optimizer != "muon" and fixed:
        raise ValueError(f"--optimizer {cfg.optimizer} puts the matrices on its own manifold: not with --mp or --ngpt, which normalise them")
    moonlight = cfg.optimizer == "muon" and cfg.muon_scale == "moonlight"  # AdamW's lr and weight decay
    lr_mult = 1.0 if moonlight else cfg.matrix_lr / cfg.max_lr
    groups = [{"params": [p for p in muon if id(p) not in fixed], "kind": cfg.optimizer, "lr_mult": lr_mult,
               "weight_decay": cfg.weight_decay if moonlight else 0.0},
              {"params": [p for p in muon if id(p) in fixed], "kind": cfg.optimizer, "lr_mult": lr_mult,
               "weight_decay": 0.0}]
    for g in adam_groups:
        groups.append({"params": [p for p in g["params"] if id(p) not in muon_ids],
                       "weight_decay": g["weight_decay"], "kind": "adamw", "lr_mult": 1.0})
    groups = [g for g in groups if g["params"]]
    return MatrixOptimizer(groups, lr=cfg.max_lr, momentum=cfg.muon_momentum, scale=cfg.muon_scale,
                           betas=betas, eps=cfg.eps, dual_steps=cfg.manifold_dual_steps)


def describe(model, optimizer):
    """One line per param group: which optimizer, lr multiplier, weight decay, and the tensors (layer
    numbers folded into *), so a user sees which tensor gets what."""
    names = {id(p): re.sub(r"\.\d+\.", ".*.", n) for n, p in model.named_parameters()}
    lines = []
    for g in optimizer.param_groups:
        kind = g.get("kind", "adamw")
        tensors = sorted({names[id(p)] for p in g["params"]})
        count = sum(p.numel() for p in g["params"])
        lines.append(f"{kind} lr×{g.get('lr_mult', 1.0):g} wd {g['weight_decay']:g}: {count / 1e6:.2f}M params in "
                     f"{len(g['params'])} tensors: {', '.join(tensors)}")
    return lines
