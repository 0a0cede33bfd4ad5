"""What every method takes for granted: backbones, data sets, the standard view
recipes, distributed and mixed-precision plumbing, LARS, the learning-rate
schedule, checkpoints, logging and the kNN / linear evaluation protocols.

Method files import this module; it imports no method file. Anything a paper
describes as part of its method (its views, heads, queues, momentum encoders,
losses) lives in that method's own file, not here.
"""
import argparse
import functools
import json
import math
import os
import pickle
import random
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.models.resnet import BasicBlock

# ---------------------------------------------------------------------------
# Clear errors. Bad input ends the program with one sentence and an exit code:
# 2 for a wrong command line (argparse's own convention), 1 for anything found
# wrong while running (missing or corrupt files, mismatched checkpoints).
# ---------------------------------------------------------------------------

USAGE, RUNTIME = 2, 1


def fail(message, code=RUNTIME):
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


# ---------------------------------------------------------------------------
# Command line shared by all five scripts (SPEC 2.2). Flags whose default
# depends on the data set are None here and filled from the method's recipe.
# ---------------------------------------------------------------------------

DATASETS = ("cifar10", "cifar100", "svhn", "stl10", "tinyimagenet", "imagenet", "folder", "synthetic")
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet_small")


def one_line_errors(parser):
    """argparse prints usage plus a message; one line is easier to read in a log."""
    parser.error = lambda message: fail(f"{parser.prog}: {message} (see --help)", USAGE)
    return parser


def add_base_args(parser):
    one_line_errors(parser)
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="cifar10", choices=DATASETS, help="data set (default cifar10)")
    g.add_argument("--data-dir", default="./data", help="where the data sets live (default ./data)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch CIFAR, SVHN or STL-10 when missing (default on)")
    g.add_argument("--subset", type=int, default=None, help="use only the first N training images")
    g.add_argument("--image-size", type=int, default=None,
                   help="input side in pixels (default: 32 CIFAR/SVHN/synthetic, 64 Tiny ImageNet, "
                        "96 STL-10, 224 ImageNet/folder); the CIFAR stem is used at 64 and below")
    g.add_argument("--workers", type=int, default=None, help="data loader processes per GPU (default: min(8, cores))")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--arch", default=None, choices=ARCHS, help="backbone (default: the paper's)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (default: the paper's)")
    g.add_argument("--batch-size", type=int, default=None, help="GLOBAL batch size, over all processes")
    g.add_argument("--lr", type=float, default=None, help="base learning rate, scaled with the batch as the paper scales it")
    g.add_argument("--weight-decay", type=float, default=None, help="weight decay (default: the paper's)")
    g.add_argument("--warmup-epochs", type=float, default=None, help="linear warmup epochs before cosine decay")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision (auto: bf16 on GPUs that have it, else fp16; off on CPU)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convolutions on tensor cores)")
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder (default runs/<method>-<data>)")
    g.add_argument("--resume", default="auto", help="auto (continue from OUT/last.pt if present), none, or a checkpoint path")
    g.add_argument("--seed", type=int, default=0, help="random seed (offset by rank)")
    g.add_argument("--knn-every", type=int, default=None, help="kNN monitor every N epochs, 0 = off (default 10; 0 on ImageNet/folder)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps in all (smoke runs, benchmarks)")
    g.add_argument("--log-every", type=int, default=50, help="progress line every N steps")
    return parser


def finish_args(args, method, recipes):
    """Fill data-set dependent defaults from the method's recipe and check the
    flags against each other. `recipes` maps "small" (CIFAR-size data sets) and
    "large" (ImageNet, folder) to {flag: value}; an explicit flag always wins."""
    info = DATA_INFO[args.data]
    args.method = method
    if args.image_size is None:
        args.image_size = info["image_size"]
    for name, value in recipes["large" if args.data in ("imagenet", "folder") else "small"].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.knn_every is None:
        args.knn_every = 0 if args.data in ("imagenet", "folder") else 10
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1)
    if args.out is None:
        args.out = os.path.join("runs", f"{method}-{args.data}")
    for name in ("epochs", "batch_size", "image_size", "log_every"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}", USAGE)
    for name in ("subset", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}", USAGE)
    if args.image_size < 16:
        fail(f"--image-size {args.image_size} is too small for a ResNet; use at least 16", USAGE)
    return args


# ---------------------------------------------------------------------------
# Backbones: torchvision ResNets with `fc` removed. For images of 64 px and
# below, the CIFAR stem (SimCLR App. B.9): a 3x3 stride-1 first convolution
# and no max-pool, so a 32 px image still reaches the last stage at 4x4.
# ---------------------------------------------------------------------------

class SmallResNet(nn.Module):
    """Four BasicBlocks of width 16-32-64-128 (about 0.7M parameters): the
    layout of a ResNet-18 at a fraction of its cost, for CPU smoke runs and tests."""

    def __init__(self, widths=(16, 32, 64, 128)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, c_in = [], widths[0]
        for i, c_out in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or c_in != c_out:
                down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            stages.append(BasicBlock(c_in, c_out, stride, down))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], 1000)  # as in torchvision; resnet() removes it

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(arch, image_size):
    """Returns (backbone, feature dimension). The backbone maps [B, 3, S, S]
    images to [B, dim] features h (after global average pooling)."""
    if arch == "resnet_small":
        net = SmallResNet()
    elif arch in ("resnet18", "resnet34", "resnet50"):
        net = getattr(torchvision.models, arch)(weights=None)
    else:
        fail(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}", USAGE)
    dim = net.fc.in_features
    if image_size <= 64:  # CIFAR stem
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, dim


