"""Run by test_optim.py under torchrun: Muon, sphere and manifold-Muon steps on identical gradients on
every rank, with the matrix work split across ranks; each rank saves its result, the collectives it
called and the matrices it updated, to compare with one process."""

import collections
import os
import sys

import torch
import torch.distributed as dist

from optim import MatrixOptimizer

# same-shape matrices share a stack: 4 muon (16, 32) and the k and v blocks of a GQA c_attn (64, 32) (q: 32 rows,
# k and v 16 each; q joins the (32, 32)), 2 manifold (8, 24) (a rank with none), a batch of 3 experts stored
# (experts, in, out); the rest one of a shape
SHAPES = [(16, 32), (48, 16), (16, 32), (8, 8), (16, 32), (32, 32), (16, 32), (5,), (24, 8), (8, 24), (8, 24),
          (3, 12, 8), (64, 32)]
STEPS = 3


def run():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    params[11].IN_OUT = True
    params[12].ROW_BLOCKS = (32, 16, 16)
    opt = MatrixOptimizer([{"params": params[:7] + params[11:], "kind": "muon", "weight_decay": 0.1},
                           {"params": params[8:9], "kind": "sphere"},
                           {"params": params[9:11], "kind": "manifold_muon"},
                           {"params": params[7:8]}], lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


def counting(fn, counts, key, size=lambda *a, **k: 1):
    def counted(*args, **kwargs):
        counts[key] += size(*args, **kwargs)
        return fn(*args, **kwargs)
    return counted


if __name__ == "__main__":
    dist.init_process_group("gloo")
    counts = collections.Counter()  # collectives by name, and "matrices": how many this rank updated
    for name in ("all_gather_into_tensor", "all_gather", "broadcast", "all_reduce", "reduce_scatter_tensor"):
        setattr(dist, name, counting(getattr(dist, name), counts, name))
    MatrixOptimizer._stacked_steps = counting(MatrixOptimizer._stacked_steps, counts, "matrices",
                                              lambda self, group, todo: len(todo))
    result = run()
    torch.save({"weights": result, "counts": dict(counts)}, f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
    os._exit(0)  # leave without Python's shutdown (see the end of train_gpt2.py)
