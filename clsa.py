"""CLSA: Contrastive Learning with Stronger Augmentations.
Wang and Qi, 2021 (ICLR 2021 submission; IEEE TPAMI 2022). https://arxiv.org/abs/2104.07713

Idea: MoCo v2 (a query encoder, a momentum key encoder and a queue of past
keys) plus strongly augmented views S(x). Pushing S(x) straight onto its key
hurts (Table 4): the distortions can destroy the image's identity. Instead the
strong query is asked to match the weak query's DISTRIBUTION of similarities
over the bank of the positive key and the K queued keys (Sec. 3.2).

Objective: L = L_C + beta * sum over strong views of L_D (Algorithm 1, line 7).
L_C is the contrastive loss of the weak query against its key and the queue,
Eq. (1); L_D is the cross-entropy from p(.|z'), the weak query's softmax over
the 1+K bank (a fixed target), to p(.|z''), the strong query's, Eq. (3)-(4).

Views (Sec. 3.3): key T(x) and weak query T'(x) are two draws of the MoCo v2
augmentation (crop 0.2-1, jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale p=0.2, blur
p=0.5, flip); a strong view is its own weak-style crop at its own size, then
5 draws of one of the 14 Table 1 ops, each applied with p=0.5. CLSA-Single:
one 96 px strong crop (ImageNet); CLSA-Multi: --strong-sizes 224 192 160 128 96.

    python clsa.py --data cifar10
    torchrun --nproc_per_node=8 clsa.py --data imagenet --data-dir /datasets/imagenet

Deviations from the paper:
- The paper has no CIFAR-size recipe: those data sets get MoCo v2's CIFAR one
  (MoCo's CIFAR demo: ResNet-18 with the CIFAR stem, K=4096, alpha 0.99,
  lr 0.06 x B/256, wd 5e-4, B=512, 200 epochs, cosine, no blur, BN over 8
  groups, head hidden layer as wide as f's output: 512) with one strong view
  at the image size and the paper's tau 0.2 (the demo uses 0.1).
- The paper trains on 8 GPUs with shuffle-BN. In one process the BN of both
  encoders normalises over --bn-splits groups of the batch (8, as MoCo's
  CIFAR demo) and the key batch is shuffled first, which simulates it.
- Sec. 3.3 does not say how the strong crops are drawn; this file crops each
  strong view on its own with the weak crop's area range scaled by
  size / image size (0.086-0.429 for 96 px of 224, as in the authors' code).
- Follows the paper where the authors' code differs: one weak query (Sec. 4.2),
  a bank of [own key, queue] (Eq. (3)); their CLSA-Multi command also trains a
  weak crop at every strong size and puts all current keys in the bank.
"""
import argparse
import copy
import functools
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import common

VARIANTS = ("clsa", "mocov2", "strong-query", "strong-query-key", "contrastive")


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="CLSA pre-training (Wang and Qi 2021)")
    common.add_base_args(parser)
    g = parser.add_argument_group("CLSA")
    g.add_argument("--tau", type=float, default=0.2, help="tau, temperature of Eq. (1) and (3); 0.2, Sec. 3.1")
    g.add_argument("--beta", type=float, default=1.0, help="beta, weight of L_D, Algorithm 1; 1.0, Sec. 3.3")
    g.add_argument("--queue-size", type=int, default=None,
                   help="K, keys in the queue Q, Eq. (1); 65536 ImageNet (Sec. 3.3), 4096 CIFAR (MoCo's CIFAR demo)")
    g.add_argument("--ema-momentum", type=float, default=None,
                   help="alpha, key encoder momentum, Algorithm 1 line 8; 0.999 ImageNet (Sec. 3.3), 0.99 CIFAR (MoCo's CIFAR demo)")
    g.add_argument("--proj-dim", type=int, default=128, help="output size of the heads g, Sec. 3.3 (MoCo v2); 128")
    g.add_argument("--hidden-dim", type=int, default=None,
                   help="hidden width of the 2-layer MLP heads g; default: as wide as f's output (2048 for ResNet-50, "
                        "Sec. 3.3; 512 for ResNet-18, MoCo's CIFAR demo)")
    g.add_argument("--strong-sizes", type=int, nargs="+", default=None,
                   help="side of each strong view S(x), Sec. 4.2; 96 ImageNet (CLSA-Single), the image size on CIFAR-size "
                        "data; CLSA-Multi: 224 192 160 128 96")
    g.add_argument("--strong-scales", type=float, nargs="+", default=None,
                   help="crop area range, one MIN MAX pair per strong size (default: 0.2-1, the weak crop's, times "
                        "size / image size: 0.086-0.429 for 96 of 224, the authors' code)")
    g.add_argument("--strong-draws", type=int, default=5, help="ops drawn per strong view, Sec. 3.3; 5")
    g.add_argument("--strong-p", type=float, default=0.5, help="probability of applying each drawn op, Sec. 3.3; 0.5")
    g.add_argument("--blur", type=float, default=None,
                   help="probability of Gaussian blur in T, T' (MoCo v2); 0.5 ImageNet, 0 CIFAR (MoCo's CIFAR demo)")
    g.add_argument("--bn-splits", type=int, default=None,
                   help="BN groups per process batch, simulating shuffle-BN on one GPU (MoCo's CIFAR demo); "
                        "default 8 in one process, 1 (and only 1) under torchrun, where the key batch is shuffled across GPUs")
    g.add_argument("--variant", default="clsa", choices=VARIANTS,
                   help="Table 4 row: clsa; mocov2 (no strong view); strong-query (MoCo v2 with the strong views as "
                        "queries); strong-query-key (and a strongly augmented key); contrastive (L_C in place of L_D)")
    args = parser.parse_args(argv)
    recipes = {  # "small": MoCo v2's CIFAR recipe (the paper has none); "large": the paper's ImageNet setting (Sec. 3.3, 4.1)
        "small": dict(arch="resnet18", epochs=200, batch_size=512, lr=0.06, weight_decay=5e-4, warmup_epochs=0,
                      queue_size=4096, ema_momentum=0.99, blur=0.0),
        "large": dict(arch="resnet50", epochs=200, batch_size=256, lr=0.03, weight_decay=1e-4, warmup_epochs=0,
                      queue_size=65536, ema_momentum=0.999, blur=0.5, strong_sizes=[96]),
    }
    args = common.finish_args(args, "clsa", recipes)
    return check_clsa_args(args, world=int(os.environ.get("WORLD_SIZE", 1)))


