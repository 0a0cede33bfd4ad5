"""AAG (aag.py, arXiv 2009.07994): GNT-Xent against a term-by-term loop over
Algorithm 1, the three views and their provenance, the model, the recipe,
train_one_epoch's loss, end to end on the CPU with resume, and two
processes under torchrun."""
import copy
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms as T

import aag
import aag_dist_check as dist_
import common
import simclr
from conftest import make_run, noise_image, random_init_knn, run, torchrun


# ---------------------------------------------------------------------------
# GNT-Xent (Algorithm 1) against a literal loop
# ---------------------------------------------------------------------------

def cosine(a, b):
    """Cosine similarity of two 1-D tensors, written out element by element."""
    dot = sum(a[d] * b[d] for d in range(len(a)))
    na = torch.sqrt(sum(a[d] * a[d] for d in range(len(a))))
    nb = torch.sqrt(sum(b[d] * b[d] for d in range(len(b))))
    return dot / (na * nb)


def gnt_xent_reference(x, y, z, tau, keep_positive=False):
    """Algorithm 1 one image at a time: the s+ and s- of the paper, then
    L_xiyi, L_zixi, L_ziyi as written (ratios of exponentials inside -log);
    L = 1/n sum_i. keep_positive adds exp(s+) to each denominator (Eq. (3)).
    z=None: L_xiyi alone. Differentiable by autograd."""
    n = x.shape[0]
    s = lambda a, b: cosine(a, b) / tau
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        pos_xy = torch.exp(s(x[i], y[i]))
        den = sum(torch.exp(s(x[i], y[j])) + torch.exp(s(x[j], y[i])) + torch.exp(s(x[i], x[j]))
                  + torch.exp(s(y[i], y[j])) for j in others)
        total = total - torch.log(pos_xy / (den + (pos_xy if keep_positive else 0.0)))
        if z is None:
            continue
        for b in (x, y):  # L_zixi, then L_ziyi
            pos = torch.exp(s(z[i], b[i]))
            den_z = sum(torch.exp(s(z[i], b[j])) for j in others) + (pos if keep_positive else 0.0)
            den_b = sum(torch.exp(s(z[j], b[i])) for j in others) + (pos if keep_positive else 0.0)
            total = total - torch.log(pos / den_z * pos / den_b)
    return total / n


CASES = [  # (N, D, tau)
    (2, 3, 0.5),
    (3, 4, 0.1),
    (4, 5, 0.2),
    (5, 2, 1.0),
]


def batch(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, d, generator=g, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("keep_positive", [False, True])
@pytest.mark.parametrize("n,d,tau", CASES)
def test_loss_value_matches_algorithm_1(n, d, tau, keep_positive):
    """float64 and float32 inputs: the loss equals the per-image loop of
    Algorithm 1 (and of its NT-Xent variant), as a float32 scalar."""
    x, y, z = batch(n, d, 100 * n + d)
    ref = gnt_xent_reference(x, y, z, tau, keep_positive)
    for dtype in (torch.float64, torch.float32):
        loss = aag.gnt_xent_loss(x.to(dtype), y.to(dtype), z.to(dtype), tau, keep_positive=keep_positive)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("keep_positive", [False, True])
@pytest.mark.parametrize("n,d,tau", CASES)
def test_loss_gradients_match_algorithm_1(n, d, tau, keep_positive):
    """d loss / d x, y, z equal the loop reference's autograd gradients."""
    leaves = [t.clone().requires_grad_() for t in batch(n, d, 31 * n + d)]
    aag.gnt_xent_loss(*leaves, tau, keep_positive=keep_positive).backward()
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    gnt_xent_reference(*refs, tau, keep_positive).backward()
    for a, r in zip(leaves, refs):
        assert a.grad.dtype == torch.float64
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-6)
        assert r.grad.abs().max() > 1e-3


@pytest.mark.parametrize("keep_positive", [False, True])
def test_two_views_is_l_xy_alone(keep_positive):
    """z=None (--aux-policy none, Table 7 'Two Basic Views') gives mean_i L_xiyi, values and gradients."""
    x, y, _ = batch(4, 6, 2)
    a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = aag.gnt_xent_loss(a, b, None, 0.2, keep_positive=keep_positive)
    ra, rb = x.clone().requires_grad_(), y.clone().requires_grad_()
    ref = gnt_xent_reference(ra, rb, None, 0.2, keep_positive)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, ra.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, rb.grad, rtol=1e-5, atol=1e-6)


