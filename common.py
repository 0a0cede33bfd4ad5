"""What every method takes for granted; what a paper describes (views, heads,
queues, momentum encoders, losses, update rules) is in the method's own file.
Method files import this module; it imports none of them.

Map, in reading order (a first reading can stop before section 11):

  section                      what it holds                                       used by
  1  Backbones                 resnet() and its CIFAR stem, SmallResNet, AlexNet   all, evaluate.py
  2  Data sets                 dataset(), load_data(), subset()                    all, evaluate.py
  3  Views and image ops       normalize_on_device, the two blurs, the pixel ops   all; pixel ops:
                               of AutoAugment's table, save_views (--save-views)   clsa, dssl
  4  Evaluation                extract_features, weighted kNN                      Run's kNN monitor, evaluate.py
  --- training plumbing ---
  5  Command line              add_base_args, apply_recipe, the number types       all
  6  Distributed and AMP       setup, Context, gather_with_grad, ddp               all
  7  Shuffle-BN and split BN   batch_shuffle / batch_unshuffle, split_bn           clsa, ressl
  8  Sampler and loader        train_loader (seeded views, exact mid-epoch resume) all
  9  LARS and schedule         LARS, param_groups, lr_at, set_lr                   simclr, dssl (LARS); all
  10 Checkpoints and logging   resume, save_run, Run (progress, stop, loss check)  all
  11 Run safety                one-line errors (one per run under torchrun),       all (through Run)
                               atomic files, the lock on --out
"""
import argparse
import atexit
import datetime
import errno
import functools
import json
import math
import os
import pickle
import random
import signal
import sys
import time
import weakref
from collections import namedtuple
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torchvision.models.resnet import BasicBlock

USAGE, RUNTIME = 2, 1  # exit codes: a wrong command line (argparse's convention), a fault found while running


# ===========================================================================
# 1. Backbones: torchvision ResNets with `fc` removed, h = f(x) of shape [B, dim]

class SmallResNet(nn.Module):
    """ResNet-18's layout at widths 16-32-64-128, one block per stage (0.3M parameters): CPU smoke runs and tests."""

    def __init__(self, widths=(16, 32, 64, 128)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0])
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        stages = [BasicBlock(widths[0], widths[0])]  # then each stage halves the size, with a 1x1 stride-2 shortcut
        for c_in, c_out in zip(widths, widths[1:]):
            down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, 2, bias=False), nn.BatchNorm2d(c_out))
            stages.append(BasicBlock(c_in, c_out, 2, down))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(widths[-1], 1000)  # fc as torchvision's; resnet() drops it

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

class CifarAlexNet(nn.Module):
    """The small-image AlexNet of AAG's Tables 1-2 baselines (AND, Huang et al. 2019; ISIF, Ye et al. 2019),
    sizes of the lemniscate-style `cifar_alexnet` (AND/ISIF publish none): 3x3 convolutions 64-192-384-256-256
    with BN, ReLU, 2x2 max-pools after the 1st, 2nd, 5th; fc 4096-1024-1024 with BN, ReLU; 7.5M parameters."""

    dim = 1024

    def __init__(self, image_size=32):
        super().__init__()
        if image_size > 64:
            fail(f"--arch alexnet is the CIFAR AlexNet, for images of 32-64 px (got --image-size {image_size})", USAGE)
        layers, c_in = [], 3
        for c_out, pool in ((64, True), (192, True), (384, False), (256, False), (256, True)):
            layers += [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            layers += [nn.MaxPool2d(2, 2)] if pool else []
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(4))  # a no-op at 32 px; 64 px maps to 4x4
        self.fc = nn.Sequential(
            nn.Linear(256 * 4 * 4, self.dim, bias=False), nn.BatchNorm1d(self.dim), nn.ReLU(inplace=True),
            nn.Linear(self.dim, self.dim, bias=False), nn.BatchNorm1d(self.dim), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))

def resnet(arch, image_size):
    """(backbone, dim): [B, 3, S, S] images -> features h [B, dim]. CIFAR stem, from S alone (evaluate.py rebuilds
    it): at S <= 64 a 3x3 stride-1 first convolution, at S <= 32 no max-pool either (CIFAR code of SimCLR,
    simclr-pytorch, DSSL, MoCo v2; ReSSL's keeps it at 64 px)."""
    if arch == "alexnet":
        return CifarAlexNet(image_size), CifarAlexNet.dim
    if arch == "resnet_small":
        net = SmallResNet()
    elif arch in ("resnet18", "resnet34", "resnet50"):
        net = getattr(torchvision.models, arch)(weights=None)
    else:
        fail(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}", USAGE)
    dim = net.fc.in_features
    if image_size <= 64:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
    if image_size <= 32:
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, dim


# ===========================================================================
# 2. Data sets: each reader gives (PIL image, label) pairs. Array files are
# checked by shape, dtype and label range, not md5, so converted copies load.
# Pre-training ignores labels (STL-10's unlabeled split and bare folders: -1).

DATASETS = ("cifar10", "cifar100", "svhn", "stl10", "tinyimagenet", "imagenet", "folder", "synthetic")
LARGE_DATA = ("imagenet", "folder")  # ImageNet-size images: the "large" recipes, no kNN monitor, resize-then-crop eval
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet_small", "alexnet")
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
Data = namedtuple("Data", "pretrain train test")  # pre-training set, labelled training set (kNN bank), test set

class ArrayDataset(torch.utils.data.Dataset):
    """uint8 images [N, H, W, 3] (another layout: `axes`, applied per image, so memory maps stay on disk)."""

    def __init__(self, images, labels, axes=None):
        self.images, self.labels, self.axes = images, np.asarray(labels, dtype=np.int64), axes

    def __len__(self): return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i] if self.axes is None else self.images[i].transpose(self.axes)
        return Image.fromarray(np.ascontiguousarray(img)), int(self.labels[i])

class ListDataset(torch.utils.data.Dataset):
    """Image files with labels; `missing_labels`: why kNN and evaluate.py cannot use it (None: they can)."""

    def __init__(self, samples, classes=None, missing_labels=None):
        self.samples, self.classes, self.missing_labels = samples, classes, missing_labels

    def __len__(self): return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return load_image(path), label

def _check_arrays(name, images, labels, side, classes, where):
    if images.ndim != 4 or images.shape[1:] != (side, side, 3) or images.dtype != np.uint8:
        fail(f"{where} does not hold {name} images: expected uint8 [N, {side}, {side}, 3], "
             f"got {images.dtype} {list(images.shape)}")
    labels = np.asarray(labels)
    if len(labels) != len(images) or len(labels) == 0 or labels.min() < 0 or labels.max() >= classes:
        fail(f"{where} has {len(labels)} labels for {len(images)} images, or labels outside 0..{classes - 1}")

def _fetch_if_missing(name, root, files, download, fetch):
    """Nothing if every path in `files` exists; else fetch() (torchvision's download), or one line naming the first missing."""
    missing = [f for f in files if not os.path.isfile(f)]
    if not missing:
        return
    if not download:
        fail(f"{name} not found: no {missing[0]} ({len(missing)} of its {len(files)} files missing); run without "
             "--no-download to fetch it, or point --data-dir at the folder holding it")
    try:
        fetch()
    except Exception as e:  # no network, disk full, bad archive
        fail(f"could not download {name} to {root} ({type(e).__name__}: {e}); fetch it by hand into {root} or pass --data-dir")

