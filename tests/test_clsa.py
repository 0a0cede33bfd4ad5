"""CLSA (clsa.py): both losses against loop references, the objective's terms, the
momentum encoder, the queue, the views and the stronger augmentation's pools, the
flags, end to end with resume, and two processes."""
import copy
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import clsa
import common
from conftest import noise_image, random_init_knn, run, torchrun

# ---------------------------------------------------------------------------
# Loop references: one query at a time, one bank entry at a time. The bank of
# query i is [every key of the batch, the queue] (Sec. 3.2 under Eq. (3)), its
# positive the key at row offset + i.
# ---------------------------------------------------------------------------


def cosine(a, b):
    """Cosine similarity of two 1-D tensors, written out element by element (Eq. (2))."""
    dot = sum(a[d] * b[d] for d in range(len(a)))
    na = torch.sqrt(sum(a[d] * a[d] for d in range(len(a))))
    nb = torch.sqrt(sum(b[d] * b[d] for d in range(len(b))))
    return dot / (na * nb)


def bank_probabilities(q_i, keys, queue, tau):
    """Eq. (3): [p(k_1 | q_i), ..., p(k_M | q_i), p(z_1 | q_i), ..., p(z_K | q_i)], each term written out."""
    bank = [keys[m] for m in range(len(keys))] + [queue[j] for j in range(len(queue))]
    scores = [torch.exp(cosine(q_i, b) / tau) for b in bank]
    total = sum(scores)
    return [s / total for s in scores]


def contrastive_reference(q, keys, queue, tau, offset=0):
    """Eq. (1): mean over i of -log p(k_(offset+i) | q_i) over the bank {keys} + queue."""
    return sum(-torch.log(bank_probabilities(q[i], keys, queue, tau)[offset + i]) for i in range(len(q))) / len(q)


def ddm_reference(q_weak, q_strong, keys, queue, tau):
    """Eq. (4): mean over i of -sum_j p(j | q'_i) log p(j | q''_i), the weak
    probabilities computed from a detached copy (they are the target)."""
    total = 0.0
    for i in range(len(q_weak)):
        p_w = bank_probabilities(q_weak[i].detach(), keys, queue, tau)
        p_s = bank_probabilities(q_strong[i], keys, queue, tau)
        total = total - sum(p_w[j] * torch.log(p_s[j]) for j in range(len(p_w)))
    return total / len(q_weak)


def random_inputs(n, d, k, seed, dtype=torch.float64, m=None):
    """q_weak, q_strong: [n, d]; keys: [m, d] (m = n by default); queue: [k, d] with unit rows."""
    g = torch.Generator().manual_seed(seed)
    q_w, q_s = (torch.randn(n, d, generator=g, dtype=dtype) for _ in range(2))
    keys = torch.randn(m or n, d, generator=g, dtype=dtype)
    queue = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=dtype), dim=1)
    return q_w, q_s, keys, queue


# (N, D, K, tau, M, offset): M keys in the batch, this process's queries at rows offset.. (rank 1 of 2, 3)
CASES = [(1, 3, 1, 0.2, 1, 0), (2, 4, 3, 0.1, 2, 0), (3, 5, 7, 0.2, 6, 3), (4, 2, 5, 1.0, 12, 4), (2, 3, 0, 0.5, 4, 2)]


@pytest.mark.parametrize("n,d,k,tau,m,offset", CASES)
def test_contrastive_loss_matches_reference(n, d, k, tau, m, offset):
    """L_C equals the loop reading of Eq. (1) over [batch keys, queue], float64 and float32 inputs;
    a float32 scalar. With M > N the positive is at row offset + i (a rank's slice of the batch)."""
    q, _, keys, queue = random_inputs(n, d, k, seed=10 * n + d, m=m)
    ref = contrastive_reference(q, keys, queue, tau, offset).item()
    for dtype in (torch.float64, torch.float32):
        loss = clsa.contrastive_loss(q.to(dtype), keys.to(dtype), queue.to(dtype), tau, offset=offset)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    if m > n:  # another offset points at other keys: another value
        other = clsa.contrastive_loss(q, keys, queue, tau, offset=(offset + n) % m).item()
        assert abs(other - ref) > 1e-4


@pytest.mark.parametrize("n,d,k,tau,m,offset", CASES)
def test_ddm_loss_matches_reference(n, d, k, tau, m, offset):
    """L_D equals the loop reading of Eq. (3)-(4) over [batch keys, queue], float64 and float32 inputs;
    a float32 scalar."""
    q_w, q_s, keys, queue = random_inputs(n, d, k, seed=20 * n + d, m=m)
    ref = ddm_reference(q_w, q_s, keys, queue, tau).item()
    for dtype in (torch.float64, torch.float32):
        loss = clsa.ddm_loss(q_w.to(dtype), q_s.to(dtype), keys.to(dtype), queue.to(dtype), tau)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_the_other_batch_keys_are_negatives():
    """Two images: query 0 = key 1 = e2, key 0 = e1. With the batch's keys in the bank, key 1 (equal to
    query 0) sits in query 0's denominator: L_C = -log(e^0 / (e^0 + e^(1/t) + queue terms)); with only
    its own key (the printed Eq. (1)) it would be -log(e^0 / (e^0 + queue terms))."""
    t = 0.5
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    q, keys, queue = torch.stack([e2, e1]), torch.stack([e1, e2]), torch.stack([-e1])
    by_hand = -math.log(1 / (1 + math.exp(1 / t) + 1)) - math.log(1 / (1 + math.exp(1 / t) + math.exp(-1 / t)))
    assert clsa.contrastive_loss(q, keys, queue, t).item() == pytest.approx(by_hand / 2, rel=1e-6)


def test_known_values_by_hand():
    """One query, one key, K=2, all unit vectors: q = e1, k = e1, queue = (e2, -e1). Similarities 1, 0, -1,
    so p = softmax(1/t, 0, -1/t). L_C = -log p_0; with q_strong = e2 (similarities 0, 1, 0)
    L_D = -sum p_j log softmax(0, 1/t, 0)_j."""
    t = 0.5
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    p = np.exp([1 / t, 0.0, -1 / t])
    p /= p.sum()
    log_ps = np.array([0.0, 1 / t, 0.0]) - math.log(2 + math.exp(1 / t))
    assert clsa.contrastive_loss(e1, e1, queue, t).item() == pytest.approx(-math.log(p[0]), rel=1e-6)
    assert clsa.ddm_loss(e1, e2, e1, queue, t).item() == pytest.approx(-(p * log_ps).sum(), rel=1e-6)