def test_known_value_by_hand():
    """x_i = y_i = z_i = e_i (N=2, orthogonal): every positive has s+ = 1/t and every
    negative s- = 0. GNT-Xent: L_xy = -1/t + log(4 terms), L_zx = L_zy = -2/t + log 1 + log 1,
    so L = -5/t + log 4, below zero: the positive is not in the denominator. NT-Xent
    (Eq. (3)): L_xy = -log(e^{1/t} / (e^{1/t} + 4)), L_zx = L_zy = -2 log(e^{1/t} / (e^{1/t} + 1))."""
    t = 0.5
    e = torch.eye(2, 3)
    assert aag.gnt_xent_loss(e, e, e, t).item() == pytest.approx(-5 / t + math.log(4), rel=1e-6)
    nt = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 4)) - 4 * math.log(math.exp(1 / t) / (math.exp(1 / t) + 1))
    assert aag.gnt_xent_loss(e, e, e, t, keep_positive=True).item() == pytest.approx(nt, rel=1e-6)


def test_positive_is_not_in_the_denominator():
    """Raising only s(x_0, y_0) lowers GNT-Xent by exactly the rise of s+ / tau / N
    (dL/ds+ = -1, Sec. 'Design considerations of loss function'): x_0 and y_0 live in two
    dimensions no other embedding uses, so every negative similarity stays 0 while y_0
    turns toward x_0. NT-Xent (Eq. (3)) has e^s+ in its denominator and falls by less."""
    tau, n = 0.3, 4
    g = torch.Generator().manual_seed(11)
    x = nn.functional.normalize(torch.cat([torch.randn(n, 4, generator=g), torch.zeros(n, 2)], 1), dim=1)
    y = nn.functional.normalize(torch.cat([torch.randn(n, 4, generator=g), torch.zeros(n, 2)], 1), dim=1)
    x[0] = torch.tensor([0, 0, 0, 0, 1.0, 0])
    gnt, nt, positives = [], [], []
    for angle in (1.2, 0.8, 0.3):
        y[0] = torch.tensor([0, 0, 0, 0, math.cos(angle), math.sin(angle)])
        positives.append(math.cos(angle))
        gnt.append(aag.gnt_xent_loss(x, y, None, tau).item())
        nt.append(aag.gnt_xent_loss(x, y, None, tau, keep_positive=True).item())
    for k in (1, 2):
        assert gnt[k] - gnt[0] == pytest.approx(-(positives[k] - positives[0]) / tau / n, rel=1e-5)
        assert 0 < nt[0] - nt[k] < gnt[0] - gnt[k]


def test_auxiliary_auxiliary_similarities_are_not_used():
    """Changing s(z_i, z_j) while every similarity with x and y stays fixed leaves the loss
    unchanged (no aux-aux pairs, Algorithm 1): the z's keep their components in the x/y
    subspace and their norms, and only rotate in two dimensions x and y never use. The same
    change does move a loss that contrasts z against z (SimCLR's NT-Xent of (z, x))."""
    g = torch.Generator().manual_seed(5)
    n, d = 6, 5
    x = torch.cat([torch.randn(n, d, generator=g), torch.zeros(n, 2)], 1)
    y = torch.cat([torch.randn(n, d, generator=g), torch.zeros(n, 2)], 1)
    core = torch.randn(n, d, generator=g)

    def aux(angles):
        return torch.cat([core, torch.stack([angles.cos(), angles.sin()], 1)], 1)

    z1, z2 = aux(torch.zeros(n)), aux(torch.linspace(0, 3, n))
    assert (z1 @ z1.T - z2 @ z2.T).abs().max() > 0.5   # aux-aux similarities did change
    torch.testing.assert_close(z1 @ x.T, z2 @ x.T)    # aux-core similarities did not
    torch.testing.assert_close(z1.norm(dim=1), z2.norm(dim=1))
    for keep_positive in (False, True):
        a = aag.gnt_xent_loss(x, y, z1, 0.2, keep_positive=keep_positive).item()
        b = aag.gnt_xent_loss(x, y, z2, 0.2, keep_positive=keep_positive).item()
        assert a == pytest.approx(b, rel=1e-6)
    assert abs(simclr.nt_xent_loss(z1, x, 0.2).item() - simclr.nt_xent_loss(z2, x, 0.2).item()) > 1e-2


