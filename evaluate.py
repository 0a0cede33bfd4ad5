"""Evaluate a frozen pre-trained backbone: weighted kNN and a linear probe.

Works on the checkpoints of all five methods: `last.pt` (its args say the
data set, architecture and image size) or `backbone.pt` (read with the
`args.json` beside it, or with --data/--arch given). --data, --data-dir,
--image-size and --arch override the checkpoint's, so a backbone can be
evaluated on another data set than the one it was trained on.

    python evaluate.py --ckpt runs/simclr-cifar10/last.pt
    python evaluate.py --ckpt runs/simclr-cifar10/backbone.pt --data cifar100
    python evaluate.py --random-init --arch resnet18 --data cifar10          # the baseline
    # paper-style probe, e.g. ReSSL/DSSL on CIFAR: SGD lr 30, 100 epochs, x0.1 at 60 and 80
    python evaluate.py --ckpt runs/ressl-cifar10/last.pt --linear-aug --linear-optim sgd \\
        --linear-lr 30 --linear-epochs 100 --linear-schedule step --linear-milestones 60 80

Protocols:
- kNN (Wu et al. 2018): k=200 nearest training features by cosine similarity
  vote with weight exp(sim / 0.1); every test image is counted exactly once.
- linear, fast (default): features extracted once without augmentation,
  standardised with the training mean and std, then a linear layer trained.
- linear, paper-style (--linear-aug): random resized crop + flip of every
  training image every epoch through the frozen backbone (eval mode: BN
  statistics are never updated), optimiser, lr, epochs and schedule as flags.
"""
import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import common


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="kNN and linear evaluation of a frozen backbone")
    common.one_line_errors(parser)
    parser.add_argument("--ckpt", help="last.pt or backbone.pt of any of the five methods")
    parser.add_argument("--random-init", action="store_true", help="evaluate an untrained backbone (needs --arch and --data)")
    parser.add_argument("--data", choices=common.DATASETS, help="data set (default: the checkpoint's)")
    parser.add_argument("--data-dir", help="where the data sets live (default: the checkpoint's, else ./data)")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=True, help="fetch CIFAR, SVHN or STL-10 when missing")
    parser.add_argument("--image-size", type=int, help="evaluation image side (default: the checkpoint's)")
    parser.add_argument("--arch", choices=common.ARCHS, help="backbone (default: the checkpoint's)")
    parser.add_argument("--subset", type=int, help="use only the first N training images")
    parser.add_argument("--batch-size", type=int, default=256, help="feature extraction batch per process")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="mixed precision for feature extraction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--knn", action=argparse.BooleanOptionalAction, default=True, help="run the kNN protocol")
    parser.add_argument("--knn-k", type=int, default=200, help="k neighbours (200, Wu et al. 2018)")
    parser.add_argument("--knn-t", type=float, default=0.1, help="vote temperature (0.1, Wu et al. 2018)")
    parser.add_argument("--linear", action=argparse.BooleanOptionalAction, default=True, help="run the linear protocol")
    parser.add_argument("--linear-aug", action="store_true", help="paper-style probe: crop + flip every epoch")
    parser.add_argument("--linear-optim", default="adam", choices=("sgd", "nesterov", "adam"),
                        help="adam (AAG: lr 0.01), sgd (ReSSL/DSSL: lr 30) or nesterov (SimCLR: 0.1 x B/256)")
    parser.add_argument("--linear-lr", type=float, default=0.01, help="linear probe learning rate")
    parser.add_argument("--linear-epochs", type=int, default=50, help="linear probe epochs")
    parser.add_argument("--linear-schedule", default="cosine", choices=("cosine", "step"), help="cosine to 0, or x0.1 at each milestone")
    parser.add_argument("--linear-milestones", type=int, nargs="*", default=[60, 80], help="epochs of the x0.1 steps")
    parser.add_argument("--linear-wd", type=float, default=0.0, help="linear probe weight decay")
    parser.add_argument("--linear-batch-size", type=int, default=256, help="linear probe batch (global)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.random_init == bool(args.ckpt):
        common.fail("give either --ckpt PATH or --random-init", common.USAGE)
    return args


def load_backbone(args):
    """Returns (backbone with the checkpoint's weights, or random ones) and fills
    args.data / arch / image_size / data_dir from the checkpoint where not given."""
    state, saved = None, {}
    if args.ckpt:
        ckpt = common.load_checkpoint(args.ckpt)
        if "backbone" in ckpt and "args" in ckpt:          # last.pt of any method
            state, saved = ckpt["backbone"], ckpt["args"]
        else:                                              # backbone.pt: a bare state dict
            state = ckpt
            beside = os.path.join(os.path.dirname(args.ckpt), "args.json")
            if os.path.isfile(beside):
                with open(beside) as f:
                    saved = json.load(f)
    for name, default in (("data", None), ("arch", None), ("image_size", None), ("data_dir", "./data")):
        if getattr(args, name) is None:
            setattr(args, name, saved.get(name, default))
        if name == "image_size" and args.image_size is None and args.data:
            args.image_size = common.DATA_INFO[args.data]["image_size"]
        if getattr(args, name) is None:
            common.fail(f"--{name.replace('_', '-')} is needed: {args.ckpt or 'a random backbone'} does not say it", common.USAGE)
    # The stem belongs to the network that was trained, whatever size we evaluate at.
    torch.manual_seed(args.seed)  # --random-init: the same network on every run and every rank
    backbone, dim = common.resnet(args.arch, saved.get("image_size", args.image_size))
    if state is not None:
        common.load_strict(backbone, state, args.ckpt)
    return backbone, dim


def linear_with_aug(backbone, dim, train_set, test_f, test_y, classes, args, ctx):
    """Paper-style probe: crop + flip every epoch, frozen backbone in eval mode."""
    torch.manual_seed(args.seed)
    head = nn.Linear(dim, classes).to(ctx.device)
    ddp_head = common.ddp(head, ctx, sync_bn=False)
    scale = (0.08, 1.0)
    tf = T.Compose([T.RandomResizedCrop(args.image_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), common.to_tensor])
    loader, sampler = common.train_loader(train_set, tf, args.linear_batch_size, args.workers, args.seed, ctx)
    opt = common.make_linear_optimizer(head.parameters(), args.linear_optim, args.linear_lr, args.linear_wd)
    backbone.eval()
    for epoch in range(args.linear_epochs):
        sampler.set_epoch(epoch)
        common.set_lr(opt, common.linear_lr(epoch, args.linear_epochs, args.linear_lr, args.linear_schedule, args.linear_milestones))
        for x, y in loader:
            with torch.no_grad(), ctx.autocast():
                h = backbone(common.to_device(x, ctx, args.data))
            loss = F.cross_entropy(ddp_head(h.float()), y.to(ctx.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if ctx.main:
            print(f"linear epoch {epoch + 1}/{args.linear_epochs}  loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        return 100.0 * (head(test_f).argmax(1) == test_y).float().mean().item()


def main(argv=None):
    args = get_args(argv)
    backbone, dim = load_backbone(args)
    ctx = common.setup(args)
    backbone = backbone.to(ctx.device)
    data_args = argparse.Namespace(data=args.data, data_dir=args.data_dir, download=args.download,
                                   image_size=args.image_size, subset=args.subset)
    _, train_set, test_set = common.load_data(data_args, ctx)
    classes = common.num_classes(args.data, train_set)
    tf = common.eval_transform(args.data, args.image_size)
    train_f, train_y = common.extract_features(backbone, train_set, tf, ctx, args.data, args.batch_size, args.workers)
    test_f, test_y = common.extract_features(backbone, test_set, tf, ctx, args.data, args.batch_size, args.workers)
    results = dict(ckpt=args.ckpt, data=args.data, arch=args.arch, image_size=args.image_size,
                   train_images=len(train_f), test_images=len(test_f))
    if args.knn:
        results["knn_top1"] = common.knn_top1(train_f, train_y, test_f, test_y, classes, args.knn_k, args.knn_t)
    if args.linear and args.linear_aug:
        results["linear_top1"] = linear_with_aug(backbone, dim, train_set, test_f, test_y, classes, args, ctx)
    elif args.linear:
        results["linear_top1"], _ = common.linear_probe(
            train_f, train_y, test_f, test_y, classes, args.linear_epochs, args.linear_lr, args.linear_optim,
            args.linear_schedule, args.linear_milestones, args.linear_wd, args.linear_batch_size, args.seed)
    if ctx.main:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        print(" ".join(f"{k}={results[k]:.2f}" if k in results else f"{k}=-" for k in ("knn_top1", "linear_top1")), flush=True)
    common.teardown()


if __name__ == "__main__":
    main()