# ---------------------------------------------------------------------------
# Data sets. Every reader returns a Dataset of (PIL image, label); arrays are
# validated by shape, dtype and label range rather than by md5, so converted
# copies load. Pre-training ignores labels (STL-10's unlabeled split has -1).
# ---------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATA_INFO = {
    "cifar10": dict(image_size=32, classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(image_size=32, classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "svhn": dict(image_size=32, classes=10, mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970)),
    "stl10": dict(image_size=96, classes=10, mean=(0.4467, 0.4398, 0.4066), std=(0.2603, 0.2566, 0.2713)),
    "tinyimagenet": dict(image_size=64, classes=200, mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821)),
    "imagenet": dict(image_size=224, classes=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "folder": dict(image_size=224, classes=None, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "synthetic": dict(image_size=32, classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
}


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 images in an array ([N, H, W, 3], or another layout given by
    `axes`, applied per image so that memory-mapped files stay on disk)."""

    def __init__(self, images, labels, axes=None):
        self.images, self.labels, self.axes = images, np.asarray(labels, dtype=np.int64), axes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i] if self.axes is None else self.images[i].transpose(self.axes)
        return Image.fromarray(np.ascontiguousarray(img)), int(self.labels[i])


def _check_arrays(name, images, labels, side, classes, where):
    if images.ndim != 4 or images.shape[1:] != (side, side, 3) or images.dtype != np.uint8:
        fail(f"{where} does not hold {name} images: expected uint8 [N, {side}, {side}, 3], "
             f"got {images.dtype} {list(images.shape)}")
    labels = np.asarray(labels)
    if len(labels) != len(images) or len(labels) == 0 or labels.min() < 0 or labels.max() >= classes:
        fail(f"{where} has {len(labels)} labels for {len(images)} images, or labels outside 0..{classes - 1}")


def _unpickle(path):
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")  # Python 2 pickles: str keys
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        fail(f"{path} is unreadable ({type(e).__name__}: {e}); delete it and download again")


def _cifar(name, root, train, download):
    folder, files, key, classes, tv = {
        "cifar10": ("cifar-10-batches-py", ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
                    "labels", 10, torchvision.datasets.CIFAR10),
        "cifar100": ("cifar-100-python", (["train"], ["test"]), "fine_labels", 100, torchvision.datasets.CIFAR100),
    }[name]
    path = os.path.join(root, folder)
    needed = files[0] + files[1]
    if not all(os.path.isfile(os.path.join(path, f)) for f in needed):
        if not download:
            fail(f"{name} not found: expected {', '.join(needed)} in {path}; "
                 "run without --no-download to fetch it, or point --data-dir at the folder holding it")
        _download(lambda: tv(root, download=True), name, root)
    images, labels = [], []
    for f in files[0 if train else 1]:
        entry = _unpickle(os.path.join(path, f))
        if isinstance(entry, dict):
            entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
        if not isinstance(entry, dict) or "data" not in entry or key not in entry:
            fail(f"{os.path.join(path, f)} is not a {name} batch (no data/labels entries)")
        data, batch_labels = np.asarray(entry["data"]), np.asarray(entry[key])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            fail(f"{os.path.join(path, f)} does not hold {name} images: expected uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
        if batch_labels.ndim != 1 or not np.issubdtype(batch_labels.dtype, np.integer):
            fail(f"{os.path.join(path, f)} has no integer label list under {key!r}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are 1024 R, 1024 G, 1024 B
        labels.extend(batch_labels.tolist())
    images = np.concatenate(images)
    _check_arrays(name, images, labels, 32, classes, path)
    return ArrayDataset(images, labels)


def _download(fetch, name, root):
    try:
        fetch()
    except Exception as e:  # no network, disk full, bad archive: say so in one line
        fail(f"could not download {name} to {root} ({type(e).__name__}: {e}); "
             f"fetch it by hand into {root} or pass --data-dir")


def _svhn(root, train, download):
    split = "train" if train else "test"
    path = os.path.join(root, f"{split}_32x32.mat")
    if not os.path.isfile(path):
        if not download:
            fail(f"svhn not found: expected {path}; run without --no-download to fetch it")
        _download(lambda: torchvision.datasets.SVHN(root, split=split, download=True), "svhn", root)
    try:
        import scipy.io
    except ImportError:
        fail("reading SVHN's .mat files needs scipy: pip install scipy")
    try:
        mat = scipy.io.loadmat(path)
        images, labels = np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2)), mat["y"].reshape(-1).astype(np.int64)
    except Exception as e:
        fail(f"{path} is not a readable SVHN .mat file ({type(e).__name__}: {e})")
    labels[labels == 10] = 0  # SVHN stores digit 0 as label 10
    _check_arrays("svhn", images, labels, 32, 10, path)
    return ArrayDataset(images, labels)


def _stl10(root, split, download):
    """split: "train+unlabeled" (pre-training), "train" or "test"."""
    path = os.path.join(root, "stl10_binary")
    parts = {"train+unlabeled": ["train", "unlabeled"], "train": ["train"], "test": ["test"]}[split]
    if not all(os.path.isfile(os.path.join(path, f"{p}_X.bin")) for p in parts):
        if not download:
            fail(f"stl10 not found: expected {', '.join(p + '_X.bin' for p in parts)} in {path}; "
                 "run without --no-download to fetch it")
        _download(lambda: torchvision.datasets.STL10(root, split="train+unlabeled", download=True), "stl10", root)
    arrays = []
    for p in parts:
        x_path, y_path = os.path.join(path, f"{p}_X.bin"), os.path.join(path, f"{p}_y.bin")
        if os.path.getsize(x_path) == 0 or os.path.getsize(x_path) % (3 * 96 * 96):
            fail(f"{x_path} is not an STL-10 image file: its size is not a positive multiple of 3x96x96 bytes")
        if p != "unlabeled" and not os.path.isfile(y_path):
            fail(f"stl10 labels not found: {x_path} has no {y_path} beside it")
        x = np.memmap(x_path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)  # column-major [N, C, W, H]
        if p == "unlabeled":
            y = np.full(len(x), -1)
        else:
            y = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
            if len(y) != len(x) or y.min() < 0 or y.max() > 9:
                fail(f"{y_path} does not match {x_path}: {len(y)} labels for {len(x)} images, or labels outside 1..10")
        arrays.append(ArrayDataset(x, y, axes=(2, 1, 0)))
    return arrays[0] if len(arrays) == 1 else torch.utils.data.ConcatDataset(arrays)


class ListDataset(torch.utils.data.Dataset):
    """Image files with labels, e.g. Tiny ImageNet's val/ (flat images plus
    val_annotations.txt), which ImageFolder cannot read."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB"), label


