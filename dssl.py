"""DSSL: Directional Self-supervised Learning for Heavy Image Augmentations.
Bai, Yang, Zhang and Mei, CVPR 2022. https://arxiv.org/abs/2110.13555

Idea: heavy augmentations (RandAugment, jigsaw) carry useful variation, but
pulling every pair of views together makes negative-free methods (SimSiam,
BYOL) collapse. DSSL derives a harder view v^ = t^(v) FROM each standard view
v and treats the views as a partially ordered set: standard <-> standard stays
symmetric, heavy -> its own source is one-way (Sec. 3.2-3.3). It is a training
scheme on top of SimSiam, BYOL or SimCLR (--framework).

Objective: L_DSSL = L_S + L_A (Eq. (5)): L_S is the framework's symmetric loss
on the standard views (Eq. (2)); L_A = D(z^, y(v)) + D(z^', y(v')) pulls each
heavy view toward the stop-gradient target of its source (Eq. (4)), with D the
negative cosine. Eq. (6) weighs four view-pair families (alpha, beta, gamma,
delta), each pair term at 1/2 so that alpha alone IS the framework's own loss.

Views (App. A): two standard views (crop 0.2-1 + flip, ColorJitter
0.4/0.4/0.4/0.1 p=0.8, grayscale p=0.2; blur p=0.5 on ImageNet) and, for each,
one heavy view made from it: the authors' RandAugment(n=2, m=9) (HeavyRandAugment
below: 16 ops at FIXED magnitude m/30 of each op's range; at m=9 a 1-bit posterize
and 30 px shifts, nearly the whole side of a CIFAR image; App. A.2's m=5: 1-bit
posterize and 17 px shifts), or, with probability p, Jigsaw(4).

    python dssl.py --data cifar10 --framework simsiam
    torchrun --nproc_per_node=8 dssl.py --data imagenet --data-dir /datasets/imagenet --framework byol

Deviations from the paper (defaults follow the authors' code, Yif-Yang/DSSL):
- CIFAR weights are 1 0 0.9 0.1 (gamma heavy -> source, delta source -> heavy:
  the "soft" loss of simsiam_cifar10/main.py, soft_loss_rate 0.1); Algorithm 1
  and the ImageNet code use 1 0 1 0 (--weights 1 0 1 0).
- Each pair term weighs 1/2 (their code); Algorithm 1 prints 1/4, half of it.
- No jigsaw on CIFAR (--p-jigsaw 0): the authors' CIFAR pipeline draws
  RandAugment on every heavy view (simsiam_cifar10/augmentations/simsiam_aug.py),
  and it produced the CIFAR numbers of Table 2; App. A.2's jigsaw with p=0.1 is
  --p-jigsaw 0.1, the ImageNet default (simsiam_imagenet/augmentations).
- CIFAR standard views have no blur (their CIFAR pipeline; App. A.1 says p=0.5:
  --blur 0.5); on ImageNet MoCo v2's PIL blur, radius 0.1-2, as their code.
- CIFAR SimSiam/BYOL warm up for 10 epochs (simsiam_cifar10/run.py); Sec. 4.2
  names only the cosine decay (--warmup-epochs 0).
- RandAugment magnitude m=9, not App. A.2's RA(2, 5): every launcher of the authors
  passes M=9 (simsiam_cifar10/run.py, simsiam_imagenet/run.py,
  byol_harder-aug_imagenet/run.py; only simsiam_imagenet/main_simsiam.py's argparse
  default, which its run.py overrides, is 5). The paper's reading is --ra-m 5.
- BYOL: target EMA 0.99, constant, on every data set: the paper gives no value; the
  authors' only BYOL code (byol_harder-aug_imagenet/byol/byol.py, moving_average_decay=0.99,
  never scheduled) does. BYOL's own cosine schedule from 0.996 is
  --ema-schedule cosine --ema-momentum 0.996.
  BYOL's loss is D (negative cosine), as Algorithm 1, not its normalised MSE (= 2 + 2D).
- SimCLR framework: SimCLR's own recipe (Sec. 4.1 "strictly follow"), from the
  repository the paper names, AndrewAtanov/simclr-pytorch (configs/, models/encoder.py):
  LARS, lr 1.0 x B/256, warmup 1% of the run, wd 1e-6, tau 0.5, colour strength 0.5,
  crop 0.08-1, head fc-BN-ReLU-fc-BN (ImageNet: lr 0.3, warmup 10%, tau 0.1, s=1.0),
  at the paper's B=512 (the config: 1024). Its L_A is D on the projections, a design
  choice (dssl_nt_xent_loss): the paper gives only the "+2n" cost of Sec. 4.1.
- --naive, the "w/ T^" row of Table 2: our reading of "training views are jointly
  augmented from standard and heavy augmentations" and of Table 5's "heavily
  augmented view-pairs" is the framework's own symmetric loss on the heavy pair
  as an extra pair, i.e. --weights 1 1 0 0 (Algorithm 2's mean over two pairs is
  --weights 0.5 0.5 0 0; every pair of Eq. (6) is --weights 1 1 1 1).
- CIFAR defaults of --framework byol and simclr are extrapolated: the authors' CIFAR
  trainer (simsiam_cifar10) is SimSiam's only. BYOL on CIFAR takes that trainer's
  recipe (lr 0.03 x B/256, wd 5e-4, 10 warmup epochs, 800 epochs) and its DSSL parts
  (weights 1 0 0.9 0.1, RA on every heavy view, no blur); SimCLR takes the same DSSL
  parts with simclr-pytorch's optimiser recipe (below).
- BYOL on ImageNet: the views are the Table 2 pipeline (simsiam_imagenet's). The
  authors' BYOL code (byol_harder-aug_imagenet, "setting in Table 3" per their README)
  is a different, harder recipe that is not reproduced here: RA(2, 9) also inside
  the standard views, heavy views RA(8, 16) followed by a second crop, flip, jitter
  0.5, blur and a 4x4 grid shuffle with p=0.1. From it come only the optimiser
  (SGD, lr 0.1 at B=512, wd 1e-4, via byol_harder-aug_imagenet/run.py and
  main_simsiam.py), the EMA 0.99 and the negative-cosine loss.
- DSSL-SimCLR forwards v and v' as ONE batch of 2N, as SimCLR and simclr-pytorch do
  (utils/datautils.py MultiplyBatchSampler repeats the batch indices, so models/ssl.py
  step() encodes both views in one self.model(x) call), so the standard views share
  BN statistics; v^ and v^' go through as a second 2N batch of their own, so heavy
  views never shift the standard views' BN. SimSiam and BYOL forward each view
  alone, as the authors' code (simsiam_*/main*.py: model(images[i]) per view;
  byol.py: online_encoder(image_one), online_encoder(image_two)).
- DSSL-SimCLR's LARS leaves out of decay and adaptation what simclr-pytorch does
  (models/ssl.py exclude_from_wd_and_adaptation: 'bn' or 'bias' in the parameter
  name): every bias and every BN parameter except the ResNet shortcut BN scales
  (downsample.1.weight has no 'bn' in its name), which are decayed and adapted.
  Excluding every BN and bias, as SimCLR's own code (google-research/simclr
  model_util.py: 'batch_normalization' and 'bias') and simclr.py do, is
  --lars-exclude all-bn.
- `--heavy off` is the two-view baseline (Table 5's "1 standard view-pair"),
  not the four-standard-view re-implementation of Algorithm 2.
"""
import argparse
import copy
import functools
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