def check_clsa_args(args, world):
    """Derived defaults (strong crops, BN groups) and the checks that need several flags."""
    usage = functools.partial(common.fail, code=common.USAGE)
    args.strong_sizes = args.strong_sizes or [args.image_size]
    if args.strong_scales is None:
        ratios = [min(1.0, s / args.image_size) for s in args.strong_sizes]
        args.strong_scales = [v for r in ratios for v in (0.2 * r, r)]
    if len(args.strong_scales) != 2 * len(args.strong_sizes):
        usage(f"--strong-scales needs a MIN MAX pair for each of the {len(args.strong_sizes)} --strong-sizes")
    if not all(0 < lo <= hi <= 1 for lo, hi in zip(args.strong_scales[::2], args.strong_scales[1::2])):
        usage("each --strong-scales pair must be 0 < MIN <= MAX <= 1")
    if min(args.strong_sizes) < 16:
        usage(f"--strong-sizes {min(args.strong_sizes)} is too small for a ResNet; use at least 16")
    if args.queue_size < args.batch_size:
        usage(f"--queue-size {args.queue_size} must hold at least one global batch of {args.batch_size} keys")
    if args.bn_splits is None:
        args.bn_splits = 8 if world == 1 else 1
    if world > 1 and args.bn_splits != 1:
        usage("--bn-splits must be 1 under torchrun: the key batch is shuffled across the GPUs instead (MoCo)")
    if args.bn_splits < 1 or args.batch_size // world % args.bn_splits:
        usage(f"the batch of {args.batch_size // world} per process does not split into "
              f"--bn-splits {args.bn_splits} BN groups")
    if not 0 <= args.ema_momentum <= 1:
        usage(f"--ema-momentum must be in [0, 1], got {args.ema_momentum}")
    return args


# ---------------------------------------------------------------------------
# Views (Sec. 3.3, Table 1)
# ---------------------------------------------------------------------------

class CLSAViews:
    """[key T(x), weak query T'(x), strong views S(x)...] (Algorithm 1, line 4).
    Table 4 variants: mocov2 drops the strong views, strong-query(-key) the weak
    query (and strong-query-key follows the key's T with S as well)."""

    def __init__(self, args):
        jitter = (0.4, 0.4, 0.4, 0.1)  # MoCo v2's colour jitter, the "weaker augmentation" of Sec. 3.3
        self.weak = common.view_transform(args.image_size, scale=(0.2, 1.0), jitter=jitter, p_blur=args.blur)
        strong = common.StrongAugment(args.strong_draws, args.strong_p)  # Table 1: 14 ops, `draws` tries with p each
        self.key = T.Compose([self.weak, strong]) if args.variant == "strong-query-key" else self.weak
        self.with_weak = args.variant not in ("strong-query", "strong-query-key")
        scales = zip(args.strong_scales[::2], args.strong_scales[1::2])
        self.strong = [] if args.variant == "mocov2" else [
            T.Compose([common.view_transform(size, scale=scale, jitter=jitter, p_blur=args.blur), strong])
            for size, scale in zip(args.strong_sizes, scales)]

    def __call__(self, img):
        views = [self.key(img)] + ([self.weak(img)] if self.with_weak else []) + [s(img) for s in self.strong]
        return [common.to_tensor(v) for v in views]


