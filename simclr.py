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
- CIFAR-size defaults are the authors' CIFAR-10 command (README of
  google-research/simclr: ResNet-18, B=512, lr 1.0 x B/256, weight decay 1e-4,
  tau 0.5, 1000 epochs, no blur, s=0.5); App. B.9 itself trains a ResNet-50,
  and the paper's weight decay is 1e-6 (Sec. 4; --weight-decay 1e-6).
- The projection head has BN after each of its two layers as their code builds
  it (`projection_head`/`linear_layer` in model_util.py: hidden Linear -> BN ->
  ReLU, output Linear -> BN with a scale but no shift); --no-head-bn gives Sec.
  2.1's g(h) = W2 relu(W1 h) literally. Two layers as in the paper; their later
  (SimCLRv2) code defaults to three.
- The loss trained on is their objective.py's loss_a + loss_b: the sum of the
  two directions, i.e. 2x Eq. (1)'s mean over the 2N views (--loss-scale sum).
  Under LARS this is not a 2x lr: the trust ratio normalises the adapted
  weights' step (only the gradient's balance against weight decay shifts),
  while BN and bias parameters (not adapted) move twice as far. --loss-scale
  mean trains on Eq. (1) as printed. nt_xent_loss itself is always the mean.
- --lr-scaling sqrt without --lr uses App. B.1's base 0.075 (0.075 x sqrt(B)),
  not the linear rule's base.
"""
import argparse
import functools
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    g.add_argument("--loss-scale", default="sum", choices=("sum", "mean"),
                   help="sum: loss_a + loss_b over the two directions, the authors' objective.py (default); "
                        "mean: Eq. (1)'s mean over the 2N views (half of it)")
    args = parser.parse_args(argv)
    if args.lr is None and args.lr_scaling == "sqrt":
        args.lr = 0.075  # App. B.1: "learning rate = 0.075 x sqrt(BatchSize)"
    recipes = {  # "small": the authors' CIFAR-10 command (their README); "large": the paper's ImageNet setting (Sec. 4)
        "small": dict(arch="resnet18", epochs=1000, batch_size=512, lr=1.0, weight_decay=1e-4, warmup_epochs=10,
                      tau=0.5, color_strength=0.5, blur=0.0),
        "large": dict(arch="resnet50", epochs=100, batch_size=4096, lr=0.3, weight_decay=1e-6, warmup_epochs=10,
                      tau=0.1, color_strength=1.0, blur=0.5),
    }
    return common.finish_args(args, "simclr", recipes)


# ---------------------------------------------------------------------------
# Views (App. A)
# ---------------------------------------------------------------------------

class SimCLRViews:
    """Two independent draws t, t' ~ T of the SimCLR augmentation (Algorithm 1)."""

    def __init__(self, args):
        s = args.color_strength
        self.t = common.view_transform(args.image_size, scale=(0.08, 1.0),
                                       jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), p_blur=args.blur)
        self.names = ["t(x)", "t'(x)"]  # --save-views columns, in __call__'s order

    def __call__(self, img):
        return [common.to_tensor(self.t(img)), common.to_tensor(self.t(img))]


# ---------------------------------------------------------------------------
# Model (Sec. 2.1): encoder f and projection head g
# ---------------------------------------------------------------------------

class SimCLR(nn.Module):
    def __init__(self, arch, image_size, proj_dim, head_bn=True):
        super().__init__()
        self.backbone, dim = common.resnet(arch, image_size)   # f: [B, 3, S, S] -> h [B, dim]
        if head_bn:  # the authors' head: Linear -> BN -> ReLU -> Linear -> BN (no shift), biases folded into BN
            self.projector = nn.Sequential(
                nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                nn.Linear(dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim))
            self.projector[-1].bias.requires_grad_(False)      # center=False in their code: beta stays 0
        else:        # Sec. 2.1: z = W2 relu(W1 h), hidden as wide as h
            self.projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, proj_dim))

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

