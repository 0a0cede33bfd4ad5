"""LARS, the learning-rate schedule, kNN and linear evaluation, frozen-backbone
feature extraction, and every test image counted once under 2 processes."""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import evaluate
from conftest import torchrun

CPU = common.Context(0, 1, 0, torch.device("cpu"), None)


# ---------------------------------------------------------------------------
# LARS and its parameter groups
# ---------------------------------------------------------------------------

def norm(values):
    return math.sqrt(sum(v * v for v in values))


def lars_reference(w, grads, lr, momentum, wd, eta, adapt):
    """Plain-python LARS on a flat list of floats, one step per gradient:
    g = grad + wd * w; if adapt: g *= eta * ||w|| / ||g|| (1 if a norm is 0);
    v = momentum * v + lr * g; w = w - v. Returns w after each step."""
    v = [0.0] * len(w)
    history = []
    for grad in grads:
        g = [gi + wd * wi for gi, wi in zip(grad, w)]
        if adapt:
            wn, gn = norm(w), norm(g)
            trust = eta * wn / gn if wn > 0 and gn > 0 else 1.0
            g = [trust * gi for gi in g]
        v = [momentum * vi + lr * gi for vi, gi in zip(v, g)]
        w = [wi - vi for wi, vi in zip(w, v)]
        history.append(w)
    return history


def tiny_model():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.5]]))
        model[0].bias.copy_(torch.tensor([0.5, -1.0]))
        model[1].weight.copy_(torch.tensor([1.5, 0.75]))
        model[1].bias.copy_(torch.tensor([-0.2, 0.3]))
    return model


