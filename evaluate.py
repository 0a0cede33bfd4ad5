"""Evaluate a frozen pre-trained network: weighted kNN and a linear probe.

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
    # AAG's kNN (Tables 1-7) is on the 128-d embedding, the head's output
    python evaluate.py --ckpt runs/aag-cifar10/last.pt --features embedding --no-linear

Protocols:
- kNN (Wu et al. 2018): k=200 nearest training features by cosine similarity
  vote with weight exp(sim / 0.1); every test image is counted exactly once.
  Under torchrun the training features stay in one shard per process (only
  the test features are gathered): README "Evaluation memory".
- linear, fast (default): features extracted once without augmentation,
  standardised with the training mean and std, then a linear layer trained.
- linear, paper-style (--linear-aug): random resized crop + flip of every
  training image every epoch through the frozen backbone (eval mode: BN
  statistics are never updated), optimiser, lr, epochs, schedule and crop
  range (--linear-crop-scale) as flags.
- the papers' settings: --linear-optim lars (DSSL ImageNet), --linear-schedule
  cosine-iter (ReSSL: cosine set every step), --linear-final-lr-ratio (CLSA: the
  cosine ends at 0.01 = 0.001 x lr 10), --interpolation bilinear (the ImageNet
  probes' torchvision default), --eval-resize 36 (DSSL CIFAR: resize to 36, centre
  crop 32), --linear-report best (the best test accuracy over the probe's epochs,
  what DSSL, CLSA and ReSSL print; selected on the test set, so optimistic).
- --features embedding: both protocols on the head's output z = g(h) instead
  of h. The head is rebuilt from last.pt's `projector.*` weights (every
  method names its head g `projector`): a bare Linear, or a Sequential whose
  Linear and BatchNorm1d layers are read from their shapes and whose
  parameter-free slots are ReLUs (true of every head in the five files). It
  runs in eval mode (BN with its running statistics). backbone.pt has no head.
"""
import argparse
import json
import math
import os
import signal
import sys