def test_invariant_to_scaling_and_dependent_on_pairs():
    """Inputs are L2-normalised inside (row scaling changes nothing); shuffling the images of
    all three views together changes nothing; shuffling z alone (wrong positives) does."""
    x, y, z = batch(5, 6, 9, torch.float32)
    base = aag.gnt_xent_loss(x, y, z, 0.1).item()
    r = torch.rand(5, 1) * 40 + 0.1
    assert aag.gnt_xent_loss(r * x, 3 * y, z / r, 0.1).item() == pytest.approx(base, rel=1e-5)
    perm = torch.tensor([2, 0, 4, 1, 3])
    assert aag.gnt_xent_loss(x[perm], y[perm], z[perm], 0.1).item() == pytest.approx(base, rel=1e-5)
    assert abs(aag.gnt_xent_loss(x, y, z[perm], 0.1).item() - base) > 1e-2
    assert abs(aag.gnt_xent_loss(x, y, z, 0.5).item() - base) > 1e-2  # tau enters


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """float16 / bfloat16 inputs give a finite float32 loss equal to the float32 loss on the
    same rounded values and close to the unrounded one, at tau = 0.05 where the logits reach
    20 (exp() would overflow float16); gradients come back finite in the input dtype."""
    x, y, z = batch(16, 32, 5, torch.float32)
    y, z = x + 0.1 * y, x + 0.2 * z   # positives close together: large logits
    for tau in (0.5, 0.05):
        h = [t.to(dtype) for t in (x, y, z)]
        loss = aag.gnt_xent_loss(*h, tau)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert loss.item() == pytest.approx(aag.gnt_xent_loss(*(t.float() for t in h), tau).item(), rel=1e-5, abs=1e-5)
        assert loss.item() == pytest.approx(aag.gnt_xent_loss(x, y, z, tau).item(), rel=5e-2, abs=5e-2)
    leaves = [t.to(dtype).requires_grad_() for t in (x, y, z)]
    aag.gnt_xent_loss(*leaves, 0.05).backward()
    for t in leaves:
        assert t.grad.dtype == dtype and torch.isfinite(t.grad).all() and t.grad.abs().max() > 0


# ---------------------------------------------------------------------------
# Views (Sec. Hybrid Data Augmentation Scheme, Table 7)
# ---------------------------------------------------------------------------

def flat(t):
    """Every transform inside Compose / RandomApply, with the probability that gates it."""
    if isinstance(t, T.Compose):
        return [item for s in t.transforms for item in flat(s)]
    if isinstance(t, T.RandomApply):
        return [(s, t.p) for s in t.transforms]
    return [(t, 1.0)]


@pytest.mark.parametrize("data,policy", [("cifar10", T.AutoAugmentPolicy.CIFAR10), ("svhn", T.AutoAugmentPolicy.SVHN),
                                         ("imagenet", T.AutoAugmentPolicy.IMAGENET)])
def test_views_recipe(data, policy):
    """Three uint8 [3, S, S] views that differ. Basic: crop area 0.2-1, flip, ColorJitter(0.4 x 4)
    on every view, grayscale 0.2, blur 0.5. Auxiliary: its own crop (same area range) + flip,
    then AutoAugment with the data set's published policy."""
    args = aag.get_args(["--data", data])
    views = aag.AAGViews(args)
    torch.manual_seed(0)
    out = views(noise_image(args.image_size))
    assert len(out) == 3
    for v in out:
        assert v.dtype == torch.uint8 and v.shape == (3, args.image_size, args.image_size)
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])
    basic = flat(views.basic)
    kinds = {type(t): p for t, p in basic}
    crop = next(t for t, _ in basic if isinstance(t, T.RandomResizedCrop))
    assert tuple(crop.scale) == (0.2, 1.0)
    jitter = next(t for t, _ in basic if isinstance(t, T.ColorJitter))
    assert kinds[T.ColorJitter] == 1.0 and tuple(jitter.hue) == pytest.approx((-0.4, 0.4))
    assert tuple(jitter.brightness) == pytest.approx((0.6, 1.4))
    assert next(t for t, _ in basic if isinstance(t, T.RandomGrayscale)).p == pytest.approx(0.2)
    assert kinds[common.KernelBlur] == pytest.approx(0.5) and T.RandomHorizontalFlip in kinds
    aux = [t for t, _ in flat(views.aux)]
    assert [type(t) for t in aux] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.AutoAugment]
    assert tuple(aux[0].scale) == (0.2, 1.0) and aux[2].policy == policy