def test_param_groups_split_weights_from_biases_and_bn():
    """param_groups: the Linear weight (2-D) is decayed and LARS-adapted; the
    Linear bias and BN weight/bias (1-D) get no weight decay and no adaptation."""
    model = tiny_model()
    decay, rest = common.param_groups(model, 1e-4)
    assert [id(p) for p in decay["params"]] == [id(model[0].weight)]
    assert {id(p) for p in rest["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert len(rest["params"]) == 3
    assert decay["weight_decay"] == 1e-4 and decay["lars"] is True
    assert rest["weight_decay"] == 0.0 and rest["lars"] is False


def test_param_groups_skip_frozen_parameters():
    """Parameters with requires_grad=False are in neither group."""
    model = tiny_model()
    model[1].weight.requires_grad_(False)
    decay, rest = common.param_groups(model, 1e-4)
    assert id(model[1].weight) not in {id(p) for p in decay["params"] + rest["params"]}


def test_lars_two_steps_by_hand():
    """Two LARS steps (momentum buffer starting at zero, then carrying over)
    match the plain-python reference: the 2-D weight with weight decay and the
    trust ratio, the 1-D bias and BN parameters as plain momentum SGD."""
    lr, momentum, wd, eta = 0.5, 0.9, 0.01, 0.001
    model = tiny_model()
    start = {name: p.detach().flatten().tolist() for name, p in model.named_parameters()}
    grads = [
        {"0.weight": [0.1, 0.2, -0.3, 0.4, -0.05, 0.6], "0.bias": [0.3, -0.2],
         "1.weight": [0.05, -0.1], "1.bias": [0.7, 0.1]},
        {"0.weight": [-0.2, 0.1, 0.3, 0.0, 0.25, -0.4], "0.bias": [-0.1, 0.4],
         "1.weight": [0.2, 0.3], "1.bias": [-0.6, 0.2]},
    ]
    opt = common.LARS(common.param_groups(model, wd), lr=lr, momentum=momentum, eta=eta)
    params = dict(model.named_parameters())
    after = []
    for step_grads in grads:
        for name, p in params.items():
            p.grad = torch.tensor(step_grads[name], dtype=torch.float64).view_as(p)
        opt.step()
        after.append({name: p.detach().flatten().tolist() for name, p in params.items()})
    for name in params:
        adapt = name == "0.weight"
        expected = lars_reference(start[name], [g[name] for g in grads], lr, momentum,
                                  wd if adapt else 0.0, eta, adapt)
        for step in range(2):
            assert after[step][name] == pytest.approx(expected[step], rel=1e-12, abs=1e-12), (name, step)
    # the adaptation really scaled the weight's step: it moved far less than lr * grad
    moved = norm([a - b for a, b in zip(after[0]["0.weight"], start["0.weight"])])
    assert 0 < moved < 0.01 * lr * norm(grads[0]["0.weight"])


def test_lars_excluded_group_is_momentum_sgd():
    """A lars=False, weight_decay=0 group updates exactly as torch.optim.SGD with
    the same momentum (v = m v + g; w -= lr v equals v' = m v' + lr g; w -= v'
    at constant lr)."""
    w0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    a, b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    lars = common.LARS([dict(params=[a], weight_decay=0.0, lars=False)], lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD([b], lr=0.1, momentum=0.9)
    for grad in ([0.3, -0.2, 0.1], [-0.5, 0.4, 0.05], [0.2, 0.2, -0.3]):
        a.grad = torch.tensor(grad, dtype=torch.float64)
        b.grad = a.grad.clone()
        lars.step()
        sgd.step()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


def test_lars_zero_weight_norm_uses_trust_ratio_one():
    """A LARS-adapted tensor that is all zeros gets trust ratio 1 (not 0 or NaN):
    its first step is -lr * grad."""
    w = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    opt = common.LARS([dict(params=[w], weight_decay=0.01, lars=True)], lr=0.5, momentum=0.9, eta=0.001)
    w.grad = torch.tensor([[1.0, -2.0], [0.5, 0.25]], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.detach(), -0.5 * w.grad, rtol=0, atol=1e-15)


def test_lars_zero_gradient_leaves_weight_unchanged():
    """Zero gradient and no weight decay: ||g|| = 0 gives trust ratio 1, the
    update is zero and nothing becomes NaN."""
    w = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    opt = common.LARS([dict(params=[w], weight_decay=0.0, lars=True)], lr=0.5, momentum=0.9)
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([[1.0, 2.0]], dtype=torch.float64))


# ---------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------

BASE, FINAL, TOTAL, WARM = 2.0, 0.1, 100, 10


def test_lr_warmup():
    """Linear warmup: step 0 is base/warmup, step k is base*(k+1)/warmup, and the
    last warmup step (warmup-1) reaches base."""
    assert common.lr_at(0, TOTAL, WARM, BASE, FINAL) == pytest.approx(BASE / WARM)
    for k in range(WARM):
        assert common.lr_at(k, TOTAL, WARM, BASE, FINAL) == pytest.approx(BASE * (k + 1) / WARM)
    assert common.lr_at(WARM - 1, TOTAL, WARM, BASE, FINAL) == pytest.approx(BASE)


def test_lr_cosine():
    """Cosine part: base at step == warmup, (base+final)/2 halfway, final at
    total_steps (and after), and the value at each step follows the cosine."""
    assert common.lr_at(WARM, TOTAL, WARM, BASE, FINAL) == pytest.approx(BASE)
    mid = WARM + (TOTAL - WARM) // 2
    assert common.lr_at(mid, TOTAL, WARM, BASE, FINAL) == pytest.approx((BASE + FINAL) / 2)
    assert common.lr_at(TOTAL, TOTAL, WARM, BASE, FINAL) == pytest.approx(FINAL)
    assert common.lr_at(TOTAL + 5, TOTAL, WARM, BASE, FINAL) == pytest.approx(FINAL)
    s = WARM + 30
    expected = FINAL + (BASE - FINAL) * 0.5 * (1 + math.cos(math.pi * 30 / (TOTAL - WARM)))
    assert common.lr_at(s, TOTAL, WARM, BASE, FINAL) == pytest.approx(expected)


def test_lr_monotone_after_warmup():
    """From the end of warmup to total_steps the rate never increases, and
    strictly decreases overall."""
    values = [common.lr_at(s, TOTAL, WARM, BASE, FINAL) for s in range(WARM - 1, TOTAL + 1)]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
    assert values[0] > values[-1]


def test_lr_without_warmup():
    """warmup_steps = 0: starts at base, reaches final at total_steps, default final 0."""
    assert common.lr_at(0, 50, 0, BASE, FINAL) == pytest.approx(BASE)
    assert common.lr_at(25, 50, 0, BASE, FINAL) == pytest.approx((BASE + FINAL) / 2)
    assert common.lr_at(50, 50, 0, BASE, FINAL) == pytest.approx(FINAL)
    assert common.lr_at(50, 50, 0, BASE) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------
# Weighted kNN
# ---------------------------------------------------------------------------

def unit(deg):
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def knn_reference(test_f, train_f, train_y, classes, k, t):
    """Loop version: sort training items by cosine similarity, keep k, add
    exp(sim / t) to each neighbour's class, predict the largest total."""
    preds = []
    for q in test_f.tolist():
        sims = []
        for i, x in enumerate(train_f.tolist()):
            sims.append((sum(a * b for a, b in zip(q, x)), i))
        sims.sort(reverse=True)
        votes = [0.0] * classes
        for sim, i in sims[:k]:
            votes[int(train_y[i])] += math.exp(sim / t)
        preds.append(max(range(classes), key=lambda c: votes[c]))
    return preds


def test_knn_weighted_vote_beats_majority():
    """Query at 0 deg. Class 0 has one neighbour at 0 deg (sim 1); class 1 has
    two at +-60 deg (sim 0.5). With k=3 the majority is class 1, but at t=0.1
    the weights are e^10 vs 2 e^5, so class 0 wins; at t=10 they are e^0.1 vs
    2 e^0.05, so class 1 wins. A far item at 180 deg (class 2) is not among the k."""
    train = torch.tensor([unit(0), unit(60), unit(-60), unit(180)])
    labels = torch.tensor([0, 1, 1, 2])
    q = torch.tensor([unit(0)])
    assert common.knn_predict(q, train, labels, 3, k=3, t=0.1).tolist() == [0]
    assert common.knn_predict(q, train, labels, 3, k=3, t=10.0).tolist() == [1]
    assert common.knn_predict(q, train, labels, 3, k=1, t=10.0).tolist() == [0]


def test_knn_k_larger_than_bank_is_clamped():
    """k=200 with 4 training items uses all 4 and raises no error. Query at
    10 deg: the two class-2 items (at +-170 deg, sims about -0.94 and -1) only
    win when all 4 vote with nearly equal weight (t=100); at t=0.1 the class-0
    item at 0 deg (sim 0.98) dominates."""
    train = torch.tensor([unit(0), unit(170), unit(-170), unit(90)])
    labels = torch.tensor([0, 2, 2, 1])
    q = torch.tensor([unit(10)])
    assert common.knn_predict(q, train, labels, 3, k=200, t=100.0).tolist() == [2]
    assert common.knn_predict(q, train, labels, 3, k=200, t=0.1).tolist() == [0]


def test_knn_matches_loop_reference_in_chunks():
    """Random unit features, several queries split into chunks of 3: the
    predictions equal the loop reference."""
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(40, 6, generator=g), dim=1)
    labels = torch.randint(0, 4, (40,), generator=g)
    test = torch.nn.functional.normalize(torch.randn(11, 6, generator=g), dim=1)
    for k, t in ((5, 0.1), (15, 0.5), (40, 0.07)):
        got = common.knn_predict(test, train, labels, 4, k=k, t=t, chunk=3).tolist()
        assert got == knn_reference(test, train, labels, 4, k, t)


def test_knn_top1_normalises_and_scores():
    """knn_top1 takes raw features (any length) and returns the percentage of
    correct test predictions: here the second test item is mislabelled."""
    train = torch.tensor([[10.0, 0.0], [0.0, 0.1], [-3.0, 0.0]])
    train_y = torch.tensor([0, 1, 2])
    test = torch.tensor([[0.5, 0.01], [0.0, 7.0], [-100.0, 1.0]])
    test_y = torch.tensor([0, 2, 2])
    assert common.knn_top1(train, train_y, test, test_y, 3, k=1, t=0.1) == pytest.approx(100.0 * 2 / 3)


# ---------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------

def test_linear_probe_learns_separable_problem():
    """Labels = [x0 + 2 x1 - x2 > 0] with a margin, features shifted and scaled
    per dimension (the probe standardises them): held-out accuracy >= 95%, and
    the returned accuracy is the head's on the standardised test features."""
    g = torch.Generator().manual_seed(0)

    def make(n):
        x = torch.randn(3 * n, 5, generator=g)
        s = x[:, 0] + 2 * x[:, 1] - x[:, 2]
        keep = s.abs() > 0.3
        x, s = x[keep][:n], s[keep][:n]
        return x * torch.tensor([1.0, 5.0, 0.2, 3.0, 1.0]) + 4.0, (s > 0).long()

    train_f, train_y = make(400)
    test_f, test_y = make(400)
    acc, head = evaluate.linear_probe(train_f, train_y, test_f, test_y, 2, epochs=10, lr=0.1, batch_size=128)
    assert acc >= 95.0
    assert isinstance(head, nn.Linear) and head.weight.shape == (2, 5)
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    with torch.no_grad():
        again = 100.0 * (head((test_f - mean) / std).argmax(1) == test_y).float().mean().item()
    assert again == pytest.approx(acc)


def test_linear_probe_random_labels_stay_near_chance():
    """Random features with random labels: whatever the probe fits on the
    training set, held-out accuracy is near chance (50% +- 10)."""
    g = torch.Generator().manual_seed(1)
    train_f, train_y = torch.randn(300, 30, generator=g), torch.randint(0, 2, (300,), generator=g)
    test_f, test_y = torch.randn(2000, 30, generator=g), torch.randint(0, 2, (2000,), generator=g)
    acc, _ = evaluate.linear_probe(train_f, train_y, test_f, test_y, 2, epochs=10, lr=0.1, batch_size=64)
    assert 40.0 <= acc <= 60.0


# ---------------------------------------------------------------------------
# Frozen backbone: feature extraction and the paper-style probe
# ---------------------------------------------------------------------------

def index_dataset(n, side=32, seed=0):
    """n noise images; the label of item i is i."""
    rng = np.random.default_rng(seed)
    return common.ArrayDataset(rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8), np.arange(n))


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_identical(before, module):
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"


