"""What every method takes for granted: backbones, data sets, the standard view
recipes, distributed and mixed-precision plumbing, LARS, the learning-rate
schedule, checkpoints, logging and the kNN / linear evaluation protocols.

Method files import this module; it imports no method file. Anything a paper
describes as part of its method (its views, heads, queues, momentum encoders,
losses) lives in that method's own file, not here.
"""
import argparse
import atexit
import errno
import functools
import hashlib
import json
import math
import os
import pickle
import random
import signal
import sys
import time
import weakref
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torchvision.models.resnet import BasicBlock

# ---------------------------------------------------------------------------
# Clear errors. Bad input ends the program with one sentence and an exit code:
# 2 for a wrong command line (argparse's own convention), 1 for anything found
# wrong while running (missing or corrupt files, mismatched checkpoints).
# ---------------------------------------------------------------------------

USAGE, RUNTIME = 2, 1


def fail(message, code=RUNTIME):
    message = " ".join(str(message).split())  # one line, whatever an exception's text holds
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


# ---------------------------------------------------------------------------
# Command line shared by all five scripts (SPEC 2.2). Flags whose default
# depends on the data set are None here and filled from the method's recipe.
# ---------------------------------------------------------------------------

DATASETS = ("cifar10", "cifar100", "svhn", "stl10", "tinyimagenet", "imagenet", "folder", "synthetic")
LARGE_DATA = ("imagenet", "folder")  # ImageNet-size images: the "large" recipes, no kNN monitor, resize-then-crop eval
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet_small", "alexnet")


def one_line_errors(parser):
    """argparse prints usage plus a message; one line is easier to read in a log."""
    parser.error = lambda message: fail(f"{parser.prog}: {message} (see --help)", USAGE)
    return parser


def _number(kind, ok, rule):
    """An argparse type: `kind` (int or float), finite, satisfying `ok`; else
    argparse's one-line "argument --x: ..." error (exit 2)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(v) or not ok(v):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# Types for numeric flags, so that an impossible value (--lr -1, --tau 0,
# --workers -1, a NaN) is refused in one line before anything runs.
positive_int = _number(int, lambda v: v >= 1, "at least 1")
nonneg_int = _number(int, lambda v: v >= 0, "0 or more")
positive_float = _number(float, lambda v: v > 0, "greater than 0")
nonneg_float = _number(float, lambda v: v >= 0, "0 or more")
probability = _number(float, lambda v: 0 <= v <= 1, "between 0 and 1")


def add_base_args(parser):
    one_line_errors(parser)
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="cifar10", choices=DATASETS, help="data set (default cifar10)")
    g.add_argument("--data-dir", default="./data", help="where the data sets live (default ./data)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch CIFAR, SVHN or STL-10 when missing (default on)")
    g.add_argument("--subset", type=positive_int, default=None, help="use only the first N training images (in file order: on a class-folder tree, the first classes)")
    g.add_argument("--image-size", type=positive_int, default=None,
                   help="input side in pixels (default: 32 CIFAR/SVHN/synthetic, 64 Tiny ImageNet, "
                        "96 STL-10, 224 ImageNet/folder); the CIFAR stem is used at 64 and below")
    g.add_argument("--workers", type=nonneg_int, default=None, help="data loader processes per GPU (default: min(8, cores))")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--arch", default=None, choices=ARCHS, help="backbone (default: the paper's)")
    g.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: the paper's)")
    g.add_argument("--batch-size", type=positive_int, default=None, help="GLOBAL batch size, over all processes")
    g.add_argument("--lr", type=positive_float, default=None, help="base learning rate, scaled with the batch as the paper scales it")
    g.add_argument("--weight-decay", type=nonneg_float, default=None, help="weight decay (default: the paper's)")
    g.add_argument("--warmup-epochs", type=nonneg_float, default=None, help="linear warmup epochs before cosine decay")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision (auto: bf16 on GPUs with native bf16, compute capability 8.0+; "
                        "fp16 with loss scaling on older GPUs such as the RTX 2080 Ti, V100, T4; off on CPU)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convolutions on tensor cores)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels, cudnn.benchmark off: a resumed run ends bit-identical on a GPU too "
                        "(slower; on the CPU runs are deterministic anyway)")
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder (default runs/<method>-<data>)")
    g.add_argument("--resume", default="auto", help="auto (continue from OUT/last.pt if present), none, or a checkpoint path")
    g.add_argument("--seed", type=int, default=0, help="random seed (offset by rank)")
    g.add_argument("--knn-every", type=nonneg_int, default=None, help="kNN monitor every N epochs, 0 = off (default 10; 0 on ImageNet/folder)")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after N optimizer steps in all (smoke runs, benchmarks)")
    g.add_argument("--log-every", type=positive_int, default=50, help="progress line every N steps")
    g.add_argument("--save-views", type=png_file, default=None, metavar="FILE.png",
                   help="write a grid of the first --save-views-n images (one row each: the original, then the "
                        "method's views as training draws them at epoch 0) and exit without training")
    g.add_argument("--save-views-n", type=positive_int, default=8, help="images (rows) in the --save-views grid (default 8)")
    return parser


def finish_args(args, method, recipes):
    """Fill data-set dependent defaults from the method's recipe and check the
    flags against each other. `recipes` maps "small" (CIFAR-size data sets) and
    "large" (ImageNet, folder) to {flag: value}; an explicit flag always wins."""
    info = DATA_INFO[args.data]
    args.method = method
    if args.image_size is None:
        args.image_size = info["image_size"]
    for name, value in recipes["large" if args.data in LARGE_DATA else "small"].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.knn_every is None:
        args.knn_every = 0 if args.data in LARGE_DATA else 10
    if args.workers is None:
        args.workers = default_workers()
    if args.out is None:
        args.out = os.path.join("runs", f"{method}-{args.data}")
    # --epochs, --batch-size and the other counts are checked by their argparse types.
    if args.image_size < 16:
        fail(f"--image-size {args.image_size} is too small for a ResNet; use at least 16", USAGE)
    return args


def default_workers():
    """--workers default: the cores this process may run on (its CPU affinity, which
    Slurm, taskset and container limits set; not the machine's count) shared among
    this node's processes (torchrun's LOCAL_WORLD_SIZE), at least 1. min(8, cpu_count)
    per process gave 64 workers on an 8-GPU node whatever the job was given."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


# ---------------------------------------------------------------------------
# Backbones: torchvision ResNets with `fc` removed. Small images get the CIFAR
# stem by image size (the rule is stated once, in resnet() below): a 3x3
# stride-1 first convolution at 64 px and below, and no max-pool at 32 px and
# below, so a 32 px image reaches the last stage at 4x4 and a 64 px one too.
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


