"""CLSA: Contrastive Learning with Stronger Augmentations.
Wang and Qi, 2021 (ICLR 2021 submission; IEEE TPAMI 2022). https://arxiv.org/abs/2104.07713

Idea: MoCo v2 (a query encoder, a momentum key encoder and a queue of past
keys) plus strongly augmented views S(x). Pushing S(x) straight onto its key
hurts (Table 4): the distortions can destroy the image's identity. Instead the
strong query is asked to match the weak query's DISTRIBUTION of similarities
over the representation bank: the keys of the current batch and the K queued
keys (Sec. 3.2, under Eq. (3)).

Objective: L = sum_w L_C + beta * sum_(w, s) L_D (Algorithm 1, line 7; Sec. 4.2).
L_C is the contrastive loss of a weak query against the bank, its own key the
positive, Eq. (1); L_D is the cross-entropy from p(.|z'), a weak query's softmax
over the bank (a fixed target), to p(.|z''), a strong query's, Eq. (3)-(4).
CLSA-Single: one weak query, one strong view (1 L_C + 1 L_D). CLSA-Multi: a
weak query and a strong view at each of 5 sizes (5 L_C + 25 L_D).

Views (Sec. 3.3): key T(x) and weak queries T'(x) are draws of the MoCo v2
augmentation (crop 0.2-1, jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale p=0.2, PIL
blur p=0.5, flip); a strong view is its own weak-style crop at its own size,
then 5 draws of one op of the pool, each applied with p=0.5.

    python clsa.py --data cifar10
    torchrun --nproc_per_node=8 clsa.py --data imagenet --data-dir /datasets/imagenet

Deviations from the paper (default = what produced the paper's numbers):
- The bank of L_C and L_D is [all keys of the global batch, the queue], query
  i's positive at its own key, as in every command of the authors' code
  (maple-research-lab/CLSA, model/CLSA.py) and the text under Eq. (3); Eq. (1)
  and (3) as printed have one positive per query. The other keys of the batch
  are extra negatives.
- The strong ops: the authors' pool (data_processing/RandAugment.py, the
  FixMatch pool): Identity in place of Invert, each magnitude a fraction
  v/10, v uniform in 1..9, of the op's maximum (+ its offset), a random sign
  for the geometric ops. `--strong-ops paper` draws Table 1's 14 ops with
  magnitudes uniform over Table 1's ranges.
- CLSA-Multi as the authors' command (cmd/run_multi.sh, --pick_weak 0 1 2 3 4
  --pick_strong 0 1 2 3 4): a weak query at every strong size too
  (`--weak-sizes 224 192 160 128 96`), every weak query's distribution the
  target of every strong view. Sec. 4.2 reads as one weak query:
  `--weak-sizes 224` with the five `--strong-sizes`.
- The paper has no CIFAR-size recipe: those data sets get MoCo's CIFAR demo
  values (ResNet-18 with the CIFAR stem, K=4096, alpha 0.99, lr 0.06 at B=512,
  i.e. 0.03 x B/256, wd 5e-4, 200 epochs, cosine, no blur, BN over 8 groups)
  with one strong view at the image size and the paper's tau 0.2 (the demo:
  0.1). This project's choices, not the demo's: the weak crop 0.2-1 (the
  demo: 0.08-1) and the 2-layer MLP head, hidden as wide as f's output (512;
  the demo's head is linear).
- The paper trains on 8 GPUs with shuffle-BN. In one process the BN of both
  encoders normalises over --bn-splits groups of the batch (8, as MoCo's
  CIFAR demo) and the key batch is shuffled first, which simulates it.
- Sec. 3.3 does not say how the crops are drawn: each view is cropped on its
  own with the area range 0.2-1 scaled by size / image size (0.086-0.429 for
  96 px of 224), the authors' command's ranges.
- This project's plumbing, not the authors': bicubic resizing in the crops
  (theirs: bilinear), the cosine schedule updated every step (theirs: every
  epoch), and bf16 autocast on GPUs with `--amp auto` (theirs: float32; the
  losses are computed in float32 either way).
"""
import argparse
import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF

import common