import common

# Head widths per framework, as in each framework's paper (DSSL Sec. 4.1 keeps them):
# (projector hidden, projector output, predictor hidden); None = as wide as the backbone / no predictor.
HEADS = {
    "simsiam": (2048, 2048, 512),  # SimSiam baseline settings: 2048-d fc layers, 512-d predictor bottleneck
    "byol": (4096, 256, 4096),     # BYOL Sec. 3.3: MLP 4096 -> 256, predictor of the same shape
    "simclr": (None, 128, None),   # SimCLR Sec. 2.1: hidden as wide as h, 128-d output, no predictor
}


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="DSSL pre-training (Bai et al. 2022)")
    common.add_base_args(parser)
    g = parser.add_argument_group("DSSL")
    g.add_argument("--framework", default="simsiam", choices=("simsiam", "byol", "simclr"),
                   help="the method DSSL is applied to (Table 2); simsiam as in Algorithm 1")
    g.add_argument("--heavy", default="on", choices=("on", "off"),
                   help="heavy views T^ (Sec. 3.2); off = the framework alone on two standard views (Table 2 'repro.')")
    g.add_argument("--weights", type=common.nonneg_float, nargs=4, metavar=("ALPHA", "BETA", "GAMMA", "DELTA"), default=None,
                   help="alpha beta gamma delta, the Eq. (6) weights of SV<->SV, HV<->HV, SV<-HV, HV<-SV, each pair "
                        "term at 1/2; 1 0 0.9 0.1 CIFAR (the authors' SimSiam CIFAR trainer; extrapolated to byol and simclr), "
                        "1 0 1 0 ImageNet (Algorithm 1)")
    g.add_argument("--naive", action="store_true",
                   help="Table 2's 'w/ T^' row: the framework's loss on the heavy pair as an extra pair (= --weights 1 1 0 0)")
    g.add_argument("--ra-n", type=common.positive_int, default=2, help="n, RandAugment ops per heavy view, RA(n, m); 2, App. A.2")
    g.add_argument("--ra-m", type=common.nonneg_int, default=9,
                   help="m, RandAugment magnitude on the 0-30 scale; 9, every launcher of the authors (their run.py "
                        "files); 5 is the paper's text, App. A.2")
    g.add_argument("--jigsaw-grid", type=common.positive_int, default=4, help="jigsaw grid n (n x n tiles), Jigsaw(n); 4, App. A.2")
    g.add_argument("--p-jigsaw", type=common.probability, default=None,
                   help="probability that a heavy view is the jigsaw instead of RandAugment; 0 CIFAR (the authors' "
                        "SimSiam CIFAR pipeline), 0.1 ImageNet (App. A.2 and their ImageNet code)")
    g.add_argument("--crop-min", type=common.probability, default=None,
                   help="smallest crop area of the standard views; 0.2 SimSiam/BYOL (App. A.1), 0.08 SimCLR")
    g.add_argument("--color-strength", type=common.nonneg_float, default=None,
                   help="s, standard views' ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) p=0.8; 0.5 (App. A.1: 0.4/0.4/0.4/0.1), "
                        "1.0 SimCLR on ImageNet")
    g.add_argument("--blur", type=common.probability, default=None,
                   help="probability of Gaussian blur in the standard views; 0 CIFAR (the authors' CIFAR pipeline), "
                        "0.5 ImageNet (App. A.1)")
    g.add_argument("--proj-layers", type=common.positive_int, default=None,
                   help="SimSiam projector depth (fc layers, BN on each); 2 CIFAR, 3 ImageNet (SimSiam). simsiam only")
    g.add_argument("--ema-momentum", type=common.probability, default=None,
                   help="m, BYOL target EMA momentum (base value under --ema-schedule cosine); 0.99, the authors' BYOL code "
                        "(byol_harder-aug_imagenet/byol/byol.py; the paper gives no value). byol only")
    g.add_argument("--ema-schedule", default=None, choices=("constant", "cosine"),
                   help="BYOL target momentum schedule: constant m (the authors' code), or m_k = 1 - (1 - m)(cos(pi k/K) + 1)/2 "
                        "(BYOL Sec. 3.3). byol only")
    g.add_argument("--tau", type=common.positive_float, default=None,
                   help="tau, NT-Xent temperature of the simclr framework; 0.5 CIFAR, 0.1 ImageNet (SimCLR). simclr only")
    g.add_argument("--lars-exclude", default="simclr-pytorch", choices=("simclr-pytorch", "all-bn"),
                   help="parameters LARS neither decays nor adapts: simclr-pytorch's name rule (biases and BN, but "
                        "not the ResNet shortcut BN scales), or every BN parameter and bias (SimCLR's own code). "
                        "simclr only")
    args = parser.parse_args(argv)
    if args.heavy == "off" and (args.weights is not None or args.naive):
        common.fail("--weights and --naive weigh heavy-view terms, which --heavy off does not have; drop one", common.USAGE)
    if args.naive and args.weights is not None:
        common.fail("--naive is --weights 1 1 0 0; give one of the two", common.USAGE)
    if args.out is None:  # one folder per framework and baseline, so that --resume auto never mixes them
        args.out = os.path.join("runs", f"dssl-{args.framework}{'-noheavy' if args.heavy == 'off' else ''}-{args.data}")
    if args.data in common.LARGE_DATA:  # Sec. 4.1 and the authors' ImageNet run.py files (lr 0.1 at B=512)
        recipe = dict(arch="resnet50", epochs=100, batch_size=512, lr=0.05, weight_decay=1e-4, warmup_epochs=0,
                      proj_layers=3, ema_momentum=0.99, ema_schedule="constant", tau=0.1, p_jigsaw=0.1,
                      crop_min=0.2, color_strength=0.5, blur=0.5)
        # byol: these settings and Table 2's views; their BYOL code's Table 3 views are not reproduced (Deviations)
        if args.framework == "simclr":  # SimCLR's own recipe (Sec. 4.1): simclr-pytorch's imagenet_train_*bs512.yaml
            recipe.update(lr=0.3, weight_decay=1e-6, warmup_epochs=None, crop_min=0.08, color_strength=1.0)
    else:  # the authors' CIFAR trainer (simsiam_cifar10/run.py), SimSiam's only: for byol (and simclr's DSSL parts) extrapolated
        recipe = dict(arch="resnet18", epochs=800, batch_size=512, lr=0.03, weight_decay=5e-4, warmup_epochs=10,
                      proj_layers=2, ema_momentum=0.99, ema_schedule="constant", tau=0.5, p_jigsaw=0.0,
                      crop_min=0.2, color_strength=0.5, blur=0.0)
        if args.framework == "simclr":  # SimCLR's own recipe (Sec. 4.1): simclr-pytorch's cifar_train_*.yaml
            recipe.update(lr=1.0, weight_decay=1e-6, warmup_epochs=None, crop_min=0.08)
    args = common.apply_recipe(args, "dssl", recipe)
    large = args.data in common.LARGE_DATA
    if args.warmup_epochs is None:  # simclr: warmup 1% (CIFAR) / 10% (ImageNet) of the run, as its configs
        args.warmup_epochs = args.epochs * (0.1 if large else 0.01)
    if args.heavy == "on" and args.weights is None:
        args.weights = [1.0, 1.0, 0.0, 0.0] if args.naive else [1.0, 0.0, 1.0, 0.0] if large else [1.0, 0.0, 0.9, 0.1]
    # Single numbers are range-checked by their argparse types; what is left needs more than the type.
    checks = [(args.weights is None or sum(args.weights) > 0, f"--weights must not be all 0, got {args.weights}"),
              (args.ra_m <= 30, f"--ra-m must be in 0..30, got {args.ra_m}"),
              (args.jigsaw_grid <= args.image_size, f"--jigsaw-grid must be in 1..{args.image_size}, got {args.jigsaw_grid}"),
              (args.crop_min > 0, "--crop-min must be in (0, 1]: a crop of no area")]
    for ok, message in checks:
        if not ok:
            common.fail(message, common.USAGE)
    return args