@pytest.mark.parametrize("n,d,k,tau,m,offset", CASES[1:])
def test_gradients_match_reference(n, d, k, tau, m, offset):
    """d L_C / d q and d L_D / d q_strong equal the loop references' autograd gradients."""
    q_w, q_s, keys, queue = random_inputs(n, d, k, seed=30 * n + d, m=m)
    a = q_w.clone().requires_grad_()
    clsa.contrastive_loss(a, keys, queue, tau, offset=offset).backward()
    r = q_w.clone().requires_grad_()
    contrastive_reference(r, keys, queue, tau, offset).backward()
    torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-7)
    assert r.grad.abs().max() > 1e-3
    s = q_s.clone().requires_grad_()
    clsa.ddm_loss(q_w, s, keys, queue, tau).backward()
    rs = q_s.clone().requires_grad_()
    ddm_reference(q_w, rs, keys, queue, tau).backward()
    torch.testing.assert_close(s.grad, rs.grad, rtol=1e-5, atol=1e-7)
    assert rs.grad.abs().max() > 1e-3


def test_ddm_gives_no_gradient_to_the_weak_query():
    """p(.|z') is a target: no gradient reaches q_weak through L_D, while q_strong gets one."""
    q_w, q_s, keys, queue = random_inputs(4, 6, 5, seed=1, dtype=torch.float32, m=8)
    q_w.requires_grad_()
    q_s.requires_grad_()
    clsa.ddm_loss(q_w, q_s, keys, queue, 0.2).backward()
    assert q_w.grad is None or not q_w.grad.any()
    assert q_s.grad is not None and q_s.grad.abs().max() > 1e-4


def test_ddm_is_cross_entropy_minimised_at_the_weak_distribution():
    """With q_strong = q_weak, L_D is the entropy of p_w (its minimum over p_s): any other strong
    query scores higher, and the gradient at q_strong = q_weak vanishes."""
    q_w, q_s, keys, queue = random_inputs(3, 4, 6, seed=2, dtype=torch.float64, m=6)
    at_weak = q_w.clone().requires_grad_()
    loss = clsa.ddm_loss(q_w, at_weak, keys, queue, 0.2)
    loss.backward()
    assert clsa.ddm_loss(q_w, q_s, keys, queue, 0.2).item() > loss.item() + 1e-3
    assert at_weak.grad.abs().max() < 1e-5


def test_losses_normalise_inputs_and_use_tau():
    """Scaling rows of q, k or the queue leaves both losses unchanged; a different tau changes them."""
    q_w, q_s, keys, queue = random_inputs(5, 8, 6, seed=3, dtype=torch.float32)
    c, d = clsa.contrastive_loss(q_w, keys, queue, 0.2).item(), clsa.ddm_loss(q_w, q_s, keys, queue, 0.2).item()
    scale = torch.rand(5, 1) * 20 + 0.05
    assert clsa.contrastive_loss(scale * q_w, 3 * keys, 7 * queue, 0.2).item() == pytest.approx(c, rel=1e-5)
    assert clsa.ddm_loss(2 * q_w, scale * q_s, keys, 0.5 * queue, 0.2).item() == pytest.approx(d, rel=1e-5)
    assert abs(clsa.contrastive_loss(q_w, keys, queue, 1.0).item() - c) > 1e-3
    assert abs(clsa.ddm_loss(q_w, q_s, keys, queue, 1.0).item() - d) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """fp16/bf16 inputs (as under autocast) give finite float32 losses, equal to the float32 losses
    on the same rounded values and close to those on the unrounded inputs; tau 0.05 puts logits at
    20, where exp() overflows float16."""
    q_w, q_s, keys, queue = random_inputs(16, 32, 64, seed=4, dtype=torch.float32)
    keys = q_w + 0.1 * keys  # positives close: large logits
    for tau in (0.2, 0.05):
        args = [t.to(dtype) for t in (q_w, q_s, keys, queue)]
        for fn, inputs in ((clsa.contrastive_loss, (0, 2, 3)), (clsa.ddm_loss, (0, 1, 2, 3))):
            half = fn(*[args[i] for i in inputs], tau)
            assert half.dtype == torch.float32 and torch.isfinite(half)
            same = fn(*[args[i].float() for i in inputs], tau)
            full = fn(*[(q_w, q_s, keys, queue)[i] for i in inputs], tau)
            assert half.item() == pytest.approx(same.item(), rel=1e-5, abs=1e-6)
            assert half.item() == pytest.approx(full.item(), rel=5e-2, abs=5e-2)


def args_for(*flags):
    """Parsed flags for a small synthetic run (one process)."""
    return clsa.get_args(["--data", "synthetic", "--arch", "resnet_small", "--batch-size", "8", "--queue-size", "16", *flags])


class StopMain(Exception):
    """Raised by a stand-in to end clsa.main() where a test has seen enough."""


def main_args(monkeypatch, argv, world=1):
    """The args clsa.main() goes on with after its checks that depend on the number of
    processes, as `world` processes see them: common.setup gives a CPU Context of that
    world size, and main() is stopped at load_data."""
    seen = {}

    def load_data(args, ctx):
        seen["args"] = args
        raise StopMain
    monkeypatch.setattr(common, "setup", lambda args: common.Context(0, world, 0, torch.device("cpu"), None))
    monkeypatch.setattr(common, "load_data", load_data)
    with pytest.raises(StopMain):
        clsa.main(argv)
    return seen["args"]


