"""Run under torchrun (2 CPU processes, gloo); each rank saves what it computed
to OUT.rank<r> for tests/test_aag.py to compare with one process.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/aag_dist_check.py OUT

1. GNT-Xent through common.gather_with_grad: each rank holds its contiguous
   half of a fixed global batch of three-view embeddings (x, y, z) as leaves.
2. A BN-free three-view model wrapped with common.ddp, GNT-Xent over the
   gathered embeddings (as aag.train_one_epoch does), SGD steps as aag.main
   builds them (momentum 0.9, weight decay on every parameter).

The builders below are imported by the test for the one-process computation.
"""
import argparse
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import aag  # noqa: E402
import common  # noqa: E402

GLOBAL_BATCH, EMBED_DIM, TAU = 8, 16, 0.1
SIDE, STEPS = 8, 2
LR, WEIGHT_DECAY = 0.05, 5e-4


def embedding_batch():
    """Fixed global batch x, y, z [8, 16]."""
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(GLOBAL_BATCH, EMBED_DIM, generator=g) for _ in range(3))


class ThreeViewNet(nn.Module):
    """No BatchNorm; all views in one forward pass, like aag.AAG."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 32), nn.ReLU(), nn.Linear(32, EMBED_DIM))

    def forward(self, *views):
        return self.net(torch.cat(views)).chunk(len(views))


def make_model():
    torch.manual_seed(0)
    return ThreeViewNet()


def make_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)


def image_batches():
    """STEPS global batches of three views [8, 3, 8, 8] each."""
    g = torch.Generator().manual_seed(1)
    return [tuple(torch.randn(GLOBAL_BATCH, 3, SIDE, SIDE, generator=g) for _ in range(3)) for _ in range(STEPS)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    out_path = parser.parse_args().out
    ctx = common.setup(argparse.Namespace(amp="off", seed=0))
    assert ctx.world == 2, "launch with torchrun --nproc_per_node=2"
    n = GLOBAL_BATCH // ctx.world
    mine = slice(ctx.rank * n, (ctx.rank + 1) * n)
    result = {"rank": ctx.rank, "world": ctx.world}

    # 1. GNT-Xent on gathered leaves
    leaves = [e[mine].clone().requires_grad_() for e in embedding_batch()]
    loss = aag.gnt_xent_loss(*[common.gather_with_grad(e) for e in leaves], TAU)
    loss.backward()
    result.update(gnt_loss=loss.detach(), gnt_grads=[e.grad for e in leaves])

    # 2. DDP + gathered GNT-Xent + SGD
    model = make_model()
    wrapped = common.ddp(model, ctx)
    result["wrapped_in_ddp"] = isinstance(wrapped, nn.parallel.DistributedDataParallel)
    optimizer = make_optimizer(model)
    result["losses"], result["grads"], result["params"] = [], [], []
    for views in image_batches():
        x, y, z = (common.gather_with_grad(e) for e in wrapped(*(v[mine] for v in views)))
        loss = aag.gnt_xent_loss(x, y, z, TAU)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        result["losses"].append(loss.detach())
        result["grads"].append({k: p.grad.detach().clone() for k, p in model.named_parameters()})
        optimizer.step()
        result["params"].append({k: p.detach().clone() for k, p in model.named_parameters()})

    torch.save(result, f"{out_path}.rank{ctx.rank}")
    common.teardown()


if __name__ == "__main__":
    main()