def test_views_ablation_flags():
    """Table 7: --aux-policy randaugment gives RandAugment(2 ops, magnitude 10) after the crop;
    basic gives three basic views; none gives two."""
    ra = aag.AAGViews(aag.get_args(["--aux-policy", "randaugment"]))
    op = flat(ra.aux)[-1][0]
    assert isinstance(op, T.RandAugment) and op.num_ops == 2 and op.magnitude == 10
    three = aag.AAGViews(aag.get_args(["--aux-policy", "basic"]))
    assert three.aux is three.basic and len(three(noise_image(32))) == 3
    two = aag.AAGViews(aag.get_args(["--aux-policy", "none"]))
    assert len(two(noise_image(32))) == 2


def test_docs_name_the_real_sources():
    """--aux-policy randaugment is described as torchvision's, not the MindSpore port's (18 ops,
    Cutout 13 px, Translate 33 px at m=10); the AlexNet's sizes are not credited to a file AND or
    ISIF lacks; the step schedule is ISIF's adjust_learning_rate with its later branches firing."""
    doc = " ".join(aag.__doc__.split())
    assert "torchvision's RandAugment(2, 10)" in doc and "18 ops" in doc
    assert "Cutout 13 px and Translate 33 px" in doc
    assert "never fire" not in doc and "--milestones 120 160 --milestone-factors 0.1 0.05" in doc
    assert "models/alexnet.py" not in doc and "publishes an AlexNet definition" in doc
    assert "cifar_alexnet" in common.CifarAlexNet.__doc__ and "AND/ISIF publish none" in common.CifarAlexNet.__doc__


def identity(img):
    return img


def loader_views(images, argv, ctx):
    """One batch of all `images` through common.train_loader (as aag.main builds it), with the
    auxiliary policy op replaced by the identity so the crop alone makes the auxiliary view."""
    args = aag.get_args(["--data", "synthetic", *argv])
    views = aag.AAGViews(args)
    views.aux.transforms[-1] = identity
    ds = common.ArrayDataset(np.stack(images), np.arange(len(images)))
    loader = common.train_loader(ds, views, len(images), 0, 0, ctx)
    return next(iter(loader))


def test_three_views_come_from_the_same_image(ctx):
    """Through the loader, every row's x, y and z are made from that row's own image: image k
    is a flat grey of value 10 + 15k (crop, flip, grayscale, blur-free and jitter-free basic
    views keep it flat and exact), and the label returned with the row is k."""
    images = [np.full((32, 32, 3), 10 + 15 * k, np.uint8) for k in range(16)]
    (x, y, z), labels = loader_views(images, ["--jitter", "0", "--blur", "0"], ctx)
    assert sorted(labels.tolist()) == list(range(16)) and labels.tolist() != list(range(16))  # shuffled
    for r, k in enumerate(labels.tolist()):
        for v in (x, y, z):
            assert (v[r] == 10 + 15 * k).all(), (r, k)


def test_auxiliary_view_has_its_own_crop(ctx):
    """g_aux is drawn independently (Algorithm 1) and applied to the image, not to a basic
    view: on a horizontal grey ramp with colour-free basic views and the policy op removed,
    z differs from both x and y in every row (a z built on x's crop would equal x)."""
    ramp = np.repeat(np.repeat((np.arange(32) * 8).astype(np.uint8)[None, :, None], 32, 0), 3, 2)
    (x, y, z), _ = loader_views([ramp] * 8, ["--jitter", "0", "--blur", "0"], ctx)
    for r in range(8):
        assert not torch.equal(z[r], x[r]) and not torch.equal(z[r], y[r]) and not torch.equal(x[r], y[r])


