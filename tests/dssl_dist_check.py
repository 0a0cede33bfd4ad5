"""Run under torchrun (2 CPU processes, gloo); each rank saves what it computed
to OUT.rank<r> for tests/test_dssl.py to compare with one process.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dssl_dist_check.py OUT

1. DSSL on SimCLR (dssl_nt_xent_loss) over embeddings gathered with
   common.gather_with_grad, as dssl.training_loss does: each rank holds its
   contiguous half of a fixed global batch of z1, z2, zh1, zh2 as leaves.
2. dssl_loss (SimSiam/BYOL) on each rank's half, no gather: DDP's gradient
   averaging is what makes it the global mean.
3. A BYOL DSSL model wrapped with common.ddp, trained for STEPS SGD steps with
   the target EMA after each: the parameters and the target of both ranks.

The builders below are imported by the test for the one-process computation.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import dssl  # noqa: E402

GLOBAL_BATCH, EMBED_DIM, TAU, STEPS, M = 8, 16, 0.5, 2, 0.9
WEIGHTS = (1.0, 0.5, 1.0, 0.25)  # every Eq. (6) family non-zero, so all four views carry gradient


def embedding_batch():
    """Fixed global batch of four [8, 16] embeddings (v, v', v^, v^')."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(GLOBAL_BATCH, EMBED_DIM, generator=g) for _ in range(4)]


def prediction_batch():
    """Fixed global predictions p and targets z for dssl_loss: two lists of four [8, 16]."""
    g = torch.Generator().manual_seed(1)
    return ([torch.randn(GLOBAL_BATCH, EMBED_DIM, generator=g) for _ in range(4)],
            [torch.randn(GLOBAL_BATCH, EMBED_DIM, generator=g) for _ in range(4)])


def make_byol():
    torch.manual_seed(0)
    return dssl.DSSL("byol", "resnet_small", 16, heavy_targets=True)


def image_batches():
    """STEPS global batches of four views [8, 3, 16, 16]."""
    g = torch.Generator().manual_seed(2)
    return [[torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g) for _ in range(4)] for _ in range(STEPS)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    out_path = parser.parse_args().out
    ctx = common.setup(argparse.Namespace(amp="off", seed=0))
    assert ctx.world == 2, "launch with torchrun --nproc_per_node=2"
    n = GLOBAL_BATCH // ctx.world
    mine = slice(ctx.rank * n, (ctx.rank + 1) * n)
    result = {"rank": ctx.rank, "world": ctx.world}

    # 1. DSSL-SimCLR on gathered leaves
    leaves = [z[mine].clone().requires_grad_() for z in embedding_batch()]
    loss = dssl.dssl_nt_xent_loss(*[common.gather_with_grad(z) for z in leaves], TAU, WEIGHTS)
    loss.backward()
    result.update(simclr_loss=loss.detach(), simclr_grads=[z.grad for z in leaves])

    # 2. dssl_loss on the local half
    p_all, z_all = prediction_batch()
    p = [t[mine].clone().requires_grad_() for t in p_all]
    loss = dssl.dssl_loss(*p[:2], *[t[mine] for t in z_all[:2]], *p[2:], *[t[mine] for t in z_all[2:]], weights=WEIGHTS)
    loss.backward()
    result.update(dssl_loss=loss.detach(), dssl_grads=[t.grad for t in p])

    # 3. BYOL + DSSL under DDP: SGD step, then the EMA, as dssl.train_one_epoch does
    model = make_byol()
    wrapped = common.ddp(model, ctx)
    optimizer = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.1, momentum=0.9)
    for views in image_batches():
        p, z = wrapped([v[mine] for v in views])
        loss = dssl.dssl_loss(*p[:2], *z[:2], *p[2:], *z[2:], weights=WEIGHTS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_target(M)
    result["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    torch.save(result, f"{out_path}.rank{ctx.rank}")
    common.teardown()


if __name__ == "__main__":
    main()