def _cifar(name, root, train, download):
    folder, files, key, classes, tv = {
        "cifar10": ("cifar-10-batches-py", ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
                    "labels", 10, torchvision.datasets.CIFAR10),
        "cifar100": ("cifar-100-python", (["train"], ["test"]), "fine_labels", 100, torchvision.datasets.CIFAR100),
    }[name]
    path = os.path.join(root, folder)
    _fetch_if_missing(name, root, [os.path.join(path, f) for f in files[0] + files[1]], download,
                      lambda: tv(root, download=True))
    images, labels = [], []
    for f in files[0 if train else 1]:
        where = os.path.join(path, f)
        entry = _unpickle(where)
        entry = entry if isinstance(entry, dict) else {}
        data, batch_labels = (np.asarray(entry.get(k, entry.get(k.encode()))) for k in ("data", key))  # str or bytes keys
        if (data.dtype != np.uint8 or data.shape[1:] != (3072,)
                or batch_labels.ndim != 1 or batch_labels.dtype.kind not in "iu"):
            fail(f"{where} is not a {name} batch: expected uint8 'data' [N, 3072] and an integer list {key!r}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are 1024 R, 1024 G, 1024 B
        labels.extend(batch_labels.tolist())
    images = np.concatenate(images)
    _check_arrays(name, images, labels, 32, classes, path)
    return ArrayDataset(images, labels)

def _svhn(root, train, download):
    split = "train" if train else "test"
    path = os.path.join(root, f"{split}_32x32.mat")
    _fetch_if_missing("svhn", root, [path], download, lambda: torchvision.datasets.SVHN(root, split=split, download=True))
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
    _fetch_if_missing("stl10", root, [os.path.join(path, f"{p}_X.bin") for p in parts], download,
                      lambda: torchvision.datasets.STL10(root, split="train+unlabeled", download=True))
    arrays = []
    for p in parts:
        x_path, y_path = os.path.join(path, f"{p}_X.bin"), os.path.join(path, f"{p}_y.bin")
        if os.path.getsize(x_path) == 0 or os.path.getsize(x_path) % (3 * 96 * 96):
            fail(f"{x_path} is not an STL-10 image file: its size is not a positive multiple of 3x96x96 bytes")
        x = np.memmap(x_path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)  # column-major [N, C, W, H]
        y = np.full(len(x), -1)
        if p != "unlabeled":
            if not os.path.isfile(y_path):
                fail(f"stl10 labels not found: {x_path} has no {y_path} beside it")
            y = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
            if len(y) != len(x) or y.min() < 0 or y.max() > 9:
                fail(f"{y_path} does not match {x_path}: {len(y)} labels for {len(x)} images, or labels outside 1..10")
        arrays.append(ArrayDataset(x, y, axes=(2, 1, 0)))
    return arrays[0] if len(arrays) == 1 else torch.utils.data.ConcatDataset(arrays)

IMAGE_EXTENSIONS = torchvision.datasets.folder.IMG_EXTENSIONS  # .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp

def _is_image(path):
    """An image file: an image extension (any case), no dot-name, and a regular file where something exists (a
    named pipe, socket or device is skipped as a text file is: opening a pipe blocks; a broken link stays, to
    fail in one line when read). One stat per file."""
    name = os.path.basename(path)
    return (not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
            and (os.path.isfile(path) or not os.path.exists(path)))

def _image_folder(name, root, split, hint):
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        fail(f"{name} not found: expected a folder {path} ({hint})")
    try:
        return torchvision.datasets.ImageFolder(path, loader=load_image, is_valid_file=_is_image)
    except (FileNotFoundError, RuntimeError) as e:
        fail(f"{path} is not an image folder ({e})")

def _image_files(top):
    """(path, folders between top and it) of every image file under `top`, sorted; dot-names skipped.
    Links are followed, but not back into a folder the walk is in (a loop: its files are listed already)."""
    files, within = [], {top: (os.path.realpath(top),)}  # each folder walked: the real folders it lies in
    for folder, dirs, names in os.walk(top, followlinks=True):
        real = {d: os.path.realpath(os.path.join(folder, d)) for d in dirs if not d.startswith(".")}
        dirs[:] = sorted(d for d in real if real[d] not in within[folder])
        within.update((os.path.join(folder, d), within[folder] + (real[d],)) for d in dirs)
        depth = tuple(d for d in os.path.relpath(folder, top).split(os.sep) if d != ".")  # () for top itself
        files += [(os.path.join(folder, n), depth) for n in sorted(names) if _is_image(os.path.join(folder, n))]
    return files

def _folder(root, train):
    """--data folder: ROOT/train/ (else ROOT) is labelled when every image lies one
    folder down in at least two folders (train/<class>/<image>; val/ then holds the
    same classes); any other tree is unlabelled images (-1) for pre-training."""
    layout = "train/<class>/<image> and val/<class>/<image>"
    tree = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    if not os.path.isdir(tree):
        fail(f"folder not found: --data-dir {root} does not exist (it must hold images, or {layout})")
    files = _image_files(tree)
    if not files:
        fail(f"folder: no image files ({' '.join(IMAGE_EXTENSIONS)}, any case) under {tree}")
    one_down = tree != root and all(len(depth) == 1 for _, depth in files)
    classes = sorted({depth[0] for _, depth in files}) if one_down else []
    classes = classes if len(classes) >= 2 else None
    val = os.path.join(root, "val")
    if classes is None:
        why = (f"{root} has no train/ folder, so its images have no labels" if tree == root else
               f"{tree} is not one level of at least two class folders ({layout}), so it has no labels")
    else:
        why = None if os.path.isdir(val) else f"{root} has no val/ folder of labelled images (val/<class>/<image>) to test on"
    index = {c: i for i, c in enumerate(classes or ())}
    if train:
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
    return ListDataset([(path, index[depth[0]]) for path, depth in val_files], classes)

def _first_root(*candidates):  # --data-dir may name the data set or its parent
    return next((c for c in candidates if os.path.isdir(os.path.join(c, "train"))), candidates[-1])

def _tinyimagenet(root, train):
    root = _first_root(root, os.path.join(root, "tiny-imagenet-200"))
    hint = "unzip tiny-imagenet-200.zip into --data-dir"
    train_set = _image_folder("tinyimagenet", root, "train", hint)
    notes = os.path.join(root, "val", "val_annotations.txt")
    if train or not os.path.isfile(notes):  # val/ already sorted into class folders, or not needed
        return train_set if train else _image_folder("tinyimagenet", root, "val", hint)
    samples = []
    with open(notes) as f:
        for line in filter(str.strip, f):
            parts = line.split("\t")
            if len(parts) < 2:
                fail(f"{notes} has a line that is not 'file<TAB>wnid...': {line.strip()!r}")
            if parts[1] not in train_set.class_to_idx:
                fail(f"{notes} names class {parts[1]}, which train/ does not have")
            samples.append((os.path.join(root, "val", "images", parts[0]), train_set.class_to_idx[parts[1]]))
    return ListDataset(samples)

def _synthetic(train, image_size, n=None):
    """A small learnable data set made in memory (the same every time): class c is a
    square, disc or cross (c % 3) in its own colour, randomly placed, on noise."""
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
        dy, dx = abs(yy - cy), abs(xx - cx)
        mask = [(dy < r) & (dx < r), dy ** 2 + dx ** 2 < r ** 2,
                ((dy < r / 3) & (dx < r)) | ((dx < r / 3) & (dy < r))][c % 3]
        images[i][mask] = palette[c]
    return ArrayDataset(images, labels)

def dataset(name, root, train, download=True, image_size=32, pretrain=False):
    """Train or test split of a data set; pretrain=True gives STL-10's train+unlabeled split."""
    root = os.path.expanduser(root)
    if os.path.exists(root) and not os.path.isdir(root):
        fail(f"--data-dir {root} is a file, not a folder; pass the folder that holds the data", USAGE)
    read = {
        "cifar10": lambda: _cifar(name, root, train, download), "cifar100": lambda: _cifar(name, root, train, download),
        "svhn": lambda: _svhn(root, train, download), "tinyimagenet": lambda: _tinyimagenet(root, train),
        "stl10": lambda: _stl10(root, ("train+unlabeled" if pretrain else "train") if train else "test", download),
        "imagenet": lambda: _image_folder("imagenet", _first_root(root, os.path.join(root, "imagenet")),
                                          "train" if train else "val", "ILSVRC-2012 with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"),
        "folder": lambda: _folder(root, train), "synthetic": lambda: _synthetic(train, image_size)}
    if name not in read:
        fail(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}", USAGE)
    return read[name]()

def subset(ds, n): return ds if n is None or n >= len(ds) else torch.utils.data.Subset(ds, range(n))  # --subset

def load_data(args, ctx):
    """Data(pretrain, train, test) for --data, --subset applied to the training sets. DDP: each process
    loads in one turn, one download per file system: rank 0, then each node's first process, then the rest."""
    def load():
        pretrain = dataset(args.data, args.data_dir, True, args.download, args.image_size, pretrain=True)
        train = dataset(args.data, args.data_dir, True, False, args.image_size) if args.data == "stl10" else pretrain
        test = dataset(args.data, args.data_dir, False, args.download, args.image_size)
        return Data(subset(pretrain, args.subset), subset(train, args.subset), test)
    for turn in (ctx.main, ctx.local_rank == 0 and not ctx.main, ctx.local_rank != 0 and not ctx.main):
        if turn:
            out = load()
        if ctx.world > 1:
            dist.barrier()
    why = missing_labels(out.train)
    if why and getattr(args, "knn_every", 0):  # pre-training needs no labels: the monitor is turned off, not the run
        if ctx.main:
            print(f"kNN monitor off: {why}", flush=True)
        args.knn_every = 0
    return out

def _unsubset(ds): return _unsubset(ds.dataset) if isinstance(ds, torch.utils.data.Subset) else ds

def missing_labels(ds):  # why a training set cannot feed kNN or evaluate.py (unlabelled folder, no val/), or None
    return getattr(_unsubset(ds), "missing_labels", None)

def num_classes(name, ds): return DATA_INFO[name]["classes"] or len(_unsubset(ds).classes)


# ===========================================================================
# 3. Views and image ops on PIL images (a method can derive one view from
# another); to_tensor gives uint8 [3, H, W] (4x less to copy than float) and
# normalize_on_device does the rest on the GPU.

def to_tensor(img): return TF.pil_to_tensor(img)  # PIL image -> uint8 [3, H, W]

@functools.lru_cache(maxsize=None)
def _mean_std(data, device):  # mean and std (0-255) as [1, 3, 1, 1] on `device`, once per (data set, device)
    info = DATA_INFO[data]
    return tuple(host_to_device(255.0 * torch.tensor(info[k]).view(1, 3, 1, 1), device) for k in ("mean", "std"))

def is_channels_last(t):  # NHWC memory (a 4-D tensor that is not also plain contiguous, as [n, c, 1, 1] is)
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)