class CifarAlexNet(nn.Module):
    """The small-image AlexNet of the instance-discrimination baselines that
    AAG compares with in Tables 1-2 (AND, Huang et al. ICML 2019,
    Raymond-sci/AND `models/alexnet.py`; ISIF, Ye et al. CVPR 2019): five 3x3
    convolutions of width 64-192-384-256-256 with BN and ReLU, 2x2 max-pool
    after the 1st, 2nd and 5th ([B, 256, 4, 4] at 32 px), then two fully
    connected layers 4096-1024-1024 with BN and ReLU. h is that 1024-d output
    (7.5M parameters; no biases before BN); the baselines' last
    Linear(1024, 128) is the method's head. --arch alexnet; CIFAR-size images
    only (32-64 px: an adaptive max-pool, a no-op at 32 px, brings 64 px maps
    to 4x4)."""

    dim = 1024

    def __init__(self, image_size=32):
        super().__init__()
        if image_size > 64:
            fail(f"--arch alexnet is the CIFAR AlexNet, for images of 32-64 px (got --image-size {image_size})", USAGE)
        layers, c_in = [], 3
        for c_out, pool in ((64, True), (192, True), (384, False), (256, False), (256, True)):
            layers += [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2, 2))
            c_in = c_out
        layers.append(nn.AdaptiveMaxPool2d(4))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Linear(256 * 4 * 4, self.dim, bias=False), nn.BatchNorm1d(self.dim), nn.ReLU(inplace=True),
            nn.Linear(self.dim, self.dim, bias=False), nn.BatchNorm1d(self.dim), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def resnet(arch, image_size):
    """Returns (backbone, feature dimension). The backbone maps [B, 3, S, S]
    images to [B, dim] features h (after global average pooling).

    The stem rule, on the image size S alone (the same for every method,
    data set and evaluate.py, which rebuilds the backbone from the saved S):
    - S <= 64: the first 7x7 stride-2 convolution becomes a 3x3 stride-1 one;
    - S <= 32: the max-pool after it is dropped as well;
    - S > 64: ResNet's ImageNet stem unchanged.
    So CIFAR-10/100 and SVHN (32 px) get the full CIFAR stem, and STL-10 and
    Tiny ImageNet at 64 px keep the max-pool (a 3x3 conv, then 64 -> 32 px).
    Sources: ReSSL's small-data code (public copies of the authors' release)
    drops the max-pool on CIFAR only and keeps it on STL-10 and Tiny ImageNet
    at 64 px, where the paper reports 88.25 and 46.60 (ReSSL Sec. 4 removes it
    "for a small dataset", its name for CIFAR); the CIFAR code of SimCLR
    (google-research/simclr `cifar_stem`, App. B.9), AndrewAtanov/simclr-pytorch
    `models/resnet.py`, Yif-Yang/DSSL `simsiam_cifar10/simsiam/resnet_cifar.py`
    and MoCo v2's CIFAR recipe (CLSA) all run 32 px with no max-pool. Only
    ReSSL reports numbers between 33 and 64 px; SimCLR's code would use the
    ImageNet stem there (`cifar_stem=image_size <= 32`), which no reported
    number depends on."""
    if arch == "alexnet":  # not a ResNet: no stem to swap (CIFAR-size images only)
        return CifarAlexNet(image_size), CifarAlexNet.dim
    if arch == "resnet_small":
        net = SmallResNet()
    elif arch in ("resnet18", "resnet34", "resnet50"):
        net = getattr(torchvision.models, arch)(weights=None)
    else:
        fail(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}", USAGE)
    dim = net.fc.in_features
    if image_size <= 64:  # CIFAR stem, the rule above: 3x3 stride-1 first convolution ...
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
    if image_size <= 32:  # ... and no max-pool only at CIFAR's 32 px (ReSSL's small-data code)
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


class _ArrayUnpickler(pickle.Unpickler):
    """A CIFAR batch holds dicts, lists, strings, bytes and numpy arrays, and a
    pickle names every other class it builds. This unpickler builds numpy arrays
    and refuses any other class before running it, so a hostile batch file
    cannot execute code (as checkpoints are read with weights_only=True)."""

    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks to build {module}.{name}, which a data batch never holds")
        return super().find_class(module, name)


def _unpickle(path):
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()  # Python 2 pickles: str keys
    except Exception as e:  # random bytes can raise almost anything: OverflowError, MemoryError, KeyError...
        fail(f"{path} is unreadable ({type(e).__name__}: {str(e)[:200]}); delete it and download again")


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

    def __init__(self, samples, classes=None, missing_labels=None):
        self.samples, self.classes = samples, classes
        self.missing_labels = missing_labels  # why kNN / evaluate.py cannot use it (None: they can)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return load_image(path), label


class BadImageError(RuntimeError):
    """An image file that cannot be decoded (not an image, truncated, corrupt)."""


