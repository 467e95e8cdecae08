"""
Optimizers beyond AdamW, chosen with train_gpt2.py --optimizer (SPEC-improvements.md, section C).

muon: Muon (Keller Jordan 2024, as in modded-nanogpt) for the hidden matrices: SGD momentum with
Nesterov, then the update is replaced by the nearest semi-orthogonal matrix (all singular values ~1)
by 5 Newton–Schulz iterations, so every direction of the matrix moves by the same amount. Embeddings,
the output layer, norm gains and biases stay on AdamW in the same optimizer object (one state_dict,
one GradScaler step, one learning-rate schedule).
"""

import re

import torch
import torch.distributed as dist

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


def muon_scale(shape, kind):
    """Per-matrix update size. keller: √max(1, rows/cols), so tall matrices are not under-updated.
    moonlight (arXiv 2502.16982): 0.2·√max(rows, cols), which matches AdamW's typical update RMS so that
    AdamW's learning rate and weight decay can be reused."""
    rows, cols = shape[-2], shape[-1]
    if kind == "keller":
        return max(1.0, rows / cols) ** 0.5
    return 0.2 * max(rows, cols) ** 0.5


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for groups with use_muon=True, AdamW for the rest.

    Under DDP every rank holds the same (all-reduced) gradients and momentum; the Newton–Schulz work is
    split: matrix i is orthogonalised and applied by rank i % world_size and then broadcast, so its
    cost per rank falls with the number of ranks. Momentum stays on every rank, so rank 0's
    state_dict is the whole state and a checkpoint resumes on any number of ranks."""

    def __init__(self, param_groups, lr, momentum=0.95, scale="keller", betas=(0.9, 0.95), eps=1e-8):
        defaults = dict(lr=lr, weight_decay=0.0, use_muon=False, momentum=momentum, scale=scale,
                        betas=betas, eps=eps)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon(group, rank, world)
            else:
                self._adamw(group)

    def _muon(self, group, rank, world):
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        pending = []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum" not in state:
                state["momentum"] = torch.zeros_like(p)
            buf = state["momentum"]
            buf.mul_(beta).add_(p.grad)
            if i % world != rank:  # another rank orthogonalises this one and sends the result
                pending.append(dist.broadcast(p, src=i % world, async_op=True))
                continue
            update = p.grad.add(buf, alpha=beta)  # Nesterov: look one momentum step ahead
            update = newton_schulz(update) * muon_scale(p.shape, group["scale"])
            p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr)
            if world > 1:
                pending.append(dist.broadcast(p, src=rank, async_op=True))
        for work in pending:
            work.wait()

    def _adamw(self, group):
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))


def hidden_matrix(name, p):
    """Muon's share: every ≥2-D weight inside the transformer blocks (not embeddings or the head)."""
    return name.startswith("transformer.h.") and p.dim() >= 2 and not name.endswith("bias")


def build_optimizer(model, cfg, device_type):
    """The optimizer cfg.optimizer names, with the param groups printed by describe()."""
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return model.configure_optimizers(cfg.weight_decay, cfg.max_lr, betas, device_type, eps=cfg.eps)
    if cfg.optimizer != "muon":
        raise ValueError(f"--optimizer {cfg.optimizer}: choose adamw or muon")
    adam_groups = model.configure_optimizers(cfg.weight_decay, cfg.max_lr, betas, "cpu", eps=cfg.eps).param_groups
    named = list(model.named_parameters())
    muon = [p for n, p in named if hidden_matrix(n, p)]
    muon_ids = {id(p) for p in muon}
    fixed = {id(p) for p in model.normalized_params()}  # forced-normalised weights: no decay
    moonlight = cfg.muon_scale == "moonlight"  # reuses AdamW's lr and weight decay
    groups = [{"params": [p for p in muon if id(p) not in fixed], "use_muon": True,
               "lr_mult": 1.0 if moonlight else cfg.muon_lr / cfg.max_lr,
               "weight_decay": cfg.weight_decay if moonlight else 0.0},
              {"params": [p for p in muon if id(p) in fixed], "use_muon": True,
               "lr_mult": 1.0 if moonlight else cfg.muon_lr / cfg.max_lr, "weight_decay": 0.0}]
    for g in adam_groups:
        groups.append({"params": [p for p in g["params"] if id(p) not in muon_ids],
                       "weight_decay": g["weight_decay"], "use_muon": False, "lr_mult": 1.0})
    groups = [g for g in groups if g["params"]]
    return MuonWithAdamW(groups, lr=cfg.max_lr, momentum=cfg.muon_momentum, scale=cfg.muon_scale,
                         betas=betas, eps=cfg.eps)


def describe(model, optimizer):
    """One line per param group: which optimizer, lr multiplier, weight decay, and the tensors (layer
    numbers folded into *), so a user sees which tensor gets what."""
    names = {id(p): re.sub(r"\.\d+\.", ".*.", n) for n, p in model.named_parameters()}
    lines = []
    for g in optimizer.param_groups:
        kind = "muon" if g.get("use_muon") else "adamw"
        tensors = sorted({names[id(p)] for p in g["params"]})
        count = sum(p.numel() for p in g["params"])
        lines.append(f"{kind} lr×{g.get('lr_mult', 1.0):g} wd {g['weight_decay']:g}: {count / 1e6:.2f}M params in "
                     f"{len(g['params'])} tensors: {', '.join(tensors)}")
    return lines