import torch
import torch.distributed as dist
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
    parser.add_argument("--image-size", type=common.positive_int, help="evaluation image side (default: the checkpoint's)")
    parser.add_argument("--arch", choices=common.ARCHS, help="backbone (default: the checkpoint's)")
    parser.add_argument("--subset", type=common.positive_int, help="use only the first N training images")
    parser.add_argument("--batch-size", type=common.positive_int, default=256, help="feature extraction batch per process")
    parser.add_argument("--workers", type=common.nonneg_int, default=common.default_workers(),
                        help="data loader processes (default: this process's share of the cores it may use)")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="mixed precision for feature extraction")
    parser.add_argument("--seed", type=common.seed_int, default=0)
    parser.add_argument("--features", default="backbone", choices=("backbone", "embedding"),
                        help="evaluate h = f(x) (default; SimCLR Sec. 4.2) or the head's output g(h), read from last.pt "
                             "(AAG's kNN: 'low-dim features of the last layer')")
    parser.add_argument("--knn", action=argparse.BooleanOptionalAction, default=True, help="run the kNN protocol")
    parser.add_argument("--knn-k", type=common.positive_int, default=200, help="k neighbours (200, Wu et al. 2018)")
    parser.add_argument("--knn-t", type=common.positive_float, default=0.1, help="vote temperature (0.1, Wu et al. 2018)")
    parser.add_argument("--linear", action=argparse.BooleanOptionalAction, default=True, help="run the linear protocol")
    parser.add_argument("--linear-aug", action="store_true", help="paper-style probe: crop + flip every epoch")
    parser.add_argument("--linear-crop-scale", type=common.probability, nargs=2, default=(0.08, 1.0), metavar=("LO", "HI"),
                        help="area range of --linear-aug's random resized crop (default 0.08 1; DSSL's CIFAR probe: 0.8 1)")
    parser.add_argument("--linear-optim", default="adam", choices=("sgd", "nesterov", "adam", "lars"),
                        help="adam (AAG: lr 0.01), sgd (ReSSL/DSSL CIFAR: lr 30; CLSA: 10), nesterov (SimCLR: 0.1 x B/256) "
                             "or lars (DSSL ImageNet: momentum 0.9, trust coefficient 0.001, weight and bias both adapted)")
    parser.add_argument("--linear-lr", type=common.positive_float, default=0.01, help="linear probe learning rate")
    parser.add_argument("--linear-epochs", type=common.positive_int, default=50, help="linear probe epochs")
    parser.add_argument("--linear-schedule", default="cosine", choices=("cosine", "cosine-iter", "step"),
                        help="cosine: set once per epoch (DSSL, CLSA); cosine-iter: set every step (ReSSL's "
                             "CosineAnnealingLR over all iterations); step: x0.1 at each milestone")
    parser.add_argument("--linear-final-lr-ratio", type=common.probability, default=0.0, metavar="R",
                        help="the cosine schedules fall to R x --linear-lr, not 0 (default 0; CLSA: final lr 0.01 "
                             "at lr 10, R = 0.001)")
    parser.add_argument("--linear-milestones", type=common.positive_int, nargs="*", default=[60, 80], help="epochs of the x0.1 steps")
    parser.add_argument("--linear-wd", type=common.nonneg_float, default=0.0, help="linear probe weight decay")
    parser.add_argument("--linear-batch-size", type=common.positive_int, default=256, help="linear probe batch (global)")
    parser.add_argument("--linear-report", default="last", choices=("last", "best"),
                        help="last (default): the probe's accuracy after its last epoch; best: the best test accuracy "
                             "over its epochs, tested after each one, as the DSSL, CLSA and ReSSL code reports: a figure "
                             "selected on the test set, optimistic")
    parser.add_argument("--eval-resize", type=common.positive_int, metavar="N",
                        help="resize the evaluation images (kNN, fast probe, test set) to N, then centre-crop "
                             "--image-size (DSSL's CIFAR code: 36, then 32; default: --image-size, or /0.875 on ImageNet)")
    parser.add_argument("--interpolation", default="bicubic", choices=("bicubic", "bilinear"),
                        help="of the evaluation resize and of --linear-aug's crops (default bicubic; the ImageNet probes "
                             "of CLSA, ReSSL and DSSL use torchvision's default, bilinear)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.random_init == bool(args.ckpt):
        common.fail("give either --ckpt PATH or --random-init", common.USAGE)
    if args.ckpt and os.path.isdir(args.ckpt):
        common.fail(f"--ckpt {args.ckpt} is a folder, not a checkpoint file; pass its last.pt or backbone.pt", common.USAGE)
    if args.json and not os.path.isdir(folder := os.path.dirname(os.path.abspath(args.json))):
        common.fail(f"--json {args.json}: the folder {folder} does not exist", common.USAGE)
    if args.features == "embedding" and args.random_init:
        common.fail("--features embedding reads the head from a last.pt; a --random-init network has none", common.USAGE)
    lo, hi = args.linear_crop_scale
    if not 0 < lo <= hi <= 1:
        common.fail(f"--linear-crop-scale {lo} {hi}: need 0 < LO <= HI <= 1", common.USAGE)
    if args.linear_final_lr_ratio > 0 and args.linear_schedule == "step":
        common.fail("--linear-final-lr-ratio sets where a cosine schedule ends: not with --linear-schedule step", common.USAGE)
    return args


INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}


def eval_transform(args):
    """The evaluation images (kNN, fast probe, test set): common.eval_transform with --eval-resize N
    (DSSL's CIFAR code: 36, int(32 x 8/7), then the 32 px centre crop) and --interpolation."""
    resize = getattr(args, "eval_resize", None)
    if resize is not None and resize < args.image_size:
        common.fail(f"--eval-resize {resize} is smaller than the centre crop, --image-size {args.image_size}", common.USAGE)
    return common.eval_transform(args.data, args.image_size, resize, INTERPOLATION[getattr(args, "interpolation", "bicubic")])


def load_head(model_state, where):
    """The projection head g rebuilt from a last.pt's model state dict (its
    `projector.*` entries), loaded strictly. Returns (head, output size).
    Linear layers are read from 2-D weights, BatchNorm1d from running_mean
    (affine when it has a weight), and a slot with no parameters between them
    is a ReLU, as in every head of the five methods."""
    prefix = "projector."
    state = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
    if not state:
        common.fail(f"--features embedding: {where} holds no head (no 'projector' weights)", common.USAGE)
    if "weight" in state:  # a bare nn.Linear (AAG's linear head)
        w = state["weight"]
        head = nn.Linear(w.shape[1], w.shape[0], bias="bias" in state)
        out_dim = w.shape[0]
    else:
        slots = {}
        for key, value in state.items():
            index, _, name = key.partition(".")
            if not index.isdigit():
                common.fail(f"--features embedding: cannot rebuild the head of {where} (entry projector.{key})", common.USAGE)
            slots.setdefault(int(index), {})[name] = value
        layers, out_dim = [], None
        for i in range(max(slots) + 1):
            p = slots.get(i)
            if p is None:
                layers.append(nn.ReLU(inplace=True))
            elif "running_mean" in p:
                layers.append(nn.BatchNorm1d(len(p["running_mean"]), affine="weight" in p))
            elif "weight" in p and p["weight"].dim() == 2:
                layers.append(nn.Linear(p["weight"].shape[1], p["weight"].shape[0], bias="bias" in p))
                out_dim = p["weight"].shape[0]
            else:
                common.fail(f"--features embedding: cannot rebuild layer {i} of the head of {where}", common.USAGE)
        head = nn.Sequential(*layers)
    common.load_strict(head, state, f"the head of {where}")
    return head, out_dim


