"""AAG: Self-supervised representation learning by Auxiliary Augmentation with GNT-Xent loss.
arXiv 2009.07994, 2020. https://arxiv.org/abs/2009.07994

Idea: SimCLR-style instance discrimination that works at small batch sizes.
Each image gives THREE views: two core views from the basic augmentation and
one auxiliary view from a much richer policy (AutoAugment), all encoded by one
siamese network f (ResNet + 128-d head). The auxiliary view brings diversity
without a large batch; only one is made per image because it is noisier, and
auxiliary-auxiliary pairs are never contrasted.

Objective: GNT-Xent, Eq. (1)-(2), (4) and Algorithm 1. With s(a,b) = cos(a,b)/tau
and sums over j != i, L = mean_i (L_xy + L_zx + L_zy), where
L_xy = -s(x_i,y_i) + log sum_j [e^s(x_i,y_j) + e^s(x_j,y_i) + e^s(x_i,x_j) + e^s(y_i,y_j)],
L_zx = -2 s(z_i,x_i) + log sum_j e^s(z_i,x_j) + log sum_j e^s(z_j,x_i), L_zy likewise.
The positive is never in a denominator (Eq. (4) vs NT-Xent's Eq. (3)), so
dL/ds+ = -1 at every step (Sec. "Design considerations of loss function").
--loss nt-xent (the NT-Xent rows of Tables 4 and 7) keeps these three terms
and their negatives and puts e^s+ back into each denominator: the paper says
the two losses differ only in that term. (SimCLR's NT-Xent summed over the
view pairs would instead contrast z against z, which AAG never does.)

Views (Algorithm 1: g_basic1, g_basic2 ~ G_basic and g_aux ~ G_aux, each drawn
independently and applied to the same image d_i): basic = random resized crop,
colour jitter, random grayscale, horizontal flip, Gaussian blur; auxiliary = its
own random resized crop + flip, then AutoAugment's published policy for the
data set (CIFAR10, SVHN or IMAGENET), or torchvision's RandAugment(2 ops,
magnitude 10) (not the authors' port's RandAugment: see Deviations).
Blur: SimCLR's (App. A: kernel 10% of the side, sigma 0.1-2, p=0.5), since the
paper lists blur among the basic ops and says they follow SimCLR.

Evaluation (Sec. Experiments, "Evaluation protocols"): kNN on "low-dim
features of the last layer", i.e. the 128-d embedding g(f(x)) (every kNN
number of Tables 1-7), and the linear probe on "the features before the last
layer", h = f(x) (Adam lr 0.01, 50 epochs, cosine). The in-training kNN
monitor uses the embedding (--knn-features); evaluate.py --features embedding
reads it from last.pt.

    python aag.py --data cifar10
    torchrun --nproc_per_node=8 aag.py --data imagenet --data-dir /datasets/imagenet

Deviations from the paper:
- The paper names the basic operations but not their strengths: crop area
  0.2-1 and ColorJitter(0.4, 0.4, 0.4, 0.4) on every view with grayscale
  p=0.2 are the authors' CIFAR code; blur p=0.5 is SimCLR's (App. A), which
  the paper says it follows (their code has no blur: --blur 0).
- The paper trains only on 32 px data; the ImageNet/folder defaults
  (ResNet-50 with the MLP head of Table 6, B=256) are this script's choice.
- Table 7 (iii) "with StepLR": --schedule step. The paper gives no
  milestones; the defaults are the step schedule of ISIF's CIFAR trainer
  (mangye16/Unsupervised_Embedding_Learning `demo_seen.py`,
  `adjust_learning_rate` since commit 2f24bec "fix lr bug"), the recipe AAG's
  settings come from (lr 0.03, B=128, wd 5e-4, tau 0.1) and whose StepLR the
  paper says it replaced with cosine. ISIF sets lr = base x 0.1 for epochs
  120-159, base x 0.05 for 160-199 and base x 0.01 from 200 (factors of the
  base lr, not cumulative), and trains 301 epochs. Within AAG's 200 epochs
  that is --milestones 120 160 --milestone-factors 0.1 0.05 (the default);
  ISIF's whole run is --epochs 301 --milestones 120 160 200
  --milestone-factors 0.1 0.05 0.01. (Before 2f24bec the later branches
  could not fire: `if epoch >= 120` caught every later epoch.) GNT-Xent
  inside ISIF / SimCLR (Table 5) belongs to those methods.
- --aux-policy randaugment is torchvision's RandAugment(2, 10): 14 ops,
  magnitude 10 of 30, e.g. translate about 4.8 px at 32 px, no Cutout. The
  authors' MindSpore port (mindspore-ai/models research/cv/AVA_cifar,
  src/RandAugment/augmentations.py, used by src/datasets.py with n=2, m=10)
  is a different RandAugment: 18 ops (AutoContrast, Equalize, Invert, Rotate,
  Posterize, Solarize, SolarizeAdd, Contrast, Sharpness, ShearX/Y, Cutout,
  TranslateX/Y, and PIL's BLUR, CONTOUR, EMBOSS and FIND_EDGES filters; no
  Color, Brightness or Identity), magnitude m/30 of each op's range in
  absolute units: Cutout 13 px and Translate 33 px (more than a 32 px image)
  at m=10, Posterize to 1 bit. Table 7's RandAugment row may have come from
  either; this file does not reproduce the port's.
- The port also differs from the paper in defaults this file does not take:
  RandAugment(2, 10) as the auxiliary view (the paper's default is
  AutoAugment), batch 96 (here 128, Sec. Experiments) and an MLP head without
  ReLU (here Table 6's "2-layer MLP as SimCLR does", with ReLU).
- --arch alexnet: the paper cites only Krizhevsky et al. Neither AND
  (Raymond-sci/AND: models/ holds only resnet_cifar.py in every commit, though
  its README links an AlexNet checkpoint) nor ISIF
  (mangye16/Unsupervised_Embedding_Learning: resnet, resnet_cifar,
  inception_v1) publishes an AlexNet definition. The layer sizes
  (common.CifarAlexNet) are those of the `CIFARAlexNet` (`cifar_alexnet`,
  low_dim head on fc 4096-1024-1024) of the lemniscate-derived code family
  these baselines share, as found in public copies; no authors' file backs
  them.
- On several GPUs BN is synchronised (SyncBN), so the step equals the
  paper's one-GPU step on the same batch.
- L_xy follows Algorithm 1 term by term; the authors' MindSpore code builds
  it from x-anchored rows only (counted twice).
"""
import argparse
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import common


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="AAG pre-training (auxiliary augmentation + GNT-Xent)")
    common.add_base_args(parser)
    g = parser.add_argument_group("AAG")
    g.add_argument("--tau", type=common.positive_float, default=0.1,
                   help="tau, temperature of s(a,b) = cos(a,b)/tau, Eq. (2) and Algorithm 1; 0.1 (Sec. Experiments)")
    g.add_argument("--loss", default="gnt-xent", choices=("gnt-xent", "nt-xent"),
                   help="gnt-xent: no positive in any denominator (Eq. (4), Algorithm 1); nt-xent: exp(s+) added back "
                        "to every denominator of Algorithm 1 (Eq. (3)), the NT-Xent rows of Tables 4 and 7")
    g.add_argument("--aux-policy", default="autoaugment", choices=("autoaugment", "randaugment", "basic", "none"),
                   help="g_aux, the auxiliary view (Sec. Hybrid Data Augmentation): AutoAugment's policy for the data "
                        "set (default), torchvision's RandAugment 2 ops magnitude 10 (Table 7 'with RandAugment'; not "
                        "the authors' MindSpore port's RandAugment: 18 ops, Cutout 13 px, Translate 33 px at m=10), a "
                        "third basic view (Table 7 'Three Basic Views') or none (Table 7 'Two Basic Views')")
    g.add_argument("--head", default=None, choices=("linear", "mlp"),
                   help="head to the embedding: linear (Sec. Experiments; default on CIFAR-size data) or SimCLR's "
                        "2-layer MLP (Table 6; default on imagenet/folder)")
    g.add_argument("--proj-dim", type=common.positive_int, default=128, help="embedding size of the last layer, Sec. Experiments; 128")
    g.add_argument("--crop-min", type=common.probability, default=0.2,
                   help="smallest crop area of basic op i and of the auxiliary view's crop; 0.2 (authors' code)")
    g.add_argument("--jitter", type=common.nonneg_float, default=0.4,
                   help="brightness, contrast, saturation and hue of basic op ii (ColorJitter); 0.4 (authors' code)")
    g.add_argument("--blur", type=common.probability, default=0.5,
                   help="probability of Gaussian blur, basic op v; 0.5 with SimCLR's kernel, App. A (the authors' code: 0)")
    g.add_argument("--schedule", default="cosine", choices=("cosine", "step"),
                   help="cosine without restarts (Sec. Experiments) or step (Table 7 (iii) 'with StepLR'): from each "
                        "of --milestones on, lr = base x its --milestone-factors entry")
    g.add_argument("--milestones", type=common.positive_int, nargs="+", default=None,
                   help="epochs at which --schedule step changes the lr; default 120 160, ISIF's demo_seen.py "
                        "schedule within 200 epochs (the paper gives none; ISIF's whole 301-epoch run: --epochs 301 "
                        "--milestones 120 160 200 --milestone-factors 0.1 0.05 0.01)")
    g.add_argument("--milestone-factors", type=common.positive_float, nargs="+", default=None,
                   help="lr = base x factor from each milestone on (factors of the base lr, not cumulative); default "
                        "0.1 0.05 with the default milestones (ISIF), else 0.1, 0.01, ... (StepLR, gamma 0.1)")
    g.add_argument("--knn-features", default="embedding", choices=("embedding", "backbone"),
                   help="features of the kNN monitor: the 128-d embedding, the last layer, as every kNN number in the "
                        "paper (Sec. Experiments, Evaluation protocols), or the backbone's h")
    args = parser.parse_args(argv)
    if args.data in common.LARGE_DATA:  # not in the paper (see Deviations)
        recipe = dict(arch="resnet50", epochs=200, batch_size=256, lr=0.03, weight_decay=5e-4, head="mlp")
    else:                               # Sec. Experiments (Table 1)
        recipe = dict(arch="resnet18", epochs=200, batch_size=128, lr=0.03, weight_decay=5e-4, head="linear")
    args = common.apply_recipe(args, "aag", recipe)
    if args.warmup_epochs is None:  # Fig. 3: "for batch sizes more than 256, we warm up the learning rate for 10 epochs"
        args.warmup_epochs = 10 if args.batch_size > 256 else 0
    if args.milestones is None:  # ISIF's adjust_learning_rate within 200 epochs: x0.1 at 120, x0.05 at 160
        args.milestones = [120, 160]
        if args.milestone_factors is None:
            args.milestone_factors = [0.1, 0.05]
    if args.milestone_factors is None:  # StepLR: x0.1 more at each milestone
        args.milestone_factors = [0.1 ** (k + 1) for k in range(len(args.milestones))]
    if list(args.milestones) != sorted(set(args.milestones)):
        common.fail(f"--milestones {' '.join(map(str, args.milestones))} must increase", common.USAGE)
    if len(args.milestone_factors) != len(args.milestones):
        common.fail(f"--milestone-factors gives {len(args.milestone_factors)} factors for {len(args.milestones)} "
                    f"--milestones; give one per milestone", common.USAGE)
    if args.schedule == "step" and any(m >= args.epochs for m in args.milestones):
        common.fail(f"--milestones {' '.join(map(str, args.milestones))} must lie between 1 and --epochs - 1 "
                    f"({args.epochs - 1})", common.USAGE)
    return args


