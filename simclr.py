"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations.
Chen, Kornblith, Norouzi and Hinton, ICML 2020. https://arxiv.org/abs/2002.05709

Idea: two random views of an image should land close together, and far from
the views of every other image in the batch. An encoder f (a ResNet) gives the
representation h = f(x); a small MLP head g gives z = g(h), where the loss is
computed. The head is thrown away afterwards: h is what transfers (Sec. 4.2).

Objective: NT-Xent, Eq. (1) and Algorithm 1. For N images there are 2N views;
view i's positive is the other view of its image, the other 2N-2 views are its
negatives, and the loss is the mean over all 2N views of -log softmax(positive).

Views (App. A): random resized crop (area 0.08-1) + horizontal flip, colour
distortion of strength s (jitter p=0.8, grayscale p=0.2), Gaussian blur p=0.5.
CIFAR-size data (App. B.9): s=0.5 and no blur.

    python simclr.py --data cifar10
    torchrun --nproc_per_node=8 simclr.py --data imagenet --data-dir /datasets/imagenet

Deviations from the paper (defaults follow the authors' code, google-research/simclr,
which produced the reported numbers; the paper's text is one flag away):
- CIFAR-size defaults are ONE command the authors ran: the CIFAR-10 command of
  their paper-era (SimCLR v1) README (commits be133b3 to 85e8552: ResNet-18,
  B=512, lr 1.0 x B/256, weight decay 1e-6, tau 0.5, 1000 epochs, no blur,
  s=0.5; "around 91%" linear), with v1's run.py head (num_nlh_layers=1: two
  layers, the paper's head). Chosen over the v2 README because v1 matches the
  paper's 2-layer head and is the code of the paper's era. App. B.9 itself
  trains a ResNet-50. The other command: commit 244e712 ("updates that include
  SimCLRv2 changes") changed the README's CIFAR weight decay to 1e-4 and
  run.py's num_proj_layers default to 3 (a 3-layer head) in the same commit,
  claiming the same ~91%: `--weight-decay 1e-4 --proj-layers 3`.
- What still differs from the chosen v1 command (data_util.py at 85e8552):
  brightness there is additive (tf.image.random_brightness, delta up to 0.8s
  on [0, 1] pixels), here torchvision's multiplicative factor in
  [1 - 0.8s, 1 + 0.8s] (which is v2's `random_brightness`, impl 'simclrv2');
  the crop there is tf's sample_distorted_bounding_box with 100 attempts
  (falling back to the whole image), here RandomResizedCrop's 10 tries
  (falling back to a centre crop); the blur (ImageNet; off on CIFAR) there
  draws one sigma per batch (`batch_random_blur` blurs the whole batch with one
  sigma, a per-image coin picks blurred or not), here one sigma per image. The
  head's hidden width and BN are v1's: Linear -> BN -> ReLU -> Linear -> BN
  with a scale but no shift (`linear_layer` in model_util.py); --no-head-bn
  gives Sec. 2.1's g(h) = W2 relu(W1 h) literally.
- The loss trained on is their objective.py's loss_a + loss_b: the sum of the
  two directions, i.e. 2x Eq. (1)'s mean over the 2N views (--loss-scale sum).
  Under LARS this is not a 2x lr. For the adapted weights (LARS with weight
  decay) the trust ratio fixes the step's length at eta x lr x ||w||, so the
  factor changes only its direction: 2g + wd w points where g + (wd/2) w
  does, i.e. against the gradient the weight decay weighs half as much as it
  would under Eq. (1)'s mean (the default 1e-6 acts like 5e-7 would on the
  mean). BN and bias parameters (not adapted, not decayed) move twice as far.
  --loss-scale mean trains on Eq. (1) as printed. nt_xent_loss itself is
  always the mean.
- --lr-scaling sqrt without --lr uses App. B.1's base 0.075 (0.075 x sqrt(B)),
  not the linear rule's base.
"""
import argparse
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import common


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="SimCLR pre-training (Chen et al. 2020)")
    common.add_base_args(parser)
    g = parser.add_argument_group("SimCLR")
    g.add_argument("--tau", type=common.positive_float, default=None,
                   help="tau, NT-Xent temperature, Eq. (1); 0.5 CIFAR (App. B.9), 0.1 ImageNet (Sec. 5.1)")
    g.add_argument("--proj-dim", type=common.positive_int, default=128, help="output size of the head g, Sec. 2.1; 128")
    g.add_argument("--color-strength", type=common.nonneg_float, default=None,
                   help="s, colour distortion strength, App. A; 0.5 CIFAR (App. B.9), 1.0 ImageNet")
    g.add_argument("--blur", type=common.probability, default=None,
                   help="probability of Gaussian blur, App. A; 0 CIFAR (App. B.9), 0.5 ImageNet")
    g.add_argument("--lr-scaling", default="linear", choices=("linear", "sqrt"),
                   help="lr = base x B/256 (linear, Sec. 4) or base x sqrt(B) (sqrt, App. B.1; base 0.075 "
                        "unless --lr is given)")
    g.add_argument("--head-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="BN after each layer of the head g, as the authors' code (model_util.py) builds it; "
                        "default on; --no-head-bn: Sec. 2.1's g(h) = W2 relu(W1 h)")
    g.add_argument("--proj-layers", type=int, default=2, choices=(2, 3),
                   help="linear layers of the head g: 2 (Sec. 2.1; v1 run.py num_nlh_layers=1, default) or 3 (the "
                        "v2 code's num_proj_layers default, commit 244e712; with --weight-decay 1e-4 the v2 README's "
                        "CIFAR-10 command)")
    g.add_argument("--loss-scale", default="sum", choices=("sum", "mean"),
                   help="sum: loss_a + loss_b over the two directions, the authors' objective.py (default; under "
                        "LARS it halves weight decay's weight against the gradient for the adapted weights and "
                        "doubles the BN/bias steps); mean: Eq. (1)'s mean over the 2N views (half of it)")
    args = parser.parse_args(argv)
    if args.lr is None and args.lr_scaling == "sqrt":
        args.lr = 0.075  # App. B.1: "learning rate = 0.075 x sqrt(BatchSize)"
    if args.data in common.LARGE_DATA:  # the paper's ImageNet setting (Sec. 4)
        recipe = dict(arch="resnet50", epochs=100, batch_size=4096, lr=0.3, weight_decay=1e-6, warmup_epochs=10,
                      tau=0.1, color_strength=1.0, blur=0.5)
    else:                               # the authors' CIFAR-10 command (v1 README, be133b3-85e8552)
        recipe = dict(arch="resnet18", epochs=1000, batch_size=512, lr=1.0, weight_decay=1e-6, warmup_epochs=10,
                      tau=0.5, color_strength=0.5, blur=0.0)
    return common.apply_recipe(args, "simclr", recipe)


# ---------------------------------------------------------------------------
# Views (App. A)
# ---------------------------------------------------------------------------

class SimCLRViews:
    """Two independent draws t, t' ~ T of the SimCLR augmentation (Algorithm 1, App. A)."""

    def __init__(self, args):
        s, size = args.color_strength, args.image_size
        self.t = T.Compose([
            T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),  # colour distortion, strength s
            T.RandomGrayscale(p=0.2),
            # Gaussian blur, kernel 10% of the side (odd), sigma 0.1-2.0; none on CIFAR (App. B.9)
            *([T.RandomApply([common.KernelBlur(max(3, int(0.1 * size) // 2 * 2 + 1), sigma=(0.1, 2.0))], p=args.blur)]
              if args.blur > 0 else []),
        ])
        self.names = ["t(x)", "t'(x)"]  # --save-views columns, in __call__'s order

    def __call__(self, img):
        return [common.to_tensor(self.t(img)), common.to_tensor(self.t(img))]


# ---------------------------------------------------------------------------
# Model (Sec. 2.1): encoder f and projection head g
# ---------------------------------------------------------------------------

class SimCLR(nn.Module):
    def __init__(self, arch, image_size, proj_dim, head_bn=True, proj_layers=2):
        super().__init__()
        self.backbone, dim = common.resnet(arch, image_size)   # f: [B, 3, S, S] -> h [B, dim]
        hidden = []
        for _ in range(proj_layers - 1):  # hidden layers as wide as h (2: v1 and Sec. 2.1; 3: the v2 code)
            hidden += ([nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim)] if head_bn else [nn.Linear(dim, dim)])
            hidden += [nn.ReLU(inplace=True)]
        if head_bn:  # the authors' head: (Linear -> BN -> ReLU) x (layers - 1) -> Linear -> BN (no shift), biases in BN
            self.projector = nn.Sequential(*hidden, nn.Linear(dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim))
            self.projector[-1].bias.requires_grad_(False)      # center=False in their code: beta stays 0
        else:        # Sec. 2.1: z = W2 relu(W1 h), hidden as wide as h
            self.projector = nn.Sequential(*hidden, nn.Linear(dim, proj_dim))

    def forward(self, x1, x2):
        # Both views in one pass, so BN normalises over all 2N views (as the
        # authors' code does); this is also faster than two passes.
        z = self.projector(self.backbone(torch.cat([x1, x2])))
        return z.chunk(2)


# ---------------------------------------------------------------------------
# Loss: NT-Xent, Eq. (1)
# ---------------------------------------------------------------------------

def nt_xent_loss(z1, z2, tau):
    """NT-Xent (Eq. (1), Algorithm 1). z1, z2: [N, D] projections of two views
    of the same N images, any float dtype. Returns a float32 scalar:
    mean over the 2N views i of -log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) ),
    where j is i's other view and s is cosine similarity."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)            # [2N, D]
    logits = z @ z.T / tau                                          # [2N, 2N], s_ik / tau
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))           # 1[k != i]: drop self-similarity
    positive = torch.arange(2 * n, device=z.device).roll(n)          # view i's positive: i + N mod 2N
    return F.cross_entropy(logits, positive)                        # mean of l(i, j) over 2N views


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def train_one_epoch(model, loader, optimizer, scaler, lr_at, run, args, ctx):
    """One pass over the loader (a resumed run re-enters its epoch where it stopped)."""
    model.train()
    for (x1, x2), _ in loader:
        common.set_lr(optimizer, lr_at(run.step))
        x1 = common.normalize_on_device(x1, ctx, args.data, args.channels_last)  # uint8 -> normalised float
        x2 = common.normalize_on_device(x2, ctx, args.data, args.channels_last)
        with ctx.autocast():
            z1, z2 = model(x1, x2)
        # DDP: every rank computes NT-Xent over the GLOBAL batch; the gather keeps
        # the graph, so the negatives from other GPUs also send gradient back.
        z1, z2 = common.gather_with_grad(z1), common.gather_with_grad(z2)
        loss = nt_xent_loss(z1, z2, args.tau)
        if args.loss_scale == "sum":
            loss = 2 * loss  # objective.py: loss_a + loss_b, each a mean over N anchors
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # AMP: scaled only in fp16
        scaler.step(optimizer)
        scaler.update()
        if run.end_step(loss, z1):  # progress line, finite-loss check, stop request
            return


def main(argv=None):
    args = get_args(argv)
    ctx = common.setup(args)
    data = common.load_data(args, ctx)
    loader = common.train_loader(data.pretrain, SimCLRViews(args), args.batch_size, args.workers, args.seed, ctx)
    if args.save_views:  # look before you train: a PNG of the epoch-0 views of the first images, then stop
        return common.save_views(args, loader.dataset, ctx)

    model = SimCLR(args.arch, args.image_size, args.proj_dim, args.head_bn, args.proj_layers).to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    scale = args.batch_size / 256 if args.lr_scaling == "linear" else math.sqrt(args.batch_size)
    base_lr = args.lr * scale  # Sec. 4: 0.3 x B/256; App. B.1: 0.075 x sqrt(B)
    optimizer = common.LARS(common.param_groups(model, args.weight_decay), lr=base_lr, momentum=0.9, eta=0.001)
    scaler = ctx.grad_scaler()
    run = common.Run(args, ctx, model, optimizer, scaler, loader, data)  # resumes; DDP: before wrapping
    lr_at = functools.partial(common.lr_at, total_steps=run.total_steps, base_lr=base_lr,
                              warmup_steps=round(args.warmup_epochs * run.steps_per_epoch))
    ddp_model = common.ddp(model, ctx)  # SyncBN on GPUs: global BN (Sec. 3)

    for epoch in run.epochs():
        train_one_epoch(ddp_model, loader, optimizer, scaler, lr_at, run, args, ctx)
        run.end_epoch()  # last.pt and backbone.pt, the kNN monitor, log.jsonl
    common.teardown()


if __name__ == "__main__":
    main()