def normalize_on_device(x, ctx, data, channels_last=False):
    """uint8 images [B, 3, H, W] -> float32 on ctx.device, normalised with the data set's mean and std."""
    mean, std = _mean_std(data, ctx.device)
    x = (x.to(ctx.device, non_blocking=True).float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x

def eval_transform(data, size, resize=None, interpolation=T.InterpolationMode.BICUBIC):
    """No augmentation: resize to `resize` (default: `size`; size/0.875 on ImageNet-size data), centre-crop `size`."""
    resize = resize or (int(round(size / 0.875)) if data in LARGE_DATA else size)
    return T.Compose([T.Resize(resize, interpolation=interpolation), T.CenterCrop(size), to_tensor])

class KernelBlur(T.GaussianBlur):
    """SimCLR's blur (App. A): torchvision's GaussianBlur (same sigma draw, kernel, reflect padding) as two
    1-D passes on PIL images, without the end taps that weigh under 1/1024 together: within 1/255 of
    torchvision's, 1.6 ms per 224 px view on one core (all 23 taps: 2.1 ms; 2-D: k^2 multiply-adds a pixel)."""

    def forward(self, img):
        if not isinstance(img, Image.Image):
            return super().forward(img)
        sigma, k = self.get_params(self.sigma[0], self.sigma[1]), self.kernel_size[0]
        x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k)
        w = torch.exp(-0.5 * (x / sigma) ** 2)
        w = w / w.sum()
        cut = int((w.cumsum(0) < 1 / 2048).sum())  # taps dropped at each end: under 1/2048 a side
        if cut:
            w, k = w[cut:k - cut] / w[cut:k - cut].sum(), k - 2 * cut
        t = F.pad(TF.pil_to_tensor(img).float().unsqueeze(0), [k // 2] * 4, mode="reflect")  # [1, C, H, W]
        c = t.shape[1]
        t = F.conv2d(t, w.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)  # along x
        t = F.conv2d(t, w.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)  # along y
        return TF.to_pil_image(t[0].round_().clamp_(0, 255).to(torch.uint8))

class RandomPILBlur:
    """MoCo v2's blur: PIL's GaussianBlur of radius ~ U(sigma) px, whatever the image size."""

    def __init__(self, sigma=(0.1, 2.0)): self.sigma = sigma

    def __call__(self, img):
        s = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * float(torch.rand(()))
        return img.filter(ImageFilter.GaussianBlur(radius=s))

# AutoAugment/RandAugment pixel ops (Cubuk et al.) on PIL images: (img, v) -> img, v in the op's own unit;
# geometric ops fill uncovered pixels with black, as PIL does. The ops with a value torchvision has in this
# form (TF.rotate, solarize, posterize, adjust_saturation/contrast/brightness/sharpness) are used as they are.
# Which ops a method draws, over which ranges and signs, is in its own file (CLSA's strong views; DSSL's).
def identity(img, v=None): return img
def shear_x(img, v): return img.transform(img.size, Image.AFFINE, (1, v, 0, 0, 1, 0))       # (x, y) reads (x + v*y, y)
def shear_y(img, v): return img.transform(img.size, Image.AFFINE, (1, 0, 0, v, 1, 0))       # (x, y) reads (x, y + v*x)
def translate_x(img, v): return img.transform(img.size, Image.AFFINE, (1, 0, -v, 0, 1, 0))  # content v px right
def translate_y(img, v): return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, -v))  # content v px down
def auto_contrast(img, v=None): return ImageOps.autocontrast(img)
def equalize(img, v=None): return ImageOps.equalize(img)
def invert(img, v=None): return ImageOps.invert(img)

def save_views(args, views, ctx):
    """--save-views: a PNG grid, a row per image: the original (fitted to the cell), then the very view tensors
    of epoch 0 in the Views class's order, centred in grey cells of the largest view's side (multi-crop sizes
    keep their ratio); the grid enlarged by one integer factor (nearest neighbour) to cells of at least 96 px."""
    n = args.save_views_n
    if n > len(views):
        fail(f"--save-views-n {n} is more than the {len(views)} images of the training set", USAGE)
    if ctx.main:
        seeds = dict(iter(TrainSampler(len(views), len(views), seed=args.seed)))  # one batch: each index's epoch-0 seed
        rows = [views[(i, seeds[i])][0] for i in range(n)]  # lists of uint8 [3, h, w]
        cell = max(max(v.shape[1:]) for row in rows for v in row)
        cells = []
        for i, row in enumerate(rows):
            original = ImageOps.contain(views.ds[i][0].convert("RGB"), (cell, cell), Image.BICUBIC)
            for x in [to_tensor(original)] + row:
                top, left = (cell - x.shape[1]) // 2, (cell - x.shape[2]) // 2
                cells.append(F.pad(x, (left, cell - x.shape[2] - left, top, cell - x.shape[1] - top), value=128))
        names = ["original"] + list(getattr(views.transform, "names", [f"view {j + 1}" for j in range(len(rows[0]))]))
        grid = torchvision.utils.make_grid(torch.stack(cells), nrow=len(rows[0]) + 1, padding=2, pad_value=255)
        k = -(-96 // cell)  # one integer factor for the whole grid: a cell of at least 96 px
        grid = grid.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2)  # nearest neighbour, exact copies
        try:
            Image.fromarray(grid.permute(1, 2, 0).numpy()).save(args.save_views, format="PNG")
        except OSError as e:
            fail(f"cannot write --save-views {args.save_views}: {e}")
        print(f"{args.method} views: {' | '.join(names)}  ({n} images of {args.data}, epoch-0 seeds; {cell} px cells: "
              f"original resized to fit, smaller views padded; grid enlarged x{k}, nearest neighbour, "
              f"to {cell * k} px cells) -> {args.save_views}", flush=True)
    teardown()


# ===========================================================================
# 4. Evaluation: frozen features and weighted kNN (Wu et al. 2018). Under DDP
# each process takes a contiguous shard of the images (each counted once); the
# training features stay sharded (ImageNet's bank is 10.5 GB) and only the test
# features are gathered. The linear probe lives in evaluate.py.

def _shard(n, ctx): return range(ctx.rank * n // ctx.world, (ctx.rank + 1) * n // ctx.world)  # a contiguous share

@torch.no_grad()
def gather_shards(x, ctx):  # per-rank tensors of possibly unequal length, concatenated in rank order
    if ctx.world == 1:
        return x
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(ctx.world)]
    dist.all_gather(sizes, n)
    longest = int(max(sizes))
    parts = [x.new_empty((longest, *x.shape[1:])) for _ in range(ctx.world)]
    dist.all_gather(parts, torch.cat([x, x.new_zeros((longest - len(x), *x.shape[1:]))]))
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])