# ---------------------------------------------------------------------------
# Model (Algorithm 1): query encoder f_theta + g_theta, key encoder f_phi +
# g_phi (a momentum copy, never trained by gradient) and the queue Q
# ---------------------------------------------------------------------------

class CLSA(nn.Module):
    def __init__(self, arch, image_size, hidden_dim, proj_dim, queue_size, ema_momentum, bn_splits):
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
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # row the next key goes to

    def query_parameters(self):
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def key_parameters(self):
        return [*self.backbone_k.parameters(), *self.projector_k.parameters()]

    @torch.no_grad()
    def momentum_update(self):
        """Algorithm 1, line 8: phi <- alpha * phi + (1 - alpha) * theta, for every
        parameter (one fused kernel per op rather than two per tensor). The key
        encoder's BN running statistics stay its own, as in MoCo."""
        phi, theta = self.key_parameters(), self.query_parameters()
        torch._foreach_mul_(phi, self.ema_momentum)
        torch._foreach_add_(phi, theta, alpha=1.0 - self.ema_momentum)

    @torch.no_grad()
    def enqueue(self, k):
        """FIFO (Sec. 3.1): this step's keys from ALL processes, in rank order (the
        one-process batch order), overwrite the oldest rows; the pointer wraps
        around, so K need not be a multiple of the global batch."""
        k = common.concat_all_gather(k)  # DDP: [B, D] on every rank, so every rank keeps the same queue
        rows = (self.queue_ptr + torch.arange(len(k), device=k.device)) % len(self.queue)
        self.queue[rows] = k.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(k)) % len(self.queue))

    def forward(self, x_k, xs_q, shuffle_seed):
        """x_k: [n, 3, S, S] key views; xs_q: list of query-view batches [n, 3, s, s]
        (weak first, then strong; sizes may differ). Returns (one [n, D] projection
        per query view, keys k [n, D] unit rows, the queue [K, D] as it was before
        this step's keys were enqueued)."""
        # One pass per view, so BN normalises over one kind of view, as MoCo's
        # queries; a 96 px strong view costs (96/224)^2 = 18% of a 224 px one.
        qs = [self.projector(self.backbone(x)) for x in xs_q]
        with torch.no_grad():
            self.momentum_update()  # before the keys, as MoCo
            # DDP: shuffle-BN (MoCo Sec. 3.3): the key batch is permuted across all
            # processes (an all-gather of the images), so a key's BN statistics come
            # from other images than its query's; in one process, with split BN.
            x_k, unshuffle = common.batch_shuffle(x_k, shuffle_seed)
            k = F.normalize(self.projector_k(self.backbone_k(x_k)).float(), dim=1)
            k = common.batch_unshuffle(k, unshuffle)
        # A copy for the losses (autograd keeps it for backward), then FIFO update.
        # DDP: the queue is a buffer, so DDP also broadcasts it from rank 0 every
        # step (K x D x 4 bytes: 32 MB on ImageNet); the ranks' copies are equal anyway.
        queue = self.queue.clone()
        self.enqueue(k)
        return qs, k, queue


# ---------------------------------------------------------------------------
# Losses: L_C, Eq. (1), and L_D, Eq. (3)-(4)
# ---------------------------------------------------------------------------

def bank_logits(q, k, queue, tau):
    """sim(q_i, .) / tau over the bank of query i: its own key k_i (column 0) and
    the K queued keys. q, k: [N, D], queue: [K, D]; returns float32 [N, 1+K]."""
    q, k, queue = (F.normalize(t.float(), dim=1) for t in (q, k, queue))  # Eq. (2): cosine similarity
    return torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / tau


def contrastive_loss(q, k, queue, tau):
    """L_C, Eq. (1) in MoCo's form: q, k [N, D] query and key projections of N
    images, queue [K, D]. Mean over i of -log softmax of the positive k_i among
    the 1+K bank entries. Any float dtype in, float32 scalar out."""
    logits = bank_logits(q, k, queue, tau)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def ddm_loss(q_weak, q_strong, k, queue, tau):
    """L_D, Eq. (3)-(4): p_w = softmax over the 1+K bank [k_i, queue] of the weak
    query (a target: no gradient), log p_s = log_softmax of the strong query's;
    mean over i of -sum_j p_w log p_s. q_weak, q_strong, k: [N, D], queue [K, D].
    Any float dtype in, float32 scalar out."""
    p_weak = F.softmax(bank_logits(q_weak, k, queue, tau).detach(), dim=1)
    log_p_strong = F.log_softmax(bank_logits(q_strong, k, queue, tau), dim=1)
    return -(p_weak * log_p_strong).sum(1).mean()