def _image_folder(name, root, split, hint):
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        fail(f"{name} not found: expected a folder {path} ({hint})")
    try:
        ds = torchvision.datasets.ImageFolder(path)
    except (FileNotFoundError, RuntimeError) as e:
        fail(f"{path} is not an image folder ({e})")
    return ds


def _first_root(*candidates):
    """Accept both --data-dir pointing at the data set and at its parent."""
    return next((c for c in candidates if os.path.isdir(os.path.join(c, "train"))), candidates[-1])


def _tinyimagenet(root, train):
    root = _first_root(root, os.path.join(root, "tiny-imagenet-200"))
    hint = "unzip tiny-imagenet-200.zip into --data-dir"
    train_set = _image_folder("tinyimagenet", root, "train", hint)
    if train:
        return train_set
    notes = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(notes):  # already sorted into class folders
        return _image_folder("tinyimagenet", root, "val", hint)
    samples = []
    with open(notes) as f:
        for line in filter(str.strip, f):
            parts = line.split("\t")
            if len(parts) < 2:
                fail(f"{notes} has a line that is not 'file<TAB>wnid...': {line.strip()!r}")
            file, wnid = parts[:2]
            if wnid not in train_set.class_to_idx:
                fail(f"{notes} names class {wnid}, which train/ does not have")
            samples.append((os.path.join(root, "val", "images", file), train_set.class_to_idx[wnid]))
    return ListDataset(samples)


def _synthetic(train, image_size, n=None):
    """A small learnable data set made in memory: class c is a filled shape
    (square, disc or cross by c % 3) in a class-dependent colour, at a random
    position and size on a noisy background. Same images on every call."""
    n = n or (2048 if train else 512)
    g = np.random.default_rng(1 if train else 2)
    labels = np.arange(n) % 10
    palette = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190]])
    yy, xx = np.mgrid[:image_size, :image_size]
    images = g.integers(0, 80, size=(n, image_size, image_size, 3)).astype(np.uint8)
    for i, c in enumerate(labels):
        r = g.uniform(0.15, 0.35) * image_size
        cy, cx = g.uniform(r, image_size - r, size=2)
        if c % 3 == 0:
            mask = (abs(yy - cy) < r) & (abs(xx - cx) < r)
        elif c % 3 == 1:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        else:
            mask = ((abs(yy - cy) < r / 3) & (abs(xx - cx) < r)) | ((abs(xx - cx) < r / 3) & (abs(yy - cy) < r))
        images[i][mask] = palette[c]
    return ArrayDataset(images, labels)


