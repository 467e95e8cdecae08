"""Run by test_optim.py under torchrun: Muon, sphere and manifold-Muon steps on identical gradients on
every rank, with the matrix work split across ranks; each rank saves its result to compare with one process."""

import os
import sys

import torch
import torch.distributed as dist

from optim import MatrixOptimizer


def run():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(16, 32), (48, 16), (8, 8), (32, 32), (5,)]]
    params.append(torch.nn.Parameter(torch.randn(24, 8)))
    params.append(torch.nn.Parameter(torch.randn(8, 24)))
    opt = MatrixOptimizer([{"params": params[:4], "kind": "muon", "weight_decay": 0.1},
                           {"params": params[5:6], "kind": "sphere"}, {"params": params[6:], "kind": "manifold_muon"},
                           {"params": params[4:5]}], lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


if __name__ == "__main__":
    dist.init_process_group("gloo")
    result = run()
    torch.save(result, f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
    os._exit(0)  # leave without Python's shutdown (see train_gpt2.py's end): 3 ranks on 2 cores hit that race