def clsa_objective(qs, k, queue, tau, beta=1.0, variant="clsa"):
    """L = L_C + beta * sum_s L_D (Algorithm 1, line 7), or a Table 4 variant.
    qs: the query projections in the order of CLSAViews (weak first if present)."""
    if variant in ("strong-query", "strong-query-key"):  # MoCo v2 whose queries are the strong views
        return sum(contrastive_loss(q, k, queue, tau) for q in qs)
    q, strong = qs[0], qs[1:]
    loss = contrastive_loss(q, k, queue, tau)  # L_C, Eq. (1); mocov2 stops here (no strong view)
    for q_s in strong:  # Sec. 4.2: L_D summed over the strong views
        pair = ddm_loss(q, q_s, k, queue, tau) if variant == "clsa" else contrastive_loss(q_s, k, queue, tau)
        loss = loss + beta * pair
    return loss


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def train_one_epoch(model, loader, optimizer, scaler, lr_at, epoch, step, stop_at, args, ctx, progress, stop):
    """Trains from optimizer step `step` to the end of the epoch (or stop_at,
    or a stop request). Returns (step, epoch means of loss and z-std, stopped)."""
    model.train()
    sums, n, stopped = torch.zeros(2, device=ctx.device), 0, False  # loss, z-std: summed on the device
    for (x_k, *xs_q), _ in loader:
        lr = lr_at(step)
        common.set_lr(optimizer, lr)
        x_k = common.to_device(x_k, ctx, args.data, args.channels_last)  # uint8 -> normalised float
        xs_q = [common.to_device(x, ctx, args.data, args.channels_last) for x in xs_q]
        with ctx.autocast():
            # The shuffle-BN permutation comes from (seed, step): a resumed run draws the same one.
            qs, k, queue = model(x_k, xs_q, args.seed * 10**9 + step)
        # DDP: each rank's loss is over its own queries; the queue holds every rank's keys.
        loss = clsa_objective(qs, k, queue, args.tau, args.beta, args.variant)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # AMP: scaled only in fp16
        scaler.step(optimizer)
        scaler.update()
        step += 1
        z_std = common.embedding_std(qs[0])  # collapse indicator: ~1/sqrt(D) healthy, 0 collapsed
        sums += torch.stack([loss.detach(), z_std])
        n += 1
        if step % args.log_every == 0 or step == stop_at:
            if ctx.main:  # the only host sync in the loop
                print(progress.line(epoch, args.epochs, step, loss.item(), lr, f"  z-std {z_std:.3f}"), flush=True)
            stopped = stop.agreed(ctx)  # DDP: every rank stops at the same step
        if stopped or step >= stop_at:
            break
    loss, z_std = (sums / max(n, 1)).tolist()
    return step, dict(loss=loss, z_std=z_std), stopped


def main(argv=None):
    args = get_args(argv)
    ctx = common.setup(args)
    pretrain_set, train_set, test_set = common.load_data(args, ctx)
    loader, sampler = common.train_loader(pretrain_set, CLSAViews(args), args.batch_size, args.workers, args.seed, ctx)

    model = CLSA(args.arch, args.image_size, args.hidden_dim, args.proj_dim, args.queue_size, args.ema_momentum,
                 args.bn_splits).to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = common.ddp(model, ctx, sync_bn=False)  # per-process BN, as MoCo: shuffle-BN guards the keys
    base_lr = args.lr * args.batch_size / 256  # Sec. 4.1: 0.03 at B=256; linear in the global batch (MoCo's rule)
    # Sec. 4.1: SGD, momentum 0.9, weight decay on every trained tensor (as MoCo); the key encoder is not trained.
    optimizer = torch.optim.SGD(model.query_parameters(), lr=base_lr, momentum=0.9, weight_decay=args.weight_decay)
    scaler = ctx.grad_scaler()
    step = common.resume(args, model, optimizer, scaler)
    common.start_run(args, ctx)  # after resume() accepted OUT's checkpoint: a refused run leaves OUT untouched

    steps_per_epoch = sampler.steps
    total_steps = args.epochs * steps_per_epoch
    stop_at = min(total_steps, args.max_steps or total_steps)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    lr_at = functools.partial(common.lr_at, total_steps=total_steps, warmup_steps=warmup_steps, base_lr=base_lr)
    progress, stop = common.Progress(stop_at, step, args.batch_size), common.StopSignal()
    if ctx.main:
        print(f"clsa: {args.arch} on {args.data} ({len(pretrain_set)} images), {ctx.world} process(es) on {ctx.device}, "
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
                      images_per_s=(step - first_step) * args.batch_size / elapsed,
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