def dataset(name, root, train, download=True, image_size=32, pretrain=False):
    """Train or test split of a data set as (PIL image, label) pairs.
    pretrain=True gives STL-10's train+unlabeled split (the others are unchanged)."""
    root = os.path.expanduser(root)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root, train, download)
    if name == "svhn":
        return _svhn(root, train, download)
    if name == "stl10":
        return _stl10(root, ("train+unlabeled" if pretrain else "train") if train else "test", download)
    if name == "tinyimagenet":
        return _tinyimagenet(root, train)
    if name == "imagenet":
        root = _first_root(root, os.path.join(root, "imagenet"))
        return _image_folder("imagenet", root, "train" if train else "val",
                             "ILSVRC-2012 with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
    if name == "folder":
        return _image_folder("folder", root, "train" if train else "val", "--data-dir must hold train/<class>/ and val/<class>/")
    if name == "synthetic":
        return _synthetic(train, image_size)
    fail(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}", USAGE)


def load_data(args, ctx):
    """(pre-training set, labelled training set, test set) for --data; --subset
    applies to the training sets. Rank 0 reads (and downloads) first."""
    def load():
        pretrain = dataset(args.data, args.data_dir, True, args.download, args.image_size, pretrain=True)
        train = dataset(args.data, args.data_dir, True, False, args.image_size) if args.data == "stl10" else pretrain
        test = dataset(args.data, args.data_dir, False, args.download, args.image_size)
        return first(pretrain, args.subset), first(train, args.subset), test
    if ctx.world > 1 and not ctx.main:
        dist.barrier()
    out = load()
    if ctx.world > 1 and ctx.main:
        dist.barrier()
    return out


def num_classes(name, ds):
    return DATA_INFO[name]["classes"] or len(ds.classes)


def first(ds, n):
    """The first n items (--subset)."""
    return ds if n is None or n >= len(ds) else torch.utils.data.Subset(ds, range(n))


# ---------------------------------------------------------------------------
# Seeded augmentation. The sampler hands each sample its own seed, a function
# of (run seed, epoch, index) only. So the views of an image do not depend on
# the number of processes or loader workers, and a run resumed in the middle
# of an epoch sees exactly the views the uninterrupted run would have seen.
# ---------------------------------------------------------------------------

class TrainSampler(torch.utils.data.Sampler):
    """Shuffles every epoch, drops the last partial GLOBAL batch, and gives
    process `rank` the rank-th contiguous slice of every global batch, so that
    concatenating the slices over ranks gives the one-process batch in order.
    Yields (index, seed) pairs; `start_step` skips batches already trained."""

    def __init__(self, n, global_batch, rank=0, world=1, seed=0):
        if global_batch % world:
            fail(f"--batch-size {global_batch} is not divisible by the {world} processes", USAGE)
        if n < global_batch:
            fail(f"the training set has {n} images, fewer than one batch of {global_batch}; lower --batch-size", USAGE)
        self.n, self.batch, self.local, self.rank, self.seed = n, global_batch, global_batch // world, rank, seed
        self.steps = n // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[: self.steps * self.batch].view(self.steps, self.batch)
        mine = order[self.start_step:, self.rank * self.local:(self.rank + 1) * self.local].reshape(-1)
        base = (self.seed * 100_003 + self.epoch) * self.n
        return iter([(i, base + i) for i in mine.tolist()])

    def __len__(self):
        return (self.steps - self.start_step) * self.local


class SeededViews(torch.utils.data.Dataset):
    """Applies `transform` to the image of each (index, seed) key with the
    torch RNG seeded by `seed` (every torchvision transform draws from it)."""

    def __init__(self, ds, transform):
        self.ds, self.transform = ds, transform

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        i, seed = key
        img, label = self.ds[i]
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also seed every GPU (100x slower)
        try:
            return self.transform(img), label
        finally:
            torch.set_rng_state(state)


def train_loader(ds, transform, batch_size, workers, seed, ctx):
    """Training loader over a GLOBAL batch size: returns (loader, sampler); each
    batch is what `transform` returns (e.g. a list of views), plus labels."""
    sampler = TrainSampler(len(ds), batch_size, ctx.rank, ctx.world, seed)
    loader = torch.utils.data.DataLoader(
        SeededViews(ds, transform), batch_size=batch_size // ctx.world, sampler=sampler,
        num_workers=workers, pin_memory=ctx.device.type == "cuda", drop_last=True, worker_init_fn=ignore_stop_signals,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    return loader, sampler


def ignore_stop_signals(worker_id=None):
    """Loader workers leave Ctrl-C / SIGTERM to the main process, which saves a
    checkpoint before stopping (a terminal sends SIGINT to every process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---------------------------------------------------------------------------
# View recipes. All work on PIL images and return PIL images, so that a method
# can derive one view from another (DSSL) before `to_tensor` normalises.
# ---------------------------------------------------------------------------

def view_transform(size, scale=(0.08, 1.0), jitter=None, p_jitter=0.8, p_gray=0.2, p_blur=0.0, flip=True):
    """Random resized crop (area `scale`, ratio 3/4-4/3) + horizontal flip +
    ColorJitter(*jitter) with p_jitter + grayscale with p_gray + Gaussian blur
    with p_blur (kernel 10% of the side, sigma 0.1-2.0; SimCLR App. A).
    SimCLR's colour distortion of strength s is jitter=(0.8s, 0.8s, 0.8s, 0.2s)."""
    ops = [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)]
    if flip:
        ops.append(T.RandomHorizontalFlip())
    if jitter is not None:
        ops.append(T.RandomApply([T.ColorJitter(*jitter)], p=p_jitter))
        ops.append(T.RandomGrayscale(p=p_gray))
    if p_blur > 0:
        kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd, 10% of the side
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=p_blur))
    return T.Compose(ops)


def to_tensor(img):
    """PIL image -> uint8 tensor [3, H, W]. The loader ships uint8 (4x less to
    copy than float) and `to_device` normalises on the GPU."""
    return TF.pil_to_tensor(img)


@functools.lru_cache(maxsize=None)
def _mean_std(data, device):
    info = DATA_INFO[data]
    return tuple(255.0 * torch.tensor(info[k], device=device).view(1, 3, 1, 1) for k in ("mean", "std"))