# ---------------------------------------------------------------------------
# Recipe, model and the training step
# ---------------------------------------------------------------------------

def test_recipe_defaults():
    """CIFAR (Sec. Experiments, Table 1): ResNet-18, B=128, 200 epochs, lr 0.03 (x B/128),
    wd 5e-4, tau 0.1, linear 128-d head, GNT-Xent, AutoAugment; no warmup up to B=256,
    10 epochs above (Fig. 3); explicit flags win; imagenet: ResNet-50 with the MLP head."""
    a = aag.get_args(["--data", "cifar10"])
    assert (a.arch, a.batch_size, a.epochs, a.lr, a.weight_decay, a.tau) == ("resnet18", 128, 200, 0.03, 5e-4, 0.1)
    assert (a.head, a.proj_dim, a.loss, a.aux_policy, a.warmup_epochs) == ("linear", 128, "gnt-xent", "autoaugment", 0)
    assert aag.get_args(["--batch-size", "256"]).warmup_epochs == 0
    assert aag.get_args(["--batch-size", "512"]).warmup_epochs == 10
    assert aag.get_args(["--batch-size", "512", "--warmup-epochs", "2"]).warmup_epochs == 2
    big = aag.get_args(["--data", "imagenet"])
    assert (big.arch, big.head, big.image_size) == ("resnet50", "mlp", 224)
    assert aag.get_args(["--data", "imagenet", "--head", "linear"]).head == "linear"


def test_batch_of_one_is_refused(capsys):
    """--batch-size 1 leaves GNT-Xent without negatives: one 'error:' line, exit code 2."""
    with pytest.raises(SystemExit) as exc:
        aag.get_args(["--batch-size", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_model_heads_and_shapes():
    """A linear head dim -> 128 by default (Sec. Experiments), SimCLR's MLP dim-dim-128 for
    Table 6; forward maps 3 (or 2) view batches to as many [B, 128] embeddings."""
    torch.manual_seed(0)
    model = aag.AAG("resnet_small", 32, 128, "linear")
    assert isinstance(model.projector, nn.Linear)
    assert (model.projector.in_features, model.projector.out_features) == (128, 128)
    views = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    out = model(*views)
    assert len(out) == 3 and all(e.shape == (4, 128) for e in out)
    assert len(model(*views[:2])) == 2
    mlp = aag.AAG("resnet18", 32, 128, "mlp").projector
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 128)]


@pytest.mark.parametrize("argv,keep_positive,n_views",
                         [([], False, 3), (["--loss", "nt-xent", "--aux-policy", "none"], True, 2)])