@torch.no_grad()
def extract_features(backbone, ds, transform, ctx, data, batch_size=256, workers=0, gather=True):
    """Features [N, D] (float32) and labels [N] of ds, in order, on ctx.device (gather=False:
    this process's shard), the backbone in eval mode (BN statistics untouched)."""
    was_training = backbone.training
    backbone.eval()
    channels_last = any(is_channels_last(p) for p in backbone.parameters())  # the input layout of a channels-last model
    shard = _shard(len(ds), ctx)
    keep = len(shard)
    shard = shard if keep else range(1)  # more processes than images: run one to learn the shape, keep none
    loader = torch.utils.data.DataLoader(SeededViews(torch.utils.data.Subset(ds, shard), transform),
                                         batch_size=batch_size, num_workers=workers, worker_init_fn=ignore_stop_signals,
                                         sampler=[(i, 0) for i in range(len(shard))], pin_memory=ctx.device.type == "cuda")
    feats, labels, done = None, None, 0
    for x, y in fail_on_bad_images(loader):
        with ctx.autocast():
            h = backbone(normalize_on_device(x, ctx, data, channels_last))
        if feats is None:  # filled in place: a list of batches and its concatenation would hold the shard twice
            feats = torch.empty((len(shard), *h.shape[1:]), device=ctx.device)
            labels = torch.empty(len(shard), dtype=y.dtype, device=ctx.device)
        feats[done:done + len(h)], labels[done:done + len(y)] = h.float(), y.to(ctx.device)
        done += len(h)
    backbone.train(was_training)
    feats, labels = feats[:keep], labels[:keep]
    return (gather_shards(feats, ctx), gather_shards(labels, ctx)) if gather else (feats, labels)

def _merge_top(sim_a, y_a, sim_b, y_b, k):  # the k largest of two candidate lists [b, *], with their labels
    sim, j = torch.cat([sim_a, sim_b], 1).topk(k, dim=1)
    return sim, torch.cat([y_a, y_b], 1).gather(1, j)

@torch.no_grad()
def knn_predict(test_feats, train_feats, train_labels, classes, k=200, t=0.1, chunk=1024, bank_chunk=16384,
                ctx=None, normalize=False):
    """Weighted kNN: the k most cosine-similar training features vote for their label with weight exp(sim / t);
    labels [N_test]. Unit rows, or normalize=True. A bank sharded over processes (ctx): each shard's top k is
    gathered and merged, the same neighbours as one bank. Memory: one [chunk, bank_chunk] block at a time."""
    sharded = ctx is not None and ctx.world > 1
    total = torch.tensor([len(train_feats)], device=test_feats.device)
    if sharded:
        dist.all_reduce(total)
    k = min(k, int(total))
    preds = []
    for q in test_feats.split(chunk):
        q = F.normalize(q, dim=1) if normalize else q
        # -inf fills a shard with fewer than k rows: exp(-inf / t) = 0, and a full bank never picks them.
        top_sim = torch.full((len(q), k), -math.inf, device=q.device, dtype=q.dtype)
        top_y = torch.zeros((len(q), k), device=q.device, dtype=train_labels.dtype)
        for start in range(0, len(train_feats), bank_chunk):
            bank = train_feats[start:start + bank_chunk]
            bank = F.normalize(bank, dim=1) if normalize else bank
            sim, idx = (q @ bank.T).topk(min(k, len(bank)), dim=1)
            top_sim, top_y = _merge_top(top_sim, top_y, sim, train_labels[start:start + bank_chunk][idx], k)
        if sharded:
            sims, ys = [torch.empty_like(top_sim) for _ in range(ctx.world)], [torch.empty_like(top_y) for _ in range(ctx.world)]
            dist.all_gather(sims, top_sim)
            dist.all_gather(ys, top_y)
            top_sim, top_y = _merge_top(sims[0], ys[0], torch.cat(sims[1:], 1), torch.cat(ys[1:], 1), k)
        votes = torch.zeros(len(q), classes, device=q.device, dtype=q.dtype)
        preds.append(votes.scatter_add_(1, top_y, (top_sim / t).exp()).argmax(dim=1))
    return torch.cat(preds)

def knn_top1(train_f, train_y, test_f, test_y, classes, k=200, t=0.1, ctx=None):  # top-1 %, raw features
    pred = knn_predict(test_f, train_f, train_y, classes, k, t, ctx=ctx, normalize=True)
    return 100.0 * (pred == test_y).float().mean().item()

def knn_accuracy(net, train_ds, test_ds, classes, ctx, size, data, k=200, t=0.1, batch_size=256, workers=0):
    tf = eval_transform(data, size)
    train_f, train_y = extract_features(net, train_ds, tf, ctx, data, batch_size, workers, gather=False)
    test_f, test_y = extract_features(net, test_ds, tf, ctx, data, batch_size, workers)
    return knn_top1(train_f, train_y, test_f, test_y, classes, k, t, ctx=ctx)


# ===========================================================================
#                           TRAINING PLUMBING
# 5. Command line shared by the five scripts. Flags whose default depends on the
# data set are None here; the method's recipe fills them (apply_recipe).

def _number(kind, ok, rule):
    """An argparse type: a finite `kind` satisfying `ok`, else argparse's one-line error."""
    def parse(text):
        v = kind(text)  # not a number: argparse says "invalid int value: 'x'"
        if not math.isfinite(v) or not ok(v):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse

positive_int = _number(int, lambda v: v >= 1, "at least 1")
batch_int = _number(int, lambda v: v >= 2, "at least 2: BatchNorm and every loss here compare images within a batch")
seed_int = _number(int, lambda v: 0 <= v < 2**31, "between 0 and 2147483647 (2^31 - 1)")
nonneg_int = _number(int, lambda v: v >= 0, "0 or more")
positive_float = _number(float, lambda v: v > 0, "greater than 0")
nonneg_float = _number(float, lambda v: v >= 0, "0 or more")
probability = _number(float, lambda v: 0 <= v <= 1, "between 0 and 1")

def png_file(text):  # --save-views: a FILE.png whose folder exists
    if not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"writes a PNG: give a FILE ending in .png, got {text!r}")
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(text)))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder} of {text!r} does not exist")
    return text

def add_base_args(parser):
    one_line_errors(parser)
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="cifar10", choices=DATASETS, help="data set (default cifar10)")
    g.add_argument("--data-dir", default="./data", help="where the data sets live (default ./data)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch CIFAR, SVHN or STL-10 when missing (default on)")
    g.add_argument("--subset", type=positive_int, default=None,
                   help="use only the first N training images (in file order: on a class-folder tree, the first classes)")
    g.add_argument("--image-size", type=positive_int, default=None, help="input side in pixels (default: 32 CIFAR/SVHN/"
                   "synthetic, 64 Tiny ImageNet, 96 STL-10, 224 ImageNet/folder); the CIFAR stem is used at 64 and below")
    g.add_argument("--workers", type=nonneg_int, default=None, help="data loader processes per GPU (default: this process's share of its cores)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--arch", default=None, choices=ARCHS, help="backbone (default: the paper's)")
    g.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: the paper's)")
    g.add_argument("--batch-size", type=batch_int, default=None, help="GLOBAL batch size, over all processes")
    g.add_argument("--lr", type=positive_float, default=None, help="base learning rate, scaled with the batch as the paper scales it")
    g.add_argument("--weight-decay", type=nonneg_float, default=None, help="weight decay (default: the paper's)")
    g.add_argument("--warmup-epochs", type=nonneg_float, default=None, help="linear warmup epochs before cosine decay")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="mixed precision (auto: bf16 on "
                   "GPUs with native bf16, compute capability 8.0+; fp16 with loss scaling on older GPUs such as the RTX "
                   "2080 Ti, V100, T4; off on CPU)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convolutions on tensor cores)")
    g.add_argument("--deterministic", action="store_true", help="deterministic GPU kernels, cudnn.benchmark off: a resumed "
                   "run ends bit-identical on a GPU too (slower; on the CPU runs are deterministic anyway)")
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder (default runs/<method>-<data>)")
    g.add_argument("--resume", default="auto", help="auto (continue from OUT/last.pt if present), none, or a checkpoint path")
    g.add_argument("--seed", type=seed_int, default=0, help="random seed (offset by rank)")
    g.add_argument("--knn-every", type=nonneg_int, default=None, help="kNN monitor every N epochs, 0 = off (default 10; 0 on ImageNet/folder)")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after N optimizer steps in all (smoke runs, benchmarks)")
    g.add_argument("--log-every", type=positive_int, default=50, help="progress line every N steps")
    g.add_argument("--save-views", type=png_file, default=None, metavar="FILE.png", help="write a grid of the first "
                   "--save-views-n images (one row each: the original, then the method's views as training draws them at "
                   "epoch 0) and exit without training")
    g.add_argument("--save-views-n", type=positive_int, default=8, help="images (rows) in the --save-views grid (default 8)")
    return parser

def apply_recipe(args, method, recipe):
    """Flags left at None from `recipe` ({flag: value} for this data set) and the data set; explicit flags win."""
    args.method = method
    by_data = dict(image_size=DATA_INFO[args.data]["image_size"], knn_every=0 if args.data in LARGE_DATA else 10,
                   out=os.path.join("runs", f"{method}-{args.data}"))
    for name, value in {**by_data, **recipe}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.workers is None:
        args.workers = default_workers()
    if args.image_size < 16:
        fail(f"--image-size {args.image_size} is too small for a ResNet; use at least 16", USAGE)
    return args