def to_device(x, ctx, data, channels_last=False):
    """uint8 images [B, 3, H, W] -> float on ctx.device, normalised with the data set's mean and std."""
    mean, std = _mean_std(data, ctx.device)
    x = (x.to(ctx.device, non_blocking=True).float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def eval_transform(data, size):
    """No augmentation: small-image data sets are resized to `size`; ImageNet and
    folder are resized to size/0.875 and centre-cropped (the standard protocol)."""
    resize = int(round(size / 0.875)) if data in ("imagenet", "folder") else size
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), to_tensor])


def autoaugment(data):
    """torchvision's AutoAugment with the published policy for the data set
    (SVHN policy for SVHN, ImageNet policy for ImageNet-like data, CIFAR-10 otherwise)."""
    policy = {"svhn": T.AutoAugmentPolicy.SVHN, "imagenet": T.AutoAugmentPolicy.IMAGENET,
              "folder": T.AutoAugmentPolicy.IMAGENET}.get(data, T.AutoAugmentPolicy.CIFAR10)
    return T.AutoAugment(policy)


def randaugment(n=2, m=10):
    """torchvision's RandAugment: n ops per image at magnitude m on the 0-30 scale."""
    return T.RandAugment(num_ops=n, magnitude=m)


class StrongAugment:
    """CLSA's stronger augmentation (CLSA Sec. 3.3, Table 1): `draws` times,
    pick one of 14 ops uniformly and apply it with probability p, its
    magnitude drawn uniformly from the op's range."""

    OPS = {  # name: (function of (PIL image, magnitude), magnitude range); Table 1
        "ShearX": (lambda img, v: TF.affine(img, 0.0, [0, 0], 1.0, [math.degrees(math.atan(v)), 0.0], center=[0, 0]), (-0.3, 0.3)),
        "ShearY": (lambda img, v: TF.affine(img, 0.0, [0, 0], 1.0, [0.0, math.degrees(math.atan(v))], center=[0, 0]), (-0.3, 0.3)),
        "TranslateX": (lambda img, v: TF.affine(img, 0.0, [int(v * img.size[0]), 0], 1.0, [0.0, 0.0]), (-0.3, 0.3)),
        "TranslateY": (lambda img, v: TF.affine(img, 0.0, [0, int(v * img.size[1])], 1.0, [0.0, 0.0]), (-0.3, 0.3)),
        "Rotate": (lambda img, v: TF.rotate(img, v), (-30.0, 30.0)),
        "AutoContrast": (lambda img, v: TF.autocontrast(img), None),
        "Invert": (lambda img, v: TF.invert(img), None),
        "Equalize": (lambda img, v: TF.equalize(img), None),
        "Solarize": (lambda img, v: TF.solarize(img, v), (0.0, 256.0)),
        "Posterize": (lambda img, v: TF.posterize(img, int(v)), (4, 8)),
        "Contrast": (lambda img, v: TF.adjust_contrast(img, v), (0.05, 0.95)),
        "Color": (lambda img, v: TF.adjust_saturation(img, v), (0.05, 0.95)),
        "Brightness": (lambda img, v: TF.adjust_brightness(img, v), (0.05, 0.95)),
        "Sharpness": (lambda img, v: TF.adjust_sharpness(img, v), (0.05, 0.95)),
    }

    def __init__(self, draws=5, p=0.5):
        self.draws, self.p, self.names = draws, p, list(self.OPS)

    def sample(self):
        """The ops to apply: a list of (name, magnitude) for the draws that fired."""
        chosen = []
        for _ in range(self.draws):
            name = self.names[int(torch.randint(len(self.names), ()))]
            fires = torch.rand(()) < self.p
            span = self.OPS[name][1]
            if span is None:
                v = None
            elif isinstance(span[0], int):  # Posterize bits: an integer in [4, 8]
                v = int(torch.randint(span[0], span[1] + 1, ()))
            else:
                v = span[0] + (span[1] - span[0]) * float(torch.rand(()))
            if fires:
                chosen.append((name, v))
        return chosen

    def __call__(self, img):
        for name, v in self.sample():
            img = self.OPS[name][0](img, v)
        return img


class Jigsaw:
    """Cut the image into a grid x grid array of tiles and put them back in a
    random order (DSSL App. A.2, Jigsaw(4)). Pixels beyond the last whole tile
    (sides not divisible by `grid`) stay where they are."""

    def __init__(self, grid=4):
        self.grid = grid

    def __call__(self, img):
        x = TF.pil_to_tensor(img)  # [C, H, W] uint8
        g, (c, h, w) = self.grid, x.shape
        th, tw = h // g, w // g
        tiles = x[:, : g * th, : g * tw].reshape(c, g, th, g, tw).permute(1, 3, 0, 2, 4).reshape(g * g, c, th, tw)
        tiles = tiles[torch.randperm(g * g)]
        out = x.clone()
        out[:, : g * th, : g * tw] = tiles.reshape(g, g, c, th, tw).permute(2, 0, 3, 1, 4).reshape(c, g * th, g * tw)
        return TF.to_pil_image(out)


# ---------------------------------------------------------------------------
# Distributed plumbing. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without
# them the program is one plain process and every collective is a no-op.
# ---------------------------------------------------------------------------