VARIANTS = ("clsa", "mocov2", "strong-query", "strong-query-key", "contrastive")
STRONG_QUERY = ("strong-query", "strong-query-key")  # the Table 4 rows without a weak query


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="CLSA pre-training (Wang and Qi 2021)")
    common.add_base_args(parser)
    g = parser.add_argument_group("CLSA")
    g.add_argument("--tau", type=common.positive_float, default=0.2, help="tau, temperature of Eq. (1) and (3); 0.2, Sec. 3.1")
    g.add_argument("--beta", type=common.nonneg_float, default=1.0, help="beta, weight of L_D, Algorithm 1; 1.0, Sec. 3.3")
    g.add_argument("--queue-size", type=common.positive_int, default=None,
                   help="K, keys in the queue Q, Eq. (1); 65536 ImageNet (Sec. 3.3), 4096 CIFAR (MoCo's CIFAR demo)")
    g.add_argument("--ema-momentum", type=common.probability, default=None,
                   help="alpha, key encoder momentum, Algorithm 1 line 8; 0.999 ImageNet (Sec. 3.3), 0.99 CIFAR (MoCo's CIFAR demo)")
    g.add_argument("--proj-dim", type=common.positive_int, default=128, help="output size of the heads g, Sec. 3.3 (MoCo v2); 128")
    g.add_argument("--hidden-dim", type=common.positive_int, default=None,
                   help="hidden width of the 2-layer MLP heads g; default: as wide as f's output (2048 for ResNet-50, "
                        "Sec. 3.3; 512 for ResNet-18)")
    g.add_argument("--weak-sizes", type=common.positive_int, nargs="+", default=None,
                   help="side of each weak query T'(x); default the image size (CLSA-Single); CLSA-Multi as the "
                        "authors' command: 224 192 160 128 96")
    g.add_argument("--weak-scales", type=common.probability, nargs="+", default=None,
                   help="crop area range, one MIN MAX pair per weak size (default: 0.2-1 times size / image size)")
    g.add_argument("--strong-sizes", type=common.positive_int, nargs="+", default=None,
                   help="side of each strong view S(x), Sec. 4.2; 96 ImageNet (CLSA-Single), the image size on CIFAR-size "
                        "data; CLSA-Multi: 224 192 160 128 96")
    g.add_argument("--strong-scales", type=common.probability, nargs="+", default=None,
                   help="crop area range, one MIN MAX pair per strong size (default: 0.2-1, the weak crop's, times "
                        "size / image size: 0.086-0.429 for 96 of 224, the authors' command)")
    g.add_argument("--strong-ops", default="authors", choices=sorted(STRONG_OPS),
                   help="pool of the stronger augmentation: authors (their code: Identity for Invert, magnitudes "
                        "v/10 of each maximum, v in 1..9) or paper (Table 1's ops and ranges)")
    g.add_argument("--strong-draws", type=common.nonneg_int, default=5, help="ops drawn per strong view, Sec. 3.3; 5")
    g.add_argument("--strong-p", type=common.probability, default=0.5, help="probability of applying each drawn op, Sec. 3.3; 0.5")
    g.add_argument("--blur", type=common.probability, default=None,
                   help="probability of MoCo v2's Gaussian blur in T, T', S; 0.5 ImageNet, 0 CIFAR (MoCo's CIFAR demo)")
    g.add_argument("--bn-splits", type=common.positive_int, default=None,
                   help="BN groups per process batch, simulating shuffle-BN on one GPU (MoCo's CIFAR demo); "
                        "default 8 in one process, 1 (and only 1) under torchrun, where the key batch is shuffled across GPUs")
    g.add_argument("--variant", default="clsa", choices=VARIANTS,
                   help="Table 4 row: clsa; mocov2 (no strong view); strong-query (MoCo v2 with the strong views as "
                        "queries, no weak query); strong-query-key (as strong-query, and the key view too is followed "
                        "by the stronger augmentation: a strongly augmented image through the key encoder); "
                        "contrastive (L_C of each strong view in place of L_D)")
    args = parser.parse_args(argv)
    if args.data in common.LARGE_DATA:  # the paper's ImageNet setting (Sec. 3.3, 4.1)
        recipe = dict(arch="resnet50", epochs=200, batch_size=256, lr=0.03, weight_decay=1e-4, warmup_epochs=0,
                      queue_size=65536, ema_momentum=0.999, blur=0.5, strong_sizes=[96])
    else:                               # MoCo's CIFAR demo values (the paper has none)
        recipe = dict(arch="resnet18", epochs=200, batch_size=512, lr=0.03, weight_decay=5e-4, warmup_epochs=0,
                      queue_size=4096, ema_momentum=0.99, blur=0.0)
    args = common.apply_recipe(args, "clsa", recipe)
    return check_clsa_args(args)