def load_backbone(args):
    """Returns (backbone with the checkpoint's weights, or random ones) and fills
    args.data / arch / image_size / data_dir from the checkpoint where not given."""
    state, saved, model_state = None, {}, None
    if args.ckpt:
        ckpt = common.load_checkpoint(args.ckpt)
        if "backbone" in ckpt and "args" in ckpt:          # last.pt of any method
            state, saved, model_state = ckpt["backbone"], ckpt["args"], ckpt.get("model")
        else:                                              # backbone.pt: a bare state dict
            if args.features == "embedding":
                common.fail(f"--features embedding needs a last.pt: {args.ckpt} holds the backbone alone", common.USAGE)
            state = ckpt
            beside = os.path.join(os.path.dirname(args.ckpt), "args.json")
            if os.path.isfile(beside):
                with open(beside) as f:
                    try:
                        saved = json.load(f)
                    except ValueError as e:  # not JSON, or not text
                        common.fail(f"{beside}, the settings of {args.ckpt}, is not valid JSON ({e}); repair it, "
                                    "or delete it and pass --data and --arch")
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
    if args.features == "embedding":  # z = g(f(x)): the network the kNN and the probe then see
        head, dim = load_head(model_state or {}, args.ckpt)
        backbone = nn.Sequential(backbone, head)
    return backbone, dim


