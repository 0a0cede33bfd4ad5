"""ReSSL: Relational Self-Supervised Learning with Weak Augmentation.
Zheng, You, Wang, Qian, Zhang, Wang and Xu, NeurIPS 2021. https://arxiv.org/abs/2107.09282

Idea: no instance is pushed away from another. A teacher (an EMA of the
student, Eq. (6)) sees a WEAKLY augmented view and says how similar the image
is to each of K past embeddings in a memory buffer Q; the student sees a
strongly (contrastively) augmented view and must reproduce that relation. The
teacher's relation is sharpened (tau_t < tau_s) so that it stresses the most
similar entries (Sec. 3.2, 4.1). The student encoder f_s is what transfers.

Objective: relational consistency, Eq. (3)-(5) and Algorithm 1:
p_t = softmax(z_t Q^T / tau_t) (Eq. (3), a detached target), p_s =
softmax(z_s Q^T / tau_s) (Eq. (4)), loss = H(p_t, p_s) (Eq. (5): the KL up to
the constant H(p_t)). Q is read BEFORE this step's teacher keys enter it.

Views: teacher: random resized crop (area 0.2-1) + flip only (Sec. 4.2,
Table 4); student: crop 0.2-1, flip, colour distortion of strength 0.5 with
p=0.8, grayscale p=0.2, Gaussian blur p=0.5 (Sec. 4), the blur as MoCo v2
and the authors' code apply it: PIL's GaussianBlur of radius sigma 0.1-2 px
on the image (common.RandomPILBlur), not SimCLR's kernel of 10% of the side
(3 px at 32 px, which barely blurs). With several student crops (2x
backprop, multi-crop, Sec. 5) each is forwarded on its own (BN statistics per
crop, as the authors' multi-crop code), matched to the same teacher relation,
and the loss is the mean over crops.

    python ressl.py --data cifar10
    torchrun --nproc_per_node=8 ressl.py --data imagenet --data-dir /datasets/imagenet

Deviations from the paper:
- The paper gives no batch size for CIFAR-size data; B=256 here (Table 5
  runs K=256, so a batch fits the smallest buffer it reports).
- Projection head without BN: 2048 hidden, 128-d out on CIFAR-size data
  (the authors' small-data code; the paper gives no sizes there, and MoCo v2's
  head, which Sec. 4 builds on, is `--proj-hidden 512`); 4096 hidden, 512 out
  on ImageNet (Sec. 5).
- tau_t: 0.05 on CIFAR-10 and STL-10, 0.04 elsewhere, the best value of
  Table 2 per data set, which is what Table 1 reports (90.20, 63.79, 88.25,
  46.60); Sec. 5 calls 0.04 "the best setting from Table 2" (`--tau-t 0.04`
  applies it to every data set).
- Stem: a 3x3 stride-1 first convolution at 32 and 64 px; the max-pool is
  removed "for a small dataset" (Sec. 4), the paper's name for CIFAR, so
  STL-10 and Tiny ImageNet at 64 px keep it, as the authors' small-data code
  (the rule lives in common.resnet).
- ImageNet: BN and bias parameters get no weight decay (KyleZheng1997/ReSSL
  `ressl.py`; the paper is silent): `--no-exclude-bn-bias` decays them too.
  CIFAR-size data: every parameter is decayed (`--exclude-bn-bias` to change).
- Multi-crop area scales are not in the paper ("the same as AdCo"): a crop of
  side s gets area (0.2 s/S, s/S) of the image, S = --image-size, as in
  AdCo's and CLSA's code (96 px: 0.086-0.429).
- The ImageNet warmup (5 epochs, then cosine) and weight decay (1e-4) are not
  stated in Sec. 5; they come from the authors' ImageNet trainer,
  KyleZheng1997/ReSSL `ressl.py` (HEAD 4d67daa: `warm_up = 5` in
  adjust_learning_rate; SGD momentum 0.9 with weight_decay 1e-4 on all but the
  'bn'/'bias' parameters, lr 0.05, 200 epochs), not from the small-data recipe
  or MoCo v2. The same commit confirms ImageNet's tau_t 0.04 and tau_s 0.1
  (ressl.py), K = 131072 and m = 0.999 (network/ressl.py) and the
  2048-4096-512 head (network/head.py ProjectionHead).
- Small-data settings that could NOT be checked against the authors' code:
  their CIFAR-10/100, STL-10 and Tiny ImageNet code is published only as a
  Google Drive archive linked from the README, not in the repository, so it
  was not read. Resting on that code alone (the paper is silent) and so
  unverified: the head sizes dim-2048-128, the stem rule (max-pool kept at
  64 px), weight decay on every parameter (no BN/bias exclusion) and the
  5-epoch warmup on small data (B=256 is this file's choice, above). The small-data lr, weight decay, m, K and
  tau_t follow the paper's text (Sec. 4, Tables 1-2) as cited in --help, also
  without the code to confirm them.
"""
import argparse
import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import common


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="ReSSL pre-training (Zheng et al. 2021)")
    common.add_base_args(parser)
    g = parser.add_argument_group("ReSSL")
    g.add_argument("--tau-s", type=common.positive_float, default=0.1, help="tau_s, student temperature, Eq. (4); 0.1 (Table 2)")
    g.add_argument("--tau-t", type=common.positive_float, default=None,
                   help="tau_t, teacher temperature, Eq. (3), below tau_s for a sharper target (Sec. 3.2); 0.05 on "
                        "CIFAR-10 and STL-10, 0.04 elsewhere (the best of Table 2 per data set, as Table 1 reports)")
    g.add_argument("--ema-momentum", type=common.probability, default=None,
                   help="m, teacher EMA momentum, Eq. (6); 0.99 small, 0.996 STL-10/Tiny ImageNet (Sec. 4), 0.999 ImageNet")
    g.add_argument("--queue-size", type=common.positive_int, default=None,
                   help="K, memory buffer size, Sec. 3.2; 4096 small, 16384 STL-10/Tiny ImageNet (Sec. 4), "
                        "131072 ImageNet (Sec. 5: 130k)")
    g.add_argument("--proj-dim", type=common.positive_int, default=None,
                   help="output size of the head g; 128 small (MoCo v2), 512 ImageNet (Sec. 5)")
    g.add_argument("--proj-hidden", type=common.positive_int, default=None,
                   help="hidden size of the head g; 2048 small (the authors' small-data code, published only as an archive: "
                        "unverified), 4096 ImageNet (Sec. 5; KyleZheng1997/ReSSL network/head.py)")
    g.add_argument("--teacher-aug", default="weak", choices=("weak", "contrastive"),
                   help="teacher view: weak = crop + flip (Sec. 4.2); contrastive = the student's recipe (Table 3, row 1)")
    g.add_argument("--student-crops", type=common.positive_int, nargs="+", default=None,
                   help="sides of the student crops: one (1x backprop, default: --image-size), two equal (2x backprop, "
                        "Table 6), or e.g. 224 192 160 128 96 (multi-crop, Table 7)")
    g.add_argument("--bn-splits", type=common.positive_int, default=None,
                   help="BN groups per process, shuffle-BN simulated on one GPU (Sec. 4); default 8 in one process "
                        "(MoCo's one-GPU recipe), 1 under torchrun (per-GPU BN, teacher batch shuffled across GPUs)")
    g.add_argument("--exclude-bn-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="no weight decay on BN and bias parameters; on for ImageNet (KyleZheng1997/ReSSL ressl.py), "
                        "off on small data")
    args = parser.parse_args(argv)
    if args.data == "stl10" and args.image_size is None:
        args.image_size = 64  # Sec. 4: "medium" data sets are resized to 64x64
    if args.data in common.LARGE_DATA:  # the paper's ImageNet setting (Sec. 5)
        recipe = dict(arch="resnet50", epochs=200, batch_size=256, lr=0.05, weight_decay=1e-4, warmup_epochs=5,
                      ema_momentum=0.999, queue_size=131072, proj_dim=512, proj_hidden=4096, exclude_bn_bias=True)
    else:                               # Sec. 4: CIFAR-size and the "medium" data sets
        medium = args.data in ("stl10", "tinyimagenet")
        recipe = dict(arch="resnet18", epochs=200, batch_size=256, lr=0.06, weight_decay=5e-4, warmup_epochs=5,
                      ema_momentum=0.996 if medium else 0.99, queue_size=16384 if medium else 4096, proj_dim=128,
                      proj_hidden=2048, exclude_bn_bias=False)
    args = common.apply_recipe(args, "ressl", recipe)
    if args.tau_t is None:
        args.tau_t = 0.05 if args.data in ("cifar10", "stl10") else 0.04  # Table 2's best, used for Table 1
    if args.student_crops is None:
        args.student_crops = [args.image_size]
    if not all(16 <= s <= args.image_size for s in args.student_crops):
        common.fail(f"--student-crops sides must lie between 16 and --image-size {args.image_size}", common.USAGE)
    return args  # --bn-splits depends on the number of processes: main() completes it after common.setup


