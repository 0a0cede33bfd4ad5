"""Run under torchrun (2 CPU processes, gloo): the pieces that keep a large
multi-process run within memory and in step.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/scale_dist_check.py eval
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/scale_dist_check.py load LOG [two-nodes]
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/scale_dist_check.py resume OUT0 OUT1 ARGS...

eval: the sharded kNN and the sharded linear probe against one process holding
everything; prints `SCALE <name> OK` or `SCALE <name> FAIL <reason>` per check
on rank 0, then `SCALE DONE`.
load: load_data with a data set reader that logs when each process reads; the
test checks that rank 1 starts after rank 0 has finished. `two-nodes` makes
rank 1 the first process of a second node (LOCAL_RANK 0).
resume: simclr.py's main with --out OUT0 on rank 0 and OUT1 on rank 1 (as
with node-local disks), the remaining arguments passed on.
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import evaluate  # noqa: E402


def features(n, d, seed, classes=5):
    """Clustered features: class c around its own centre, so the kNN and the probe score well above chance."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99))
    return centres[y] + 1.5 * torch.randn(n, d, generator=g), y


def check_eval(ctx):
    results = {}
    train_f, train_y = features(23, 6, seed=1)
    test_f, test_y = features(17, 6, seed=2)
    mine = common._shard(len(train_f), ctx)
    shard_f, shard_y = train_f[mine.start:mine.stop], train_y[mine.start:mine.stop]
    # k above a shard's 11-12 rows, k above the bank, and chunks that split both bank and queries
    for k in (1, 5, 15, 40):
        for t in (0.07, 1.0):
            got = common.knn_predict(test_f, shard_f, shard_y, 5, k=k, t=t, chunk=5, bank_chunk=4, ctx=ctx, normalize=True)
            want = common.knn_predict(test_f, train_f, train_y, 5, k=k, t=t, normalize=True)
            results[f"knn k={k} t={t}"] = None if torch.equal(got, want) else f"{got.tolist()} != {want.tolist()}"
    got = common.knn_top1(shard_f, shard_y, test_f, test_y, 5, k=7, ctx=ctx)
    want = common.knn_top1(train_f, train_y, test_f, test_y, 5, k=7)
    results["knn_top1"] = None if got == want and got > 40 else f"{got} != {want} (or not above chance)"

    # The probe: the same global batches, gradients summed over the shards -> the one-process head.
    train_f, train_y = features(101, 6, seed=3)
    mine = common._shard(len(train_f), ctx)
    for opt, bs in (("sgd", 16), ("adam", 200)):
        kw = dict(epochs=3, lr=0.1, optimizer=opt, batch_size=bs, weight_decay=1e-4, seed=5)
        acc, head = evaluate.linear_probe(train_f[mine.start:mine.stop], train_y[mine.start:mine.stop], test_f, test_y, 5,
                                          ctx=ctx, **kw)
        ref_acc, ref = evaluate.linear_probe(train_f, train_y, test_f, test_y, 5, **kw)
        same = torch.allclose(head.weight, ref.weight, atol=1e-5) and torch.allclose(head.bias, ref.bias, atol=1e-5)
        moved = not torch.allclose(head.weight, evaluate.linear_probe(train_f, train_y, test_f, test_y, 5,
                                                                     **dict(kw, epochs=1))[1].weight, atol=1e-3)
        results[f"probe {opt}"] = None if same and moved and acc == ref_acc else \
            f"acc {acc} vs {ref_acc}, max weight diff {(head.weight - ref.weight).abs().max():.2e}, trained {moved}"
    # gather=False: this process's rows only, in order
    ds = common.ArrayDataset((torch.arange(7 * 4 * 4 * 3) % 256).to(torch.uint8).reshape(7, 4, 4, 3).numpy(),
                             torch.arange(7).numpy())
    net = torch.nn.Flatten()
    f, y = common.extract_features(net, ds, common.to_tensor, ctx, "synthetic", batch_size=2, gather=False)
    mine = common._shard(7, ctx)
    results["extract shard"] = None if y.tolist() == list(mine) and len(f) == len(mine) else f"labels {y.tolist()}"
    for name, problem in results.items():
        flag = torch.tensor([problem is not None], dtype=torch.int)
        dist.all_reduce(flag)  # a failure on either rank
        if ctx.main:
            print(f"SCALE {name} {'OK' if not int(flag) else 'FAIL ' + str(problem)}", flush=True)


def check_load(ctx, log, two_nodes):
    if two_nodes and ctx.rank == 1:
        ctx.local_rank = 0

    def reader(name, root, train, download=True, image_size=32, pretrain=False):
        with open(log, "a") as f:
            f.write(f"start {ctx.rank} {time.time()}\n")
        time.sleep(0.3)  # a download
        with open(log, "a") as f:
            f.write(f"end {ctx.rank} {time.time()}\n")
        return common._synthetic(train, image_size, n=8)

    common.dataset = reader
    args = argparse.Namespace(data="synthetic", data_dir=".", download=True, image_size=32, subset=None)
    data = common.load_data(args, ctx)
    if ctx.main:
        print(f"SCALE load OK {len(data.pretrain)}", flush=True)


def main():
    mode = sys.argv[1]
    if mode == "resume":
        import simclr
        rank = int(os.environ["RANK"])
        simclr.main(["--out", sys.argv[2 + rank], *sys.argv[4:]])
        return
    ctx = common.setup(argparse.Namespace(amp="off", seed=0))
    assert ctx.world == 2, "launch with torchrun --nproc_per_node=2"
    if mode == "eval":
        check_eval(ctx)
    else:
        check_load(ctx, sys.argv[2], "two-nodes" in sys.argv[3:])
    dist.barrier()
    if ctx.main:
        print("SCALE DONE", flush=True)
    common.teardown()


if __name__ == "__main__":
    main()