def test_extract_features_frozen_ordered_and_in_eval_mode():
    """extract_features on a backbone left in TRAIN mode: every parameter and BN
    buffer (running_mean/var, num_batches_tracked) is bit-identical afterwards,
    train mode is restored on every submodule, exactly len(ds) rows come back in
    dataset order, and the features are the eval-mode forward of each image."""
    torch.manual_seed(0)
    backbone, dim = common.resnet("resnet_small", 32)
    # non-trivial BN statistics, so that eval and train mode give different outputs
    backbone.train()
    with torch.no_grad():
        backbone(torch.randn(8, 3, 32, 32) * 2 + 1)
    before = snapshot(backbone)
    assert before["bn1.num_batches_tracked"].item() == 1
    ds = index_dataset(10)
    feats, labels = common.extract_features(backbone, ds, common.eval_transform("synthetic", 32), CPU,
                                            "synthetic", batch_size=4)
    assert_identical(before, backbone)
    assert backbone.training and all(m.training for m in backbone.modules())
    assert feats.shape == (10, dim) and feats.dtype == torch.float32
    assert labels.tolist() == list(range(10))
    x = torch.stack([common.to_tensor(ds[i][0]) for i in range(10)])
    backbone.eval()
    with torch.no_grad():
        expected = backbone(common.normalize_on_device(x, CPU, "synthetic"))
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-5)