def test_train_one_epoch_minimises_the_chosen_loss(ctx, argv, keep_positive, n_views, tmp_path):
    """One step of aag.train_one_epoch reports (in the epoch's log.jsonl record) the loss of
    the model's embeddings of the batch's views (GNT-Xent, or NT-Xent with --loss nt-xent;
    two views with --aux-policy none), and its SGD step moves the weights."""
    args = aag.get_args(["--data", "synthetic", "--arch", "resnet_small", "--batch-size", "8", "--log-every", "1", *argv])
    torch.manual_seed(0)
    model = aag.AAG("resnet_small", 32, 128, "linear")
    views = [torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8) for _ in range(n_views)]
    with torch.no_grad():  # a copy in train mode (BN on batch statistics), as the step sees the model
        x, y, z = (*copy.deepcopy(model)(*(common.normalize_on_device(v, ctx, "synthetic") for v in views)), None)[:3]
        expected = aag.gnt_xent_loss(x, y, z, args.tau, keep_positive=keep_positive)
    before = model.backbone.conv1.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=args.weight_decay)
    scaler = ctx.grad_scaler()
    run, loader = make_run(args, ctx, model, optimizer, scaler, [(views, torch.zeros(8))], tmp_path)
    aag.train_one_epoch(model, loader, optimizer, scaler, lambda s: 0.1, run, run.args, ctx)
    assert run.step == 1 and not run.stopped
    run.end_epoch()
    stats = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert stats["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert not torch.equal(before, model.backbone.conv1.weight)


# ---------------------------------------------------------------------------
# End to end on the CPU: outputs, resume, evaluate.py
# ---------------------------------------------------------------------------

TRAIN = ["aag.py", "--data", "synthetic", "--arch", "resnet_small", "--workers", "0",
         "--batch-size", "8", "--subset", "64", "--knn-every", "1", "--log-every", "1"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """An uninterrupted 12-step run (8 steps per epoch: one complete epoch, one partial)."""
    out = tmp_path_factory.mktemp("aag_a")
    proc = run([*TRAIN, "--out", str(out), "--max-steps", "12"])
    return out, proc.stdout


def test_end_to_end_outputs(run_a):
    """Start-up line with lr 0.03 x 8/128; 12 progress lines; last.pt (method aag, step 12) loads
    strictly into AAG; backbone.pt has clean keys, loads strictly into the common backbone and
    equals last.pt's; log.jsonl has two epoch records with loss, z_std and the first's kNN."""
    out, stdout = run_a
    start = [line for line in stdout.splitlines() if line.startswith("aag:")]
    assert len(start) == 1 and "lr 0.001875" in start[0] and "from step 0" in start[0]
    assert sum(bool(re.search(r"\bstep \d+/\d+", line)) for line in stdout.splitlines()) == 12
    for name in ("last.pt", "backbone.pt", "log.jsonl", "args.json"):
        assert (out / name).is_file(), name
    ckpt = load(out / "last.pt")
    assert ckpt["method"] == "aag" and ckpt["step"] == 12 and ckpt["args"]["aux_policy"] == "autoaugment"
    aag.AAG("resnet_small", 32, 128, "linear").load_state_dict(ckpt["model"], strict=True)
    state = load(out / "backbone.pt")
    assert not any(k.startswith("module.") or "_orig_mod." in k for k in state)
    common.resnet("resnet_small", 32)[0].load_state_dict(state, strict=True)
    assert all(torch.equal(state[k], ckpt["backbone"][k]) for k in state)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2 and 0 <= records[0]["knn_top1"] <= 100
    for r in records:
        assert math.isfinite(r["loss"]) and 0 < r["z_std"] < 1.2 / 128 ** 0.5
    assert json.loads((out / "args.json").read_text())["tau"] == 0.1


def test_resume_mid_epoch_is_bit_identical(run_a, tmp_path):
    """5 steps (--resume none ignores a finished run's last.pt), then the same command to 12:
    weights, BN buffers and SGD momentum equal the uninterrupted run's bit for bit."""
    out_a, _ = run_a
    out = tmp_path / "b"
    out.mkdir()
    shutil.copy(out_a / "last.pt", out / "last.pt")
    assert "from step 0" in run([*TRAIN, "--out", str(out), "--max-steps", "5", "--resume", "none"]).stdout
    assert load(out / "last.pt")["step"] == 5
    assert "from step 5" in run([*TRAIN, "--out", str(out), "--max-steps", "12"]).stdout
    a, b = load(out_a / "last.pt"), load(out / "last.pt")
    assert a["step"] == b["step"] == 12 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert len(a["optimizer"]["state"]) == len(list(aag.AAG("resnet_small", 32, 128, "linear").parameters()))
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"]), i


def test_evaluate_reads_the_checkpoint(run_a, tmp_path):
    """python evaluate.py --ckpt OUT/last.pt prints the final line and writes JSON for the aag run."""
    out, _ = run_a
    proc = run(["evaluate.py", "--ckpt", str(out / "last.pt"), "--workers", "0", "--subset", "128",
                "--linear-epochs", "2", "--json", str(tmp_path / "e.json")])
    assert re.match(r"^knn_top1=\d+\.\d+ linear_top1=\d+\.\d+$", proc.stdout.strip().splitlines()[-1])
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["arch"] == "resnet_small" and result["data"] == "synthetic" and 0 <= result["knn_top1"] <= 100


# ---------------------------------------------------------------------------
# Two processes (torchrun, gloo): the one-process result on the global batch
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("aag_dist") / "result")
    torchrun(2, ["tests/aag_dist_check.py", out], timeout=300)
    results = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1] and all(r["wrapped_in_ddp"] for r in results)
    return results