def load_image(path):
    """An RGB PIL image, or BadImageError naming the file. Files are checked
    when they are read, not up front: reading the headers of 1.28M ImageNet
    files before training would take minutes. The run then ends in one line
    naming the file, and the last checkpoint stays as it was."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's decoders raise all of these
        raise BadImageError(f"{path} is not a readable image ({type(e).__name__}); remove or replace it") from None


def fail_on_bad_images(loader):
    """Iterate a DataLoader, turning a BadImageError (re-raised from a loader
    worker with the worker's traceback in its text) into one line."""
    batches = iter(loader)
    _LIVE_BATCHES.add(batches)
    try:
        yield from batches
    except BadImageError as e:
        lines = [line for line in str(e).splitlines() if "is not a readable image" in line]
        fail((lines[-1] if lines else str(e)).split("BadImageError: ")[-1].strip())


# Loader workers ignore SIGTERM (ignore_stop_signals), so when a run ends with
# an error mid-epoch, the interpreter's exit would wait for them forever (it
# stops daemon processes with SIGTERM). Shut the workers down first instead;
# atexit runs this before multiprocessing's and torch's own exit hooks.
_LIVE_BATCHES = weakref.WeakSet()


@atexit.register
def _stop_loader_workers():
    for batches in list(_LIVE_BATCHES):
        if hasattr(batches, "_shutdown_workers"):
            batches._shutdown_workers()


class _Loader:
    """A DataLoader whose iteration ends a run in one line on an unreadable
    image, and which measures how long the training loop waits for data.

    data_wait() is the share of wall-clock time, since this pass over the
    loader began, spent inside next() on the DataLoader's iterator: the time
    from the end of a step (the loop asking for its next batch) to the batch's
    arrival, worker start-up at the beginning of the pass included. Two
    perf_counter() calls per batch: no device sync, no .item(). What it means:
    - workers > 0: next() returns at once when the workers have a batch ready
      and blocks while they are behind, so the share is the time the loop
      stalled for the loader (0% when loading keeps up);
    - --workers 0: loading and augmenting run inside next(), so the share is
      their whole cost, none of it overlapped with compute;
    - on the CPU the step's compute is synchronous, so the share is exact;
    - on a GPU the host returns from a step as soon as its kernels are queued,
      and the GPU works through that queue while the host waits in next(): the
      GPU only idles for the part of the wait beyond the queued work. The share
      is therefore an upper bound on the GPU's starvation, not a measure of it
      (a high share with a full GPU means a slow loader hidden by slower compute).
    """

    STARVED = 0.3  # an epoch with more data wait than this prints one hint (once per run)

    def __init__(self, loader):
        self.loader = loader
        self.wait, self.t0, self.hinted = 0.0, time.perf_counter(), False

    def __iter__(self):
        self.wait, self.t0 = 0.0, time.perf_counter()
        batches = fail_on_bad_images(self.loader)
        while True:
            t = time.perf_counter()
            batch = next(batches, None)  # a batch is never None (default_collate)
            self.wait += time.perf_counter() - t
            if batch is None:
                break
            yield batch
        self._hint()

    def data_wait(self):
        """Share (0-1) of the time since this pass began spent waiting for batches."""
        return self.wait / max(time.perf_counter() - self.t0, 1e-9)

    def _hint(self):
        """After a whole pass: one hint, on the main process, the first time the loader starved."""
        share, main = self.data_wait(), not dist.is_initialized() or dist.get_rank() == 0
        if share > self.STARVED and not self.hinted and main:
            self.hinted = True
            print(f"note: {100 * share:.0f}% of this epoch was spent waiting for data: the loader is the bottleneck. "
                  f"Try more --workers (now {self.loader.num_workers}), fewer or cheaper views, or a faster disk "
                  "(images on local SSD, or decoded to arrays)", flush=True)

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _image_folder(name, root, split, hint):
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        fail(f"{name} not found: expected a folder {path} ({hint})")
    try:
        ds = torchvision.datasets.ImageFolder(path, loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:
        fail(f"{path} is not an image folder ({e})")
    return ds


IMAGE_EXTENSIONS = torchvision.datasets.folder.IMG_EXTENSIONS  # .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp


def _image_files(top):
    """Every image file under `top` at any depth, as (path, folders between top
    and the file), in sorted order (the same on every process). Found by
    extension in any case (.JPG too); names starting with a dot (.git/,
    macOS ._x.jpg) are skipped. One walk of the tree, as ImageFolder does."""
    files = []
    for folder, dirs, names in os.walk(top, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(folder, top)
        depth = () if rel == "." else tuple(rel.split(os.sep))
        files += [(os.path.join(folder, n), depth) for n in sorted(names)
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return files


def _class_folders(files):
    """Sorted class names if every file lies exactly one folder down in at least
    two folders (<class>/<image>), else None: images directly in the tree,
    deeper nesting, or a single folder mean no labels."""
    if any(len(depth) != 1 for _, depth in files):
        return None
    classes = sorted({depth[0] for _, depth in files})
    return classes if len(classes) >= 2 else None


def _folder(root, train):
    """--data folder. The training tree is --data-dir/train/ if it exists, else
    --data-dir itself. It is labelled when every image in it is exactly one
    folder down, in at least two folders (train/<class>/<image>); then val/,
    when present, must hold images of those classes (val/<class>/<image>). Any
    other tree (a flat folder, deeper nesting, no train/) is a set of unlabelled
    images for pre-training: every image file under it, labels -1. The test
    split is None without labels (no labelled train/ or no val/); the training
    set's `missing_labels` then says why, for the kNN monitor and evaluate.py."""
    exts = " ".join(IMAGE_EXTENSIONS)
    labelled_layout = "train/<class>/<image> and val/<class>/<image>"
    tree = os.path.join(root, "train")
    if not os.path.isdir(tree):
        if not os.path.isdir(root):
            fail(f"folder not found: --data-dir {root} does not exist (it must hold images, or {labelled_layout})")
        tree = root
    files = _image_files(tree)
    if not files:
        fail(f"folder: no image files ({exts}, any case) under {tree}")
    classes = _class_folders(files) if tree != root else None
    val = os.path.join(root, "val")
    if classes is None:
        why = (f"{root} has no train/ folder, so its images have no labels" if tree == root else
               f"{tree} is not one level of at least two class folders ({labelled_layout}), so it has no labels")
    elif not os.path.isdir(val):
        why = f"{root} has no val/ folder of labelled images (val/<class>/<image>) to test on"
    else:
        why = None
    if train:
        index = {c: i for i, c in enumerate(classes or ())}
        return ListDataset([(path, index[depth[0]] if classes else -1) for path, depth in files], classes, why)
    if why:
        return None
    val_files = _image_files(val)
    if not val_files or any(len(depth) != 1 for _, depth in val_files):
        fail(f"{val} must hold images of train/'s classes one folder down (val/<class>/<image>), "
             f"as train/ does; remove val/ to pre-train without a test set")
    unknown = sorted({d[0] for _, d in val_files} - set(classes))
    if unknown:
        fail(f"{val} has class folders that train/ does not have: {', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    return ListDataset([(path, index[depth[0]]) for path, depth in val_files], classes)


def missing_labels(ds):
    """Why a training set from load_data() cannot feed the kNN monitor or
    evaluate.py (an unlabelled folder, or no val/), or None when it can."""
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    return getattr(ds, "missing_labels", None)


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
        return _folder(root, train)
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
    # DDP: one download per file system, never several into one folder at once. Rank 0
    # first; then the first process of every other node (on a shared --data-dir it finds
    # rank 0's copy, on a node-local one it fetches its own); then the rest, which only read.
    out = None
    for turn in (ctx.main, ctx.local_rank == 0 and not ctx.main, ctx.local_rank != 0 and not ctx.main):
        if turn:
            out = load()
        if ctx.world > 1:
            dist.barrier()
    skip_knn_without_labels(args, ctx, out[1])
    return out


def num_classes(name, ds):
    while isinstance(ds, torch.utils.data.Subset):  # --subset wraps the set
        ds = ds.dataset
    return DATA_INFO[name]["classes"] or len(ds.classes)


def skip_knn_without_labels(args, ctx, train):
    """The kNN monitor votes with the labels of a training set on a labelled
    test set; an unlabelled folder has neither. Turns it off (args.knn_every = 0)
    with one line saying why, instead of failing: pre-training needs no labels."""
    why = missing_labels(train)
    if why and getattr(args, "knn_every", 0):
        if ctx.main:
            print(f"kNN monitor off: {why}", flush=True)
        args.knn_every = 0


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
        # 2 batches in flight per worker (PyTorch's default): at 4, an ImageNet batch of 154 MB
        # x 4 x every worker fills a container's /dev/shm (often 64 MB to a few GB).
        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)
    return _Loader(loader), sampler


def ignore_stop_signals(worker_id=None):
    """Loader workers leave Ctrl-C / SIGTERM to the main process, which saves a
    checkpoint before stopping (a terminal sends SIGINT to every process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---------------------------------------------------------------------------
# View recipes. All work on PIL images and return PIL images, so that a method
# can derive one view from another (DSSL) before `to_tensor` normalises.
# ---------------------------------------------------------------------------

def view_transform(size, scale=(0.08, 1.0), jitter=None, p_jitter=0.8, p_gray=0.2, p_blur=0.0, blur="kernel", flip=True):
    """Random resized crop (area `scale`, ratio 3/4-4/3) + horizontal flip +
    ColorJitter(*jitter) with p_jitter + grayscale with p_gray + Gaussian blur
    with p_blur. SimCLR's colour distortion of strength s is
    jitter=(0.8s, 0.8s, 0.8s, 0.2s). Two blurs, both with sigma drawn from 0.1-2.0:
      blur="kernel": SimCLR App. A, a kernel 10% of the image side (3 px at 32 px,
                     so little blur on CIFAR);
      blur="pil":    MoCo v2's, used by CLSA, ReSSL and DSSL: PIL's GaussianBlur
                     of radius sigma on the image, whatever its size."""
    ops = [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)]
    if flip:
        ops.append(T.RandomHorizontalFlip())
    if jitter is not None:
        ops.append(T.RandomApply([T.ColorJitter(*jitter)], p=p_jitter))
        ops.append(T.RandomGrayscale(p=p_gray))
    if p_blur > 0:
        if blur == "pil":
            ops.append(T.RandomApply([RandomPILBlur((0.1, 2.0))], p=p_blur))
        elif blur == "kernel":
            kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd, 10% of the side
            ops.append(T.RandomApply([KernelBlur(kernel, sigma=(0.1, 2.0))], p=p_blur))
        else:
            raise ValueError(f"blur must be 'kernel' or 'pil', got {blur!r}")
    return T.Compose(ops)


class KernelBlur(T.GaussianBlur):
    """SimCLR's blur (App. A): torchvision's GaussianBlur (same sigma draw,
    kernel, reflect padding and rounding), computed on PIL images as two 1-D
    passes: 2k instead of k^2 multiply-adds per pixel, so a 224 px view with
    its 23 px kernel costs a few ms instead of tens (the loader's heaviest op).
    Equal to torchvision's result up to 1/255 where float rounding meets a tie."""

    def forward(self, img):
        if not isinstance(img, Image.Image):
            return super().forward(img)
        sigma = self.get_params(self.sigma[0], self.sigma[1])
        k = self.kernel_size[0]
        x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k)
        w = torch.exp(-0.5 * (x / sigma) ** 2)
        w = w / w.sum()
        t = TF.pil_to_tensor(img).float().unsqueeze(0)  # [1, C, H, W]
        c = t.shape[1]
        t = F.pad(t, [k // 2] * 4, mode="reflect")
        t = F.conv2d(t, w.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)  # along x
        t = F.conv2d(t, w.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)  # along y
        return TF.to_pil_image(t[0].round_().clamp_(0, 255).to(torch.uint8))


class RandomPILBlur:
    """MoCo v2's Gaussian blur: PIL's GaussianBlur with radius (= sigma, in
    pixels) drawn uniformly from `sigma`, on the image at its own size. Its
    kernel is not truncated to a fraction of the side, so sigma 2 blurs a
    32 px image as much as it does a 224 px one, pixel for pixel."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        s = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * float(torch.rand(()))
        return img.filter(ImageFilter.GaussianBlur(radius=s))

    def __repr__(self):
        return f"RandomPILBlur(sigma={self.sigma})"


def to_tensor(img):
    """PIL image -> uint8 tensor [3, H, W]. The loader ships uint8 (4x less to
    copy than float) and `to_device` normalises on the GPU."""
    return TF.pil_to_tensor(img)


@functools.lru_cache(maxsize=None)
def _mean_std(data, device):
    """The data set's mean and std (0-255 units) as [1, 3, 1, 1] tensors on `device`, made once
    per (data set, device) and copied without blocking: torch.tensor(..., device="cuda") makes
    the host wait for the GPU, and to_device runs for every view of every step."""
    info = DATA_INFO[data]
    return tuple(host_to_device(255.0 * torch.tensor(info[k]).view(1, 3, 1, 1), device) for k in ("mean", "std"))


def to_device(x, ctx, data, channels_last=False):
    """uint8 images [B, 3, H, W] -> float on ctx.device, normalised with the data set's mean and std."""
    mean, std = _mean_std(data, ctx.device)
    x = (x.to(ctx.device, non_blocking=True).float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def eval_transform(data, size):
    """No augmentation: small-image data sets are resized to `size`; ImageNet and
    folder are resized to size/0.875 and centre-cropped (the standard protocol)."""
    resize = int(round(size / 0.875)) if data in LARGE_DATA else size
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


# ---------------------------------------------------------------------------
# AutoAugment/RandAugment image ops (Cubuk et al.), on PIL images as the
# reference implementations apply them. Each maps (PIL image, v) to a PIL image,
# v in the op's own unit; the ops without a magnitude ignore it. WHICH ops a
# method draws, over which ranges, with which signs and how many is part of the
# method, so each method file holds its own table (DSSL's heavy augmentation,
# CLSA's stronger augmentation); these are only the pixel operations.
# Geometric ops fill uncovered pixels with black, as PIL's transform does.
# ---------------------------------------------------------------------------

def identity(img, v=None):
    return img


def shear_x(img, v):
    """Shear by factor v: output pixel (x, y) reads input (x + v*y, y)."""
    return img.transform(img.size, Image.AFFINE, (1, v, 0, 0, 1, 0))


def shear_y(img, v):
    """Shear by factor v: output pixel (x, y) reads input (x, y + v*x)."""
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, v, 1, 0))


def translate_x(img, v):
    """Move the content v pixels to the right (left for v < 0)."""
    return img.transform(img.size, Image.AFFINE, (1, 0, -v, 0, 1, 0))


def translate_y(img, v):
    """Move the content v pixels down (up for v < 0)."""
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, -v))


def rotate(img, v):
    """Rotate by v degrees counter-clockwise about the centre."""
    return img.rotate(v)


def auto_contrast(img, v=None):
    return ImageOps.autocontrast(img)


def equalize(img, v=None):
    return ImageOps.equalize(img)


def invert(img, v=None):
    return ImageOps.invert(img)


def solarize(img, v):
    """Invert every pixel value >= v (v = 256: no change, v = 0: inverted)."""
    return ImageOps.solarize(img, v)


def solarize_add(img, v, threshold=128):
    """Add v to every pixel value (clipped to 0-255), then solarize at `threshold`."""
    x = np.clip(np.asarray(img).astype(np.int16) + int(v), 0, 255).astype(np.uint8)
    return ImageOps.solarize(Image.fromarray(x, img.mode), threshold)


def posterize(img, v):
    """Keep the v most significant bits of each channel (v in 1-8: at most 2**v levels)."""
    return ImageOps.posterize(img, int(v))


def color(img, v):
    """Saturation factor v (0: grey, 1: unchanged)."""
    return ImageEnhance.Color(img).enhance(v)


def contrast(img, v):
    return ImageEnhance.Contrast(img).enhance(v)


def brightness(img, v):
    return ImageEnhance.Brightness(img).enhance(v)


def sharpness(img, v):
    return ImageEnhance.Sharpness(img).enhance(v)


def cutout(img, v, fill=(128, 128, 128)):
    """Paint a v x v square of colour `fill`, centred on a uniformly drawn pixel
    (torch RNG) and clipped at the border (Cutout, DeVries & Taylor 2017)."""
    v = int(round(v))
    if v <= 0:
        return img
    w, h = img.size
    cx, cy = int(torch.randint(w, ())), int(torch.randint(h, ()))
    x0, y0 = max(0, cx - v // 2), max(0, cy - v // 2)
    box = (x0, y0, min(w, x0 + v), min(h, y0 + v))
    img = img.copy()
    img.paste(tuple(fill) if img.mode == "RGB" else fill[0], box)
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
# Look before you train (--save-views): a PNG grid of what the model sees. One
# row per image, the original first, then the method's views in the order its
# Views class returns them (and its training loop consumes them), drawn with
# the epoch-0 seeds of the training sampler: the very tensors of epoch 0.
# ---------------------------------------------------------------------------

def png_file(text):
    """argparse type of --save-views: a FILE.png whose folder exists."""
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(text)))
    if not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"writes a PNG: give a FILE ending in .png, got {text!r}")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder} of {text!r} does not exist")
    return text