def default_workers():  # the cores this process may use (affinity: Slurm, taskset, containers) per local process
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: all
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


# ===========================================================================
# 6. Distributed and AMP. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE;
# without them the program is one process and every collective is a no-op.

PEER_WAIT = 600  # seconds a process started by hand (RANK, WORLD_SIZE set, no torchrun) waits for the others

class Context:
    """Rank, world size, device and mixed-precision dtype of this process."""

    def __init__(self, rank, world, local_rank, device, amp_dtype, cpu_group=None):
        self.rank, self.world, self.local_rank, self.device, self.amp_dtype = rank, world, local_rank, device, amp_dtype
        self.main = rank == 0
        self.cpu_group = cpu_group  # the stop flag's gloo group on GPUs, never waiting for one (None: the default group)

    def autocast(self):
        # AMP: forward passes in bf16/fp16; every loss casts to float32 itself.
        return nullcontext() if self.amp_dtype is None else torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self):
        # AMP: only fp16 needs loss scaling; bf16 has float32's exponent range.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

def setup(args):
    """Join torchrun's process group if launched by it, pick device and AMP dtype, seed with --seed + rank."""
    env = {k: os.environ.get(k, d) for k, d in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"))}
    if not all(v.isdigit() for v in env.values()) or int(env["RANK"]) >= int(env["WORLD_SIZE"]):
        fail(f"{' '.join(f'{k}={v}' for k, v in env.items())} is not a process of a run (RANK must be 0 to "
             "WORLD_SIZE - 1): launch with torchrun, or unset them")
    rank, local_rank, world = (int(v) for v in env.values())
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if world > 1 and not (addr and port):
        fail(f"WORLD_SIZE={world} without MASTER_ADDR and MASTER_PORT: launch with torchrun, or unset WORLD_SIZE")
    deterministic = getattr(args, "deterministic", False)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        torch.backends.cudnn.benchmark = not deterministic  # it times kernels and picks the fastest: not reproducible
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible matmuls
        torch.use_deterministic_algorithms(True, warn_only=True)
    if world > 1:
        by_hand = "TORCHELASTIC_RUN_ID" not in os.environ  # torchrun has gathered the processes already
        if by_hand:
            print(f"process {rank} of {world}: waiting up to {PEER_WAIT} s for the others at {addr}:{port}", file=sys.stderr, flush=True)
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda"
                                    else None, timeout=datetime.timedelta(seconds=PEER_WAIT) if by_hand else None)
        except (RuntimeError, ValueError) as e:  # DistStoreError (no peers in time) is a RuntimeError
            fail(f"process {rank} of {world} could not join the others at {addr}:{port} ({type(e).__name__}: "
                 f"{str(e).splitlines()[0][:150]}); start all {world} processes, or launch with torchrun")
    amp_dtype = choose_amp(getattr(args, "amp", "off"), device, warn=rank == 0)
    seed = getattr(args, "seed", 0) + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    install_error_hook(args, world, amp_dtype)
    return Context(rank, world, local_rank, device, amp_dtype,
                   dist.new_group(backend="gloo") if world > 1 and device.type == "cuda" else None)

def choose_amp(amp, device, warn=True):
    """The autocast dtype for --amp (None: float32). AMP: `auto` is bf16 where the GPU
    has it natively (compute capability 8.0+), fp16 with loss scaling on older cards
    (RTX 2080 Ti, V100, T4 emulate bf16 without tensor cores), off on the CPU."""
    if device.type != "cuda":
        if amp == "fp16":
            fail("--amp fp16 needs a CUDA GPU; use --amp bf16 or off on the CPU", USAGE)
        return torch.bfloat16 if amp == "bf16" else None
    cc = torch.cuda.get_device_capability(device)
    if amp == "auto":
        return torch.bfloat16 if cc >= (8, 0) else torch.float16
    if amp == "bf16" and cc < (8, 0) and warn:
        print(f"warning: {torch.cuda.get_device_name(device)} (compute capability {cc[0]}.{cc[1]}) has no native bf16: "
              "it is emulated and slow; --amp fp16 (or auto) uses the tensor cores", file=sys.stderr, flush=True)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]

def teardown():  # leave the process group together: no rank leaves while rank 0 still saves
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

def world_size(): return dist.get_world_size() if dist.is_initialized() else 1

def dist_rank(): return dist.get_rank() if dist.is_initialized() else 0

class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x):
        return concat_all_gather(x)

    @staticmethod
    def backward(fctx, grad):  # every rank computed the same loss: the gradient summed over ranks, our rows of it
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]

def gather_with_grad(x):
    """x [n, ...] of every process in rank order -> [world*n, ...], with gradient: every
    rank computes the same loss, and DDP's averaging makes it the one-process step."""
    return x if world_size() == 1 else _GatherWithGrad.apply(x)

@torch.no_grad()
def concat_all_gather(x):  # x [n, ...] of every process, in rank order, without gradient
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)

def ddp(model, ctx, sync_bn=True, same_on_every_rank=()):
    """DDP wrapper (a no-op in one process), SyncBN on GPUs (global BN, SimCLR Sec. 3;
    on the CPU BN stays per process). `same_on_every_rank`: buffers equal on every rank
    by construction (a queue), which DDP would otherwise broadcast before every forward."""
    if ctx.world == 1:
        return model
    if sync_bn and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(same_on_every_rank))
    return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)

def unwrap(model): return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ===========================================================================
# 7. Shuffle-BN (MoCo Sec. 3.3): BN over the same images as the query would leak
# the positive through the batch statistics, so keys are computed on a permuted
# global batch. One all_to_all each way moves only the images that change process
# (ImageNet, 8 GPUs: 17 MB per GPU and step; an all-gather: 135 MB). In one
# process, split BN (BN over groups of the batch) stands in for the GPUs.

# index [4, n]: our rows in sending order, received rows into slot order, the same two back; counts per rank
ShufflePlan = namedtuple("ShufflePlan", "index send_counts recv_counts")

@torch.no_grad()
def batch_shuffle(x, seed):
    """x: this process's [n, ...] -> (its slice of the global batch permuted by a permutation
    drawn from `seed`, the plan that undoes it). Every rank draws the same one on the host
    (the exchange's counts must be host integers): nothing broadcast, no GPU stall."""
    world, rank, n = world_size(), dist_rank(), x.shape[0]
    perm = torch.randperm(world * n, generator=torch.Generator().manual_seed(seed))  # slot p holds image perm[p]
    sender = perm // n                                       # rank holding each slot's image
    ours = sender == rank
    send_rows = perm[ours] - rank * n                        # our images in slot order: grouped by receiving rank
    send_counts = torch.bincount(torch.nonzero(ours)[:, 0] // n, minlength=world)
    own_senders = sender[rank * n:(rank + 1) * n]            # who sends each of our slots
    arrival = torch.argsort(own_senders, stable=True)       # our slots in arrival order: by sender, then slot
    recv_counts = torch.bincount(own_senders, minlength=world)
    index = torch.stack([send_rows, torch.argsort(arrival), arrival, torch.argsort(send_rows)])
    plan = ShufflePlan(host_to_device(index, x.device), send_counts.tolist(), recv_counts.tolist())
    return _exchange(x[plan.index[0]], plan.send_counts, plan.recv_counts)[plan.index[1]], plan

@torch.no_grad()
def batch_unshuffle(y, plan):  # undo batch_shuffle: row i of y is again image i of this process
    return _exchange(y[plan.index[2]], plan.recv_counts, plan.send_counts)[plan.index[3]]

def _exchange(rows, send_counts, recv_counts):
    """all_to_all of rows grouped by receiving rank; returns rows grouped by sending rank (channels-last kept)."""
    if world_size() == 1:
        return rows
    nhwc = is_channels_last(rows)
    rows = rows.permute(0, 2, 3, 1) if nhwc else rows  # the same memory as a contiguous [m, H, W, C]: sent without a copy
    out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts)
    return out.permute(0, 3, 1, 2) if nhwc else out