@pytest.mark.parametrize("variant", clsa.VARIANTS)
def test_objective_variants_are_the_table4_rows(variant):
    """clsa: L_C(weak) + beta * sum_s L_D; contrastive: L_C(weak) + beta * sum_s L_C(strong);
    mocov2: L_C(weak) alone; strong-query(-key): sum_s L_C(strong) (the strong views are the queries).
    The offset reaches every L_C."""
    a = args_for("--variant", variant, "--beta", "0.7")
    q_w, q_s, keys, queue = random_inputs(4, 6, 5, seed=5, dtype=torch.float32, m=8)
    q_s2 = q_s.flip(0)
    lc = lambda q: clsa.contrastive_loss(q, keys, queue, a.tau, offset=4)  # noqa: E731
    ld = lambda w, s: clsa.ddm_loss(w, s, keys, queue, a.tau)  # noqa: E731
    expected = {
        "clsa": lc(q_w) + 0.7 * (ld(q_w, q_s) + ld(q_w, q_s2)),
        "contrastive": lc(q_w) + 0.7 * (lc(q_s) + lc(q_s2)),
        "mocov2": lc(q_w),
        "strong-query": lc(q_s) + lc(q_s2),
        "strong-query-key": lc(q_s) + lc(q_s2),
    }[variant]
    weak = [] if variant.startswith("strong") else [q_w]
    strong = [] if variant == "mocov2" else [q_s, q_s2]
    got = clsa.clsa_objective(weak, strong, keys, queue, a.tau, a.beta, a.variant, offset=4)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_multi_objective_is_5_contrastive_and_25_ddm_terms(monkeypatch):
    """CLSA-Multi as the authors' command: 5 weak queries and 5 strong views give 5 L_C (one per weak
    query) and 25 L_D (every (weak, strong) pair, the weak query's distribution the target), summed with
    beta, from one product with the bank per query; every weak query receives gradient from its L_C only
    (L_D's target is detached)."""
    g = torch.Generator().manual_seed(6)
    weak = [torch.randn(3, 4, generator=g, requires_grad=True) for _ in range(5)]
    strong = [torch.randn(3, 4, generator=g, requires_grad=True) for _ in range(5)]
    keys, queue = torch.randn(3, 4, generator=g), torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    calls = []
    lc, ld, logits = clsa.contrastive_loss, clsa.ddm_loss, clsa.bank_logits
    monkeypatch.setattr(clsa, "bank_logits", lambda q, *a: calls.append(q) or logits(q, *a))
    loss = clsa.clsa_objective(weak, strong, keys, queue, 0.2, beta=0.5)
    assert [id(q) for q in calls] == [id(q) for q in weak + strong]
    monkeypatch.setattr(clsa, "bank_logits", logits)
    expected = sum(lc(w, keys, queue, 0.2) for w in weak) + 0.5 * sum(ld(w, s, keys, queue, 0.2) for w in weak for s in strong)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    for w in weak:
        alone = w.detach().clone().requires_grad_()
        lc(alone, keys, queue, 0.2).backward()
        torch.testing.assert_close(w.grad, alone.grad)
    assert all(s.grad.abs().max() > 1e-4 for s in strong)


# ---------------------------------------------------------------------------
# Model: momentum encoder, shuffle-BN, queue
# ---------------------------------------------------------------------------

def small_model(queue_size=6, ema_momentum=0.9, bn_splits=2, proj_dim=8):
    torch.manual_seed(0)
    return clsa.CLSA("resnet_small", 32, 32, proj_dim, queue_size, ema_momentum, bn_splits)