def linear_probe(train_f, train_y, test_f, test_y, classes, epochs=100, lr=0.1, optimizer="sgd", schedule="cosine",
                 milestones=(), weight_decay=0.0, batch_size=256, seed=0, ctx=None, final_ratio=0.0, history=None):
    """A linear classifier trained on fixed features [n, D]; returns (top-1 % on
    the test features, the trained nn.Linear). With a list as `history`, the
    test top-1 after every epoch is appended to it (--linear-report best:
    history[-1] is the returned figure). The features are standardised
    with the training mean and std (an affine map: the probe stays linear),
    batch by batch, so no standardised copy is held. With a ctx of several
    processes train_f/train_y are this process's shard (test_f whole): every
    process draws the same global batches and computes the loss of the rows it
    holds, and the gradients are summed, so the head is the one-process head
    (one all-reduce of D x C + C numbers per step; the features never move)."""
    sharded = ctx is not None and ctx.world > 1
    sizes = [len(train_f)]
    if sharded:
        counts = [torch.zeros(1, dtype=torch.long, device=train_f.device) for _ in range(ctx.world)]
        dist.all_gather(counts, torch.tensor([len(train_f)], device=train_f.device))
        sizes = [int(c) for c in counts]
    n, lo = sum(sizes), sum(sizes[:ctx.rank]) if sharded else 0
    mean, std = _feature_stats(train_f, n, ctx if sharded else None)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(train_f.shape[1], classes).to(train_f.device)
    opt = make_linear_optimizer(head.parameters(), optimizer, lr, weight_decay)
    steps = -(-n // batch_size)

    @torch.no_grad()
    def test_top1():
        correct = sum(int((head((f - mean) / std).argmax(1) == y).sum()) for f, y in zip(test_f.split(8192), test_y.split(8192)))
        return 100.0 * correct / max(1, len(test_f))

    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)  # the global order, the same on every process
        if sharded:  # this process's rows of each global batch (on the CPU: no GPU sync)
            mine = (perm >= lo) & (perm < lo + len(train_f))
            per_step = torch.bincount(torch.arange(n)[mine] // batch_size, minlength=steps).tolist()
            batches = (perm[mine] - lo).to(train_f.device).split(per_step)
        else:
            batches = perm.to(train_f.device).split(batch_size)
        for s, idx in enumerate(batches):
            common.set_lr(opt, linear_lr(epoch, epochs, lr, schedule, milestones, final_ratio, s, steps))
            logits = head((train_f[idx] - mean) / std)
            # The mean over the GLOBAL batch: each process adds its rows' share.
            loss = F.cross_entropy(logits, train_y[idx], reduction="sum") / min(batch_size, n - s * batch_size)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sharded:  # DDP: sum the shares (a D x C matrix and C biases, not the features)
                for p in head.parameters():
                    dist.all_reduce(p.grad)
            opt.step()
        if history is not None:
            history.append(test_top1())
    return history[-1] if history else test_top1(), head


@torch.no_grad()
def _feature_stats(f, n, ctx=None, chunk=8192):
    """Per-dimension mean and std (unbiased, as torch.std, plus 1e-6) of features
    [n, D] held in shards over ctx's processes: two passes in float64, `chunk`
    rows at a time (one chunk's float64 copy in memory), two D-sized all-reduces."""
    total = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
    for c in f.split(chunk):
        total += c.sum(0, dtype=torch.float64)
    if ctx is not None:
        dist.all_reduce(total)
    mean = total / max(1, n)
    sq = torch.zeros_like(total)
    for c in f.split(chunk):
        sq += ((c.double() - mean) ** 2).sum(0)
    if ctx is not None:
        dist.all_reduce(sq)
    return mean.float(), (sq / max(1, n - 1)).sqrt().float() + 1e-6


def make_linear_optimizer(params, name, lr, weight_decay):
    """--linear-optim: Adam; SGD with momentum 0.9 (Nesterov for "nesterov"); or
    LARS (common.LARS, momentum 0.9, eta 0.001) with every parameter adapted, the
    bias too, as DSSL's ImageNet probe (NVIDIA's LARC, scaling mode, around SGD)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "lars":
        return common.LARS(params, lr=lr, momentum=0.9, weight_decay=weight_decay, eta=0.001)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=name == "nesterov", weight_decay=weight_decay)


def linear_lr(epoch, epochs, lr, schedule, milestones=(), final_ratio=0.0, step=0, steps=1):
    """The probe's rate in `epoch` (from 0): x0.1 at each milestone epoch ("step"),
    or half a cosine from lr to final_ratio x lr, reached when training ends:
    sampled at the start of each epoch ("cosine", as DSSL's and CLSA's code) or at
    each of the `steps` steps of an epoch ("cosine-iter", `step` from 0: ReSSL's
    CosineAnnealingLR over epochs x steps iterations)."""
    if schedule == "step":
        return lr * 0.1 ** sum(epoch >= m for m in milestones)
    t, total = (epoch * steps + step, epochs * steps) if schedule == "cosine-iter" else (epoch, epochs)
    end = lr * final_ratio
    return end + (lr - end) * 0.5 * (1.0 + math.cos(math.pi * t / total))


def linear_with_aug(backbone, dim, train_set, test_f, test_y, classes, args, ctx, history=None):
    """Paper-style probe: crop + flip every epoch, frozen backbone in eval mode.
    Returns the test top-1 after the last epoch; with a list as `history`, the
    test top-1 after every epoch is appended to it (--linear-report best)."""
    torch.manual_seed(args.seed)
    head = nn.Linear(dim, classes).to(ctx.device)
    ddp_head = common.ddp(head, ctx, sync_bn=False)
    scale = tuple(args.linear_crop_scale)  # 0.08-1 (Inception-style, default); DSSL's CIFAR probe: 0.8-1
    interpolation = INTERPOLATION[getattr(args, "interpolation", "bicubic")]
    tf = T.Compose([T.RandomResizedCrop(args.image_size, scale=scale, interpolation=interpolation),
                    T.RandomHorizontalFlip(), common.to_tensor])
    loader = common.train_loader(train_set, tf, args.linear_batch_size, args.workers, args.seed, ctx)
    opt = make_linear_optimizer(head.parameters(), args.linear_optim, args.linear_lr, args.linear_wd)
    final_ratio = getattr(args, "linear_final_lr_ratio", 0.0)
    backbone.eval()
    for epoch in range(args.linear_epochs):
        loader.sampler.set_epoch(epoch)
        for s, (x, y) in enumerate(loader):  # the rate of step s (per epoch unless --linear-schedule cosine-iter)
            common.set_lr(opt, linear_lr(epoch, args.linear_epochs, args.linear_lr, args.linear_schedule,
                                         args.linear_milestones, final_ratio, s, len(loader)))
            with torch.no_grad(), ctx.autocast():
                h = backbone(common.normalize_on_device(x, ctx, args.data))
            loss = F.cross_entropy(ddp_head(h.float()), y.to(ctx.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if history is not None:
            history.append(_top1(head, test_f, test_y))
        if ctx.main:
            tested = f"  test top-1 {history[-1]:.2f}" if history is not None else ""
            print(f"linear epoch {epoch + 1}/{args.linear_epochs}  loss {loss.item():.4f}{tested}", flush=True)
    return history[-1] if history else _top1(head, test_f, test_y)


@torch.no_grad()
def _top1(head, test_f, test_y):
    return 100.0 * (head(test_f).argmax(1) == test_y).float().mean().item()


def main(argv=None):
    args = get_args(argv)
    backbone, dim = load_backbone(args)
    tf = eval_transform(args)  # here: an --eval-resize below --image-size stops before any process starts
    ctx = common.setup(args)
    backbone = backbone.to(ctx.device)
    data_args = argparse.Namespace(data=args.data, data_dir=args.data_dir, download=args.download,
                                   image_size=args.image_size, subset=args.subset)
    data = common.load_data(data_args, ctx)
    train_set, test_set = data.train, data.test
    if why := common.missing_labels(train_set):
        common.fail(f"evaluate.py needs labelled images, train/<class>/<image> and val/<class>/<image> under --data-dir: "
                    f"{why}")
    classes = common.num_classes(args.data, train_set)
    # DDP: the training features stay in shards, one per process (ImageNet's are 10.5 GB);
    # --linear-aug reads the images every epoch and needs none of them.
    if args.knn or (args.linear and not args.linear_aug):
        train_f, train_y = common.extract_features(backbone, train_set, tf, ctx, args.data, args.batch_size, args.workers,
                                                   gather=False)
    test_f, test_y = common.extract_features(backbone, test_set, tf, ctx, args.data, args.batch_size, args.workers)
    results = dict(ckpt=args.ckpt, data=args.data, arch=args.arch, image_size=args.image_size, features=args.features,
                   train_images=len(train_set), test_images=len(test_f))
    if args.knn:
        results["knn_top1"] = common.knn_top1(train_f, train_y, test_f, test_y, classes, args.knn_k, args.knn_t, ctx=ctx)
    history = [] if args.linear_report == "best" else None
    if args.linear and args.linear_aug:
        common.install_error_hook(args, ctx.world, ctx.amp_dtype, "linear_batch_size")  # the probe's batch
        results["linear_top1"] = linear_with_aug(backbone, dim, train_set, test_f, test_y, classes, args, ctx, history)
    elif args.linear:
        results["linear_top1"], _ = linear_probe(
            train_f, train_y, test_f, test_y, classes, args.linear_epochs, args.linear_lr, args.linear_optim,
            args.linear_schedule, args.linear_milestones, args.linear_wd, args.linear_batch_size, args.seed, ctx=ctx,
            final_ratio=args.linear_final_lr_ratio, history=history)
    if args.linear:
        results["linear_report"] = args.linear_report
        results["linear_top1_last"] = results["linear_top1"]
    if history:  # --linear-report best: linear_top1 becomes the best epoch's test accuracy
        best = max(range(len(history)), key=history.__getitem__)
        results.update(linear_top1=history[best], linear_best_epoch=best + 1, linear_top1_per_epoch=history,
                       linear_report_note="best: the maximum test accuracy over the probe's epochs, as the DSSL, "
                                          "CLSA and ReSSL code reports it; selected on the test set, so optimistic "
                                          "(linear_top1_last is the last epoch's)")
        if ctx.main:
            print(f"linear_report=best: epoch {best + 1} of {len(history)}, {history[best]:.2f} "
                  f"(last epoch {history[-1]:.2f}; selected on the test set, optimistic)", flush=True)
    if ctx.main:
        print(" ".join(f"{k}={results[k]:.2f}" if k in results else f"{k}=-" for k in ("knn_top1", "linear_top1")), flush=True)
        if args.json:
            try:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=2)
            except OSError as e:
                common.fail(f"could not write --json {args.json} ({e.strerror or e}); the results are the line above")
    common.teardown()


def interrupted(signum, frame):  # Ctrl-C: nothing to save; at once, wherever it lands (a loader, a __del__)
    print("error: interrupted", file=sys.stderr, flush=True)
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted)
    main()