def crop_scales(sizes, scales, image_size, flag, usage):
    """One (MIN, MAX) crop area range per size: given, or the weak crop's 0.2-1
    times size / image size (the authors' command: 0.086-0.429 for 96 of 224)."""
    if scales is None:
        ratios = [min(1.0, s / image_size) for s in sizes]
        scales = [v for r in ratios for v in (0.2 * r, r)]
    if len(scales) != 2 * len(sizes):
        usage(f"--{flag}-scales needs a MIN MAX pair for each of the {len(sizes)} --{flag}-sizes")
    if not all(0 < lo <= hi <= 1 for lo, hi in zip(scales[::2], scales[1::2])):
        usage(f"each --{flag}-scales pair must be 0 < MIN <= MAX <= 1")
    if min(sizes) < 16:
        usage(f"--{flag}-sizes {min(sizes)} is too small for a ResNet; use at least 16")
    return scales


def check_clsa_args(args):
    """Derived defaults (the views' sizes and crops) and the checks that need several
    flags; the BN groups depend on the number of processes: main() sets them."""
    usage = functools.partial(common.fail, code=common.USAGE)
    if args.variant in STRONG_QUERY and args.weak_sizes is not None:
        usage(f"--variant {args.variant} has no weak query; drop --weak-sizes")
    args.weak_sizes = args.weak_sizes or [args.image_size]
    args.strong_sizes = args.strong_sizes or [args.image_size]
    args.weak_scales = crop_scales(args.weak_sizes, args.weak_scales, args.image_size, "weak", usage)
    args.strong_scales = crop_scales(args.strong_sizes, args.strong_scales, args.image_size, "strong", usage)
    if args.queue_size < args.batch_size:
        usage(f"--queue-size {args.queue_size} must hold at least one global batch of {args.batch_size} keys")
    return args


# ---------------------------------------------------------------------------
# Views (Sec. 3.3, Table 1)
# ---------------------------------------------------------------------------

def _translate_x(img, v):  # v: a fraction of the width
    return common.translate_x(img, int(v * img.size[0]))


def _translate_y(img, v):  # v: a fraction of the height
    return common.translate_y(img, int(v * img.size[1]))