def test_extract_features_restores_eval_mode():
    """A backbone handed over in eval mode stays in eval mode."""
    torch.manual_seed(0)
    backbone, _ = common.resnet("resnet_small", 32)
    backbone.eval()
    common.extract_features(backbone, index_dataset(3), common.to_tensor, CPU, "synthetic")
    assert not any(m.training for m in backbone.modules())


def test_linear_with_aug_leaves_backbone_untouched():
    """The paper-style probe (--linear-aug) trains only the head: the backbone's
    parameters and BN buffers are bit-identical afterwards even though it was
    handed over in train mode, and no backbone gradient was computed."""
    args = evaluate.get_args(["--random-init", "--arch", "resnet_small", "--data", "synthetic", "--linear-aug",
                              "--linear-epochs", "2", "--linear-batch-size", "8", "--workers", "0", "--amp", "off"])
    backbone, dim = evaluate.load_backbone(args)
    assert args.image_size == 32
    backbone.train()
    before = snapshot(backbone)
    train_set = common.ArrayDataset(np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
                                    np.arange(16) % 10)
    g = torch.Generator().manual_seed(0)
    test_f, test_y = torch.randn(8, dim, generator=g), torch.arange(8)
    acc = evaluate.linear_with_aug(backbone, dim, train_set, test_f, test_y, 10, args, CPU)
    assert_identical(before, backbone)
    assert all(p.grad is None for p in backbone.parameters())
    assert 0.0 <= acc <= 100.0 and (acc / 12.5) == pytest.approx(round(acc / 12.5))  # k of 8 test items


# ---------------------------------------------------------------------------
# Two processes: every test image counted exactly once
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dist_eval_output():
    """stdout of tests/dist_eval_check.py under torchrun with 2 processes, for
    a 7-item data set (shards of 3 and 4) and a 1-item one (rank 0's shard empty)."""
    proc = torchrun(2, ["tests/dist_eval_check.py", "7", "1"], timeout=300, check=False)
    assert "DIST_EVAL DONE" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def marker(output, key):
    found = re.findall(rf"^DIST_EVAL {re.escape(key)} (.*)$", output, flags=re.M)
    assert len(found) == 1, output
    return found[0]


def test_gather_shards_unequal_lengths_two_processes(dist_eval_output):
    """gather_shards concatenates 1 row from rank 0 and 2 rows from rank 1 in
    rank order, without the padding."""
    assert marker(dist_eval_output, "gather_shards") == "OK"


def test_extract_features_counts_each_item_once_two_processes(dist_eval_output):
    """7 items on 2 processes: the gathered labels are exactly 0..6 in order and
    the features equal the one-process features."""
    assert marker(dist_eval_output, "n=7") == "OK"


def test_extract_features_fewer_items_than_processes(dist_eval_output):
    """1 item on 2 processes (rank 0's shard is empty): the one item still comes
    back exactly once, rather than a crash."""
    assert marker(dist_eval_output, "n=1") == "OK"