# ---------------------------------------------------------------------------
# Views (Sec. 3.2, App. A): two standard views, and a heavy view made from each
# ---------------------------------------------------------------------------

def solarize_add(img, v, threshold=128):
    """SolarizeAdd of the table below: add v to every value (clipped to 0-255), then solarize at `threshold`."""
    x = np.clip(np.asarray(img).astype(np.int16) + int(v), 0, 255).astype(np.uint8)
    return ImageOps.solarize(Image.fromarray(x, img.mode), threshold)


def cutout(img, v, fill=(128, 128, 128)):
    """CutoutAbs: a v x v square of `fill` centred on a random pixel, clipped at the border (DeVries & Taylor 2017)."""
    v = int(round(v))
    if v <= 0:
        return img
    w, h = img.size
    cx, cy = int(torch.randint(w, ())), int(torch.randint(h, ()))
    x0, y0 = max(0, cx - v // 2), max(0, cy - v // 2)
    img = img.copy()
    img.paste(tuple(fill) if img.mode == "RGB" else fill[0], (x0, y0, min(w, x0 + v), min(h, y0 + v)))
    return img


class Jigsaw:
    """Jigsaw(grid), App. A.2: grid x grid tiles put back in random order; pixels past the last whole tile stay."""

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


class HeavyRandAugment:
    """RA(n, m) as the authors ran it (App. A.2; Yif-Yang/DSSL augmentations/rand_aug_custom.py,
    the TPU EfficientNet RandAugment table): n ops drawn uniformly WITH replacement from
    the 16 below, each applied (no probability) at the fixed value low + (high - low) m/30,
    negated with probability 1/2 for the geometric ones. Unlike torchvision's RandAugment
    (whose m=9 is a 7-bit posterize and 4.4 px shifts on 32 px) this is heavy on 32 px
    images: at the default m=9 a 1-bit posterize (int(1.2)), 30 px shifts, a 12 px
    cutout, enhance factor 0.64, rotation 9 degrees, solarize threshold 77; at the
    paper's m=5 a 1-bit posterize (0.67, floored at 1), 17 px shifts, 6.7 px cutout,
    enhance factor 0.4, rotation 5 degrees, solarize threshold 43."""

    OPS = {  # name: (pixel op, low, high, random sign)
        "AutoContrast": (common.auto_contrast, 0, 1, False),
        "Equalize": (common.equalize, 0, 1, False),
        "Invert": (common.invert, 0, 1, False),
        "Rotate": (TF.rotate, 0, 30, True),                                        # degrees
        "Posterize": (lambda img, v: TF.posterize(img, max(1, int(v))), 0, 4, False),  # bits kept, at least 1
        "Solarize": (TF.solarize, 0, 256, False),                                  # threshold
        "SolarizeAdd": (solarize_add, 0, 110, False),                              # added, then solarize at 128
        "Color": (TF.adjust_saturation, 0.1, 1.9, False),                          # enhance factors
        "Contrast": (TF.adjust_contrast, 0.1, 1.9, False),
        "Brightness": (TF.adjust_brightness, 0.1, 1.9, False),
        "Sharpness": (TF.adjust_sharpness, 0.1, 1.9, False),
        "ShearX": (common.shear_x, 0.0, 0.3, True),
        "ShearY": (common.shear_y, 0.0, 0.3, True),
        "CutoutAbs": (lambda img, v: cutout(img, v, fill=(125, 123, 114)), 0, 40, False),  # side in px; their fill
        "TranslateX": (common.translate_x, 0.0, 100.0, True),                      # absolute pixels, not a fraction
        "TranslateY": (common.translate_y, 0.0, 100.0, True),
    }

    def __init__(self, n=2, m=9):
        self.n, self.m = n, m

    def sample(self):
        """The n ops to apply, in order: a list of (name, signed value)."""
        names = list(self.OPS)
        chosen = []
        for i in torch.randint(len(names), (self.n,)).tolist():
            _, low, high, signed = self.OPS[names[i]]
            v = low + (high - low) * self.m / 30
            if signed and float(torch.rand(())) < 0.5:
                v = -v
            chosen.append((names[i], v))
        return chosen

    def __call__(self, img):
        for name, v in self.sample():
            img = self.OPS[name][0](img, v)
        return img


class HeavyAugment:
    """t^ ~ T^ (App. A.2): Jigsaw(grid) with probability p_jigsaw, otherwise RA(n, m).
    Works on a PIL image: the standard view."""

    def __init__(self, n, m, grid, p_jigsaw):
        self.randaugment, self.jigsaw, self.p_jigsaw = HeavyRandAugment(n, m), Jigsaw(grid), p_jigsaw

    def __call__(self, img):
        return self.jigsaw(img) if float(torch.rand(())) < self.p_jigsaw else self.randaugment(img)


class DSSLViews:
    """[v, v', v^ = t^(v), v^' = t^(v')] (Eq. (3)); [v, v'] when heavy is None.
    `heavy` is an attribute so a test can swap it for the identity."""

    def __init__(self, args):
        s, size = args.color_strength, args.image_size
        if args.framework == "simclr":  # SimCLR's blur: the kernel odd, 10% of the side (SimCLR App. A)
            blur = common.KernelBlur(max(3, int(0.1 * size) // 2 * 2 + 1), sigma=(0.1, 2.0))
        else:                           # MoCo v2's PIL blur, as the authors' code
            blur = common.RandomPILBlur((0.1, 2.0))
        self.t = T.Compose([
            T.RandomResizedCrop(size, scale=(args.crop_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),  # colour distortion, strength s
            T.RandomGrayscale(p=0.2),
            *([T.RandomApply([blur], p=args.blur)] if args.blur > 0 else []),  # none on CIFAR (the authors' pipeline)
        ])  # T, App. A.1
        self.heavy = HeavyAugment(args.ra_n, args.ra_m, args.jigsaw_grid, args.p_jigsaw) if args.heavy == "on" else None
        self.names = ["v", "v'"] + (["t^(v)", "t^(v')"] if self.heavy is not None else [])  # --save-views columns

    def __call__(self, img):
        views = [self.t(img), self.t(img)]
        if self.heavy is not None:
            views += [self.heavy(v) for v in views]  # each harder view derived from its own standard view
        return [common.to_tensor(v) for v in views]


# ---------------------------------------------------------------------------
# Model (Sec. 3.1, 4.1): encoder f, projector g, and the framework's extras
# (SimSiam/BYOL predictor q, BYOL's momentum target)
# ---------------------------------------------------------------------------

def simsiam_projector(dim, hidden, out, layers):
    """SimSiam's projection MLP: BN after every fc, ReLU after all but the output
    fc; the output BN has no affine parameters (as in the authors' code)."""
    mods = []
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    return nn.Sequential(*mods, nn.Linear(dim, out, bias=False), nn.BatchNorm1d(out, affine=False))


def mlp(dim, hidden, out, bias=True):
    """fc-BN-ReLU-fc: SimSiam's predictor (bottleneck hidden layer) and BYOL's projector and predictor."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=bias), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


def simclr_projector(dim, out):
    """The SimCLR head of the repository DSSL used (AndrewAtanov/simclr-pytorch models/encoder.py):
    fc-BN-ReLU-fc-BN, fc layers without bias, the output BN's shift frozen at 0 (scale only)."""
    head = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, out, bias=False), nn.BatchNorm1d(out))
    head[-1].bias.requires_grad_(False)
    return head


class DSSL(nn.Module):
    def __init__(self, framework, arch, image_size, proj_layers=2, heavy_targets=False):
        super().__init__()
        self.framework, self.heavy_targets = framework, heavy_targets
        self.backbone, dim = common.resnet(arch, image_size)  # f: [B, 3, S, S] -> h [B, dim]
        hidden, out, pred_hidden = HEADS[framework]
        if framework == "simsiam":
            self.projector = simsiam_projector(dim, hidden, out, proj_layers)
            self.predictor = mlp(out, pred_hidden, out, bias=False)
        elif framework == "byol":
            self.projector, self.predictor = mlp(dim, hidden, out), mlp(out, pred_hidden, out)
            # Target network xi: an EMA of the online f and g that never receives gradient (BYOL Sec. 3.1).
            self.target_backbone, self.target_projector = copy.deepcopy(self.backbone), copy.deepcopy(self.projector)
            for p in [*self.target_backbone.parameters(), *self.target_projector.parameters()]:
                p.requires_grad_(False)
        else:
            self.projector, self.predictor = simclr_projector(dim, out), None

    def forward(self, views):
        """views: list of [n, 3, S, S] batches [v, v'(, v^, v^')]. Returns (p, z),
        one [n, D] tensor per view: p the online outputs (the predictor's for
        SimSiam/BYOL, the projection for SimCLR), z the targets y(.) of Eq. (2)
        (SimSiam, SimCLR: the projection; BYOL: the target network's projection,
        for the heavy views only when heavy_targets, i.e. beta or delta != 0)."""
        if self.framework == "simclr":
            # SimCLR encodes both views of the batch in one pass (simclr-pytorch models/ssl.py
            # step(): one self.model(x) over the 2N images), so BN normalises v and v' together;
            # the heavy pair v^, v^' is a second 2N pass of its own, so heavy views never shift
            # the standard views' BN statistics.
            z = [zi for pair in (views[:2], views[2:]) if pair
                 for zi in self.projector(self.backbone(torch.cat(pair))).chunk(len(pair))]
        else:
            # SimSiam/BYOL: one pass per view, as the authors' code (model(images[i]) per view)
            # and Algorithm 1's f(v), f(v'), f(v^), f(v^'): BN statistics stay per view.
            z = [self.projector(self.backbone(x)) for x in views]
        p = [self.predictor(zi) for zi in z] if self.predictor is not None else z
        if self.framework == "byol":
            with torch.no_grad():
                targets = views if self.heavy_targets else views[:2]
                z = [self.target_projector(self.target_backbone(x)) for x in targets]
        return p, z

    @torch.no_grad()
    def update_target(self, m):
        """BYOL's target update, after each optimizer step: the target xi (f and g) is an
        exponential moving average of the online theta, m its momentum."""
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        target = [*self.target_backbone.parameters(), *self.target_projector.parameters()]
        for xi, theta in zip(target, online):
            xi.mul_(m).add_(theta.detach(), alpha=1 - m)  # BYOL Sec. 3.1: xi <- m xi + (1 - m) theta


def target_momentum(step, total_steps, base, schedule):
    """m at optimizer step `step` (0-based): constant, or BYOL's cosine increase
    from `base` at step 0 to 1 at step total_steps (BYOL Sec. 3.3)."""
    if schedule == "constant":
        return base
    return 1 - (1 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


# ---------------------------------------------------------------------------
# Losses: D (Sec. 3.3), DSSL Eq. (5)-(6), and NT-Xent for the SimCLR framework
# ---------------------------------------------------------------------------

def negative_cosine(p, z):
    """D(p, z) = -mean_i <p_i, z_i> / (|p_i| |z_i|) (Sec. 3.3, Algorithm 1's D),
    with stop-gradient on the target z. p, z: [N, D], any float dtype; returns a
    float32 scalar."""
    p = F.normalize(p.float(), dim=1)
    z = F.normalize(z.detach().float(), dim=1)  # y.detach(): no gradient through the target
    return -(p * z).sum(dim=1).mean()


def dssl_loss(p1, p2, z1, z2, ph1, ph2, zh1=None, zh2=None, weights=(1.0, 0.0, 1.0, 0.0)):
    """Eq. (6) with D as the pair loss, every pair term at 1/2 as in the authors'
    code: weights 1 0 0 0 are SimSiam's D(p1,z2)/2 + D(p2,z1)/2, so a DSSL run
    trains the standard pair at the rate of its baseline; 1 0 1 0 is Algorithm 1
    times 2 (it prints /4). p*: [N, D] online predictions of v, v', v^, v^';
    z*: their targets (zh* only needed when beta or delta != 0).
    weights = (alpha, beta, gamma, delta):
      alpha [D(p1,z2) + D(p2,z1)]    SV <-> SV, L_S (Eq. (2))
      beta  [D(ph1,zh2) + D(ph2,zh1)]  HV <-> HV
      gamma [D(ph1,z1) + D(ph2,z2)]  SV <- HV, each heavy view to its own source, L_A (Eq. (4))
      delta [D(p1,zh1) + D(p2,zh2)]  HV <- SV, each source to its heavy view"""
    alpha, beta, gamma, delta = weights
    D = negative_cosine
    loss = alpha * (D(p1, z2) + D(p2, z1)) + gamma * (D(ph1, z1) + D(ph2, z2))
    if beta or delta:
        if zh1 is None or zh2 is None:
            raise ValueError("dssl_loss: beta or delta != 0 needs the heavy views' targets zh1, zh2")
        loss = loss + beta * (D(ph1, zh2) + D(ph2, zh1)) + delta * (D(p1, zh1) + D(p2, zh2))
    return loss / 2


def nt_xent_loss(z1, z2, tau):
    """The SimCLR framework's L_S (SimCLR Eq. (1)). z1, z2: [N, D] projections of
    the two standard views of N images. Every one of the 2N views is an anchor
    whose positive is its image's other view and whose negatives are the other
    2N-2 views; returns the float32 mean over anchors of -log softmax(positive)."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)            # [2N, D]
    logits = z @ z.T / tau                                          # [2N, 2N] cosine / tau
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))           # an anchor is not its own negative
    positive = torch.arange(2 * n, device=z.device).roll(n)        # [n..2n-1, 0..n-1], made on the device: no copy
    return F.cross_entropy(logits, positive)


def dssl_nt_xent_loss(z1, z2, zh1, zh2, tau, weights=(1.0, 0.0, 1.0, 0.0)):
    """DSSL on SimCLR: Eq. (6) with NT-Xent as L_S and D as L_A. z*: [N, D]
    projections of v, v', v^, v^'. weights = (alpha, beta, gamma, delta):
        alpha NT-Xent(z1, z2) + beta NT-Xent(zh1, zh2)
        + gamma [D(zh1, z1) + D(zh2, z2)] / 2 + delta [D(z1, zh1) + D(z2, zh2)] / 2
    A design choice (the paper gives only the "+2n" cost of Sec. 4.1 for SimCLR):
    SimCLR has no predictor, so L_A pulls each heavy
    projection toward the stop-gradient projection of its source (y(v) = g(f(v)),
    Sec. 3.1) with D, the same pair loss as Eq. (4), rather than adding the heavy
    views to the softmax: that adds 2n similarities to NT-Xent's 2n^2 (Sec. 4.1)
    and keeps heavy views out of the standard views' negatives. The mean over the
    two L_A terms keeps gamma on the scale of one NT-Xent term."""
    alpha, beta, gamma, delta = weights
    D = negative_cosine
    loss = alpha * nt_xent_loss(z1, z2, tau) + gamma * (D(zh1, z1) + D(zh2, z2)) / 2
    if beta or delta:
        loss = loss + beta * nt_xent_loss(zh1, zh2, tau) + delta * (D(z1, zh1) + D(z2, zh2)) / 2
    return loss


def training_loss(p, z, args):
    """The framework's loss on the model's outputs (lists over the views)."""
    if args.framework == "simclr":
        # DDP: every rank computes the loss over the GLOBAL batch, as one process would; the
        # gather keeps the graph, so negatives from other GPUs also send gradient back.
        z = [common.gather_with_grad(t) for t in z]
        return nt_xent_loss(z[0], z[1], args.tau) if args.heavy == "off" else dssl_nt_xent_loss(*z, args.tau, args.weights)
    # SimSiam/BYOL: D is a mean over images; DDP's gradient averaging makes it the global mean.
    if args.heavy == "off":
        return (negative_cosine(p[0], z[1]) + negative_cosine(p[1], z[0])) / 2  # L_S, Eq. (2), SimSiam's D/2 + D/2
    return dssl_loss(*p[:2], *z[:2], *p[2:], *z[2:], weights=args.weights)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def lars_param_groups(model, weight_decay, exclude="simclr-pytorch"):
    """LARS groups of the simclr framework: [decayed and adapted, neither]. "all-bn": every
    1-D tensor (BN and biases) is left alone, as SimCLR's own code (common.param_groups).
    "simclr-pytorch": what its name test ('bn' or 'bias' in the name, models/ssl.py) leaves
    alone on its torchvision ResNet and fc1-bn1-relu-fc2-bn2 head: all biases and BN
    parameters but the shortcut BN scales (`downsample.1.weight`), which are decayed and
    adapted like the weights. Our head's BN are numbered, not named bn*, hence the test by
    shape plus the one named exception."""
    if exclude == "all-bn":
        return common.param_groups(model, weight_decay)
    return common.param_groups(model, weight_decay,
                               adapted=lambda k, p: p.ndim > 1 or (".downsample." in k and k.endswith(".weight")))


def train_one_epoch(model, loader, optimizer, scaler, lr_at, run, args, ctx):
    """One pass over the loader (a resumed run re-enters its epoch where it stopped)."""
    model.train()
    for views, _ in loader:
        common.set_lr(optimizer, lr_at(run.step))
        views = [common.normalize_on_device(x, ctx, args.data, args.channels_last) for x in views]  # uint8 -> normalised float
        with ctx.autocast():
            p, z = model(views)  # per view [v, v'(, v^, v^')]: p the online outputs, z the targets y(.)
        # L_DSSL = L_S + L_A (Eq. (5)): the framework's symmetric loss on v, v', and each heavy
        # view pulled toward the stop-gradient target of its own source, weighed as Eq. (6)
        loss = training_loss(p, z, args)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # AMP: scaled only in fp16
        scaler.step(optimizer)
        scaler.update()
        if args.framework == "byol":  # BYOL Sec. 3.1: the target follows the online network after each step
            m = target_momentum(run.step, run.total_steps, args.ema_momentum, args.ema_schedule)
            common.unwrap(model).update_target(m)
        if run.end_step(loss, z[0]):  # progress line, finite-loss check, stop request
            return


def main(argv=None):
    args = get_args(argv)
    ctx = common.setup(args)
    data = common.load_data(args, ctx)
    loader = common.train_loader(data.pretrain, DSSLViews(args), args.batch_size, args.workers, args.seed, ctx)
    if args.save_views:  # look before you train: a PNG of the epoch-0 views of the first images, then stop
        return common.save_views(args, loader.dataset, ctx)

    heavy_targets = args.heavy == "on" and (args.weights[1] > 0 or args.weights[3] > 0)  # beta, delta use y(v^)
    model = DSSL(args.framework, args.arch, args.image_size, args.proj_layers, heavy_targets).to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    base_lr = args.lr * args.batch_size / 256  # Sec. 4.2: lr 0.03 x B/256 (SimSiam's rule); SimCLR: 1.0 x B/256
    if args.framework == "simclr":  # SimCLR's LARS (Sec. 4.1), its exclusions as simclr-pytorch's (lars_param_groups)
        optimizer = common.LARS(lars_param_groups(model, args.weight_decay, args.lars_exclude), lr=base_lr,
                                momentum=0.9, eta=0.001)
    else:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=base_lr, momentum=0.9,
                                    weight_decay=args.weight_decay)  # SimSiam's SGD: momentum 0.9, decay on every weight
    scaler = ctx.grad_scaler()
    run = common.Run(args, ctx, model, optimizer, scaler, loader, data)  # resumes; DDP: before wrapping
    lr_at = functools.partial(common.lr_at, total_steps=run.total_steps, base_lr=base_lr,
                              warmup_steps=round(args.warmup_epochs * run.steps_per_epoch))
    ddp_model = common.ddp(model, ctx)  # SyncBN on GPUs: global BN (SimSiam, BYOL, SimCLR)

    for epoch in run.epochs():
        train_one_epoch(ddp_model, loader, optimizer, scaler, lr_at, run, args, ctx)
        run.end_epoch()  # last.pt and backbone.pt, the kNN monitor, log.jsonl
    common.teardown()


if __name__ == "__main__":
    main()