def _into_cell(x, cell, fill=128):
    """[3, h, w] uint8 -> [3, cell, cell]: centred on a grey square (no resampling)."""
    out = torch.full((3, cell, cell), fill, dtype=torch.uint8)
    h, w = x.shape[1:]
    top, left = (cell - h) // 2, (cell - w) // 2
    out[:, top:top + h, left:left + w] = x
    return out


def save_views(args, views, ctx):
    """Writes args.save_views: the first args.save_views_n images of `views`
    (the SeededViews the training loader reads) and their views at epoch 0,
    then prints the column names. The keys are the (index, seed) pairs the
    TrainSampler hands out at epoch 0 (a seed depends on (seed, epoch, index)
    only, not on the batch size or the number of processes). The cell is the
    largest view's side: smaller views (multi-crop, CLSA's 96 px strong
    crops) are padded, centred on grey, not upscaled, so their size shows;
    the original is resized to fit the cell (aspect kept, padded likewise)."""
    n = args.save_views_n
    if n > len(views):
        fail(f"--save-views-n {n} is more than the {len(views)} images of the training set", USAGE)
    if not ctx.main:
        return
    sampler = TrainSampler(len(views), len(views), seed=args.seed)  # one batch: every index, the loader's seeds
    sampler.set_epoch(0)
    seeds = dict(iter(sampler))
    rows = [views[(i, seeds[i])][0] for i in range(n)]  # lists of [3, h, w] uint8, as the loader yields them
    cell = max(max(v.shape[1:]) for row in rows for v in row)
    cells = []
    for i, row in enumerate(rows):
        img = views.ds[i][0].convert("RGB")
        if max(img.size) != cell:  # fit the longer side to the cell
            w, h = img.size
            img = img.resize((max(1, round(w * cell / max(w, h))), max(1, round(h * cell / max(w, h)))), Image.BICUBIC)
        cells += [_into_cell(to_tensor(img), cell)] + [_into_cell(v, cell) for v in row]
    names = ["original"] + list(getattr(views.transform, "names", [f"view {j + 1}" for j in range(len(rows[0]))]))
    grid = torchvision.utils.make_grid(torch.stack(cells), nrow=len(rows[0]) + 1, padding=2, pad_value=255)
    try:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(args.save_views, format="PNG")
    except OSError as e:
        fail(f"cannot write --save-views {args.save_views}: {e}")
    print(f"{args.method} views: {' | '.join(names)}  ({n} images of {args.data}, epoch-0 seeds; {cell} px cells: "
          f"original resized to fit, smaller views padded, not upscaled) -> {args.save_views}", flush=True)