# The two pools of the stronger augmentation. name: (op, lo, hi, integer, signed).
# "paper", Table 1: the magnitude is uniform over [lo, hi] (an integer for
#   Posterize); Solarize's is the threshold, Translate's a fraction of the side.
# "authors", their data_processing/RandAugment.py (FixMatch's pool): Identity
#   in place of Invert; the magnitude is lo + (hi - lo) * v / 10 with v uniform
#   in 1..9 (10%-90% of the range), truncated for integer ops, and negated with
#   p=0.5 for the signed ones. Solarize's threshold 256 - int(25.6 v): 231..26.
STRONG_OPS = {
    "paper": {
        "ShearX": (common.shear_x, -0.3, 0.3, False, False),
        "ShearY": (common.shear_y, -0.3, 0.3, False, False),
        "TranslateX": (_translate_x, -0.3, 0.3, False, False),
        "TranslateY": (_translate_y, -0.3, 0.3, False, False),
        "Rotate": (TF.rotate, -30.0, 30.0, False, False),
        "AutoContrast": (common.auto_contrast, None, None, False, False),
        "Invert": (common.invert, None, None, False, False),
        "Equalize": (common.equalize, None, None, False, False),
        "Solarize": (TF.solarize, 0.0, 256.0, False, False),
        "Posterize": (TF.posterize, 4, 8, True, False),
        "Contrast": (TF.adjust_contrast, 0.05, 0.95, False, False),
        "Color": (TF.adjust_saturation, 0.05, 0.95, False, False),
        "Brightness": (TF.adjust_brightness, 0.05, 0.95, False, False),
        "Sharpness": (TF.adjust_sharpness, 0.05, 0.95, False, False),
    },
    "authors": {
        "AutoContrast": (common.auto_contrast, None, None, False, False),
        "Brightness": (TF.adjust_brightness, 0.05, 0.95, False, False),
        "Color": (TF.adjust_saturation, 0.05, 0.95, False, False),
        "Contrast": (TF.adjust_contrast, 0.05, 0.95, False, False),
        "Equalize": (common.equalize, None, None, False, False),
        "Identity": (common.identity, None, None, False, False),
        "Posterize": (TF.posterize, 4, 8, True, False),
        "Rotate": (TF.rotate, 0, 30, True, True),
        "Sharpness": (TF.adjust_sharpness, 0.05, 0.95, False, False),
        "ShearX": (common.shear_x, 0.0, 0.3, False, True),
        "ShearY": (common.shear_y, 0.0, 0.3, False, True),
        "Solarize": (TF.solarize, 256, 0, True, False),
        "TranslateX": (_translate_x, 0.0, 0.3, False, True),
        "TranslateY": (_translate_y, 0.0, 0.3, False, True),
    },
}


class StrongerAugmentation:
    """Sec. 3.3: `draws` times, pick one op of the pool uniformly (with
    replacement) and apply it with probability p. All draws from torch's RNG."""

    def __init__(self, pool="authors", draws=5, p=0.5):
        self.pool, self.ops, self.draws, self.p = pool, STRONG_OPS[pool], draws, p
        self.names = list(self.ops)

    def magnitude(self, name):
        _, lo, hi, integer, signed = self.ops[name]
        if lo is None:
            return None
        if self.pool == "paper":
            if integer:
                return int(torch.randint(lo, hi + 1, ()))
            return lo + (hi - lo) * float(torch.rand(()))
        v = int(torch.randint(1, 10, ()))  # their randint(1, m=10): 1..9
        v = lo + (int((hi - lo) * v / 10) if integer else (hi - lo) * v / 10)
        return -v if signed and torch.rand(()) < 0.5 else v

    def sample(self):
        """The ops to apply: a list of (name, magnitude) for the draws that fired."""
        chosen = []
        for _ in range(self.draws):
            name = self.names[int(torch.randint(len(self.names), ()))]
            if torch.rand(()) < self.p:
                chosen.append((name, self.magnitude(name)))
        return chosen

    def __call__(self, img):
        for name, v in self.sample():
            img = self.ops[name][0](img, v)
        return img


class CLSAViews:
    """[key T(x), weak queries T'(x)..., strong views S(x)...] (Algorithm 1, line 4).
    Table 4 variants: mocov2 drops the strong views, strong-query(-key) the weak
    queries (and strong-query-key follows the key's T with the stronger
    augmentation as well)."""

    def __init__(self, args):
        def weak(size, scale):  # MoCo v2's T, the "weaker augmentation" of Sec. 3.3
            return T.Compose([
                T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                *([T.RandomApply([common.RandomPILBlur((0.1, 2.0))], p=args.blur)] if args.blur > 0 else []),
            ])  # MoCo v2's PIL blur (the authors' Image_ops.GaussianBlur), none where --blur is 0

        strong = StrongerAugmentation(args.strong_ops, args.strong_draws, args.strong_p)
        key = weak(args.image_size, (0.2, 1.0))
        self.key = T.Compose([key, strong]) if args.variant == "strong-query-key" else key
        pairs = lambda scales: list(zip(scales[::2], scales[1::2]))  # noqa: E731
        self.weak = [] if args.variant in STRONG_QUERY else [
            weak(size, scale) for size, scale in zip(args.weak_sizes, pairs(args.weak_scales))]
        self.strong = [] if args.variant == "mocov2" else [
            T.Compose([weak(size, scale), strong]) for size, scale in zip(args.strong_sizes, pairs(args.strong_scales))]
        self.names = (["key S(T(x))" if args.variant == "strong-query-key" else "key T(x)"]  # --save-views columns
                      + [f"weak T'(x) {s}px" for s in args.weak_sizes if self.weak]
                      + [f"strong S(x) {s}px" for s in args.strong_sizes if self.strong])

    def __call__(self, img):
        views = [self.key(img)] + [w(img) for w in self.weak] + [s(img) for s in self.strong]
        return [common.to_tensor(v) for v in views]