class Context:
    """rank, world size, device and the mixed-precision setting of this process."""

    def __init__(self, rank, world, local_rank, device, amp_dtype):
        self.rank, self.world, self.local_rank, self.device, self.amp_dtype = rank, world, local_rank, device, amp_dtype
        self.main = rank == 0

    def autocast(self):
        # AMP: forward passes in bf16/fp16; every loss casts to float32 itself.
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self):
        # AMP: only fp16 needs loss scaling; bf16 has float32's exponent range.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)


def setup(args):
    """Initialise the process group when launched by torchrun; pick the device
    and AMP dtype; seed (offset by rank). Returns a Context."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    amp = getattr(args, "amp", "off")
    if amp == "fp16" and device.type != "cuda":
        fail("--amp fp16 needs a CUDA GPU; use --amp bf16 or off on the CPU", USAGE)
    if amp == "auto":
        amp_dtype = None if device.type != "cuda" else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    else:
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    seed_everything(getattr(args, "seed", 0) + rank)
    return Context(rank, world, local_rank, device, amp_dtype)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x):
        return concat_all_gather(x)

    @staticmethod
    def backward(fctx, grad):
        # Every rank computed the same loss from the gathered batch, so the
        # gradient of the sum over ranks is the all-reduced gradient; keep our slice.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(x):
    """Concatenate x [n, ...] (same n on every rank) from all processes in rank
    order -> [world*n, ...], keeping the graph. With the same loss computed on
    every rank, each rank's x receives world x its one-process gradient, which
    DDP's gradient averaging divides back: the one-process update exactly."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def concat_all_gather(x):
    """Concatenate x [n, ...] from all processes in rank order, without gradient."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


# MoCo's shuffle-BN (He et al. 2020, Sec. 3.3) for momentum encoders: a key
# computed by BN over the same images as its query leaks "which sample is the
# positive" through the batch statistics. The keys are therefore computed on a
# permuted global batch, so each process normalises over other images.

@torch.no_grad()
def batch_shuffle(x, seed):
    """x: this process's [n, ...]. Returns (this process's slice of the global
    batch permuted by a permutation drawn from `seed`, the order that undoes
    it). Every rank draws the same permutation from the same seed, so nothing
    is broadcast; a seed derived from the step keeps resumed runs exact."""
    x_all = concat_all_gather(x)
    perm = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(seed)).to(x.device)
    return x_all[_own_rows(perm, x.shape[0])], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(y, unshuffle):
    """Undo batch_shuffle on the outputs y [n, ...]: row i is again image i of this process."""
    return concat_all_gather(y)[_own_rows(unshuffle, y.shape[0])]


def _own_rows(order, n):
    """This process's n entries of an order over the global batch (rank r: entries r*n to (r+1)*n)."""
    rank = dist.get_rank() if world_size() > 1 else 0
    return order[rank * n:(rank + 1) * n]


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BN whose training statistics come from `splits` groups of the batch
    (sample i in group i % splits), as if the batch were spread over `splits`
    GPUs: with batch_shuffle this is shuffle-BN on one process (MoCo's
    one-GPU CIFAR recipe, ReSSL Sec. 4). Parameters, buffers and state_dict
    keys are those of nn.BatchNorm1d/2d; in eval mode it is plain BN."""

    def __init__(self, bn, splits):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.splits = splits

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x):
        n, c, s = x.shape[0], x.shape[1], self.splits
        if not self.training or s == 1:
            return super().forward(x)
        if n % s:
            raise ValueError(f"a batch of {n} does not split into {s} BN groups")
        # [n, c, ...] -> [n/s, s*c, ...]: channel block b holds the samples i % s == b.
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        out = F.batch_norm(x.reshape(n // s, s * c, *x.shape[2:]), mean, var,
                           self.weight.repeat(s) if self.affine else None, self.bias.repeat(s) if self.affine else None,
                           True, self.momentum, self.eps)
        with torch.no_grad():  # one running estimate: the mean over the groups
            self.running_mean.copy_(mean.view(s, c).mean(0))
            self.running_var.copy_(var.view(s, c).mean(0))
            self.num_batches_tracked += 1
        return out.reshape(x.shape)


def split_bn(module, splits):
    """Replace every BatchNorm1d/2d in `module` by a SplitBatchNorm over `splits` groups (in place)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            setattr(module, name, SplitBatchNorm(child, splits))
        else:
            split_bn(child, splits)
    return module


def ddp(model, ctx, sync_bn=True):
    """Wrap for data-parallel training. DDP: SyncBN on GPUs (global BN, SimCLR
    Sec. 3); on the CPU (gloo) BN statistics stay per process."""
    if ctx.world == 1:
        return model
    if sync_bn and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)


def unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------
# Optimisation: LARS (You et al. 2017, as SimCLR uses it) and the learning
# rate schedule: linear warmup, then cosine decay without restarts.
# ---------------------------------------------------------------------------