def train_one_epoch(model, loader, optimizer, scaler, lr_at, epoch, step, stop_at, args, ctx, progress, stop):
    """Trains from optimizer step `step` to the end of the epoch (or stop_at,
    or a stop request). Returns (step, epoch means of loss and z-std, stopped)."""
    model.train()
    sums, n, stopped = torch.zeros(3, device=ctx.device), 0, False  # loss, z-std, skipped steps: summed on the device
    for (x1, x2), _ in loader:
        lr = lr_at(step)
        common.set_lr(optimizer, lr)
        x1 = common.to_device(x1, ctx, args.data, args.channels_last)  # uint8 -> normalised float
        x2 = common.to_device(x2, ctx, args.data, args.channels_last)
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
        skipped = common.scaler_step(scaler, optimizer)  # AMP: 1 where fp16 skipped a step with overflowing gradients
        step += 1
        z_std = common.embedding_std(z1)  # collapse indicator: ~1/sqrt(D) healthy, 0 collapsed
        sums += torch.stack([loss.detach(), z_std, skipped])
        n += 1
        if step % args.log_every == 0 or step == stop_at:
            if ctx.main:  # log steps hold the loop's only host syncs: this and check_loss
                print(progress.line(epoch, args.epochs, step, loss.item(), lr, f"  z-std {z_std:.3f}", data=loader), flush=True)
            stop.check_loss(ctx, loss, step, lr, scaler)  # non-finite on any rank: every rank ends in one line
        stopped = stop.pending(ctx)  # every step, on every rank alike: a stop request loses at most one step
        if stopped or step >= stop_at:
            break
    loss, z_std, skipped = sums.tolist()
    return step, dict(loss=loss / max(n, 1), z_std=z_std / max(n, 1), skipped_steps=round(skipped)), stopped


def main(argv=None):
    args = get_args(argv)
    ctx = common.setup(args)
    pretrain_set, train_set, test_set = common.load_data(args, ctx)
    loader, sampler = common.train_loader(pretrain_set, SimCLRViews(args), args.batch_size, args.workers, args.seed, ctx)
    if args.save_views:  # look before you train: a PNG of the epoch-0 views of the first images, then stop
        common.save_views(args, loader.dataset, ctx)
        return common.teardown()

    model = SimCLR(args.arch, args.image_size, args.proj_dim, args.head_bn).to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    scale = args.batch_size / 256 if args.lr_scaling == "linear" else math.sqrt(args.batch_size)
    base_lr = args.lr * scale  # Sec. 4: 0.3 x B/256; App. B.1: 0.075 x sqrt(B)
    optimizer = common.LARS(common.param_groups(model, args.weight_decay), lr=base_lr, momentum=0.9, eta=0.001)
    scaler = ctx.grad_scaler()
    step = common.resume(args, model, optimizer, scaler)  # DDP: resume, then wrap: DDP sends rank 0's weights to all
    ddp_model = common.ddp(model, ctx)  # SyncBN on GPUs: global BN (Sec. 3)
    common.start_run(args, ctx)  # after resume() accepted OUT's checkpoint: a refused run leaves OUT untouched

    steps_per_epoch = sampler.steps
    total_steps = args.epochs * steps_per_epoch
    stop_at = min(total_steps, args.max_steps or total_steps)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    lr_at = functools.partial(common.lr_at, total_steps=total_steps, warmup_steps=warmup_steps, base_lr=base_lr)
    progress, stop = common.Progress(stop_at, step, args.batch_size), common.StopSignal()
    if ctx.main:
        print(f"simclr: {args.arch} on {args.data} ({len(pretrain_set)} images), {ctx.world} process(es) on {ctx.device}, "
              f"batch {args.batch_size}, lr {base_lr:.4g}, {steps_per_epoch} steps/epoch, from step {step}", flush=True)

    epoch = step // steps_per_epoch
    while step < stop_at:
        sampler.set_epoch(epoch, start_step=step - epoch * steps_per_epoch)
        progress.restart(step)
        t0, first_step = time.perf_counter(), step
        step, stats, stopped = train_one_epoch(ddp_model, loader, optimizer, scaler, lr_at, epoch, step, stop_at,
                                               args, ctx, progress, stop)
        elapsed = time.perf_counter() - t0
        record = dict(epoch=epoch + 1, step=step, **stats, lr=lr_at(step - 1),
                      images_per_s=(step - first_step) * args.batch_size / elapsed, data_wait=loader.data_wait(),
                      time=elapsed, complete=step == (epoch + 1) * steps_per_epoch)
        if record["complete"] and args.knn_every and ((epoch + 1) % args.knn_every == 0 or step == total_steps):
            record["knn_top1"] = common.knn_accuracy(model.backbone, train_set, test_set, common.num_classes(args.data, train_set),
                                                     ctx, args.image_size, args.data, workers=args.workers)
        if ctx.main:
            common.save_run(args, model, model.backbone, optimizer, scaler, step, epoch=step // steps_per_epoch)
            common.log_json(os.path.join(args.out, "log.jsonl"), record)
            print(f"epoch {epoch + 1} {'done' if record['complete'] else 'saved mid-way'}: loss {stats['loss']:.4f}"
                  + (f", kNN top-1 {record['knn_top1']:.2f}" if "knn_top1" in record else ""), flush=True)
        if stopped:
            if ctx.main:
                print(f"stopped at step {step}; run the same command again to resume", flush=True)
            break
        epoch += 1
    common.teardown()


if __name__ == "__main__":
    main()