# ---------------------------------------------------------------------------
# Model (Algorithm 1): query encoder f_theta + g_theta, key encoder f_phi +
# g_phi (a momentum copy, never trained by gradient) and the queue Q
# ---------------------------------------------------------------------------

class CLSA(nn.Module):
    def __init__(self, arch, image_size, hidden_dim, proj_dim, queue_size, ema_momentum, bn_splits, seed=0):
        super().__init__()
        self.ema_momentum = ema_momentum
        self.backbone, dim = common.resnet(arch, image_size)      # f_theta: [B, 3, S, S] -> h [B, dim]
        hidden_dim = hidden_dim or dim                            # Sec. 3.3: 2048 on ResNet-50, i.e. as wide as h
        self.projector = nn.Sequential(                           # g_theta: 2-layer MLP with ReLU
            nn.Linear(dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, proj_dim))
        if bn_splits > 1:  # both encoders, as MoCo's CIFAR demo (the key encoder is a copy)
            common.split_bn(self.backbone, bn_splits)
        self.backbone_k = copy.deepcopy(self.backbone)            # Algorithm 1, line 1: phi = theta
        self.projector_k = copy.deepcopy(self.projector)
        for p in self.key_parameters():
            p.requires_grad_(False)  # updated by line 8 only; the optimizer never sees it
        # Q: [K, D] unit rows, random at the start (as MoCo), then FIFO of past keys.
        # Drawn from `seed` alone, so every process starts with the same queue.
        queue = torch.randn(queue_size, proj_dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("queue", F.normalize(queue, dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # row the next key goes to

    def query_parameters(self):
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def key_parameters(self):
        return [*self.backbone_k.parameters(), *self.projector_k.parameters()]

    @torch.no_grad()
    def momentum_update(self):
        """Algorithm 1, line 8, for every parameter of the key encoder. Its BN
        running statistics stay its own, as in MoCo."""
        alpha = self.ema_momentum
        for phi, theta in zip(self.key_parameters(), self.query_parameters()):
            phi.mul_(alpha).add_(theta.detach(), alpha=1 - alpha)  # line 8: phi <- alpha phi + (1 - alpha) theta

    @torch.no_grad()
    def enqueue(self, k):
        """FIFO (Sec. 3.1): the global batch's keys k [B, D] (every process's, in
        rank order: the one-process batch order) overwrite the oldest rows; the
        pointer wraps around, so K need not be a multiple of the global batch."""
        rows = (self.queue_ptr + torch.arange(len(k), device=k.device)) % len(self.queue)
        self.queue[rows] = k.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(k)) % len(self.queue))

    def forward(self, x_k, xs_q, shuffle_seed):
        """x_k: [n, 3, S, S] key views; xs_q: list of query-view batches [n, 3, s, s]
        (weak first, then strong; sizes may differ). Returns (one [n, D] projection
        per query view, the keys of the GLOBAL batch [B, D] as unit rows, this
        process's at rows rank*n..rank*n+n-1, the queue [K, D] as it was before
        this step's keys were enqueued)."""
        # One pass per view, so BN normalises over one kind of view, as MoCo's
        # queries; a 96 px strong view costs (96/224)^2 = 18% of a 224 px one.
        qs = [self.projector(self.backbone(x)) for x in xs_q]
        with torch.no_grad():
            self.momentum_update()  # before the keys, as MoCo
            # DDP: shuffle-BN (MoCo Sec. 3.3): the key batch is permuted across all processes
            # (one all_to_all of the images that change process), so a key's BN statistics
            # come from other images than its query's; in one process, with split BN.
            x_k, unshuffle = common.batch_shuffle(x_k, shuffle_seed)
            k = F.normalize(self.projector_k(self.backbone_k(x_k)).float(), dim=1)
            k = common.batch_unshuffle(k, unshuffle)
            k = common.concat_all_gather(k)  # DDP: [B, D], the bank's batch part on every rank
        # A copy for the losses (autograd keeps it for backward), then FIFO update.
        queue = self.queue.clone()
        self.enqueue(k)
        return qs, k, queue


# ---------------------------------------------------------------------------
# Losses: L_C, Eq. (1), and L_D, Eq. (3)-(4), over the bank [k, queue]
# ---------------------------------------------------------------------------

def bank_logits(q, k, queue, tau):
    """sim(q_i, .) / tau over the bank (Sec. 3.2, under Eq. (3)): the M keys of the
    current batch, then the K queued keys. q: [N, D], k: [M, D], queue: [K, D];
    returns float32 [N, M+K]."""
    q, k, queue = (F.normalize(t.float(), dim=1) for t in (q, k, queue))  # Eq. (2): cosine similarity
    return torch.cat([q @ k.T, q @ queue.T], dim=1) / tau


def contrastive_loss(q, k, queue, tau, offset=0):
    """L_C, Eq. (1) over the bank [k, queue]: q [N, D] this process's queries,
    k [M, D] the keys of the whole (gathered) batch, query i's own key at row
    offset + i (rank r passes r * N), queue [K, D]. Mean over i of -log softmax
    of that column among the M+K. Any float dtype in, float32 scalar out."""
    logits = bank_logits(q, k, queue, tau)
    target = torch.arange(offset, offset + len(q), device=logits.device)
    return F.cross_entropy(logits, target)


def ddm_loss(q_weak, q_strong, k, queue, tau):
    """L_D, Eq. (3)-(4): p_w = softmax over the bank [k, queue] of the weak query
    (a target: no gradient), log p_s = log_softmax of the strong query's; mean
    over i of -sum_j p_w log p_s. q_weak, q_strong: [N, D], k: [M, D] the
    gathered batch keys, queue [K, D]. Any float dtype in, float32 scalar out."""
    p_weak = F.softmax(bank_logits(q_weak, k, queue, tau).detach(), dim=1)
    log_p_strong = F.log_softmax(bank_logits(q_strong, k, queue, tau), dim=1)
    return -(p_weak * log_p_strong).sum(1).mean()


def clsa_objective(q_weak, q_strong, k, queue, tau, beta=1.0, variant="clsa", offset=0):
    """L = sum_w L_C + beta * sum_(w, s) L_D (Algorithm 1, line 7; Sec. 4.2), or a
    Table 4 variant. q_weak, q_strong: lists of [N, D] query projections (the
    weak queries and the strong views, in the order of CLSAViews). The terms of
    contrastive_loss and ddm_loss, each query's logits and (log-)softmax computed
    once: CLSA-Multi's 5 L_C and 25 L_D take 10 products with the bank
    (2 N (M+K) D FLOPs each), not 55."""
    weak = [bank_logits(q, k, queue, tau) for q in q_weak]
    strong = [bank_logits(q, k, queue, tau) for q in q_strong]
    target = torch.arange(offset, offset + len((q_weak or q_strong)[0]), device=k.device)  # own keys, as in L_C
    if variant in STRONG_QUERY:  # MoCo v2 whose queries are the strong views
        return sum(F.cross_entropy(s, target) for s in strong)
    loss = sum(F.cross_entropy(w, target) for w in weak)  # L_C, Eq. (1); mocov2 stops here
    if variant == "contrastive":  # Table 4: the strong views pushed onto their keys
        return loss + beta * sum(F.cross_entropy(s, target) for s in strong)
    log_p_strong = [F.log_softmax(s, dim=1) for s in strong]
    for w in weak:  # every (weak, strong) pair: 1 L_D in CLSA-Single, 25 in CLSA-Multi
        p_weak = F.softmax(w.detach(), dim=1)  # L_D's target: no gradient
        for log_p_s in log_p_strong:
            loss = loss + beta * -(p_weak * log_p_s).sum(1).mean()
    return loss


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def train_one_epoch(model, loader, optimizer, scaler, lr_at, run, args, ctx):
    """One pass over the loader (a resumed run re-enters its epoch where it stopped)."""
    model.train()
    n_weak = 0 if args.variant in STRONG_QUERY else len(args.weak_sizes)  # qs: weak queries first, then strong
    for (x_k, *xs_q), _ in loader:
        common.set_lr(optimizer, lr_at(run.step))
        x_k = common.normalize_on_device(x_k, ctx, args.data, args.channels_last)  # uint8 -> normalised float
        xs_q = [common.normalize_on_device(x, ctx, args.data, args.channels_last) for x in xs_q]
        with ctx.autocast():
            # Also updates phi (Algorithm 1, line 8) and enqueues the keys. The shuffle-BN
            # permutation comes from (seed, step): a resumed run draws the same one.
            qs, k, queue = model(x_k, xs_q, args.seed * 2**32 + run.step)
        # DDP: each rank's loss is over its own queries; the bank holds every rank's keys,
        # this rank's queries' own keys at rows rank*n..rank*n+n-1.
        loss = clsa_objective(qs[:n_weak], qs[n_weak:], k, queue, args.tau, args.beta, args.variant,
                              offset=ctx.rank * len(x_k))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # AMP: scaled only in fp16
        scaler.step(optimizer)
        scaler.update()
        if run.end_step(loss, qs[0]):  # progress line, finite-loss check, stop request
            return


def main(argv=None):
    args = get_args(argv)
    ctx = common.setup(args)
    if args.bn_splits is None:  # MoCo's CIFAR demo: BN over 8 groups in one process; under torchrun, shuffle-BN
        args.bn_splits = 8 if ctx.world == 1 else 1
    if ctx.world > 1 and args.bn_splits != 1:
        common.fail("--bn-splits must be 1 under torchrun: the key batch is shuffled across the GPUs instead (MoCo)",
                    common.USAGE)
    if args.batch_size // ctx.world % args.bn_splits:
        common.fail(f"the batch of {args.batch_size // ctx.world} per process does not split into "
                    f"--bn-splits {args.bn_splits} BN groups", common.USAGE)
    data = common.load_data(args, ctx)
    loader = common.train_loader(data.pretrain, CLSAViews(args), args.batch_size, args.workers, args.seed, ctx)
    if args.save_views:  # look before you train: a PNG of the epoch-0 views of the first images, then stop
        return common.save_views(args, loader.dataset, ctx)

    model = CLSA(args.arch, args.image_size, args.hidden_dim, args.proj_dim, args.queue_size, args.ema_momentum,
                 args.bn_splits, args.seed).to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    base_lr = args.lr * args.batch_size / 256  # Sec. 4.1: 0.03 at B=256; linear in the global batch (MoCo's rule: 0.06 at 512)
    # Sec. 4.1: SGD, momentum 0.9, weight decay on every trained tensor (as MoCo); the key encoder is not trained.
    optimizer = torch.optim.SGD(model.query_parameters(), lr=base_lr, momentum=0.9, weight_decay=args.weight_decay)
    scaler = ctx.grad_scaler()
    run = common.Run(args, ctx, model, optimizer, scaler, loader, data)  # resumes; DDP: before wrapping
    lr_at = functools.partial(common.lr_at, total_steps=run.total_steps, base_lr=base_lr,
                              warmup_steps=round(args.warmup_epochs * run.steps_per_epoch))
    # Per-process BN, as MoCo: shuffle-BN guards the keys. Every process enqueues the same gathered
    # keys, so the queue stays equal without DDP broadcasting it each step (K x D x 4 bytes: 32 MB on ImageNet).
    ddp_model = common.ddp(model, ctx, sync_bn=False, same_on_every_rank=("queue", "queue_ptr"))

    for epoch in run.epochs():
        train_one_epoch(ddp_model, loader, optimizer, scaler, lr_at, run, args, ctx)
        run.end_epoch()  # last.pt and backbone.pt, the kNN monitor, log.jsonl
    common.teardown()


if __name__ == "__main__":
    main()