def images(n, seed, side=32):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_model_heads_and_backbone_checkpoint():
    """g is Linear(dim, dim) ReLU Linear(dim, 128) by default (2048 hidden on ResNet-50), or --hidden-dim
    wide; the key encoder starts as an exact copy of the query encoder (Algorithm 1, line 1) with BN over --bn-splits groups; the query backbone's
    state dict loads strictly into common.resnet."""
    for arch, hidden, width, inner in (("resnet50", None, 2048, 2048), ("resnet_small", None, 128, 128),
                                       ("resnet_small", 300, 128, 300)):
        head = clsa.CLSA(arch, 32, hidden, 128, 16, 0.99, 1).projector
        linears = [m for m in head if isinstance(m, torch.nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [(width, inner), (inner, 128)]
    torch.manual_seed(0)
    model = clsa.CLSA("resnet_small", 32, None, 128, 16, 0.99, 4)
    for a, b in zip(model.query_parameters(), model.key_parameters()):
        assert torch.equal(a, b) and a is not b
    assert all(m.splits == 4 for m in model.backbone_k.modules() if isinstance(m, common.SplitBatchNorm))
    assert any(isinstance(m, common.SplitBatchNorm) for m in model.backbone_k.modules())
    backbone, _ = common.resnet("resnet_small", 32)
    backbone.load_state_dict(model.backbone.state_dict(), strict=True)
    assert model.queue.shape == (16, 128)
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(16))


def test_key_encoder_gets_no_gradient_and_follows_the_momentum_formula():
    """After a training step the key encoder's parameters have no gradient and are not in the optimizer;
    the next forward first sets phi <- alpha * phi + (1 - alpha) * theta (Algorithm 1, line 8), then
    computes the keys with the updated phi on the batch shuffled by the given seed."""
    model = small_model()
    args = args_for()
    optimizer = torch.optim.SGD(model.query_parameters(), lr=0.5, momentum=0.9)
    xk, xq, xs = images(4, 1), images(4, 2), images(4, 3)
    qs, k, queue = model(xk, [xq, xs], shuffle_seed=0)
    clsa.clsa_objective(qs[:1], qs[1:], k, queue, args.tau).backward()
    assert all(not p.requires_grad and p.grad is None for p in model.key_parameters())
    assert all(p.grad is not None for p in model.query_parameters())
    assert {id(p) for g in optimizer.param_groups for p in g["params"]}.isdisjoint(map(id, model.key_parameters()))
    optimizer.step()

    phi = [p.detach().clone() for p in model.key_parameters()]
    theta = [p.detach().clone() for p in model.query_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(phi, theta))  # the step moved theta away from phi
    reference = copy.deepcopy(model)
    _, k, _ = model(xk, [xq], shuffle_seed=7)
    for p, old, new in zip(model.key_parameters(), phi, theta):
        torch.testing.assert_close(p, 0.9 * old + 0.1 * new, rtol=0, atol=1e-6)
    reference.momentum_update()
    x, unshuffle = common.batch_shuffle(xk, 7)
    with torch.no_grad():
        expected = common.batch_unshuffle(torch.nn.functional.normalize(
            reference.projector_k(reference.backbone_k(x)), dim=1), unshuffle)
    torch.testing.assert_close(k, expected, rtol=1e-5, atol=1e-6)
    # With BN over 2 groups the grouping matters: another permutation gives other keys.
    _, k_other, _ = copy.deepcopy(reference)(xk, [xq], shuffle_seed=8)
    assert not torch.allclose(k_other, k, atol=1e-4)


def test_queue_is_fifo_and_wraps_around():
    """K=5, batches of 2 keys: rows 0-1, then 2-3, then 4 and 0 (wrap-around); the pointer
    follows; rows are stored as given (unit keys)."""
    model = small_model(queue_size=5, proj_dim=3)
    start = model.queue.clone()
    keys = [torch.nn.functional.normalize(torch.randn(2, 3), dim=1) for _ in range(3)]
    model.enqueue(keys[0])
    assert int(model.queue_ptr) == 2
    assert torch.equal(model.queue[:2], keys[0]) and torch.equal(model.queue[2:], start[2:])
    model.enqueue(keys[1])
    model.enqueue(keys[2])
    assert int(model.queue_ptr) == 1
    expected = torch.stack([keys[2][1], keys[0][1], keys[1][0], keys[1][1], keys[2][0]])
    assert torch.equal(model.queue, expected)


def test_forward_returns_the_queue_before_enqueueing_this_steps_keys():
    """The losses see the queue as it was before the step (Eq. (1)'s Q holds past batches); the
    model's queue afterwards holds this step's keys at the pointer."""
    model = small_model(queue_size=6)
    before = model.queue.clone()
    qs, k, queue = model(images(4, 1), [images(4, 2)], shuffle_seed=0)
    assert torch.equal(queue, before)
    assert torch.equal(model.queue[:4], k) and torch.equal(model.queue[4:], before[4:])
    assert int(model.queue_ptr) == 4 and len(qs) == 1 and qs[0].shape == (4, 8)
    torch.testing.assert_close(k.norm(dim=1), torch.ones(4))


# ---------------------------------------------------------------------------
# Views (Sec. 3.3) and the stronger augmentation's two pools (Table 1; the authors' code)
# ---------------------------------------------------------------------------

@pytest.fixture
def strong_calls(monkeypatch):
    """Records the size of every image the stronger augmentation is applied to."""
    calls = []
    original = clsa.StrongerAugmentation.__call__

    def spy(self, img):
        calls.append(img.size)
        return original(self, img)
    monkeypatch.setattr(clsa.StrongerAugmentation, "__call__", spy)
    return calls


@pytest.mark.parametrize("variant,sizes,strong_at", [
    ("clsa", [32, 32, 32], [(32, 32)]),
    ("contrastive", [32, 32, 32], [(32, 32)]),
    ("mocov2", [32, 32], []),
    ("strong-query", [32, 32], [(32, 32)]),
    ("strong-query-key", [32, 32], [(32, 32), (32, 32)]),
])
def test_views_and_their_provenance(variant, sizes, strong_at, strong_calls):
    """[key, weak, strong...] uint8 views; the stronger augmentation is applied once per strong view
    (after its crop: at its size) and never to the key or the weak query, except in strong-query-key."""
    views = clsa.CLSAViews(args_for("--variant", variant))(noise_image(80))
    assert [tuple(v.shape) for v in views] == [(3, s, s) for s in sizes]
    assert all(v.dtype == torch.uint8 for v in views)
    assert strong_calls == strong_at


def test_views_use_mocov2_pil_blur():
    """T, T' and the strong crops blur with MoCo v2's PIL blur (the authors' GaussianBlur) with p=0.5 on ImageNet."""
    views = clsa.CLSAViews(clsa.get_args(["--data", "imagenet"]))
    for t in [views.key, *views.weak, views.strong[0].transforms[0]]:
        blurs = [op for op in t.transforms if isinstance(op, __import__("torchvision").transforms.RandomApply)
                 and isinstance(op.transforms[0], common.RandomPILBlur)]
        assert len(blurs) == 1 and blurs[0].p == 0.5


def test_multi_crop_views_sizes_and_scales(strong_calls):
    """CLSA-Multi as the authors' command: key at 224, a weak query AND a strong view at each of
    224/192/160/128/96 with the command's area ranges (0.2-1, 0.172-0.86, 0.143-0.715, 0.114-0.571,
    0.086-0.429); the stronger augmentation only on the strong views."""
    sizes = ["224", "192", "160", "128", "96"]
    a = clsa.get_args(["--data", "imagenet", "--weak-sizes", *sizes, "--strong-sizes", *sizes])
    published = [0.2, 1.0, 0.172, 0.86, 0.143, 0.715, 0.114, 0.571, 0.086, 0.429]
    assert a.strong_scales == pytest.approx(published, abs=3e-3)  # the command rounds 0.857 up to 0.86
    assert a.weak_scales == a.strong_scales
    views = clsa.CLSAViews(a)
    crops = [t.transforms[0] for t in views.weak] + [t.transforms[0].transforms[0] for t in views.strong]
    assert [c.size for c in crops] == [(int(s), int(s)) for s in sizes] * 2
    assert [c.scale for c in crops] == list(zip(a.strong_scales[::2], a.strong_scales[1::2])) * 2
    out = views(noise_image(64))
    assert [v.shape[-1] for v in out] == [224] + [int(s) for s in sizes] * 2
    assert strong_calls == [(int(s), int(s)) for s in sizes]


TABLE1 = {
    "ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3), "TranslateX": (-0.3, 0.3), "TranslateY": (-0.3, 0.3),
    "Rotate": (-30, 30), "AutoContrast": None, "Invert": None, "Equalize": None, "Solarize": (0, 256),
    "Posterize": (4, 8), "Contrast": (0.05, 0.95), "Color": (0.05, 0.95), "Brightness": (0.05, 0.95),
    "Sharpness": (0.05, 0.95),
}
# The authors' pool: name -> (max of |magnitude| range lo..hi, signed); Identity in place of Invert.
AUTHORS = {
    "ShearX": ((0, 0.3), True), "ShearY": ((0, 0.3), True), "TranslateX": ((0, 0.3), True),
    "TranslateY": ((0, 0.3), True), "Rotate": ((0, 30), True), "AutoContrast": (None, False),
    "Identity": (None, False), "Equalize": (None, False), "Solarize": ((256, 0), False), "Posterize": ((4, 8), False),
    "Contrast": ((0.05, 0.95), False), "Color": ((0.05, 0.95), False), "Brightness": ((0.05, 0.95), False),
    "Sharpness": ((0.05, 0.95), False),
}


def sampled(pool, n=1400, seed=0):
    """{op name: [magnitudes]} over n samples of the pool with every draw applied (p=1)."""
    torch.manual_seed(seed)
    sa = clsa.StrongerAugmentation(pool, draws=5, p=1.0)
    seen = {}
    for _ in range(n):
        for name, v in sa.sample():
            seen.setdefault(name, []).append(v)
    return seen


def test_default_pool_is_the_authors():
    """--strong-ops defaults to the authors' pool; `paper` gives Table 1's; the views use the flag's pool."""
    assert args_for().strong_ops == "authors"
    for pool in ("authors", "paper"):
        strong = clsa.CLSAViews(args_for("--strong-ops", pool)).strong[0].transforms[1]
        assert strong.pool == pool and (strong.draws, strong.p) == (5, 0.5)


def test_authors_pool_identity_not_invert_magnitudes_10_to_90_percent():
    """The authors' pool: their 14 ops, Identity present and Invert absent, chosen uniformly; every
    magnitude is lo + (hi - lo) * v / 10 with v in 1..9: within 10%-90% of the range (|value| for the
    signed ops, both signs seen), 9 distinct values for the continuous ops; Posterize int(0.4 v) + 4 bits
    (4..7), Rotate 3 v degrees, Solarize's threshold 256 - int(25.6 v) (231..26)."""
    seen = sampled("authors")
    assert set(clsa.STRONG_OPS["authors"]) == set(AUTHORS) == set(seen)
    assert "Identity" in seen and "Invert" not in seen
    total = sum(len(v) for v in seen.values())
    for name, values in seen.items():
        assert abs(len(values) - total / 14) < 5 * math.sqrt(total / 14)  # uniform choice
        span, signed = AUTHORS[name]
        if span is None:
            assert all(v is None for v in values)
            continue
        lo, hi = span
        mags = [abs(v) if signed else v for v in values]
        inner = sorted((lo + 0.1 * (hi - lo), lo + 0.9 * (hi - lo)))
        assert all(inner[0] - 1 <= m <= inner[1] + 1 if name in ("Posterize", "Solarize", "Rotate")
                   else inner[0] - 1e-9 <= m <= inner[1] + 1e-9 for m in mags), name
        assert (min(values) < 0 < max(values)) == signed
    assert sorted(set(seen["Posterize"])) == [4, 5, 6, 7]
    assert sorted(set(seen["Rotate"]), key=abs)[:2] in ([3, -3], [-3, 3]) and max(seen["Rotate"]) == 27
    assert sorted(set(seen["Solarize"])) == sorted(256 - int(25.6 * v) for v in range(1, 10))
    assert len(set(seen["Brightness"])) == 9 and min(seen["Brightness"]) == pytest.approx(0.14)
    assert max(seen["Brightness"]) == pytest.approx(0.86)


def test_paper_pool_follows_table1():
    """--strong-ops paper: Table 1's 14 ops (Invert, no Identity), chosen uniformly, magnitudes uniform
    over the whole printed range (Posterize an integer 4..8; None for AutoContrast, Invert, Equalize)."""
    seen = sampled("paper")
    assert set(clsa.STRONG_OPS["paper"]) == set(TABLE1) == set(seen)
    total = sum(len(v) for v in seen.values())
    assert total == 7000
    for name, values in seen.items():
        assert abs(len(values) - total / 14) < 5 * math.sqrt(total / 14)
        span = TABLE1[name]
        if span is None:
            assert all(v is None for v in values)
        elif name == "Posterize":
            assert set(values) == {4, 5, 6, 7, 8}
        else:
            lo, hi = span
            width = hi - lo
            assert all(lo <= v <= hi for v in values)
            assert min(values) < lo + 0.1 * width and max(values) > hi - 0.1 * width


@pytest.mark.parametrize("flags,draws,p", [((), 5, 0.5), (("--strong-draws", "3", "--strong-p", "0.25"), 3, 0.25)])
def test_strong_augmentation_draw_statistics(flags, draws, p):
    """`draws` draws (5, Sec. 3.3), each applied with probability p (0.5): over 4000 samples the number of
    ops applied has the Binomial(draws, p) mean and variance; one op choice (torch RNG) per draw."""
    strong = clsa.CLSAViews(args_for(*flags)).strong[0].transforms[1]
    assert (strong.draws, strong.p) == (draws, p)
    torch.manual_seed(0)
    counts = np.array([len(strong.sample()) for _ in range(4000)])
    assert counts.min() == 0 and counts.max() == draws
    assert counts.mean() == pytest.approx(draws * p, abs=0.06)
    assert counts.var() == pytest.approx(draws * p * (1 - p), rel=0.1)
    torch.manual_seed(3)
    first = [clsa.StrongerAugmentation().sample() for _ in range(5)]
    torch.manual_seed(3)
    assert first == [clsa.StrongerAugmentation().sample() for _ in range(5)]  # the torch RNG alone decides


@pytest.mark.parametrize("pool,name", [(p, n) for p in ("authors", "paper") for n in sorted(clsa.STRONG_OPS[p])])
def test_each_op_runs_at_its_extremes(pool, name):
    """Each op maps a PIL RGB image to a PIL RGB image of the same size at both ends of its range
    (and the negated end for the signed ops)."""
    img = noise_image(40).crop((0, 0, 40, 30))
    fn, lo, hi, _, signed = clsa.STRONG_OPS[pool][name]
    for v in ([None] if lo is None else [lo, hi, -hi] if signed else [lo, hi]):
        out = fn(img, v)
        assert isinstance(out, Image.Image) and out.size == img.size and out.mode == "RGB"


def test_op_effects():
    """Spot checks: Invert is 255 - x, Identity returns the image, Solarize at 256 is the identity and
    at 0 inverts everything, Posterize 8 is the identity, Brightness 0.5 halves the pixels, TranslateX
    0.25 moves the content a quarter of the width, and the pool's call returns an image of the input size."""
    img = noise_image(24)
    x = np.asarray(img).astype(int)
    ops = {name: entry[0] for pool in clsa.STRONG_OPS.values() for name, entry in pool.items()}
    assert np.array_equal(np.asarray(ops["Invert"](img, None)), 255 - x)
    assert np.array_equal(np.asarray(ops["Identity"](img, None)), x)
    assert np.array_equal(np.asarray(ops["Solarize"](img, 256)), x)
    assert np.array_equal(np.asarray(ops["Solarize"](img, 0)), 255 - x)
    assert np.array_equal(np.asarray(ops["Posterize"](img, 8)), x)
    assert np.abs(np.asarray(ops["Brightness"](img, 0.5)).astype(int) - x * 0.5).max() <= 1
    assert np.array_equal(np.asarray(ops["TranslateX"](img, 0.25))[:, 6:], x[:, :-6])
    assert not np.array_equal(np.asarray(ops["ShearX"](img, 0.3)), x)
    torch.manual_seed(0)
    out = clsa.StrongerAugmentation(p=1.0)(img)
    assert isinstance(out, Image.Image) and out.size == img.size


# ---------------------------------------------------------------------------
# Flags: recipes per data set and impossible combinations
# ---------------------------------------------------------------------------

def test_recipes(monkeypatch):
    """ImageNet: the paper's (Sec. 3.3, 4.1): lr 0.03 at B=256, CLSA-Single's one weak 224 query and one
    strong 96 view; CIFAR-size: MoCo's CIFAR demo values, lr 0.06 at B=512 (0.03 x B/256), one weak and
    one strong view at the image size; BN groups: 8 in one process, 1 under torchrun (set by main() from
    the processes it runs with; get_args does not read torchrun's environment)."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    big = clsa.get_args(["--data", "imagenet"])
    assert (big.arch, big.batch_size, big.lr, big.weight_decay, big.epochs) == ("resnet50", 256, 0.03, 1e-4, 200)
    assert (big.queue_size, big.ema_momentum, big.tau, big.beta, big.blur) == (65536, 0.999, 0.2, 1.0, 0.5)
    assert big.weak_sizes == [224] and big.weak_scales == [0.2, 1.0]
    assert big.strong_sizes == [96] and big.strong_scales == pytest.approx([0.086, 0.429], abs=1e-3)
    assert (big.proj_dim, big.warmup_epochs, big.bn_splits, big.strong_ops) == (128, 0, None, "authors")
    assert main_args(monkeypatch, ["--data", "imagenet"]).bn_splits == 8
    small = clsa.get_args(["--data", "cifar100"])
    assert (small.arch, small.batch_size, small.lr, small.weight_decay) == ("resnet18", 512, 0.03, 5e-4)
    assert small.lr * small.batch_size / 256 == pytest.approx(0.06)  # the demo's rate at its batch of 512
    assert (small.queue_size, small.ema_momentum, small.blur) == (4096, 0.99, 0.0)
    assert small.weak_sizes == [32] and small.strong_sizes == [32] and small.strong_scales == [0.2, 1.0]
    assert clsa.get_args(["--data", "stl10"]).strong_sizes == [96]
    assert main_args(monkeypatch, ["--data", "imagenet"], world=8).bn_splits == 1


@pytest.mark.parametrize("flags,world", [
    (["--strong-sizes", "32", "24", "--strong-scales", "0.2", "1"], 1),
    (["--strong-scales", "0.5", "0.2"], 1),
    (["--strong-sizes", "8"], 1),
    (["--weak-sizes", "32", "24", "--weak-scales", "0.2", "1"], 1),
    (["--weak-sizes", "8"], 1),
    (["--variant", "strong-query", "--weak-sizes", "32"], 1),
    (["--strong-ops", "table1"], 1),
    (["--queue-size", "100"], 1),
    (["--bn-splits", "3"], 1),
    (["--bn-splits", "2"], 2),
    (["--ema-momentum", "1.5"], 1),
])
def test_impossible_flags_exit_2_with_one_sentence(flags, world, capsys, monkeypatch):
    """get_args' checks, and main()'s that depend on the number of processes (--bn-splits)."""
    with pytest.raises(SystemExit) as exc:
        main_args(monkeypatch, ["--data", "cifar10", *flags], world)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------
# End to end: outputs, resume, evaluate.py, torchrun
# ---------------------------------------------------------------------------

# 64 images in batches of 8: 8 steps per epoch. K=20 is not a multiple of 8, so the queue wraps.
TRAIN = ["clsa.py", "--data", "synthetic", "--arch", "resnet_small", "--workers", "0", "--batch-size", "8",
         "--subset", "64", "--queue-size", "20", "--bn-splits", "2", "--log-every", "1"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def run_both(*commands):
    with ThreadPoolExecutor(2) as pool:  # two at a time, one thread each
        return list(pool.map(lambda c: run(c, threads=1), commands))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: 12 uninterrupted steps (two epochs, kNN after the first). B: 5 steps (mid-epoch), then the
    same command resumed to 12. Returns (out A, out B, stdout A, stdout of B's second part)."""
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    proc_a, proc_b1 = run_both([*TRAIN, "--out", str(a), "--max-steps", "12", "--knn-every", "1"],
                               [*TRAIN, "--out", str(b), "--max-steps", "5", "--knn-every", "1"])
    assert "from step 0" in proc_b1.stdout and load(b / "last.pt")["step"] == 5
    proc_b2 = run([*TRAIN, "--out", str(b), "--max-steps", "12", "--knn-every", "1"], threads=1)  # as A
    return a, b, proc_a.stdout, proc_b2.stdout


def test_cifar_base_rate_in_the_startup_line(runs):
    """The rate the optimizer gets: 0.03 x B/256, i.e. 0.06 at the CIFAR recipe's B=512 (here B=8: 0.0009375)."""
    assert "lr 0.0009375," in [line for line in runs[2].splitlines() if line.startswith("clsa:")][0]


def test_end_to_end_outputs(runs):
    """last.pt (plain dict with the key encoder and the queue in `model`), backbone.pt (clean keys,
    strict load, the query encoder), log.jsonl (loss, z_std, kNN), args.json."""
    a, _, stdout, _ = runs
    assert sum(line.startswith("clsa:") for line in stdout.splitlines()) == 1
    assert len(re.findall(r"\bstep \d+/12\b", stdout)) == 12
    ckpt = load(a / "last.pt")
    assert ckpt["method"] == "clsa" and ckpt["step"] == 12
    assert int(ckpt["model"]["queue_ptr"]) == 12 * 8 % 20
    assert ckpt["model"]["queue"].shape == (20, 128)
    assert any(k.startswith("backbone_k.") for k in ckpt["model"]) and any(k.startswith("projector_k.") for k in ckpt["model"])
    backbone, _ = common.resnet("resnet_small", 32)
    backbone.load_state_dict(load(a / "backbone.pt"), strict=True)
    for k, v in load(a / "backbone.pt").items():
        assert torch.equal(v, ckpt["model"][f"backbone.{k}"])
    records = [json.loads(line) for line in (a / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [8, 12]
    assert all(0 < r["z_std"] < 1.2 / 128 ** 0.5 and r["loss"] > 0 for r in records)
    assert 0 <= records[0]["knn_top1"] <= 100
    saved = json.loads((a / "args.json").read_text())
    assert saved["queue_size"] == 20 and saved["strong_sizes"] == [32] and saved["bn_splits"] == 2


def test_resume_mid_epoch_is_bit_identical(runs):
    """5 steps, then resumed to 12: the query encoder, the key encoder, BN statistics, the queue, its
    pointer and the optimizer state equal the uninterrupted run's bit for bit."""
    a, b, _, resumed = runs
    assert "from step 5" in resumed
    ca, cb = load(a / "last.pt"), load(b / "last.pt")
    assert ca["step"] == cb["step"] == 12
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for i, state in ca["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], cb["optimizer"]["state"][i]["momentum_buffer"])


def test_evaluate_reads_the_checkpoint(runs, tmp_path):
    """evaluate.py on last.pt prints the final line and uses the query encoder."""
    a, _, _, _ = runs
    proc = run(["evaluate.py", "--ckpt", str(a / "last.pt"), "--workers", "0", "--subset", "64",
                "--linear-epochs", "2", "--json", str(tmp_path / "e.json")])
    assert re.match(r"^knn_top1=\d+\.\d+ linear_top1=\d+\.\d+$", proc.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "e.json").read_text())["arch"] == "resnet_small"


def test_imagenet_path_multi_crop_on_an_image_folder(tmp_path):
    """The ImageNet recipe (K=65536, alpha 0.999, standard stem) with CLSA-Multi style strong crops runs on
    a tiny ImageFolder at 96 px: two steps, the queue pointer at 2 x 8, strong crops at 96/64/48."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    out = tmp_path / "out"
    run(["clsa.py", "--data", "folder", "--data-dir", str(tmp_path), "--image-size", "96", "--arch", "resnet_small",
         "--batch-size", "8", "--strong-sizes", "96", "64", "48", "--workers", "0", "--max-steps", "2", "--out", str(out)])
    ckpt = load(out / "last.pt")
    assert ckpt["step"] == 2 and int(ckpt["model"]["queue_ptr"]) == 16
    assert ckpt["args"]["queue_size"] == 65536 and ckpt["args"]["ema_momentum"] == 0.999
    assert ckpt["args"]["strong_scales"] == pytest.approx([0.2, 1.0, 0.1333, 0.6667, 0.1, 0.5], abs=1e-3)
    assert ckpt["model"]["backbone.conv1.weight"].shape[-1] == 7  # standard stem above 64 px


def test_torchrun_two_processes(tmp_path):
    """tests/clsa_dist_check.py under torchrun (2 CPU processes, gloo): see the checks below."""
    out = str(tmp_path / "result")
    torchrun(2, ["tests/clsa_dist_check.py", out], timeout=300)
    ranks = [load(f"{out}.rank{r}") for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    check_two_process_results(ranks)


def check_two_process_results(ranks):
    """Keys gathered: each rank's bank holds the whole global batch's keys in rank order, equal to
    one-process shuffle-BN keys (the global batch permuted by the step's seed, BN over each rank's slice);
    after each step both ranks hold the same queue, whose rows at the pointer are those keys (K=12, global
    batch 8: rows 0-7, then 8-11 and 0-3); the key encoders stay identical and follow
    alpha * phi + (1 - alpha) * theta. 2 processes == 1 process: the mean of the ranks' losses (each over
    its own queries, positives at rows rank*4..) is the one-process loss over the global batch, and the
    first SGD step gives the one-process model's query encoder."""
    import clsa_dist_check as check
    ref = check.make_model()
    xk, xq, xs = check.global_batch()
    perm = torch.randperm(check.GLOBAL_BATCH, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        chunks = [ref.projector_k(ref.backbone_k(xk[perm[r * 4:(r + 1) * 4]])) for r in range(2)]
    expected = torch.nn.functional.normalize(torch.cat(chunks), dim=1)[torch.argsort(perm)]
    for step in range(check.STEPS):
        assert torch.equal(ranks[0]["keys"][step], ranks[1]["keys"][step]) and len(ranks[0]["keys"][step]) == 8
    keys0, keys1 = ranks[0]["keys"]
    torch.testing.assert_close(keys0, expected, rtol=1e-5, atol=1e-6)
    # BN over each rank's slice of the permuted batch differs from BN over the whole batch.
    with torch.no_grad():
        whole = torch.nn.functional.normalize(ref.projector_k(ref.backbone_k(xk)), dim=1)
    assert not torch.allclose(whole, expected, atol=1e-4)

    start = ref.queue.clone()
    for step in range(check.STEPS):
        assert torch.equal(ranks[0]["queues"][step], ranks[1]["queues"][step])
        assert torch.equal(ranks[0]["queue_before"][step], ranks[1]["queue_before"][step])
        assert int(ranks[0]["ptr"][step]) == int(ranks[1]["ptr"][step]) == (step + 1) * 8 % 12
    q0, q1 = ranks[0]["queues"][0], ranks[0]["queues"][1]
    assert torch.equal(ranks[0]["queue_before"][0], start)
    assert torch.equal(q0[:8], keys0) and torch.equal(q0[8:], start[8:])
    assert torch.equal(q1[8:], keys1[:4]) and torch.equal(q1[:4], keys1[4:]) and torch.equal(q1[4:8], keys0[4:])
    for a, b in zip(ranks[0]["key_params"], ranks[1]["key_params"]):
        assert torch.equal(a, b)
    for phi, theta, new in zip(ranks[0]["key_params_before"], ranks[0]["query_params_before"], ranks[0]["key_params"]):
        torch.testing.assert_close(new, check.ALPHA * phi + (1 - check.ALPHA) * theta, rtol=0, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["key_params_before"], ranks[0]["query_params_before"]))

    # One process, the same first step: the queries through BN over each rank's half, the keys above
    # (phi = theta at step 1), the loss over all 8 queries with the whole batch's keys in the bank.
    one = check.make_model()
    optimizer = torch.optim.SGD(one.query_parameters(), lr=0.5, momentum=0.9)
    q_w, q_s = (torch.cat([one.projector(one.backbone(x[r * 4:(r + 1) * 4])) for r in range(2)]) for x in (xq, xs))
    loss = clsa.clsa_objective([q_w], [q_s], expected, one.queue.clone(), check.TAU)
    torch.testing.assert_close(loss.detach(), (ranks[0]["loss"][0] + ranks[1]["loss"][0]) / 2, rtol=1e-5, atol=1e-6)
    assert abs(ranks[0]["loss"][0] - ranks[1]["loss"][0]) > 1e-4  # each rank's own queries and positives
    loss.backward()
    optimizer.step()
    for a, b in zip(one.query_parameters(), ranks[0]["query_params_after_step_1"]):
        torch.testing.assert_close(a.detach(), b, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(b, a) for a, b in zip(check.make_model().query_parameters(), ranks[0]["query_params_after_step_1"]))


def test_torchrun_script_two_processes(tmp_path):
    """clsa.py itself under torchrun: one start-up line naming 2 processes, last.pt at --max-steps with
    the queue pointer advanced by the GLOBAL batch each step."""
    out = tmp_path / "ddp"
    proc = torchrun(2, ["clsa.py", "--data", "synthetic", "--arch", "resnet_small", "--workers", "0", "--batch-size", "16",
                        "--subset", "64", "--queue-size", "40", "--max-steps", "3",
                        "--knn-every", "0", "--log-every", "1", "--out", str(out)])
    startup = [line for line in proc.stdout.splitlines() if line.startswith("clsa:")]
    assert len(startup) == 1 and "2 process(es)" in startup[0]
    ckpt = load(out / "last.pt")
    assert ckpt["step"] == 3 and int(ckpt["model"]["queue_ptr"]) == 3 * 16 % 40
    assert ckpt["args"]["bn_splits"] == 1
    assert not any(k.startswith("module.") for k in ckpt["model"])


# ---------------------------------------------------------------------------
# Real data: CLSA learns on CIFAR-10
# ---------------------------------------------------------------------------

def test_clsa_learns_on_cifar10(cifar10_dir, tmp_path):
    """64 CLSA steps of the small backbone lift the kNN accuracy above the random network's.

    Measured on a 2-core CPU (resnet_small, the first 2,048 training images as the kNN bank, all
    10,000 test images): random init (seed 0) 22.34%, after 64 steps at batch 64 with the flags
    below 25.68% (+3.3 points; 25.71% with the earlier [own key, queue] bank and Table 1's op pool). The test asks for +1.5. At this scale MoCo-style
    training leaves its starting point slowly: the loss stays near 2 log(1+K) and the embeddings
    alike (z-std 0.01) for the first hundred steps; with tau 0.2, 60 steps on 2,560 images gave
    no gain at all.
    """
    data = ["--data", "cifar10", "--data-dir", cifar10_dir, "--no-download", "--subset", "2048", "--workers", "2"]
    # Short-run settings, not the recipe (K=4096, alpha 0.99, tau 0.2, lr 0.06 x B/256 need far more
    # steps): a small queue, a fast key encoder, MoCo's CIFAR temperature 0.1, BN over 2 groups.
    run(["clsa.py", *data, "--arch", "resnet_small", "--batch-size", "64", "--epochs", "2", "--lr", "0.24",
         "--tau", "0.1", "--queue-size", "256", "--ema-momentum", "0.9", "--bn-splits", "2", "--knn-every", "2",
         "--log-every", "32", "--out", str(tmp_path / "run")], timeout=1200)
    trained = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()][-1]["knn_top1"]
    random_init = random_init_knn(cifar10_dir, 2048)
    print(f"kNN top-1 on CIFAR-10: random init {random_init:.2f}%, after 64 CLSA steps {trained:.2f}%")
    assert trained >= random_init + 1.5, (random_init, trained)


def test_queue_is_the_same_on_every_process_and_not_rebroadcast_by_ddp(monkeypatch, tmp_path, keep_rng):
    """The initial queue depends on the seed alone (not on the rank-offset global
    RNG), so the processes agree without DDP broadcasting it every step: main()
    wraps the model through common.ddp with the queue and its pointer in
    same_on_every_rank (and per-process BN), and common.ddp, given two processes,
    hands those names to DDP as buffers to ignore."""
    torch.manual_seed(1)
    a = clsa.CLSA("resnet_small", 32, 32, 16, 64, 0.99, 1, seed=3)
    torch.manual_seed(2)
    b = clsa.CLSA("resnet_small", 32, 32, 16, 64, 0.99, 1, seed=3)
    c = clsa.CLSA("resnet_small", 32, 32, 16, 64, 0.99, 1, seed=4)
    assert torch.equal(a.queue, b.queue) and not torch.equal(a.queue, c.queue)
    torch.testing.assert_close(a.queue.norm(dim=1), torch.ones(64))
    real_ddp, wrapped = torch.nn.parallel.DistributedDataParallel, []

    class FakeDDP:  # records what DDP would wrap; the ignore list is set by DDP's own static method
        _set_params_and_buffers_to_ignore_for_model = staticmethod(real_ddp._set_params_and_buffers_to_ignore_for_model)

        def __init__(self, module, device_ids=None):
            wrapped.append(module)

    real = common.ddp

    def ddp(model, ctx, **kwargs):  # main()'s call, replayed as the first of two processes
        assert isinstance(model, clsa.CLSA) and kwargs.get("sync_bn") is False
        real(model, common.Context(0, 2, 0, torch.device("cpu"), None), **kwargs)
        raise StopMain
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    monkeypatch.setattr(common, "ddp", ddp)
    with pytest.raises(StopMain):
        clsa.main(["--data", "synthetic", "--arch", "resnet_small", "--workers", "0", "--batch-size", "8",
                   "--subset", "16", "--queue-size", "16", "--knn-every", "0", "--out", str(tmp_path)])
    assert len(wrapped) == 1
    assert set(wrapped[0]._ddp_params_and_buffers_to_ignore) == {"queue", "queue_ptr"}
    assert {"queue", "queue_ptr"} <= dict(wrapped[0].named_buffers()).keys()