# ---------------------------------------------------------------------------
# Views (Sec. 4, 4.2, 5)
# ---------------------------------------------------------------------------

class ReSSLViews:
    """[teacher view T_w(x), student crop 1, ..., student crop C] (Algorithm 1)."""

    def __init__(self, args):
        size = args.image_size

        def contrastive(side, scale):  # the student's T_s (Sec. 4): a crop of `side` px covering `scale` of the area
            return T.Compose([
                T.RandomResizedCrop(side, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),  # colour distortion, strength 0.5
                T.RandomGrayscale(p=0.2),
                # Gaussian blur p=0.5 as MoCo v2 and KyleZheng1997/ReSSL data/augmentation.py: PIL radius 0.1-2 px
                T.RandomApply([common.RandomPILBlur((0.1, 2.0))], p=0.5),
            ])
        weak = T.Compose([  # the teacher's T_w (Sec. 4.2, Table 4): crop + flip only
            T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
        ])
        self.teacher = weak if args.teacher_aug == "weak" else contrastive(size, (0.2, 1.0))  # Table 3, row 1
        self.students = [contrastive(s, (0.2 * s / size, s / size)) for s in args.student_crops]  # AdCo's scales
        self.names = ["teacher T_w(x)"] + [f"student T_s(x) {s}px" for s in args.student_crops]  # --save-views columns

    def __call__(self, img):
        return [common.to_tensor(self.teacher(img))] + [common.to_tensor(t(img)) for t in self.students]


