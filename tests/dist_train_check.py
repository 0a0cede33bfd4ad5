"""Run under torchrun (2 CPU processes, gloo); each rank saves what it computed
to OUT.rank<r> for tests/test_distributed.py to compare with one process.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_train_check.py OUT

1. NT-Xent through common.gather_with_grad: each rank holds its contiguous
   half of a fixed global batch of embeddings as leaves.
2. A BN-free model wrapped with common.ddp, two views per image, NT-Xent over
   the gathered embeddings (as simclr.train_one_epoch does), common.LARS steps.
3. Shuffle-BN: common.batch_shuffle of the rank's half of a global batch, and
   batch_unshuffle of a function of what it got; the same for channels-last
   images, with every collective they call recorded (kind, rows sent to and
   received from the other rank).

The builders below are imported by the test for the one-process computation.
"""
import argparse
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import simclr  # noqa: E402

GLOBAL_BATCH, EMBED_DIM, TAU = 8, 16, 0.5
SIDE, STEPS = 8, 2
LR, MOMENTUM, WEIGHT_DECAY, ETA = 0.5, 0.9, 1e-4, 0.001


def embedding_batch():
    """Fixed global batch z1, z2 [8, 16]."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(GLOBAL_BATCH, EMBED_DIM, generator=g), torch.randn(GLOBAL_BATCH, EMBED_DIM, generator=g)


class TwoViewNet(nn.Module):
    """No BatchNorm; both views in one forward pass, like simclr.SimCLR."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 32), nn.ReLU(), nn.Linear(32, EMBED_DIM))

    def forward(self, x1, x2):
        return self.net(torch.cat([x1, x2])).chunk(2)


def make_model():
    torch.manual_seed(0)
    return TwoViewNet()


def make_optimizer(model):
    return common.LARS(common.param_groups(model, WEIGHT_DECAY), lr=LR, momentum=MOMENTUM, eta=ETA)


def image_batches():
    """STEPS global batches of two views [8, 3, 8, 8] each."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 3, SIDE, SIDE, generator=g), torch.randn(GLOBAL_BATCH, 3, SIDE, SIDE, generator=g))
            for _ in range(STEPS)]


SHUFFLE_SEED = 5


def shuffle_batch():
    """Global batch [8, 2] whose rows are distinguishable: row i = (i, -i)."""
    i = torch.arange(GLOBAL_BATCH, dtype=torch.float32)
    return torch.stack([i, -i], dim=1)


def shuffle_images():
    """Global batch [8, 3, 4, 4] in channels-last memory; image i is filled with i."""
    noise = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(2))
    x = torch.arange(GLOBAL_BATCH, dtype=torch.float32).view(-1, 1, 1, 1) + noise
    return x.contiguous(memory_format=torch.channels_last)


def record_collectives(calls, rank):
    """Wrap the collectives batch_shuffle could use; append (kind, rows to others, rows from others)."""
    all_to_all, all_gather = torch.distributed.all_to_all_single, torch.distributed.all_gather

    def counted_all_to_all(out, inp, out_splits, in_splits, *a, **k):
        calls.append(("all_to_all", len(inp) - in_splits[rank], len(out) - out_splits[rank]))
        return all_to_all(out, inp, out_splits, in_splits, *a, **k)

    def counted_all_gather(outs, inp, *a, **k):
        calls.append(("all_gather", len(inp) * (len(outs) - 1), len(inp) * (len(outs) - 1)))
        return all_gather(outs, inp, *a, **k)

    torch.distributed.all_to_all_single, torch.distributed.all_gather = counted_all_to_all, counted_all_gather


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    out_path = parser.parse_args().out
    ctx = common.setup(argparse.Namespace(amp="off", seed=0))
    assert ctx.world == 2, "launch with torchrun --nproc_per_node=2"
    n = GLOBAL_BATCH // ctx.world
    mine = slice(ctx.rank * n, (ctx.rank + 1) * n)
    result = {"rank": ctx.rank, "world": ctx.world}

    # 1. NT-Xent on gathered leaves
    z1, z2 = embedding_batch()
    a, b = z1[mine].clone().requires_grad_(), z2[mine].clone().requires_grad_()
    loss = simclr.nt_xent_loss(common.gather_with_grad(a), common.gather_with_grad(b), TAU)
    loss.backward()
    result.update(ntxent_loss=loss.detach(), ntxent_grad1=a.grad, ntxent_grad2=b.grad)

    # 2. DDP + gathered NT-Xent + LARS
    model = make_model()
    wrapped = common.ddp(model, ctx)
    result["wrapped_in_ddp"] = isinstance(wrapped, nn.parallel.DistributedDataParallel)
    optimizer = make_optimizer(model)
    result["losses"], result["grads"], result["params"] = [], [], []
    for x1, x2 in image_batches():
        e1, e2 = wrapped(x1[mine], x2[mine])
        e1, e2 = common.gather_with_grad(e1), common.gather_with_grad(e2)
        loss = simclr.nt_xent_loss(e1, e2, TAU)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        result["losses"].append(loss.detach())
        result["grads"].append({k: p.grad.detach().clone() for k, p in model.named_parameters()})
        optimizer.step()
        result["params"].append({k: p.detach().clone() for k, p in model.named_parameters()})

    # 3. shuffle-BN's permutation across processes
    x = shuffle_batch()
    shuffled, unshuffle = common.batch_shuffle(x[mine], seed=SHUFFLE_SEED)
    result.update(shuffled=shuffled, restored=common.batch_unshuffle(shuffled * 10, unshuffle))
    calls = []
    record_collectives(calls, ctx.rank)
    images = shuffle_images()[mine]
    shuffled, unshuffle = common.batch_shuffle(images, seed=SHUFFLE_SEED)
    restored = common.batch_unshuffle(shuffled * 10, unshuffle)
    result.update(images_shuffled=shuffled, images_restored=restored, collectives=calls,
                  channels_last=[t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                                 for t in (shuffled, restored)])

    torch.save(result, f"{out_path}.rank{ctx.rank}")
    common.teardown()


if __name__ == "__main__":
    main()