def param_groups(model, weight_decay):
    """Two groups: weights (decayed, LARS-adapted) and biases + BN parameters
    (all 1-D tensors: no weight decay, no LARS adaptation; SimCLR App. B.6)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [dict(params=decay, weight_decay=weight_decay, lars=True),
            dict(params=rest, weight_decay=0.0, lars=False)]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling, per parameter tensor w with gradient g:
        g <- g + wd * w
        g <- g * eta * ||w|| / ||g||      (trust ratio; 1 if either norm is 0)
        v <- momentum * v + lr * g;  w <- w - v
    Groups with lars=False skip the adaptation (and set their own wd)."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad.add(w, alpha=group["weight_decay"]) if group["weight_decay"] else w.grad.clone()
                if group["lars"]:
                    w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                    g.mul_(trust)
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                v = state["momentum_buffer"]
                v.mul_(group["momentum"]).add_(g, alpha=group["lr"])
                w.sub_(v)
        return loss


def lr_at(step, total_steps, warmup_steps, base_lr, final_lr=0.0):
    """Learning rate for optimizer step `step` (0-based): linear warmup reaching
    base_lr at the last warmup step, then half a cosine from base_lr down to
    final_lr at step total_steps (SGDR without restarts)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------
# Checkpoints: plain dicts loadable with weights_only=True, written to a
# temporary file and renamed into place (a crash never leaves a torn file).
# ---------------------------------------------------------------------------

def save_atomic(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, hint=""):
    """The dict in a checkpoint file, or one clear error (missing, torn, not a checkpoint)."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torn, truncated, not a checkpoint, or pickled objects
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}: truncated, or not a torch file){hint}")
    if not isinstance(ckpt, dict):
        fail(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict or a state dict")
    return ckpt


def load_strict(module, state, what):
    """load_state_dict(strict=True) that fails in one sentence, not a page of keys."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        text = str(e)
        fail(f"{what} does not fit this model ({text.count('size mismatch')} shape mismatches"
             f"{', missing keys' if 'Missing key' in text else ''}{', unexpected keys' if 'Unexpected key' in text else ''}); "
             "was it trained with another --arch, --image-size or method?")


def clean_state_dict(module):
    """state_dict without the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes."""
    return {k.replace("module.", "").replace("_orig_mod.", ""): v for k, v in unwrap(module).state_dict().items()}


