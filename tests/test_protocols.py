"""evaluate.py: the flags that make each paper's probe one command.

--eval-resize (DSSL CIFAR: resize 36, centre crop 32), --interpolation (bilinear:
the ImageNet probes of CLSA, ReSSL, DSSL), --linear-report {last,best} (best: what
the authors' code prints), --linear-optim lars (DSSL ImageNet), --linear-final-lr-ratio
(CLSA) and --linear-schedule cosine-iter (ReSSL). Tiny features, a few epochs."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook

import common
import evaluate
from conftest import error_line, probe_crop

CPU = common.Context(0, 1, 0, torch.device("cpu"), None)
BASE = ["--random-init", "--arch", "resnet_small", "--data", "synthetic"]


def args_for(*extra):
    args = evaluate.get_args(BASE + list(extra))
    if args.image_size is None:
        args.image_size = 32
    return args


def pooled():
    """A 'backbone' whose features are the image's mean colour: dim 3, instant."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), 3


def colour_dataset(n=32, side=32, seed=0):
    """n images, each one colour of its class (10 classes) plus noise: learnable from the mean colour."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    palette = rng.integers(0, 256, (10, 3))
    images = np.clip(palette[labels][:, None, None, :] + rng.integers(-20, 20, (n, side, side, 3)), 0, 255).astype(np.uint8)
    return common.ArrayDataset(images, labels)


def separable(n, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    return torch.randn(n, d, generator=g) + 3.0 * y[:, None].float(), y


def lr_per_step(fn):
    """The learning rate of every optimizer step taken while fn() runs."""
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    try:
        fn()
    finally:
        handle.remove()
    return seen


# ---------------------------------------------------------------------------
# --eval-resize, --interpolation
# ---------------------------------------------------------------------------

def test_eval_resize_36_then_centre_crop_32():
    """DSSL's CIFAR test transform: Resize(int(32 x 8/7) = 36, bicubic), CenterCrop(32)."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    tf = evaluate.eval_transform(args_for("--eval-resize", "36", "--image-size", "32"))
    out = tf(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    resize = [t for t in tf.transforms if isinstance(t, T.Resize)][0]
    assert resize.size == 36 and resize.interpolation == T.InterpolationMode.BICUBIC
    expected = common.to_tensor(T.CenterCrop(32)(img.resize((36, 36), Image.BICUBIC)))
    assert torch.equal(out, expected)
    # a 36 px resize then a 32 px crop is a 1.125x zoom: not the image itself (the default's no-op)
    assert not torch.equal(out, common.to_tensor(img))
    assert torch.equal(evaluate.eval_transform(args_for("--image-size", "32"))(img), common.to_tensor(img))


def test_eval_transform_default_is_commons():
    """No flag: exactly common.eval_transform (bicubic; /0.875 on ImageNet-size data)."""
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    for data, size in (("synthetic", 32), ("imagenet", 48)):
        args = args_for("--image-size", str(size))
        args.data = data
        assert torch.equal(evaluate.eval_transform(args)(img), common.eval_transform(data, size)(img))


def test_interpolation_bilinear_reaches_eval_resize_and_probe_crops(monkeypatch):
    args = args_for("--image-size", "48", "--interpolation", "bilinear", "--linear-aug")
    args.data = "imagenet"
    tf = evaluate.eval_transform(args)
    resize = [t for t in tf.transforms if isinstance(t, T.Resize)][0]
    assert resize.interpolation == T.InterpolationMode.BILINEAR and resize.size == round(48 / 0.875)
    crop = probe_crop(monkeypatch, args, CPU)
    assert isinstance(crop, T.RandomResizedCrop) and crop.interpolation == T.InterpolationMode.BILINEAR
    assert probe_crop(monkeypatch, args_for("--linear-aug"), CPU).interpolation == T.InterpolationMode.BICUBIC  # default


def test_impossible_values_one_line(capsys):
    for extra in (["--eval-resize", "0"], ["--eval-resize", "x"], ["--interpolation", "nearest"],
                  ["--linear-report", "worst"], ["--linear-optim", "lamb"], ["--linear-schedule", "linear"],
                  ["--linear-final-lr-ratio", "-0.1"], ["--linear-final-lr-ratio", "1.5"],
                  ["--linear-final-lr-ratio", "nan"], ["--linear-final-lr-ratio", "0.01", "--linear-schedule", "step"]):
        line = error_line(capsys, lambda: evaluate.get_args(BASE + extra), common.USAGE)
        assert extra[0] in line, line
    # a resize below the crop: known once the image size is, before any process starts
    args = args_for("--eval-resize", "16", "--image-size", "32")
    assert "--eval-resize 16" in error_line(capsys, lambda: evaluate.eval_transform(args), common.USAGE)


# ---------------------------------------------------------------------------
# --linear-report
# ---------------------------------------------------------------------------

def test_linear_probe_history_ends_with_the_returned_figure():
    train_f, train_y = separable(64)
    test_f, test_y = separable(32, seed=1)
    history = []
    acc, _ = evaluate.linear_probe(train_f, train_y, test_f, test_y, 2, epochs=4, lr=0.1, batch_size=16, history=history)
    assert len(history) == 4 and acc == history[-1]
    plain, _ = evaluate.linear_probe(train_f, train_y, test_f, test_y, 2, epochs=4, lr=0.1, batch_size=16)
    assert plain == acc  # testing every epoch changes nothing in the training


def test_linear_with_aug_history(monkeypatch):
    backbone, dim = pooled()
    args = args_for("--linear-aug", "--linear-epochs", "3", "--linear-batch-size", "8", "--workers", "0",
                    "--linear-optim", "sgd", "--linear-lr", "0.5")
    train_set = colour_dataset()
    test_f = torch.rand(16, 3) * 255
    test_y = torch.arange(16) % 10
    history = []
    acc = evaluate.linear_with_aug(backbone, dim, train_set, test_f, test_y, 10, args, CPU, history)
    assert len(history) == 3 and acc == history[-1]
    assert evaluate.linear_with_aug(backbone, dim, train_set, test_f, test_y, 10, args, CPU) == acc


@pytest.mark.parametrize("report", ["last", "best"])
def test_report_best_is_the_max_over_epochs_last_the_last(monkeypatch, tmp_path, capsys, report):
    """A probe whose test accuracy goes 10, 50, 30 over its epochs: last reports 30, best 50 (epoch 2),
    named in the JSON as the authors' choice, selected on the test set."""
    def fake_probe(*a, history=None, **kw):
        if history is not None:
            history.extend([10.0, 50.0, 30.0])
        return 30.0, None

    monkeypatch.setattr(evaluate, "linear_probe", fake_probe)
    out = tmp_path / "r.json"
    evaluate.main(BASE + ["--image-size", "16", "--subset", "16", "--no-knn", "--workers", "0", "--amp", "off",
                          "--linear-report", report, "--json", str(out)])
    js = json.loads(out.read_text())
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert js["linear_report"] == report and js["linear_top1_last"] == 30.0
    if report == "last":
        assert js["linear_top1"] == 30.0 and "linear_best_epoch" not in js
        assert last_line == "knn_top1=- linear_top1=30.00"
    else:
        assert js["linear_top1"] == 50.0 and js["linear_best_epoch"] == 2
        assert js["linear_top1_per_epoch"] == [10.0, 50.0, 30.0]
        assert "test set" in js["linear_report_note"] and "optimistic" in js["linear_report_note"]
        assert last_line == "knn_top1=- linear_top1=50.00"


# ---------------------------------------------------------------------------
# --linear-optim lars
# ---------------------------------------------------------------------------

def test_lars_probe_adapts_weight_and_bias():
    """DSSL ImageNet (LARC around SGD, trust 0.001, momentum 0.9, both fc tensors): the first
    step moves every tensor by lr x 0.001 x its norm, whatever its gradient's size."""
    torch.manual_seed(0)
    head = nn.Linear(5, 3)
    opt = evaluate.make_linear_optimizer(head.parameters(), "lars", 1.6, 0.0)
    assert isinstance(opt, common.LARS) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["lars"] and group["eta"] == 0.001 and group["momentum"] == 0.9 and len(group["params"]) == 2
    before = [p.detach().clone() for p in head.parameters()]
    nn.functional.cross_entropy(head(torch.randn(8, 5) * 100), torch.arange(8) % 3).backward()
    opt.step()
    for p, b in zip(head.parameters(), before):
        assert (p.detach() - b).norm().item() == pytest.approx(1.6 * 0.001 * b.norm().item(), rel=1e-4)


def test_lars_probe_runs_and_differs_from_sgd():
    train_f, train_y = separable(64)
    test_f, test_y = separable(32, seed=1)
    kw = dict(epochs=3, lr=1.6, batch_size=16, seed=0)
    acc_lars, lars = evaluate.linear_probe(train_f, train_y, test_f, test_y, 2, optimizer="lars", **kw)
    acc_sgd, sgd = evaluate.linear_probe(train_f, train_y, test_f, test_y, 2, optimizer="sgd", **kw)
    assert torch.isfinite(lars.weight).all() and 0 <= acc_lars <= 100
    assert not torch.allclose(lars.weight, sgd.weight)


# ---------------------------------------------------------------------------
# --linear-final-lr-ratio, --linear-schedule cosine-iter
# ---------------------------------------------------------------------------

def test_final_lr_ratio_ends_the_cosine_at_ratio_x_lr():
    """CLSA's adjust_learning_rate: lr_e = end + (lr - end) x (1 + cos(pi e / E)) / 2, e from 0."""
    lr, epochs, r = 10.0, 100, 0.001
    assert evaluate.linear_lr(0, epochs, lr, "cosine", final_ratio=r) == lr
    assert evaluate.linear_lr(epochs, epochs, lr, "cosine", final_ratio=r) == pytest.approx(r * lr)
    for e in (1, 50, 99):
        expected = 0.01 + (10 - 0.01) * 0.5 * (1 + math.cos(math.pi * e / 100))
        assert evaluate.linear_lr(e, epochs, lr, "cosine", final_ratio=r) == pytest.approx(expected)
    rates = [evaluate.linear_lr(e, epochs, lr, "cosine", final_ratio=r) for e in range(epochs)]
    assert all(a > b for a, b in zip(rates, rates[1:])) and min(rates) > r * lr
    # ratio 0 is the old schedule, to the bit
    for e in range(epochs):
        assert evaluate.linear_lr(e, epochs, lr, "cosine") == lr * 0.5 * (1.0 + math.cos(math.pi * e / epochs))
    # the iteration cosine ends there too
    assert evaluate.linear_lr(epochs - 1, epochs, lr, "cosine-iter", (), r, 7, 7) == pytest.approx(r * lr)


def test_final_lr_ratio_reaches_the_probe(monkeypatch):
    train_f, train_y = separable(40)
    seen = lr_per_step(lambda: evaluate.linear_probe(
        train_f, train_y, train_f, train_y, 2, epochs=4, lr=1.0, batch_size=10, final_ratio=0.5))
    assert len(seen) == 16
    per_epoch = seen[::4]
    assert per_epoch == [pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * e / 4))) for e in range(4)]
    assert min(seen) > 0.5