# ---------------------------------------------------------------------------
# Distributed plumbing. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without
# them the program is one plain process and every collective is a no-op.
# ---------------------------------------------------------------------------

class Context:
    """rank, world size, device and the mixed-precision setting of this process."""

    def __init__(self, rank, world, local_rank, device, amp_dtype):
        self.rank, self.world, self.local_rank, self.device, self.amp_dtype = rank, world, local_rank, device, amp_dtype
        self.main = rank == 0
        self.cpu_group = None  # under torchrun: a gloo group for small flags, so they never touch the GPU

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
    deterministic = getattr(args, "deterministic", False)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        # cudnn.benchmark picks the fastest kernels by timing them, and several of
        # those (and the atomics in some backward kernels) make results vary run to run.
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible matmuls
        torch.use_deterministic_algorithms(True, warn_only=True)  # ops without a deterministic kernel warn once
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    amp_dtype = choose_amp(getattr(args, "amp", "off"), device, warn=rank == 0)
    seed_everything(getattr(args, "seed", 0) + rank)
    ctx = Context(rank, world, local_rank, device, amp_dtype)
    if world > 1:
        ctx.cpu_group = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    previous = sys.excepthook
    previous = previous.args[0] if getattr(previous, "func", None) is _out_of_memory_hook else previous  # set up twice
    # The hook keeps plain values, not ctx: a reference to ctx.cpu_group from sys would keep
    # gloo's threads alive past teardown(), into the interpreter's exit, where they can abort it.
    sys.excepthook = functools.partial(_out_of_memory_hook, previous, args, world, amp_dtype)
    return ctx


def _out_of_memory_hook(default, args, world, amp_dtype, kind, error, tb):
    """A CUDA out-of-memory error ends in one line saying what to change, not a page of traceback."""
    if not isinstance(error, torch.OutOfMemoryError):
        return default(kind, error, tb)
    batch = getattr(args, "batch_size", None)
    if hasattr(args, "method"):  # a training script: --batch-size is global
        where = f"at {batch // world} images per GPU (--batch-size {batch} over {world} process(es))"
    else:
        where = f"at {batch} images per GPU (--batch-size is per process here)"
    amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    advice = "lower --batch-size" + (", or use --amp bf16 (fp16 before Ampere)" if amp == "off" else "") + \
             ("; more GPUs keep the global batch at a smaller per-GPU share" if hasattr(args, "method") else "")
    # The interpreter then exits with status 1 (RUNTIME), atexit hooks run as usual.
    print(f"error: CUDA out of memory {where}, --amp {amp}: {advice} (README: memory per GPU)", file=sys.stderr, flush=True)


def choose_amp(amp, device, warn=True):
    """The autocast dtype for --amp on this device (None: float32).
    AMP: `auto` is bf16 only where the GPU computes it natively (compute
    capability 8.0+: A100, RTX 30xx and newer). torch.cuda.is_bf16_supported()
    also says yes on older cards (RTX 2080 Ti sm_75, V100 sm_70, T4) because
    bf16 is emulated there, but emulated bf16 misses the tensor-core kernels and
    crawls, so those cards get fp16 with loss scaling. On the CPU `auto` is off."""
    if device.type != "cuda":
        if amp == "fp16":
            fail("--amp fp16 needs a CUDA GPU; use --amp bf16 or off on the CPU", USAGE)
        return torch.bfloat16 if amp == "bf16" else None
    native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
    if amp == "auto":
        return torch.bfloat16 if native_bf16 else torch.float16
    if amp == "bf16" and not native_bf16 and warn:
        name, cc = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        print(f"warning: {name} (compute capability {cc[0]}.{cc[1]}) has no native bf16: it is emulated and slow; "
              "--amp fp16 (or auto) uses the tensor cores", file=sys.stderr, flush=True)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def teardown():
    """Leave the process group together (a barrier: no rank leaves while rank 0
    still writes the last checkpoint), then destroy it. Its threads stop only
    when nothing references the group any more, so nothing global may hold it
    or ctx (setup's exception hook keeps plain values): threads that live on
    into the interpreter's exit can abort it ("terminate called without an
    active exception"; tests/test_faults.py checks the thread count)."""
    if dist.is_initialized():
        dist.barrier()
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
#
# The exchange moves only the rows a process gives away: one all_to_all, not
# an all-gather of every process's images. With W processes a process sends
# and receives about n (W-1)/W images instead of receiving n (W-1): 8x less
# traffic on 8 GPUs (ImageNet, batch 256: 17 MB per GPU and step, not 135 MB).

class ShufflePlan(NamedTuple):
    """Who sends which rows where. Slot p of the shuffled global batch holds image
    perm[p]; image r*n+i is row i of rank r, and rank r computes slots r*n..r*n+n-1.
    index[0]: our rows in the order we send them (grouped by receiving rank);
    index[1]: puts the rows we receive into slot order; index[2], index[3]: the
    same two for the way back. Counts: rows we send to / receive from each rank."""
    index: torch.Tensor    # [4, n] on the images' device
    send_counts: list
    recv_counts: list


@torch.no_grad()
def batch_shuffle(x, seed):
    """x: this process's [n, ...]. Returns (this process's slice of the global
    batch permuted by a permutation drawn from `seed`, the plan that undoes it).
    Every rank draws the same permutation from the same seed, so nothing is
    broadcast; a seed derived from the step keeps resumed runs exact."""
    world, rank, n = world_size(), _rank(), x.shape[0]
    # Drawn on the host: the row counts of the exchange must be host integers, and
    # reading them back from the device would block the host mid-forward every step.
    perm = torch.randperm(world * n, generator=torch.Generator().manual_seed(seed))
    sender = perm // n                                       # the rank holding each slot's image
    ours = sender == rank                                    # slots our images go to, ascending,
    send_rows = perm[ours] - rank * n                        # so grouped by the rank computing them
    send_counts = torch.bincount(torch.nonzero(ours)[:, 0] // n, minlength=world)
    own_senders = sender[rank * n:(rank + 1) * n]
    arrival = torch.argsort(own_senders, stable=True)       # our slots in arrival order: by sender, then slot
    recv_counts = torch.bincount(own_senders, minlength=world)
    index = torch.stack([send_rows, torch.argsort(arrival), arrival, torch.argsort(send_rows)])
    plan = ShufflePlan(host_to_device(index, x.device), send_counts.tolist(), recv_counts.tolist())
    return _exchange(x[plan.index[0]], plan.send_counts, plan.recv_counts)[plan.index[1]], plan


@torch.no_grad()
def batch_unshuffle(y, plan):
    """Undo batch_shuffle on the outputs y [n, ...]: row i is again image i of this process."""
    return _exchange(y[plan.index[2]], plan.recv_counts, plan.send_counts)[plan.index[3]]


def _exchange(rows, send_counts, recv_counts):
    """all_to_all: rows [m, ...] grouped by receiving rank (send_counts[j] rows to rank j);
    returns the received rows grouped by sending rank. Keeps channels-last."""
    if world_size() == 1:
        return rows
    nhwc = rows.dim() == 4 and not rows.is_contiguous() and rows.is_contiguous(memory_format=torch.channels_last)
    if nhwc:  # the same memory seen as [m, H, W, C]: contiguous, so it is sent without a copy
        rows = rows.permute(0, 2, 3, 1)
    out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts)
    return out.permute(0, 3, 1, 2) if nhwc else out