def resume(args, model, optimizer, scaler, extra=None):
    """Restore a run per --resume (auto: OUT/last.pt if it exists). Returns the
    number of optimizer steps already taken (0 for a fresh start). `extra` maps
    checkpoint keys to objects with load_state_dict (momentum encoders, queues)."""
    path = os.path.join(args.out, "last.pt") if args.resume == "auto" else args.resume
    if args.resume == "none" or (args.resume == "auto" and not os.path.isfile(path)):
        return 0
    ckpt = load_checkpoint(path, hint="; delete it, or pass --resume none to start over")
    if ckpt.get("method") != args.method:
        fail(f"{path} is a {ckpt.get('method')!r} checkpoint, not {args.method!r}; pass --out to start a separate run")
    for name in ("arch", "image_size", "data"):
        if ckpt["args"].get(name) != getattr(args, name):
            fail(f"{path} was trained with --{name.replace('_', '-')} {ckpt['args'].get(name)}, not {getattr(args, name)}; "
                 "pass --out to start a separate run, or --resume none to overwrite it")
    load_strict(unwrap(model), ckpt["model"], path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        for key, obj in (extra or {}).items():
            obj.load_state_dict(ckpt[key])
    except (KeyError, ValueError, RuntimeError) as e:
        fail(f"{path} has an optimizer or {type(e).__name__} state that does not fit this run ({e})")
    return int(ckpt["step"])


def save_run(args, model, backbone, optimizer, scaler, step, epoch, extra=None):
    """last.pt (everything needed to resume; epoch = epochs completed) and
    backbone.pt (the encoder alone, clean keys)."""
    backbone_state = clean_state_dict(backbone)
    ckpt = dict(method=args.method, epoch=epoch, step=step, args=vars(args), model=unwrap(model).state_dict(),
                backbone=backbone_state, optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
    for key, obj in (extra or {}).items():
        ckpt[key] = obj.state_dict()
    save_atomic(ckpt, os.path.join(args.out, "last.pt"))
    save_atomic(backbone_state, os.path.join(args.out, "backbone.pt"))


# ---------------------------------------------------------------------------
# Logging: log.jsonl (one object per epoch), args.json, and a progress line.
# ---------------------------------------------------------------------------

def start_run(args, ctx):
    if ctx.main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)


def log_json(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class Progress:
    """Throughput, ETA and the progress line; `images` counts source images
    over all processes (not views)."""

    def __init__(self, total_steps, start_step, global_batch):
        self.total, self.batch = total_steps, global_batch
        self.t0, self.s0 = time.perf_counter(), start_step

    def restart(self, step):
        self.t0, self.s0 = time.perf_counter(), step

    def images_per_second(self, step):
        return (step - self.s0) * self.batch / max(1e-9, time.perf_counter() - self.t0)

    def line(self, epoch, epochs, step, loss, lr, extra=""):
        ips = self.images_per_second(step)
        eta = (self.total - step) * self.batch / max(ips, 1e-9)
        return (f"epoch {epoch + 1}/{epochs}  step {step}/{self.total}  loss {loss:.4f}  lr {lr:.4g}  "
                f"{ips:.0f} img/s  eta {time.strftime('%H:%M:%S', time.gmtime(eta))}{extra}")


class StopSignal:
    """SIGINT/SIGTERM ask the run to stop at the next log step, after writing
    a checkpoint; a second signal stops at once."""

    def __init__(self):
        self.requested = False
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self, ctx):
        """True on every rank if any rank was asked to stop (a collective: call it on all ranks)."""
        flag = torch.tensor([float(self.requested)], device=ctx.device)
        if ctx.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@torch.no_grad()
def embedding_std(z):
    """Collapse indicator: per-dimension standard deviation of the L2-normalised
    embeddings, averaged over dimensions. About 1/sqrt(D) when the embeddings
    spread over the sphere, 0 when they have collapsed to one point."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


# ---------------------------------------------------------------------------
# Evaluation: features of a frozen backbone, weighted kNN (Wu et al. 2018) and
# the linear probe. Under DDP each process takes a contiguous shard of the
# images and the shards are gathered, so every image is counted exactly once.
# ---------------------------------------------------------------------------

def _shard(n, ctx):
    return range(ctx.rank * n // ctx.world, (ctx.rank + 1) * n // ctx.world)


@torch.no_grad()
def gather_shards(x, ctx):
    """Concatenate per-rank tensors of possibly unequal length, in rank order."""
    if ctx.world == 1:
        return x
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(ctx.world)]
    dist.all_gather(sizes, n)
    pad = torch.zeros((int(max(sizes)) - len(x), *x.shape[1:]), dtype=x.dtype, device=x.device)
    parts = [torch.empty((int(max(sizes)), *x.shape[1:]), dtype=x.dtype, device=x.device) for _ in range(ctx.world)]
    dist.all_gather(parts, torch.cat([x, pad]))
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


@torch.no_grad()
def extract_features(backbone, ds, transform, ctx, data, batch_size=256, workers=0):
    """Features h [N, D] (float32) and labels [N] of every item of ds, in
    order, on ctx.device. The backbone runs in eval mode (BN statistics
    untouched) and is put back in the mode it was in."""
    was_training = backbone.training
    backbone.eval()
    shard = _shard(len(ds), ctx)
    keep = len(shard)
    if keep == 0:  # more processes than images: run one to learn the feature shape, keep none
        shard = range(1)
    loader = torch.utils.data.DataLoader(SeededViews(torch.utils.data.Subset(ds, shard), transform),
                                         batch_size=batch_size, num_workers=workers, worker_init_fn=ignore_stop_signals,
                                         sampler=[(i, 0) for i in range(len(shard))])
    feats, labels = [], []
    for x, y in loader:
        with ctx.autocast():
            h = backbone(to_device(x, ctx, data))
        feats.append(h.float())
        labels.append(y.to(ctx.device))
    backbone.train(was_training)
    return gather_shards(torch.cat(feats)[:keep], ctx), gather_shards(torch.cat(labels)[:keep], ctx)


@torch.no_grad()
def knn_predict(test_feats, train_feats, train_labels, classes, k=200, t=0.1, chunk=1024):
    """Weighted kNN (InstDisc, Wu et al. 2018): the k most cosine-similar
    training features vote for their label with weight exp(sim / t).
    Features must be L2-normalised. Returns predicted labels [N_test]."""
    k = min(k, len(train_feats))
    preds = []
    for q in test_feats.split(chunk):
        sim, idx = (q @ train_feats.T).topk(k, dim=1)          # [b, k]
        votes = torch.zeros(len(q), classes, device=q.device, dtype=q.dtype)
        votes.scatter_add_(1, train_labels[idx], (sim / t).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(backbone, train_ds, test_ds, classes, ctx, size, data, k=200, t=0.1, batch_size=256, workers=0):
    """Top-1 (%) of the weighted kNN classifier on the frozen backbone's features."""
    tf = eval_transform(data, size)
    train_f, train_y = extract_features(backbone, train_ds, tf, ctx, data, batch_size, workers)
    test_f, test_y = extract_features(backbone, test_ds, tf, ctx, data, batch_size, workers)
    return knn_top1(train_f, train_y, test_f, test_y, classes, k, t)


def knn_top1(train_f, train_y, test_f, test_y, classes, k=200, t=0.1):
    """Top-1 (%) of weighted kNN on cosine similarity of the given (raw) features."""
    pred = knn_predict(F.normalize(test_f, dim=1), F.normalize(train_f, dim=1), train_y, classes, k, t)
    return 100.0 * (pred == test_y).float().mean().item()


def linear_probe(train_f, train_y, test_f, test_y, classes, epochs=100, lr=0.1, optimizer="sgd", schedule="cosine",
                 milestones=(), weight_decay=0.0, batch_size=256, seed=0):
    """Train a linear classifier on fixed features; returns (top-1 % on the test
    features, the trained nn.Linear). The features are standardised with the
    training set's mean and std first (a fixed affine map: still linear)."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(train_f.shape[1], classes).to(train_f.device)
    opt = make_linear_optimizer(head.parameters(), optimizer, lr, weight_decay)
    for epoch in range(epochs):
        set_lr(opt, linear_lr(epoch, epochs, lr, schedule, milestones))
        for idx in torch.randperm(len(train_f), generator=g).to(train_f.device).split(batch_size):
            loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = 100.0 * (head(test_f).argmax(1) == test_y).float().mean().item()
    return acc, head


def make_linear_optimizer(params, name, lr, weight_decay):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=name == "nesterov", weight_decay=weight_decay)


def linear_lr(epoch, epochs, lr, schedule, milestones=()):
    """Per-epoch rate of the linear probe: cosine to 0, or x0.1 at each milestone epoch."""
    if schedule == "step":
        return lr * 0.1 ** sum(epoch >= m for m in milestones)
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