def host_to_device(t, device):  # a small host tensor, copied without blocking the host (pinned, asynchronous)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BN with training statistics per group of the batch (sample i in group i % splits), as over
    `splits` GPUs (MoCo's CIFAR demo, ReSSL Sec. 4): one native BN over [n/splits, splits*c, ...].
    nn.BatchNorm's parameters, buffers and keys; plain BN in eval mode; running estimate: the
    groups' mean. Channels-last input costs a copy each way (NHWC memory keeps c innermost)."""

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
        momentum, stats = self.momentum, (None, None)
        if self.track_running_stats:
            self.num_batches_tracked += 1
            momentum = 1.0 / float(self.num_batches_tracked) if momentum is None else momentum
            stats = (self.running_mean.repeat(s), self.running_var.repeat(s))  # updated in place by F.batch_norm
        weight, bias = (self.weight.repeat(s), self.bias.repeat(s)) if self.affine else (None, None)
        out = F.batch_norm(x.reshape(n // s, s * c, *x.shape[2:]), *stats, weight, bias, True, momentum, self.eps)
        if self.track_running_stats:  # stats hold no gradient
            self.running_mean.copy_(stats[0].view(s, c).mean(0))
            self.running_var.copy_(stats[1].view(s, c).mean(0))
        return out.view(x.shape).contiguous(memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)

def split_bn(module, splits):  # every BatchNorm1d/2d in `module` becomes a SplitBatchNorm (in place)
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            setattr(module, name, SplitBatchNorm(child, splits))
        else:
            split_bn(child, splits)


# ===========================================================================
# 8. Sampler and loader. Each sample's views are drawn from a seed of (run seed,
# epoch, index) only: independent of processes and workers, and a run resumed
# mid-epoch sees exactly the views the uninterrupted run would have seen.

class TrainSampler(torch.utils.data.Sampler):
    """Shuffles every epoch, drops the last partial GLOBAL batch, gives rank r the r-th slice
    of each global batch; yields (index, seed); `start_step` skips trained batches."""

    def __init__(self, n, global_batch, rank=0, world=1, seed=0):
        if global_batch % world or global_batch < 2 * world:
            fail(f"--batch-size {global_batch} does not split into {world} equal shares of 2 images or more", USAGE)
        if n < global_batch:
            fail(f"the training set has {n} images, fewer than one batch of {global_batch}; lower --batch-size", USAGE)
        self.n, self.batch, self.local, self.rank, self.seed = n, global_batch, global_batch // world, rank, seed
        self.steps = n // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0): self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        epoch_seed = self.seed * 100_003 + self.epoch
        g = torch.Generator().manual_seed(epoch_seed % 2**63)
        order = torch.randperm(self.n, generator=g)[: self.steps * self.batch].view(self.steps, self.batch)
        mine = order[self.start_step:, self.rank * self.local:(self.rank + 1) * self.local].reshape(-1)
        return iter([(i, epoch_seed * self.n + i) for i in mine.tolist()])

    def __len__(self): return (self.steps - self.start_step) * self.local

class SeededViews(torch.utils.data.Dataset):
    """transform(image) for each (index, seed) key, under the CPU RNG seeded with `seed`."""

    def __init__(self, ds, transform):
        self.ds, self.transform = ds, transform

    def __len__(self): return len(self.ds)

    def __getitem__(self, key):
        i, seed = key
        img, label = self.ds[i]
        with torch.random.fork_rng(devices=[]):  # CPU only: torch.manual_seed would seed every GPU too (100x slower)
            torch.default_generator.manual_seed(seed % 2**63)
            return self.transform(img), label

def train_loader(ds, transform, batch_size, workers, seed, ctx):
    """Loader over a GLOBAL batch size: batches of (transform's output, e.g. views; labels)."""
    return MeasuredLoader(SeededViews(ds, transform), batch_size=batch_size // ctx.world, num_workers=workers,
                          sampler=TrainSampler(len(ds), batch_size, ctx.rank, ctx.world, seed), drop_last=True,
                          pin_memory=ctx.device.type == "cuda", worker_init_fn=ignore_stop_signals,
                          persistent_workers=workers > 0)

class MeasuredLoader(torch.utils.data.DataLoader):
    """A DataLoader that ends the run in one line on an unreadable image and measures the
    share of time spent in next() waiting for batches: the stall (0% when the workers keep
    up; all of loading with --workers 0). On a GPU it bounds the starvation from above."""

    STARVED, hinted, wait, t0 = 0.3, False, 0.0, 0.0  # a pass waiting over STARVED of its time: one hint per run

    def __iter__(self):
        self.wait = 0.0
        self.t0 = t = time.perf_counter()
        for batch in fail_on_bad_images(super().__iter__()):
            self.wait += time.perf_counter() - t  # from asking for the batch to having it
            yield batch
            t = time.perf_counter()
        if self.data_wait() > self.STARVED and not self.hinted and dist_rank() == 0:
            self.hinted = True
            print(f"note: {100 * self.data_wait():.0f}% of this epoch was spent waiting for data: the loader is the "
                  f"bottleneck. Try more --workers (now {self.num_workers}), fewer or cheaper views, or a faster "
                  "disk (images on local SSD, or decoded to arrays)", flush=True)

    def data_wait(self):
        """Share (0-1) of the time since this pass began spent waiting for batches."""
        return self.wait / max(time.perf_counter() - self.t0, 1e-9)


# ===========================================================================
# 9. LARS (You et al. 2017, as SimCLR uses it) and the learning-rate schedule.

def param_groups(model, weight_decay, adapted=lambda name, p: p.ndim > 1):
    """[decayed and LARS-adapted, neither]: by default the weights, then biases and BN (the 1-D
    tensors; SimCLR App. B.6); `adapted(name, parameter)` chooses otherwise."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    return [dict(params=[p for k, p in named if adapted(k, p)], weight_decay=weight_decay, lars=True),
            dict(params=[p for k, p in named if not adapted(k, p)], weight_decay=0.0, lars=False)]

class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling, per parameter tensor w with gradient g:
        g <- g + wd * w
        g <- g * eta * ||w|| / ||g||      (trust ratio; 1 if either norm is 0)
        v <- momentum * v + lr * g;  w <- w - v
    Groups with lars=False skip the adaptation. One multi-tensor kernel per line."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            ws = [w for w in group["params"] if w.grad is not None]
            if not ws:
                continue
            gs = torch._foreach_add([w.grad for w in ws], ws, alpha=group["weight_decay"])  # a copy: adapted in place below
            if group["lars"]:
                w_norm, g_norm = torch.stack(torch._foreach_norm(ws)), torch.stack(torch._foreach_norm(gs))
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                torch._foreach_mul_(gs, list(trust.unbind()))
            for w in ws:
                if "momentum_buffer" not in self.state[w]:
                    self.state[w]["momentum_buffer"] = torch.zeros_like(w)
            vs = [self.state[w]["momentum_buffer"] for w in ws]
            torch._foreach_mul_(vs, group["momentum"])
            torch._foreach_add_(vs, gs, alpha=group["lr"])
            torch._foreach_sub_(ws, vs)

def lr_at(step, total_steps, warmup_steps, base_lr, final_lr=0.0):
    """Rate of step `step` (0-based): linear warmup to base_lr, then half a cosine to final_lr (SGDR, no restarts)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ===========================================================================
# 10. Checkpoints and logging: last.pt (a plain dict, weights_only=True),
# backbone.pt (the encoder's state_dict), log.jsonl (a record per epoch); Run.

# Flags a resume may change: where and how fast it runs, what it prints, where it stops. Every other flag
# shapes the weights (data, model, views, batch, schedule): a resume repeats them, or it is another run.
RESUME_MAY_CHANGE = {"out", "resume", "epochs", "max_steps", "log_every", "workers", "knn_every", "data_dir", "download",
                     "amp", "channels_last", "deterministic", "bn_splits", "save_views", "save_views_n"}

def resume(args, model, optimizer, scaler):
    """Restore a run per --resume (auto: OUT/last.pt if present); returns the steps taken. Before DDP wraps
    the model. DDP: rank 0 reads the checkpoint and sends it to every process (once per run, as many bytes
    as last.pt), so all resume from the same state and --out need exist only on rank 0's node."""
    path = os.path.join(args.out, "last.pt") if args.resume == "auto" else args.resume
    ckpt = None
    if args.resume != "none" and (args.resume != "auto" or os.path.isfile(path)) and dist_rank() == 0:
        ckpt = load_checkpoint(path, hint="; delete it, or pass --resume none to start over")
        if "method" not in ckpt and "step" not in ckpt:
            fail(f"{path} is a bare backbone (the weights alone, as in backbone.pt), not a training checkpoint: "
                 "pass --resume OUT/last.pt to continue a run; evaluate a backbone with evaluate.py --ckpt", USAGE)
        missing = sorted({"method", "step", "args", "model", "optimizer"} - set(ckpt))
        if missing or not isinstance(ckpt["args"], dict):
            fail(f"{path} is not a complete training checkpoint (no {', '.join(missing) or 'flags'}); "
                 "delete it, or pass --resume none to start over")
        if ckpt["method"] != args.method:
            fail(f"{path} is a {ckpt['method']!r} checkpoint, not {args.method!r}; pass --out to start a separate run")
        differ = [f"--{k.replace('_', '-')} {v} (now {getattr(args, k)})" for k, v in sorted(ckpt["args"].items())
                  if k not in RESUME_MAY_CHANGE and hasattr(args, k) and v != getattr(args, k)]
        if differ:
            fail(f"{path} was trained with {', '.join(differ)}: resume with its flags, pass another --out for a "
                 "separate run, or --resume none to overwrite it")
    if dist.is_initialized():
        box = [ckpt]
        dist.broadcast_object_list(box)
        ckpt = box[0]
    if ckpt is None:
        return 0
    load_strict(unwrap(model), ckpt["model"], path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and scaler.is_enabled():  # AMP: only fp16 has a loss scale; across modes it starts afresh
            scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, ValueError, RuntimeError) as e:
        fail(f"{path} has an optimizer or {type(e).__name__} state that does not fit this run ({e})")
    return int(ckpt["step"])

def save_run(args, model, backbone, optimizer, scaler, step, epoch):
    """last.pt (all a resume needs) and backbone.pt (clean keys: DDP wraps only the outer
    model). Non-finite weights never overwrite a good checkpoint (one sync per save)."""
    params = [p.detach() for p in unwrap(model).parameters()]
    if params and not torch.isfinite(torch.stack(torch._foreach_norm(params))).all():
        kept = "the last checkpoint is kept" if os.path.exists(os.path.join(args.out, "last.pt")) else "nothing was saved"
        fail(f"the weights are not finite at step {step}: training diverged, most likely a learning rate too high "
             f"(lower --lr); {kept}")
    ckpt = dict(method=args.method, epoch=epoch, step=step, args=vars(args), model=unwrap(model).state_dict(),
                backbone=backbone.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
    save_atomic(ckpt, os.path.join(args.out, "last.pt"))
    save_atomic(ckpt["backbone"], os.path.join(args.out, "backbone.pt"))

def append_line(path, text):  # a line; a torn last line (a run killed while writing) is ended first
    with open(path, "a+b") as f:
        torn = f.tell() > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n"
        f.write(b"\n" * torn + text.encode() + b"\n")

def duration(seconds):  # '03:04:05', or '1d 03:04:05' from a day on
    days, rest = divmod(int(min(seconds, 9_999 * 86400)), 86400)
    return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))

def _count_step(run, *_):  # the optimizer's step hook; `run` a weak reference, or the Run would outlive teardown()
    if run() is not None:
        run().optimizer_steps += 1

def _on_signal(requests, signum, frame):  # the handler holds a list, not the Run (whose ctx must not outlive the run)
    if requests:  # the second signal: stop now; the last checkpoint stays as it was
        print("stopped by a second signal before the next checkpoint; the last one is intact", file=sys.stderr, flush=True)
        raise SystemExit(130)
    requests.append(signum)

class Run:
    """A training run's bookkeeping, out of the loop's way. Run(...) resumes from last.pt, locks --out and
    writes args.json (before DDP wraps the model); epochs() yields the epochs left (a resumed one re-entered at
    its step); end_step(loss, z) prints the progress line and checks the loss every --log-every steps (the
    loop's only host syncs, besides fp16's in scaler.step) and is True when the loop must stop (--max-steps,
    the end, Ctrl-C or SIGTERM: after the current step); end_epoch() saves, runs the kNN monitor, logs."""

    NONFINITE_PATIENCE = 3  # fp16: log steps in a row with a non-finite loss before the run is stopped

    def __init__(self, args, ctx, model, optimizer, scaler, loader, data=None, knn_net=None):
        self.args, self.ctx, self.model, self.optimizer, self.scaler = args, ctx, model, optimizer, scaler
        self.loader, self.data, self.knn_net = loader, data, knn_net if knn_net is not None else model.backbone
        self.steps_per_epoch = len(loader)  # the sampler has not skipped any step yet
        self.total_steps = args.epochs * self.steps_per_epoch
        self.stop_at = min(self.total_steps, args.max_steps or self.total_steps)
        base_lr = optimizer.param_groups[0]["lr"]
        self.step = resume(args, model, optimizer, scaler)
        claim_out(args, ctx)  # only once resume() accepted OUT's checkpoint: a refused run leaves OUT untouched
        self.stopped, self.requests, self.nonfinite = False, [], 0
        self._begin_epoch()
        optimizer.register_step_post_hook(functools.partial(_count_step, weakref.ref(self)))
        if ctx.main:
            print(f"{args.method}: {args.arch} on {args.data} ({len(loader.dataset)} images), {ctx.world} process(es) "
                  f"on {ctx.device}, batch {args.batch_size}, lr {base_lr:.4g}, "
                  f"{self.steps_per_epoch} steps/epoch, from step {self.step}", flush=True)

    def _begin_epoch(self):
        self.epoch, self.first_step, self.t0 = self.step // self.steps_per_epoch, self.step, time.perf_counter()
        self.sums, self.n, self.optimizer_steps = torch.zeros(2, device=self.ctx.device), 0, 0

    def epochs(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, functools.partial(_on_signal, self.requests))
        while self.step < self.stop_at and not self.stopped:
            self._begin_epoch()
            self.loader.sampler.set_epoch(self.epoch, start_step=self.step - self.epoch * self.steps_per_epoch)
            yield self.epoch

    def end_step(self, loss, z):
        """After optimizer step `self.step`; z: [n, D] embeddings for the collapse indicator."""
        self.step += 1
        # Collapse indicator: the mean per-dimension std of the unit embeddings, ~1/sqrt(D) when spread, 0 collapsed.
        z_std = F.normalize(z.detach().float(), dim=1).std(dim=0).mean()
        self.sums += torch.stack([loss.detach().float(), z_std])  # summed on the device: no sync
        self.n += 1
        if self.step % self.args.log_every == 0 or self.step == self.stop_at:
            if self.ctx.main:
                print(self.progress_line(loss.item(), z_std), flush=True)
            self.check_loss(loss)  # a collective: every rank, same steps
        # Every step, on every rank once any was asked: a 4-byte all-reduce on a CPU group (~0.3 ms), never waiting
        # for the GPU. A stop request loses at most one step.
        flag = torch.tensor([float(bool(self.requests))])
        if self.ctx.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctx.cpu_group)
        self.stopped = bool(flag.item())
        return self.stopped or self.step >= self.stop_at

    def progress_line(self, loss, z_std):  # images: source images over all processes
        ips = (self.step - self.first_step) * self.args.batch_size / max(1e-9, time.perf_counter() - self.t0)
        eta = duration((self.stop_at - self.step) * self.args.batch_size / max(ips, 1e-9))
        return (f"epoch {self.epoch + 1}/{self.args.epochs}  step {self.step}/{self.stop_at}  loss {loss:.4f}  "
                f"lr {self.optimizer.param_groups[0]['lr']:.4g}  {ips:.0f} img/s  "
                f"data {100 * self.loader.data_wait():.0f}%  eta {eta}  z-std {z_std:.3f}")

    def check_loss(self, loss):
        """A non-finite loss on any rank ends the run in one line: at once in float32/bf16, in fp16
        after NONFINITE_PATIENCE log steps in a row (a scaler still finding its scale skips a few)."""
        bad = torch.logical_not(torch.isfinite(loss.detach()).all()).float().view(1)
        if self.ctx.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.nonfinite = self.nonfinite + 1 if bad.item() else 0
        fp16 = self.scaler.is_enabled()
        if self.nonfinite and (not fp16 or self.nonfinite >= self.NONFINITE_PATIENCE):
            fail(f"the loss is {float(loss.detach().float().mean())} at step {self.step}"
                 + (f" ({self.nonfinite} log steps in a row under fp16 loss scaling)" if fp16 else "")
                 + f"; training diverged, most likely a learning rate too high for this batch "
                 f"({self.optimizer.param_groups[0]['lr']:.4g}): lower --lr (or try --amp bf16/off). "
                 "The last checkpoint, written before it, is kept")

    def end_epoch(self):
        args, ctx = self.args, self.ctx
        elapsed = time.perf_counter() - self.t0
        loss, z_std = (self.sums / max(self.n, 1)).tolist()
        complete = self.step == (self.epoch + 1) * self.steps_per_epoch
        record = dict(epoch=self.epoch + 1, step=self.step, loss=loss, z_std=z_std,
                      skipped_steps=self.n - self.optimizer_steps, lr=self.optimizer.param_groups[0]["lr"],
                      images_per_s=(self.step - self.first_step) * args.batch_size / elapsed,
                      data_wait=self.loader.data_wait(), time=elapsed, complete=complete)
        if ctx.main:
            save_run(args, self.model, self.model.backbone, self.optimizer, self.scaler, self.step,
                     epoch=self.step // self.steps_per_epoch)
        if complete and args.knn_every and ((self.epoch + 1) % args.knn_every == 0 or self.step == self.total_steps):
            record["knn_top1"] = knn_accuracy(self.knn_net, self.data.train, self.data.test,
                                              num_classes(args.data, self.data.train), ctx, args.image_size, args.data,
                                              workers=args.workers)
        if ctx.main:
            append_line(os.path.join(args.out, "log.jsonl"), json.dumps(record))
            print(f"epoch {self.epoch + 1} {'done' if complete else 'saved mid-way'}: loss {loss:.4f}"
                  + (f", kNN top-1 {record['knn_top1']:.2f}" if "knn_top1" in record else ""), flush=True)
            if self.stopped:
                print(f"stopped at step {self.step}; run the same command again to resume", flush=True)


# ===========================================================================
# 11. Run safety: one-line errors, nothing lost, exact resume, inert hostile files.

def fail(message, code=RUNTIME):
    """One line on stderr, exit `code`. Under torchrun a command-line error, the same on every rank,
    is rank 0's to print; another error tells the other processes that it was said (see _peer_lost)."""
    rank = os.environ.get("RANK", "0")
    if code != USAGE or not rank.isdigit() or int(rank) == 0:
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            try:
                dist.distributed_c10d._get_default_store().set("said", str(dist.get_rank()))
            except Exception:  # the store went with rank 0: nobody is left to tell
                pass
    raise SystemExit(code)

def one_line_errors(parser):  # argparse's usage-plus-message errors as one line
    parser.error = lambda message: fail(f"{parser.prog}: {message} (see --help)", USAGE)

def install_error_hook(args, world, amp_dtype, flag="batch_size"):
    """Errors no line of ours catches: CUDA out of memory ends in one line saying what to change (`flag`: the
    args entry of the batch that runs); under torchrun, a lost peer in silence (_peer_lost). Plain values,
    never ctx: a reference to the process group from sys would keep gloo's threads alive."""
    sys.excepthook = functools.partial(_error_hook, args, world, amp_dtype, flag)

def _error_hook(args, world, amp_dtype, flag, kind, error, tb):
    if world > 1 and (isinstance(error, dist.DistError) or "by peer" in str(error)):
        return _peer_lost()
    if not isinstance(error, torch.OutOfMemoryError):
        return sys.__excepthook__(kind, error, tb)  # Python's own traceback
    batch, name = getattr(args, flag, None), "--" + flag.replace("_", "-")
    training = hasattr(args, "method") or flag != "batch_size"  # a global batch; evaluate.py's --batch-size: per process
    where = (f"at {batch // world} images per GPU ({name} {batch} over {world} process(es))" if training
             else f"at {batch} images per GPU ({name} is per process here)")
    amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    advice = (f"lower {name}" + (", or use --amp bf16 (fp16 before Ampere)" if amp == "off" else "")
              + ("; more GPUs keep the global batch at a smaller per-GPU share" if training else ""))
    print(f"error: CUDA out of memory {where}, --amp {amp}: {advice} (README: memory per GPU)", file=sys.stderr, flush=True)

def _peer_lost():
    """A collective found another process gone: it failed, and said why (fail() leaves a mark in the
    process group's store), or died without a word. Leave in silence (exit 1); rank 0 speaks for the dead."""
    try:
        said = dist.distributed_c10d._get_default_store().check(["said"])
    except Exception:  # the store went with rank 0, which speaks for itself
        said = True
    if not said and dist.get_rank() == 0:
        print("error: another process of this run ended without an error of its own (killed, or out of memory); "
              "torchrun's report names it. The last checkpoint is intact: run the same command to resume",
              file=sys.stderr, flush=True)

class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain containers, refusing any other class: a hostile CIFAR batch runs no code."""

    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks to build {module}.{name}, which a data batch never holds")
        return super().find_class(module, name)

def _unpickle(path):
    # Random bytes raise almost anything (OverflowError, MemoryError, KeyError...), and CPython may also print
    # a SystemError of its own through sys.excepthook when the failed load frees a buffer: silenced meanwhile.
    hook, sys.excepthook = sys.excepthook, lambda *exc: None
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()  # Python 2 pickles: str keys
    except Exception as e:
        fail(f"{path} is unreadable ({type(e).__name__}: {str(e)[:200]}); delete it and download again")
    finally:
        sys.excepthook = hook

class BadImageError(RuntimeError):
    """An image file that cannot be decoded (not an image, truncated, corrupt)."""

def load_image(path):
    """An RGB PIL image, or BadImageError naming the file (checked when read: 1.28M headers up front take minutes)."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f"{path} is not a readable image ({type(e).__name__}); remove or replace it") from None

_LIVE_BATCHES = weakref.WeakSet()  # loader iterators whose workers must stop before the interpreter exits

def fail_on_bad_images(loader):
    """Iterate a DataLoader; a BadImageError (re-raised from a worker) ends in one line."""
    batches = iter(loader)
    _LIVE_BATCHES.add(batches)
    try:
        yield from batches
    except BadImageError as e:
        lines = [line for line in str(e).splitlines() if "is not a readable image" in line]
        fail((lines[-1] if lines else str(e)).split("BadImageError: ")[-1].strip())
    except RuntimeError as e:  # a worker killed, by the out-of-memory killer most likely
        if "DataLoader worker" not in str(e):
            raise
        fail(f"{str(e).splitlines()[0].rstrip('. ')}, most likely by the out-of-memory killer: run the same command "
             "with fewer --workers (or a smaller --batch-size) to resume from the last checkpoint")

@atexit.register
def _stop_loader_workers():
    """Workers ignore the SIGTERM the interpreter's exit sends them: stop them first, or an error would hang."""
    for batches in list(_LIVE_BATCHES):
        if hasattr(batches, "_shutdown_workers"):
            batches._shutdown_workers()

def ignore_stop_signals(worker_id=None):  # loader workers leave Ctrl-C / SIGTERM to the main process
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

def save_atomic(obj, path):
    """PATH.tmp<pid>, then renamed over PATH: PATH is always a complete file; a failed write keeps it."""
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

def load_checkpoint(path, hint=""):
    """The dict in a checkpoint file, or one line (missing, torn, not a checkpoint)."""
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
    """load_state_dict(strict=True) failing in one sentence, not a page of keys."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        text = str(e)
        fail(f"{what} does not fit this model ({text.count('size mismatch')} shape mismatches"
             f"{', missing keys' if 'Missing key' in text else ''}{', unexpected keys' if 'Unexpected key' in text else ''})"
             "; was it trained with another --arch, --image-size or method?")

def claim_out(args, ctx):
    """Rank 0: create --out, take its lock, remove what a killed save left, write args.json."""
    if not ctx.main:
        return
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"--out {args.out} is a file, not a folder; pass another --out", USAGE)
    try:
        os.makedirs(args.out, exist_ok=True)
        lock_out(args.out)
        for name in os.listdir(args.out):  # PATH.tmp<pid> of a save killed mid-write: with the lock, no run is saving
            if name.startswith(("last.pt.tmp", "backbone.pt.tmp")):
                os.remove(os.path.join(args.out, name))
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    except OSError as e:
        fail(f"cannot write to --out {args.out} ({e.strerror or e}); pass a folder you can write to")

_HELD_LOCKS = {}  # run.lock path -> its file, open (and so locked) while this process lives

def lock_out(folder):
    """One live run per --out: an exclusive flock on OUT/run.lock, which the kernel releases however the
    process ends (a file system without locks, such as Lustre mounted noflock, runs unguarded)."""
    import fcntl  # POSIX only (Linux, macOS); evaluate.py never takes the lock
    path = os.path.realpath(os.path.join(folder, "run.lock"))
    if path in _HELD_LOCKS:
        return
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        fail(f"another run ({f.read().strip() or 'a live process'}) is writing to {folder}; "
             "wait for it, stop it, or pass another --out")
    except OSError:
        pass
    f.truncate(0)
    f.write(f"process {os.getpid()} on {os.uname().nodename}")
    f.flush()
    _HELD_LOCKS[path] = f
    atexit.register(f.close)  # closed before exit, not left to the kernel: no unclosed-file warning