def host_to_device(t, device):
    """Copy a small host tensor to `device` without blocking the host: from pinned
    memory, asynchronously (a pageable copy waits for the device's queue)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _rank():
    return dist.get_rank() if world_size() > 1 else 0


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
        # [n, c, ...] viewed as [n/s, s, c, ...]: sample i = a*s + b is in group b.
        # Splitting the batch dimension is a view in NCHW and in channels-last
        # alike, so the output keeps the input's memory format (a reshape that
        # moved channels would silently copy to NCHW, twice per layer).
        xg = x.view(n // s, s, *x.shape[1:])
        dims = (0, *range(3, xg.dim()))                         # all but group and channel
        shape = (1, s, c) + (1,) * (x.dim() - 2)
        var, mean = torch.var_mean(xg.float(), dim=dims, unbiased=False)     # [s, c], float32 under AMP too
        out = (xg - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(1, 1, c, *shape[3:]) + self.bias.view(1, 1, c, *shape[3:])
        if self.track_running_stats:
            with torch.no_grad():  # one running estimate: the mean over the groups of each group's statistics
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                count = x.numel() // (s * c)                    # values behind each group's statistics
                unbiased = var * (count / max(count - 1, 1))
                self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.mean(0).to(self.running_var.dtype), momentum)
        return out.to(x.dtype).view(x.shape)


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
    if sync_bn and any(isinstance(m, SplitBatchNorm) for m in model.modules()):
        # convert_sync_batchnorm would turn every SplitBatchNorm (a _BatchNorm)
        # into one global SyncBatchNorm, silently undoing the shuffle-BN groups.
        fail("SyncBN and split BN groups (--bn-splits > 1) exclude each other: pass --bn-splits 1 under torchrun", USAGE)
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
        # One multi-tensor (_foreach) kernel per line over all tensors of a
        # group, instead of a Python loop of small kernels per parameter.
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            ws = [w for w in group["params"] if w.grad is not None]
            if not ws:
                continue
            if group["weight_decay"]:
                gs = torch._foreach_add([w.grad for w in ws], ws, alpha=group["weight_decay"])
            else:
                gs = torch._foreach_mul([w.grad for w in ws], 1.0)  # a copy: the adaptation below is in place
            if group["lars"]:
                w_norm, g_norm = torch.stack(torch._foreach_norm(ws)), torch.stack(torch._foreach_norm(gs))
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                torch._foreach_mul_(gs, list(trust.unbind()))
            vs = []
            for w in ws:
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                vs.append(state["momentum_buffer"])
            torch._foreach_mul_(vs, group["momentum"])
            torch._foreach_add_(vs, gs, alpha=group["lr"])
            torch._foreach_sub_(ws, vs)
        return loss


def scaler_step(scaler, optimizer):
    """optimizer.step() through the loss scaler, then its update. Returns, on
    the device (no host sync), 1.0 if fp16 loss scaling skipped this step
    because the gradients overflowed (the scale then drops), else 0.0. A few
    skipped steps are normal while the scaler searches for its scale; the
    epoch record counts them (`skipped_steps` in log.jsonl)."""
    if not scaler.is_enabled():
        optimizer.step()
        return torch.zeros((), device=next(p for g in optimizer.param_groups for p in g["params"]).device)
    before = scaler._scale.clone()  # AMP: GradScaler keeps its scale as a device tensor
    scaler.step(optimizer)
    scaler.update()
    return (scaler._scale < before).float().squeeze()


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
    """Write to PATH.tmp<pid>, then rename over PATH: PATH is always either the
    previous complete file or the new one. A failed write (disk full, quota,
    read-only) removes the temporary file, keeps PATH, and ends in one line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)
        kept = " (the previous one is kept)" if os.path.exists(path) else ""
        fail(f"the disk is full: could not write {path}{kept}; free some space and run the same command to resume"
             if full else f"could not write {path}{kept} ({type(e).__name__}: {str(e)[:200]})")


def remove_stale_temporaries(folder):
    """Delete temporary files left by a killed save (PATH.tmp<pid> of a process that is gone)."""
    for name in os.listdir(folder):
        stem, _, pid = name.rpartition(".tmp")
        if stem and pid.isdigit() and not _alive(int(pid)):
            os.remove(os.path.join(folder, name))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


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


# Flags that change how long or where a run goes, never the shapes in its checkpoint.
RUN_ONLY_FLAGS = {"out", "resume", "epochs", "max_steps", "log_every", "workers", "knn_every", "data_dir", "download",
                  "seed", "subset", "amp", "channels_last", "deterministic", "lr", "weight_decay", "warmup_epochs"}


def load_strict(module, state, what, hint=""):
    """load_state_dict(strict=True) that fails in one sentence, not a page of keys."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        text = str(e)
        fail(f"{what} does not fit this model ({text.count('size mismatch')} shape mismatches"
             f"{', missing keys' if 'Missing key' in text else ''}{', unexpected keys' if 'Unexpected key' in text else ''})"
             + (hint or "; was it trained with another --arch, --image-size or method?"))


def clean_state_dict(module):
    """state_dict without the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes."""
    return {k.replace("module.", "").replace("_orig_mod.", ""): v for k, v in unwrap(module).state_dict().items()}


def resume(args, model, optimizer, scaler, extra=None):
    """Restore a run per --resume (auto: OUT/last.pt if it exists). Returns the
    number of optimizer steps already taken (0 for a fresh start). `extra` maps
    checkpoint keys to objects with load_state_dict (momentum encoders, queues).
    DDP: call it BEFORE wrapping the model in DDP, whose one-time broadcast then
    hands rank 0's resumed weights to all; every process reads its own --out,
    so all must agree on the step and the checkpoint (same_start)."""
    path = os.path.join(args.out, "last.pt") if args.resume == "auto" else args.resume
    if args.resume == "none" or (args.resume == "auto" and not os.path.isfile(path)):
        same_start(0, None, f"no checkpoint in {args.out}" if args.resume == "auto" else "--resume none")
        return 0
    ckpt = load_checkpoint(path, hint="; delete it, or pass --resume none to start over")
    if "method" not in ckpt and "step" not in ckpt:
        fail(f"{path} is a bare backbone (the weights alone, as in backbone.pt), not a training checkpoint: "
             "pass --resume OUT/last.pt to continue a run; evaluate a backbone with evaluate.py --ckpt", USAGE)
    if ckpt.get("method") != args.method:
        fail(f"{path} is a {ckpt.get('method')!r} checkpoint, not {args.method!r}; pass --out to start a separate run")
    for name in ("arch", "image_size", "data"):
        if ckpt["args"].get(name) != getattr(args, name):
            fail(f"{path} was trained with --{name.replace('_', '-')} {ckpt['args'].get(name)}, not {getattr(args, name)}; "
                 "pass --out to start a separate run, or --resume none to overwrite it")
    differ = [f"--{k.replace('_', '-')} {ckpt['args'][k]} (now {getattr(args, k)})" for k in sorted(ckpt["args"])
              if k not in RUN_ONLY_FLAGS and hasattr(args, k) and ckpt["args"][k] != getattr(args, k)]
    load_strict(unwrap(model), ckpt["model"], path,
                hint=f"; it was trained with {', '.join(differ)}" if differ else "")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        # AMP: only an fp16 run has a loss scale. Across precision modes (bf16 or
        # off <-> fp16) one side is empty: the fp16 side then starts its scale afresh.
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        for key, obj in (extra or {}).items():
            obj.load_state_dict(ckpt[key])
    except (KeyError, ValueError, RuntimeError) as e:
        fail(f"{path} has an optimizer or {type(e).__name__} state that does not fit this run ({e})")
    same_start(int(ckpt["step"]), _digest(ckpt["model"]), path)
    return int(ckpt["step"])


def _digest(state):
    """A hash of a state dict's tensors (about 0.2 s for ResNet-50's 100 MB)."""
    h = hashlib.sha1()
    for key in sorted(state):
        h.update(key.encode())
        if torch.is_tensor(state[key]):
            h.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def same_start(step, digest, where):
    """DDP: every process resumes from the step and checkpoint rank 0 resumes
    from, or the run stops. With --out on node-local disks (the default runs/...
    is relative) a node without last.pt would start from step 0 while node 0
    resumes, and the replicas would silently train different weights."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = dict(step=step, digest=digest, where=where, node=os.uname().nodename, rank=dist.get_rank())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    ref = everyone[0]
    for other in everyone[1:]:
        if (other["step"], other["digest"]) != (ref["step"], ref["digest"]):
            what = "a different checkpoint at the same step" if other["step"] == ref["step"] else f"step {other['step']}"
            message = (f"rank {other['rank']} on node {other['node']} would resume from {what} ({other['where']}), "
                       f"rank 0 on node {ref['node']} from step {ref['step']} ({ref['where']}): every process must see "
                       "the same checkpoint; put --out on a file system all nodes share, or copy last.pt to each node")
            if dist.get_rank() == 0:
                fail(message)
            sys.exit(RUNTIME)  # the other processes stop quietly: rank 0 says why, in one line


