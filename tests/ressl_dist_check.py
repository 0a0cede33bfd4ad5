"""Run ressl.py's main() under torchrun and save every rank's model state
(student, teacher, memory buffer) and the buffers main() names to common.ddp
as the same on every rank to OUT/rank<r>.pt, for tests/test_ressl.py to
compare across ranks (ressl.py itself saves on rank 0 only).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ressl_dist_check.py OUT [ressl.py flags]

The wrapped model is caught where main() hands it to common.ddp, and saved
when main() calls common.teardown, just before the process group goes away.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import ressl  # noqa: E402


def main():
    out, flags = sys.argv[1], sys.argv[2:]
    caught = []
    ddp, teardown = common.ddp, common.teardown

    def catching_ddp(model, ctx, sync_bn=True, same_on_every_rank=()):
        caught.append((model, ctx, same_on_every_rank))
        return ddp(model, ctx, sync_bn, same_on_every_rank)

    def saving_teardown():
        model, ctx, same_on_every_rank = caught[0]
        torch.save(dict(world=ctx.world, model=model.state_dict(), same_on_every_rank=list(same_on_every_rank)),
                   os.path.join(out, f"rank{ctx.rank}.pt"))
        teardown()

    common.ddp, common.teardown = catching_ddp, saving_teardown
    ressl.main(flags + ["--out", out])


if __name__ == "__main__":
    main()
