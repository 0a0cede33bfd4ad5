"""Run under torchrun (2 CPU processes, gloo); each rank saves what it saw to
OUT.rank<r> for tests/test_clsa.py to compare across ranks and with one process.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/clsa_dist_check.py OUT

A small CLSA model (per-process BN, as under torchrun) wrapped with common.ddp
takes STEPS training steps on its half of a fixed global batch; each step
records the gathered keys (the bank's batch part), the queue before and after,
the pointer and this rank's loss; also the key and query encoder parameters
around the last step's momentum update and the query encoder after step 1.
The builders below are imported by the test for the one-process computation.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clsa  # noqa: E402
import common  # noqa: E402

GLOBAL_BATCH, QUEUE_SIZE, ALPHA, STEPS, TAU = 8, 12, 0.9, 2, 0.2  # K=12 is not a multiple of 8: the second step wraps


def make_model():
    torch.manual_seed(0)
    return clsa.CLSA("resnet_small", 32, 32, 8, QUEUE_SIZE, ALPHA, bn_splits=1)


def global_batch():
    """Key, weak and strong views [8, 3, 32, 32] of the global batch."""
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g) for _ in range(3))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    out_path = parser.parse_args().out
    ctx = common.setup(argparse.Namespace(amp="off", seed=0))
    assert ctx.world == 2, "launch with torchrun --nproc_per_node=2"
    n = GLOBAL_BATCH // ctx.world
    mine = slice(ctx.rank * n, (ctx.rank + 1) * n)
    model = make_model()
    wrapped = common.ddp(model, ctx, sync_bn=False, same_on_every_rank=("queue", "queue_ptr"))  # as clsa.main()
    optimizer = torch.optim.SGD(model.query_parameters(), lr=0.5, momentum=0.9)
    xk, xq, xs = global_batch()
    result = dict(rank=ctx.rank, world=ctx.world, keys=[], queue_before=[], queues=[], ptr=[], loss=[])
    for step in range(STEPS):
        result["key_params_before"] = [p.detach().clone() for p in model.key_parameters()]
        result["query_params_before"] = [p.detach().clone() for p in model.query_parameters()]
        qs, k, queue = wrapped(xk[mine], [xq[mine], xs[mine]], step)
        result["key_params"] = [p.detach().clone() for p in model.key_parameters()]
        loss = clsa.clsa_objective(qs[:1], qs[1:], k, queue, TAU, offset=ctx.rank * n)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result["loss"].append(loss.detach().clone())
        if step == 0:
            result["query_params_after_step_1"] = [p.detach().clone() for p in model.query_parameters()]
        result["keys"].append(k.clone())
        result["queue_before"].append(queue.clone())
        result["queues"].append(model.queue.clone())
        result["ptr"].append(model.queue_ptr.clone())
    torch.save(result, f"{out_path}.rank{ctx.rank}")
    common.teardown()


if __name__ == "__main__":
    main()