def save_run(args, model, backbone, optimizer, scaler, step, epoch, extra=None):
    """last.pt (everything needed to resume; epoch = epochs completed) and
    backbone.pt (the encoder alone, clean keys). Weights that are no longer
    finite are never written over a good checkpoint (one host sync per save)."""
    params = [p.detach() for p in unwrap(model).parameters()]
    if params and not torch.isfinite(torch.stack(torch._foreach_norm(params))).all():
        kept = "the last checkpoint is kept" if os.path.exists(os.path.join(args.out, "last.pt")) else "nothing was saved"
        fail(f"the weights are not finite at step {step}: training diverged, most likely a learning rate too high "
             f"(lower --lr); {kept}")
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
    """Create --out, take its lock, clear what a killed run left, write args.json."""
    if ctx.main:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            fail(f"--out {args.out} is a file, not a folder; pass another --out", USAGE)
        try:
            os.makedirs(args.out, exist_ok=True)
            lock_out(args.out)
            remove_stale_temporaries(args.out)
            with open(os.path.join(args.out, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=2)
        except OSError as e:
            fail(f"cannot write to --out {args.out} ({e.strerror or e}); pass a folder you can write to")


def lock_out(folder):
    """One live run per --out: OUT/run.lock holds the owner's PID (and host),
    is removed at exit, and is taken over when its owner is gone."""
    path, me = os.path.join(folder, "run.lock"), f"{os.getpid()} {os.uname().nodename}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid, _, host = _read(path).partition(" ")
            if pid.isdigit() and int(pid) != os.getpid() and (host != os.uname().nodename or _alive(int(pid))):
                fail(f"another run (process {pid}{' on ' + host if host else ''}) is writing to {folder}; "
                     f"wait for it, stop it, or pass another --out", RUNTIME)
            os.remove(path)  # its owner is dead: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        atexit.register(lambda: os.path.exists(path) and _read(path) == me and os.remove(path))
        return
    fail(f"could not take the lock {path}; delete it if no run is using {folder}")


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


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

    def line(self, epoch, epochs, step, loss, lr, extra="", data=None):
        """`data`: the training loader; when it measures its wait (train_loader's
        does), the line shows the share of this epoch spent waiting for batches."""
        ips = self.images_per_second(step)
        eta = (self.total - step) * self.batch / max(ips, 1e-9)
        wait = f"  data {100 * data.data_wait():.0f}%" if hasattr(data, "data_wait") else ""
        return (f"epoch {epoch + 1}/{epochs}  step {step}/{self.total}  loss {loss:.4f}  lr {lr:.4g}  "
                f"{ips:.0f} img/s{wait}  eta {duration(eta)}{extra}")


def duration(seconds):
    """'03:04:05', or '1d 03:04:05' from 24 h on (strftime's %H wraps at a day)."""
    days, rest = divmod(int(min(seconds, 9_999 * 86400)), 86400)
    return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))


NONFINITE_PATIENCE = 3  # fp16: log steps in a row with a non-finite loss before the run is stopped


class StopSignal:
    """SIGINT/SIGTERM ask the run to stop after the current step, after writing
    a checkpoint; a second signal stops at once. install=False leaves the
    process's signal handlers alone (a training step called from other code)."""

    def __init__(self, install=True):
        self.requested, self.nonfinite = False, 0
        for s in (signal.SIGINT, signal.SIGTERM) if install else ():
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # the second signal: stop now, quietly; the last checkpoint stays as it was
            print("stopped by a second signal before the next checkpoint; the last one is intact", file=sys.stderr,
                  flush=True)
            raise SystemExit(130)
        self.requested = True

    def pending(self, ctx):
        """Checked every step: True on every rank once any rank was asked to
        stop, so a preemption (torchrun kills its workers ~30 s after SIGTERM)
        loses at most a step. One process: a Python flag, free. Under torchrun:
        a 4-byte all-reduce over a CPU (gloo) group, so it never waits for the
        GPU (0.3 ms between two local processes on a busy 2-core CPU)."""
        if ctx.world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
        return bool(flag.item())

    def check_loss(self, ctx, loss, step, lr, scaler):
        """At log steps, on every rank (a collective): ends the run in one line
        when the loss is not finite on any rank: at once in float32 and bf16; in
        fp16 only after NONFINITE_PATIENCE log steps in a row, since a loss
        scaler that is still searching for its scale explains a few overflowing
        steps (it skips them, the weights stay good)."""
        bad = torch.logical_not(torch.isfinite(loss.detach()).all()).float().view(1)
        if ctx.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.nonfinite = self.nonfinite + 1 if bad.item() else 0
        fp16 = scaler is not None and scaler.is_enabled()
        if self.nonfinite and (not fp16 or self.nonfinite >= NONFINITE_PATIENCE):
            value = float(loss.detach().float().mean())
            fail(f"the loss is {value} at step {step}"
                 + (f" ({self.nonfinite} log steps in a row under fp16 loss scaling)" if fp16 else "")
                 + f"; training diverged, most likely a learning rate too high for this batch ({lr:.4g}): lower --lr"
                 + " (or try --amp bf16/off). The last checkpoint, written before it, is kept")


