"""Run under torchrun (2 CPU processes, gloo): feature extraction and
gather_shards count every item exactly once, in order, when the items do not
split evenly over the processes.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_eval_check.py 7 1

For each size N on the command line, prints on rank 0 one line
`DIST_EVAL n=N OK` or `DIST_EVAL n=N FAIL <reason>`, then `DIST_EVAL DONE`.
"""
import argparse
import os
import sys
import traceback

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

SIDE = 8


def index_dataset(n):
    """Item i: an image filled with noise from seed i, label i."""
    images = np.stack([np.random.default_rng(i).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for i in range(n)])
    return common.ArrayDataset(images, np.arange(n))


def tiny_backbone():
    torch.manual_seed(123)  # same weights on every rank
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 5))


def check_size(n, ctx, local):
    ds = index_dataset(n)
    backbone = tiny_backbone()
    feats, labels = common.extract_features(backbone, ds, common.to_tensor, ctx, "synthetic", batch_size=2)
    if not ctx.main:
        return None
    if labels.tolist() != list(range(n)):
        return f"gathered labels {labels.tolist()} != range({n})"
    if feats.shape != (n, 5):
        return f"gathered features have shape {tuple(feats.shape)}, expected ({n}, 5)"
    ref_feats, ref_labels = common.extract_features(backbone, ds, common.to_tensor, local, "synthetic", batch_size=64)
    if not torch.allclose(feats, ref_feats, atol=1e-6, rtol=0):
        return "gathered features differ from the one-process features"
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("sizes", type=int, nargs="+")
    sizes = parser.parse_args().sizes
    ctx = common.setup(argparse.Namespace(amp="off", seed=0))
    assert ctx.world == 2, "launch with torchrun --nproc_per_node=2"
    local = common.Context(0, 1, 0, torch.device("cpu"), None)

    # gather_shards on its own: rank r contributes r + 1 rows of value r.
    mine = torch.full((ctx.rank + 1, 2), float(ctx.rank))
    got = common.gather_shards(mine, ctx)
    if ctx.main:
        want = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
        ok = got.shape == want.shape and torch.equal(got, want)
        print(f"DIST_EVAL gather_shards {'OK' if ok else 'FAIL got ' + str(got.tolist())}", flush=True)

    for n in sizes:
        try:
            problem = check_size(n, ctx, local)
        except Exception as e:  # report, keep the other sizes running
            problem = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        if ctx.main:
            print(f"DIST_EVAL n={n} {'OK' if problem is None else 'FAIL ' + problem}", flush=True)
    if ctx.main:
        print("DIST_EVAL DONE", flush=True)
    os._exit(0)  # a rank that failed inside a collective must not hang the other in teardown


if __name__ == "__main__":
    main()
