"""Throughput figures (printed, never asserted): not collected by pytest.

    python tests/benchmark.py data                      # views/s of the SimCLR CIFAR pipeline, one core
    python tests/benchmark.py step --arch resnet18      # SimCLR training step: images/s, peak memory
    python tests/benchmark.py step --arch resnet18 --batch-size 512 --amp auto --channels-last   # on a GPU

`step` times the model, loss and optimizer on random inputs (no loader), so it
measures the compute side; `data` times one loader worker's share of the work.
On a GPU, seconds per CIFAR-10 epoch = 50000 / images/s when the loader keeps up.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import simclr  # noqa: E402


def bench_data(args):
    ds = common.dataset("synthetic", args.data_dir, True, image_size=32) if args.data == "synthetic" \
        else common.dataset(args.data, args.data_dir, True, download=False)
    views = common.SeededViews(ds, simclr.SimCLRViews(simclr.get_args(["--data", args.data])))
    n = min(len(ds), args.images)
    for i in range(50):
        views[(i, i)]
    t0 = time.perf_counter()
    for i in range(n):
        views[(i, i)]
    dt = time.perf_counter() - t0
    print(f"data: {2 * n / dt:.0f} views/s on one core ({n / dt:.0f} images/s, 2 views each; {args.data} 32x32)")


def bench_step(args):
    sargs = simclr.get_args(["--data", "cifar10", "--arch", args.arch, "--amp", args.amp])
    ctx = common.setup(sargs)
    model = simclr.SimCLR(args.arch, 32, 128).to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = common.LARS(common.param_groups(model, 1e-6), lr=0.1)
    scaler = ctx.grad_scaler()
    x = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8)
    x1 = common.to_device(x, ctx, "cifar10", args.channels_last)
    x2 = common.to_device(x.flip(3), ctx, "cifar10", args.channels_last)

    def step():
        with ctx.autocast():
            z1, z2 = model(x1, x2)
        loss = simclr.nt_xent_loss(z1, z2, 0.5)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(args.warmup):
        step()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    ips = args.batch_size / dt
    line = (f"step: {args.arch} batch {args.batch_size} on {ctx.device} (amp {ctx.amp_dtype}, {torch.get_num_threads()} threads): "
            f"{dt * 1000:.0f} ms/step, {ips:.0f} images/s, {50000 / ips:.1f} s per CIFAR-10 epoch (compute only)")
    if ctx.device.type == "cuda":
        line += f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on {torch.cuda.get_device_name()}"
    print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("data", "step"))
    parser.add_argument("--data", default="cifar10", choices=("cifar10", "synthetic"))
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--images", type=int, default=2000, help="data: images to transform")
    parser.add_argument("--arch", default="resnet_small", choices=common.ARCHS)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    bench_data(args) if args.what == "data" else bench_step(args)


if __name__ == "__main__":
    main()