def step_lr(step, warmup_steps, base_lr, steps_per_epoch, milestones, factors):
    """Table 7 (iii): the same linear warmup as the cosine schedule, then base_lr
    x factors[k] from milestone epoch milestones[k] on (the last one reached),
    base_lr before the first: ISIF's demo_seen.py adjust_learning_rate with the
    defaults (0.1 from 120, 0.05 from 160)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    reached = [f for m, f in zip(milestones, factors) if step >= m * steps_per_epoch]
    return base_lr * (reached[-1] if reached else 1.0)


# ---------------------------------------------------------------------------
# Views (Sec. Hybrid Data Augmentation Scheme, Algorithm 1)
# ---------------------------------------------------------------------------

class AAGViews:
    """Core views g_basic1(d), g_basic2(d) and the auxiliary view g_aux(d), each
    an independent draw applied to the same image d (Algorithm 1). So the
    auxiliary view is not derived from a core view: it gets its own random
    crop and flip (AutoAugment's policies have no crop), then the policy."""

    def __init__(self, args):
        j, size = args.jitter, args.image_size
        crop = [T.RandomResizedCrop(size, scale=(args.crop_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip()]  # ops i and iv; every view draws its own
        # G_basic, ops i-v; jitter on every view (p=1) and grayscale p=0.2 as in the authors' code.
        self.basic = T.Compose([
            *crop,
            T.RandomApply([T.ColorJitter(j, j, j, j)], p=1.0),
            T.RandomGrayscale(p=0.2),
            # op v: SimCLR's Gaussian blur (App. A), kernel 10% of the side (odd), sigma 0.1-2.0; none at --blur 0
            *([T.RandomApply([common.KernelBlur(max(3, int(0.1 * size) // 2 * 2 + 1), sigma=(0.1, 2.0))], p=args.blur)]
              if args.blur > 0 else []),
        ])
        policy = {"svhn": T.AutoAugmentPolicy.SVHN, "imagenet": T.AutoAugmentPolicy.IMAGENET,   # AutoAugment's published
                  "folder": T.AutoAugmentPolicy.IMAGENET}.get(args.data, T.AutoAugmentPolicy.CIFAR10)  # policy per data set
        self.aux = {"autoaugment": T.Compose([*crop, T.AutoAugment(policy)]),                 # CIFAR10/SVHN/IMAGENET policy
                    "randaugment": T.Compose([*crop, T.RandAugment(num_ops=2, magnitude=10)]),  # Table 7, (v)
                    "basic": self.basic,                                                    # Table 7, (ii)
                    "none": None}[args.aux_policy]                                          # Table 7, (i)
        self.names = ["g_basic1(d)", "g_basic2(d)"] + (["g_aux(d)"] if self.aux is not None else [])  # --save-views columns

    def __call__(self, img):
        views = [self.basic(img), self.basic(img)] + ([self.aux(img)] if self.aux is not None else [])
        return [common.to_tensor(v) for v in views]


# ---------------------------------------------------------------------------
# Model (Fig. 1): one siamese network f_theta = head g on backbone f
# ---------------------------------------------------------------------------

class AAG(nn.Module):
    def __init__(self, arch, image_size, proj_dim, head):
        super().__init__()
        self.backbone, dim = common.resnet(arch, image_size)   # f: [B, 3, S, S] -> h [B, dim]
        if head == "linear":                                   # Sec. Experiments: 128-d last layer
            self.projector = nn.Linear(dim, proj_dim)
        else:                                                  # Table 6: "a 2-layer MLP as SimCLR does"
            self.projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, proj_dim))

    def forward(self, *views):
        # All views (x, y and z, or x and y) in one pass: BN normalises over the
        # 3N views together, and one pass is faster than three. Three views cost
        # 1.5x SimCLR's compute per image.
        z = self.projector(self.backbone(torch.cat(views)))
        return z.chunk(len(views))


# ---------------------------------------------------------------------------
# Loss: GNT-Xent, Eq. (1)-(2), (4) and Algorithm 1
# ---------------------------------------------------------------------------

def gnt_xent_loss(x, y, z, tau, keep_positive=False):
    """GNT-Xent (Algorithm 1). x, y: [N, D] embeddings of the two core views,
    z: [N, D] of the auxiliary view (None: two views, L_xy alone); any float
    dtype. Returns a float32 scalar: mean over i of L_xy + L_zx + L_zy, with
    s(a,b) = cos(a,b)/tau and every sum over j != i:
      L_xy = -s(x_i,y_i) + log sum_j [e^s(x_i,y_j) + e^s(x_j,y_i) + e^s(x_i,x_j) + e^s(y_i,y_j)]
      L_zx = -2 s(z_i,x_i) + log sum_j e^s(z_i,x_j) + log sum_j e^s(z_j,x_i);  L_zy likewise.
    No denominator holds its positive (Eq. (4)) and no z-z pair is used.
    keep_positive=True adds e^s+ to each denominator: NT-Xent, Eq. (3)."""
    x, y = F.normalize(x.float(), dim=1), F.normalize(y.float(), dim=1)
    self_mask = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)

    def log_denominator(positive, *blocks):
        # Row i of each [N, N] block is one anchor's sum over j; j = i is masked out.
        terms = torch.cat([b.masked_fill(self_mask, float("-inf")) for b in blocks], dim=1)
        if keep_positive:
            terms = torch.cat([positive[:, None], terms], dim=1)
        return torch.logsumexp(terms, dim=1)                                  # [N]

    # Five [N, N] similarity blocks (xy, xx, yy, zx, zy): O(N^2 D), small next to the backbone.
    s_xy = x @ y.T / tau                                                      # [N, N], s(x_i, y_j)
    positive = s_xy.diagonal()
    loss = -positive + log_denominator(positive, s_xy, s_xy.T, x @ x.T / tau, y @ y.T / tau)  # L_xy
    if z is not None:
        z = F.normalize(z.float(), dim=1)
        for s_zb in (z @ x.T / tau, z @ y.T / tau):                           # L_zx, then L_zy
            positive = s_zb.diagonal()                                        # s(z_i, b_i)
            # anchor z_i against b_j (rows), then anchor b_i against z_j (columns)
            loss = loss - 2 * positive + log_denominator(positive, s_zb) + log_denominator(positive, s_zb.T)
    return loss.mean()


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def train_one_epoch(model, loader, optimizer, scaler, lr_at, run, args, ctx):
    """One pass over the loader (a resumed run re-enters its epoch where it stopped)."""
    model.train()
    for views, _ in loader:
        common.set_lr(optimizer, lr_at(run.step))
        views = [common.normalize_on_device(v, ctx, args.data, args.channels_last) for v in views]  # uint8 -> normalised float
        with ctx.autocast():
            x, y, z = (*model(*views), None)[:3]  # z is None with --aux-policy none
        # DDP: every rank computes GNT-Xent over the GLOBAL batch; the gather keeps
        # the graph, so the negatives from other GPUs also send gradient back.
        x, y = common.gather_with_grad(x), common.gather_with_grad(y)
        z = common.gather_with_grad(z) if z is not None else None
        loss = gnt_xent_loss(x, y, z, args.tau, keep_positive=args.loss == "nt-xent")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # AMP: scaled only in fp16
        scaler.step(optimizer)
        scaler.update()
        if run.end_step(loss, x):  # progress line, finite-loss check, stop request
            return


def main(argv=None):
    args = get_args(argv)
    ctx = common.setup(args)
    data = common.load_data(args, ctx)
    loader = common.train_loader(data.pretrain, AAGViews(args), args.batch_size, args.workers, args.seed, ctx)
    if args.save_views:  # look before you train: a PNG of the epoch-0 views of the first images, then stop
        return common.save_views(args, loader.dataset, ctx)

    model = AAG(args.arch, args.image_size, args.proj_dim, args.head).to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    base_lr = args.lr * args.batch_size / 128  # Sec. Experiments (Fig. 3): BatchSize/128 x 0.03
    # SGD with momentum 0.9 and weight decay on every parameter (Sec. Experiments).
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=0.9, weight_decay=args.weight_decay)
    scaler = ctx.grad_scaler()
    # kNN on the last layer's output (the paper's protocol) or on h: same weights, no copy.
    knn_net = nn.Sequential(model.backbone, model.projector) if args.knn_features == "embedding" else model.backbone
    run = common.Run(args, ctx, model, optimizer, scaler, loader, data, knn_net)  # resumes; DDP: before wrapping
    warmup_steps = round(args.warmup_epochs * run.steps_per_epoch)
    if args.schedule == "cosine":  # Sec. Experiments: CosineLR without restarts
        lr_at = functools.partial(common.lr_at, total_steps=run.total_steps, base_lr=base_lr, warmup_steps=warmup_steps)
    else:                          # Table 7 (iii): StepLR after the same warmup
        lr_at = functools.partial(step_lr, warmup_steps=warmup_steps, base_lr=base_lr,
                                  steps_per_epoch=run.steps_per_epoch, milestones=args.milestones,
                                  factors=args.milestone_factors)
    ddp_model = common.ddp(model, ctx)  # SyncBN on GPUs: BN over the global batch, as on the paper's one GPU

    for epoch in run.epochs():
        train_one_epoch(ddp_model, loader, optimizer, scaler, lr_at, run, args, ctx)
        run.end_epoch()  # last.pt and backbone.pt, the kNN monitor, log.jsonl
    common.teardown()


if __name__ == "__main__":
    main()