def test_gathered_loss_and_gradients_equal_one_process(ranks):
    """GNT-Xent over gathered x, y, z equals the one-process loss on the global batch; rank r's
    rows receive 2x the one-process gradient (DDP's average divides it back)."""
    leaves = [t.clone().requires_grad_() for t in dist_.embedding_batch()]
    loss = aag.gnt_xent_loss(*leaves, dist_.TAU)
    loss.backward()
    n = dist_.GLOBAL_BATCH // 2
    for rank, r in enumerate(ranks):
        assert r["gnt_loss"].item() == pytest.approx(loss.item(), rel=1e-6)
        for got, leaf in zip(r["gnt_grads"], leaves):
            torch.testing.assert_close(got / 2, leaf.grad[rank * n:(rank + 1) * n], rtol=1e-5, atol=1e-7)
    assert leaves[2].grad.abs().max() > 1e-3


def test_ddp_steps_equal_one_process(ranks):
    """A BN-free three-view model under DDP: per step the loss, the averaged gradients and the
    SGD-updated parameters equal one process on the global batch; both ranks stay identical."""
    model = dist_.make_model()
    optimizer = dist_.make_optimizer(model)
    for step, views in enumerate(dist_.image_batches()):
        loss = aag.gnt_xent_loss(*model(*views), dist_.TAU)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for r in ranks:
            assert r["losses"][step].item() == pytest.approx(loss.item(), rel=1e-6)
            for k, p in model.named_parameters():
                torch.testing.assert_close(r["grads"][step][k], p.grad, rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(r["params"][step][k], p.detach(), rtol=0, atol=1e-6)
        for k in ranks[0]["params"][step]:
            assert torch.equal(ranks[0]["params"][step][k], ranks[1]["params"][step][k])


def test_torchrun_script(tmp_path):
    """aag.py under torchrun with 2 processes: one start-up line naming 2 processes, rank 0
    alone prints progress, and the checkpoint reaches --max-steps with clean keys and a
    finite loss in log.jsonl."""
    out = tmp_path / "ddp"
    proc = torchrun(2, ["aag.py", "--data", "synthetic", "--arch", "resnet_small", "--workers", "0", "--batch-size", "16",
                        "--subset", "64", "--max-steps", "3", "--knn-every", "0", "--log-every", "1", "--out", str(out)])
    lines = proc.stdout.splitlines()
    start = [line for line in lines if line.startswith("aag:")]
    assert len(start) == 1 and "2 process(es)" in start[0] and "batch 16" in start[0]
    assert sum(bool(re.search(r"\bstep 3/", line)) for line in lines) == 1
    ckpt = load(out / "last.pt")
    assert ckpt["step"] == 3 and not any(k.startswith("module.") for k in ckpt["model"])
    assert math.isfinite(json.loads((out / "log.jsonl").read_text().splitlines()[-1])["loss"])


# ---------------------------------------------------------------------------
# Real data: AAG learns on CIFAR-10
# ---------------------------------------------------------------------------

def test_aag_learns_on_cifar10(cifar10_dir, tmp_path):
    """64 AAG steps (batch 64, 2 epochs of the first 2,048 training images, the paper's
    lr 0.03 x B/128, cosine) lift resnet_small's kNN top-1 on the full 10,000-image test set,
    with those 2,048 images as the bank, well above the randomly initialised network's.

    Measured on a shared (heavily loaded) 2-core CPU: random init 24.18% (22.34% with the seeded
    baseline used now), after 64 steps 30.92% (+6.7 points; 140 CPU-s for training + in-training kNN, 34 CPU-s for the
    baseline); 96 steps (3 epochs) gave 33.47% (+9.3). The test asks for +3 points,
    under half the measured gain."""
    data = ["--data", "cifar10", "--data-dir", cifar10_dir, "--no-download", "--subset", "2048", "--workers", "2"]
    run(["aag.py", *data, "--arch", "resnet_small", "--batch-size", "64", "--epochs", "2", "--knn-every", "2",
         "--knn-features", "backbone", "--log-every", "32", "--out", str(tmp_path)], timeout=1200)  # h, as the baseline
    trained = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()][-1]["knn_top1"]
    random_init = random_init_knn(cifar10_dir, 2048)
    print(f"kNN top-1 on CIFAR-10: random init {random_init:.2f}%, after 64 AAG steps {trained:.2f}%")
    assert trained >= random_init + 3.0, (random_init, trained)