def test_cosine_iter_changes_within_an_epoch(monkeypatch):
    """ReSSL: CosineAnnealingLR(T_max = epochs x steps), stepped after every iteration."""
    train_f, train_y = separable(40)
    epochs, steps = 3, 4
    seen = lr_per_step(lambda: evaluate.linear_probe(
        train_f, train_y, train_f, train_y, 2, epochs=epochs, lr=0.3, batch_size=10, schedule="cosine-iter"))
    total = epochs * steps
    assert seen == [pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi * t / total))) for t in range(total)]
    assert all(a > b for a, b in zip(seen, seen[1:]))  # changes at every step, within an epoch too
    # torch's own CosineAnnealingLR, stepped per iteration, gives the same rates
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    reference = []
    for _ in range(total):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [pytest.approx(v) for v in reference]
    # per-epoch cosine: constant within each epoch
    seen = lr_per_step(lambda: evaluate.linear_probe(
        train_f, train_y, train_f, train_y, 2, epochs=epochs, lr=0.3, batch_size=10, schedule="cosine"))
    assert all(len(set(seen[e * steps:(e + 1) * steps])) == 1 for e in range(epochs))


def test_cosine_iter_in_the_augmented_probe(monkeypatch):
    backbone, dim = pooled()
    args = args_for("--linear-aug", "--linear-epochs", "2", "--linear-batch-size", "8", "--workers", "0",
                    "--linear-optim", "lars", "--linear-lr", "1.6", "--linear-schedule", "cosine-iter",
                    "--linear-final-lr-ratio", "0.1")
    train_set = colour_dataset(32)
    seen = lr_per_step(lambda: evaluate.linear_with_aug(
        backbone, dim, train_set, torch.rand(8, 3), torch.arange(8), 10, args, CPU))
    total = 2 * 4
    assert seen == [pytest.approx(0.16 + 1.44 * 0.5 * (1 + math.cos(math.pi * t / total))) for t in range(total)]