# ---------------------------------------------------------------------------
# Model (Sec. 3.2, Algorithm 1): student f_s + g_s, teacher f_t + g_t = EMA of
# the student (Eq. (6)), memory buffer Q of K past teacher embeddings
# ---------------------------------------------------------------------------

class ReSSL(nn.Module):
    def __init__(self, arch, image_size, proj_dim, proj_hidden, queue_size, bn_splits, seed=0):
        super().__init__()
        self.backbone, dim = common.resnet(arch, image_size)   # f_s: [B, 3, S, S] -> h [B, dim]
        common.split_bn(self.backbone, bn_splits)               # Sec. 4: BN statistics per group of the batch
        hidden = proj_hidden or dim
        self.projector = nn.Sequential(                         # g_s: two layers, Sec. 3.1
            nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim))
        self.teacher = nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.projector))  # f_t, g_t
        self.teacher.requires_grad_(False)                      # trained only by Eq. (6)
        # Q: [K, D] L2-normalised rows, FIFO; random until K keys have arrived (as MoCo's queue).
        # Drawn from `seed` alone, so every process starts from the same Q.
        queue = torch.randn(queue_size, proj_dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("queue", F.normalize(queue, dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # DDP: Q is identical on every process by construction (same seed, same gathered keys): main() names it
        # to common.ddp, which leaves it out of the broadcast before every forward (256 MB on ImageNet).

    def forward(self, x_t, crops, shuffle_seed):
        """x_t: [n, 3, S, S] teacher view; crops: list of C student views [n, 3, s_c, s_c].
        Returns z_t [n, D] (no gradient) and a list of C student embeddings z_s [n, D]."""
        with torch.no_grad():
            # Shuffle-BN (MoCo): the teacher normalises over other images than the student, so
            # batch statistics cannot tell it which row is which. The permutation comes from the step.
            x, unshuffle = common.batch_shuffle(x_t, shuffle_seed)
            z_t = common.batch_unshuffle(self.teacher(x), unshuffle)
        # One pass per student crop, even for crops of the same size (2x backprop): BN statistics per crop, as
        # the authors' multi-crop code (KyleZheng1997/ReSSL network/ressl_multi.py).
        z_s = [self.projector(self.backbone(x)) for x in crops]
        return z_t, z_s

    @torch.no_grad()
    def update_teacher(self, m):
        """Eq. (6) for f and g, parameter by parameter (two small kernels per tensor). The teacher's BN
        running statistics are its own (its forward passes), as for MoCo's key encoder."""
        student = [*self.backbone.parameters(), *self.projector.parameters()]
        for theta_t, theta_s in zip(self.teacher.parameters(), student):
            theta_t.mul_(m).add_(theta_s.detach(), alpha=1 - m)  # Eq. (6): theta_t <- m theta_t + (1 - m) theta_s

    @torch.no_grad()
    def enqueue(self, keys):
        """FIFO: write keys [B, D] (all processes' teacher embeddings) over the oldest rows of Q,
        wrapping around the end; when B > K only the newest K survive, as if written one by one."""
        K, B = self.queue.shape[0], keys.shape[0]
        rows = (self.queue_ptr + torch.arange(B, device=keys.device)) % K
        self.queue[rows[-K:]] = F.normalize(keys[-K:].float(), dim=1)
        self.queue_ptr.copy_((self.queue_ptr + B) % K)


# ---------------------------------------------------------------------------
# Loss: relational consistency, Eq. (3)-(5)
# ---------------------------------------------------------------------------

def relational_loss(z_student, z_teacher, queue, tau_s, tau_t):
    """Eq. (3)-(5). z_student, z_teacher: [N, D] embeddings of two views of the
    same N images (any float dtype); queue: [K, D] memory buffer. Returns a
    float32 scalar: mean over i of H(p_t_i, p_s_i) = -sum_k p_t_ik log p_s_ik,
    with p_t_i = softmax_k(sim(z_t_i, Q_k) / tau_t) detached (a target) and
    p_s_i = softmax_k(sim(z_s_i, Q_k) / tau_s). Only Q is compared with: no
    positive column. Multi-crop: z_student may stack C student crops of the
    same N images, [C*N, D] crop after crop; each crop is matched to the same
    p_t (computed once) and the loss is the mean over crops and images."""
    if len(z_student) % len(z_teacher):
        raise ValueError(f"{len(z_student)} student rows are not a whole number of crops of {len(z_teacher)} images")
    z_s = F.normalize(z_student.float(), dim=1)
    z_t = F.normalize(z_teacher.detach().float(), dim=1)
    queue = F.normalize(queue.detach().float(), dim=1)
    p_t = F.softmax(z_t @ queue.T / tau_t, dim=1)               # Eq. (3): [N, K], sharper (tau_t < tau_s)
    log_p_s = F.log_softmax(z_s @ queue.T / tau_s, dim=1)       # Eq. (4): [C*N, K]
    return -(p_t * log_p_s.view(-1, *p_t.shape)).sum(dim=2).mean()  # Eq. (5): H(p_t, p_s); H(p_t) is a constant


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def train_one_epoch(model, loader, optimizer, scaler, lr_at, run, args, ctx):
    """One pass over the loader (a resumed run re-enters its epoch where it stopped)."""
    model.train()
    net = common.unwrap(model)  # the teacher and Q are updated outside the DDP forward
    for (x_t, *crops), _ in loader:
        common.set_lr(optimizer, lr_at(run.step))
        x_t = common.normalize_on_device(x_t, ctx, args.data, args.channels_last)  # uint8 -> normalised float
        crops = [common.normalize_on_device(x, ctx, args.data, args.channels_last) for x in crops]
        with ctx.autocast():
            z_t, z_s = model(x_t, crops, shuffle_seed=args.seed * 2**32 + run.step)  # exact resume: seed from the step
        # Every student crop is matched to the same teacher relation, against Q before this step's keys.
        # One call over all crops (the mean over crops of each crop's mean), so the [K, D] buffer is
        # normalised and kept for backward, and p_t computed, once per step, not once per crop.
        loss = relational_loss(torch.cat(z_s), z_t, net.queue, args.tau_s, args.tau_t)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # AMP: scaled only in fp16
        scaler.step(optimizer)
        scaler.update()
        net.update_teacher(args.ema_momentum)       # Algorithm 1: after the student's update
        net.enqueue(common.concat_all_gather(z_t))  # DDP: every process enqueues the same global batch of keys
        if run.end_step(loss, z_s[0]):  # progress line, finite-loss check, stop request
            return


def main(argv=None):
    args = get_args(argv)
    ctx = common.setup(args)
    if args.bn_splits is None:  # Sec. 4: shuffle-BN simulated by BN groups in one process (MoCo's one-GPU recipe)
        args.bn_splits = 8 if ctx.world == 1 else 1
    if args.batch_size % (ctx.world * args.bn_splits):
        common.fail(f"--batch-size {args.batch_size} does not split into {ctx.world} process(es) x {args.bn_splits} "
                    "BN groups; change --batch-size or --bn-splits", common.USAGE)
    data = common.load_data(args, ctx)
    loader = common.train_loader(data.pretrain, ReSSLViews(args), args.batch_size, args.workers, args.seed, ctx)
    if args.save_views:  # look before you train: a PNG of the epoch-0 views of the first images, then stop
        return common.save_views(args, loader.dataset, ctx)

    model = ReSSL(args.arch, args.image_size, args.proj_dim, args.proj_hidden, args.queue_size, args.bn_splits,
                  args.seed).to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    base_lr = args.lr * args.batch_size / 256  # Sec. 4: 0.06 x B/256; Sec. 5: 0.05 x B/256
    # Only the student (requires_grad) is optimised: the teacher follows Eq. (6) alone. ImageNet: BN and bias
    # parameters (the 1-D tensors) without weight decay, as KyleZheng1997/ReSSL ressl.py.
    student = (common.param_groups(model, args.weight_decay) if args.exclude_bn_bias
               else [p for p in model.parameters() if p.requires_grad])
    optimizer = torch.optim.SGD(student, lr=base_lr, momentum=0.9, weight_decay=args.weight_decay)  # Sec. 4
    scaler = ctx.grad_scaler()
    run = common.Run(args, ctx, model, optimizer, scaler, loader, data)  # resumes; DDP: before wrapping
    lr_at = functools.partial(common.lr_at, total_steps=run.total_steps, base_lr=base_lr,
                              warmup_steps=round(args.warmup_epochs * run.steps_per_epoch))
    ddp_model = common.ddp(model, ctx, sync_bn=False, same_on_every_rank=("queue", "queue_ptr"))  # per-GPU BN (Sec. 4)

    for epoch in run.epochs():
        train_one_epoch(ddp_model, loader, optimizer, scaler, lr_at, run, args, ctx)
        run.end_epoch()  # last.pt and backbone.pt, the kNN monitor, log.jsonl
    common.teardown()


if __name__ == "__main__":
    main()