@torch.no_grad()
def embedding_std(z):
    """Collapse indicator: per-dimension standard deviation of the L2-normalised
    embeddings, averaged over dimensions. About 1/sqrt(D) when the embeddings
    spread over the sphere, 0 when they have collapsed to one point."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


# ---------------------------------------------------------------------------
# Evaluation: features of a frozen backbone, weighted kNN (Wu et al. 2018) and
# the linear probe. Under DDP each process takes a contiguous shard of the
# images, so every image is counted exactly once. The TRAINING features (the
# kNN bank, the probe's inputs) stay sharded: ImageNet's 1.28M x 2048 float32
# bank is 10.5 GB, too much to copy onto every GPU. Only the test features are
# gathered; the kNN merges per-shard top-k lists and the probe all-reduces its
# gradients (README "Evaluation memory" gives the bytes per process).
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
def extract_features(backbone, ds, transform, ctx, data, batch_size=256, workers=0, gather=True):
    """Features h [N, D] (float32) and labels [N] of every item of ds, in
    order, on ctx.device; gather=False keeps this process's shard (the items
    _shard(N, ctx) names). The backbone runs in eval mode (BN statistics
    untouched) and is put back in the mode it was in."""
    was_training = backbone.training
    backbone.eval()
    # The same input path as training: channels-last input for a channels-last model.
    channels_last = any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                        for p in backbone.parameters())
    shard = _shard(len(ds), ctx)
    keep = len(shard)
    if keep == 0:  # more processes than images: run one to learn the feature shape, keep none
        shard = range(1)
    loader = torch.utils.data.DataLoader(SeededViews(torch.utils.data.Subset(ds, shard), transform),
                                         batch_size=batch_size, num_workers=workers, worker_init_fn=ignore_stop_signals,
                                         sampler=[(i, 0) for i in range(len(shard))], pin_memory=ctx.device.type == "cuda")
    feats = labels = None
    done = 0
    for x, y in fail_on_bad_images(loader):
        with ctx.autocast():
            h = backbone(to_device(x, ctx, data, channels_last))
        if feats is None:  # filled in place: a list of batches and its concatenation would hold the shard twice
            feats = torch.empty((len(shard), *h.shape[1:]), device=ctx.device)
            labels = torch.empty(len(shard), dtype=y.dtype, device=ctx.device)
        feats[done:done + len(h)] = h.float()
        labels[done:done + len(y)] = y.to(ctx.device)
        done += len(h)
    backbone.train(was_training)
    feats, labels = feats[:keep], labels[:keep]
    if not gather:
        return feats, labels
    return gather_shards(feats, ctx), gather_shards(labels, ctx)


@torch.no_grad()
def knn_predict(test_feats, train_feats, train_labels, classes, k=200, t=0.1, chunk=1024, bank_chunk=16384,
                ctx=None, normalize=False):
    """Weighted kNN (InstDisc, Wu et al. 2018): the k most cosine-similar
    training features vote for their label with weight exp(sim / t).
    Features must be L2-normalised, or normalize=True normalises them chunk by
    chunk (no normalised copy of the bank). Returns predicted labels [N_test].
    Sharded bank: with a ctx of several processes, train_feats/train_labels
    are this process's shard and test_feats the same on every process. The
    top k of the whole bank is among the union of each shard's top k, so the
    [chunk, k] candidates of all shards are gathered and merged: the same
    neighbours as one process holding the whole bank. Queries and bank are
    both taken in chunks: a [chunk, bank_chunk] similarity block at a time."""
    sharded = ctx is not None and ctx.world > 1
    total = len(train_feats)
    if sharded:
        n = torch.tensor([total], device=test_feats.device)
        dist.all_reduce(n)
        total = int(n)
    k = min(k, total)
    preds = []
    for q in test_feats.split(chunk):
        q = F.normalize(q, dim=1) if normalize else q
        # -inf candidates fill a shard with fewer than k rows; exp(-inf / t) = 0 and a full bank never picks them.
        top_sim = torch.full((len(q), k), -math.inf, device=q.device, dtype=q.dtype)
        top_y = torch.zeros((len(q), k), device=q.device, dtype=train_labels.dtype)
        for start in range(0, len(train_feats), bank_chunk):
            bank = train_feats[start:start + bank_chunk]
            bank = F.normalize(bank, dim=1) if normalize else bank
            sim, idx = (q @ bank.T).topk(min(k, len(bank)), dim=1)  # [b, <=k]
            top_sim, top_y = _merge_top(top_sim, top_y, sim, train_labels[start:start + bank_chunk][idx], k)
        if sharded:  # DDP: W x [b, k] candidates, not the bank
            sims, ys = [torch.empty_like(top_sim) for _ in range(ctx.world)], [torch.empty_like(top_y) for _ in range(ctx.world)]
            dist.all_gather(sims, top_sim)
            dist.all_gather(ys, top_y)
            top_sim, top_y = _merge_top(sims[0], ys[0], torch.cat(sims[1:], 1), torch.cat(ys[1:], 1), k)
        votes = torch.zeros(len(q), classes, device=q.device, dtype=q.dtype)
        votes.scatter_add_(1, top_y, (top_sim / t).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def _merge_top(sim_a, y_a, sim_b, y_b, k):
    """The k largest similarities of two candidate lists [b, *], with their labels, largest first."""
    sim, j = torch.cat([sim_a, sim_b], 1).topk(k, dim=1)
    return sim, torch.cat([y_a, y_b], 1).gather(1, j)


def knn_accuracy(backbone, train_ds, test_ds, classes, ctx, size, data, k=200, t=0.1, batch_size=256, workers=0):
    """Top-1 (%) of the weighted kNN classifier on the frozen backbone's features
    (the bank stays sharded over the processes, the test features are gathered)."""
    tf = eval_transform(data, size)
    train_f, train_y = extract_features(backbone, train_ds, tf, ctx, data, batch_size, workers, gather=False)
    test_f, test_y = extract_features(backbone, test_ds, tf, ctx, data, batch_size, workers)
    return knn_top1(train_f, train_y, test_f, test_y, classes, k, t, ctx=ctx)


def knn_top1(train_f, train_y, test_f, test_y, classes, k=200, t=0.1, ctx=None):
    """Top-1 (%) of weighted kNN on cosine similarity of the given (raw) features.
    With a ctx of several processes train_f/train_y are this process's shard."""
    pred = knn_predict(test_f, train_f, train_y, classes, k, t, ctx=ctx, normalize=True)
    return 100.0 * (pred == test_y).float().mean().item()


def linear_probe(train_f, train_y, test_f, test_y, classes, epochs=100, lr=0.1, optimizer="sgd", schedule="cosine",
                 milestones=(), weight_decay=0.0, batch_size=256, seed=0, ctx=None):
    """Train a linear classifier on fixed features; returns (top-1 % on the test
    features, the trained nn.Linear). The features are standardised with the
    training set's mean and std (a fixed affine map: still linear), batch by
    batch, so no standardised copy is held. With a ctx of several processes
    train_f/train_y are this process's shard (test_f whole): every process
    draws the same global batches, computes the loss of the rows it holds, and
    the gradients are summed, so the head is the one-process head."""
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
    for epoch in range(epochs):
        set_lr(opt, linear_lr(epoch, epochs, lr, schedule, milestones))
        perm = torch.randperm(n, generator=g)  # the global order, the same on every process
        if sharded:  # this process's rows of each global batch (on the CPU: no GPU sync)
            mine = (perm >= lo) & (perm < lo + len(train_f))
            per_step = torch.bincount(torch.arange(n)[mine] // batch_size, minlength=steps).tolist()
            batches = (perm[mine] - lo).to(train_f.device).split(per_step)
        else:
            batches = perm.to(train_f.device).split(batch_size)
        for s, idx in enumerate(batches):
            logits = head((train_f[idx] - mean) / std)
            # The mean over the GLOBAL batch: each process adds its rows' share.
            loss = F.cross_entropy(logits, train_y[idx], reduction="sum") / min(batch_size, n - s * batch_size)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sharded:  # DDP: sum the shares (a D x C matrix and C biases, not the features)
                for p in head.parameters():
                    dist.all_reduce(p.grad)
            opt.step()
    with torch.no_grad():
        correct = sum(int((head((f - mean) / std).argmax(1) == y).sum()) for f, y in zip(test_f.split(8192), test_y.split(8192)))
    return 100.0 * correct / max(1, len(test_f)), head


@torch.no_grad()
def _feature_stats(f, n, ctx=None, chunk=8192):
    """Per-dimension mean and std (unbiased, as torch.std; plus 1e-6) of features
    [n, D] held in shards over ctx's processes: two passes in float64, by chunks."""
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
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=name == "nesterov", weight_decay=weight_decay)


def linear_lr(epoch, epochs, lr, schedule, milestones=()):
    """Per-epoch rate of the linear probe: cosine to 0, or x0.1 at each milestone epoch."""
    if schedule == "step":
        return lr * 0.1 ** sum(epoch >= m for m in milestones)
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
