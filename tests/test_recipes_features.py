"""SimCLR's rate and recipe as the authors ran them, AAG's StepLR and embedding
kNN, the CIFAR AlexNet, and evaluate.py's --features / --linear-crop-scale."""
import importlib
import inspect
import json
import math
import re

import pytest
import torch
import torch.nn as nn
import torchvision.transforms as T

import aag
import common
import evaluate
import simclr
from conftest import error_line, probe_crop, run

SMOKE = ["--data", "synthetic", "--workers", "0", "--subset", "64", "--batch-size", "32", "--log-every", "1"]


def header_lr(stdout):
    """The base lr printed in the script's first line ('..., lr 0.4243, ...')."""
    return float(re.search(r", lr ([0-9.e+-]+),", stdout).group(1))


def first_loss(stdout):
    return float(re.search(r"step 1/\d+\s+loss ([0-9.]+)", stdout).group(1))


# ---------------------------------------------------------------------------
# SimCLR: sqrt scaling, the authors' CIFAR-10 command, loss scale
# ---------------------------------------------------------------------------

def test_simclr_recipe_defaults():
    """CIFAR: ONE command the authors ran, their v1 README's (wd 1e-6, 2-layer head with BN,
    loss_a + loss_b); ImageNet: Sec. 4's wd 1e-6; sqrt scaling without --lr uses App. B.1's
    0.075, an explicit --lr wins."""
    a = simclr.get_args([])
    assert (a.arch, a.batch_size, a.epochs, a.lr, a.weight_decay, a.tau) == ("resnet18", 512, 1000, 1.0, 1e-6, 0.5)
    assert (a.head_bn, a.loss_scale, a.lr_scaling, a.blur, a.color_strength) == (True, "sum", "linear", 0.0, 0.5)
    assert a.proj_layers == 2
    v2 = simclr.get_args(["--weight-decay", "1e-4", "--proj-layers", "3"])  # the v2 README's command (244e712)
    assert (v2.weight_decay, v2.proj_layers, v2.lr, v2.batch_size, v2.tau) == (1e-4, 3, 1.0, 512, 0.5)
    big = simclr.get_args(["--data", "imagenet"])
    assert (big.lr, big.weight_decay, big.head_bn) == (0.3, 1e-6, True)
    assert simclr.get_args(["--lr-scaling", "sqrt"]).lr == 0.075
    assert simclr.get_args(["--lr-scaling", "sqrt", "--data", "imagenet"]).lr == 0.075
    assert simclr.get_args(["--lr-scaling", "sqrt", "--lr", "0.1"]).lr == 0.1
    assert simclr.get_args(["--no-head-bn"]).head_bn is False


def test_simclr_head_bn_as_the_authors_code_builds_it():
    """--head-bn: Linear(no bias) -> BN -> ReLU -> Linear(no bias) -> BN whose shift stays 0
    (not trained); --no-head-bn: Sec. 2.1's W2 relu(W1 h) with biases and no BN."""
    head = simclr.SimCLR("resnet_small", 32, 128, head_bn=True).projector
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert head[0].bias is None and head[3].bias is None
    assert not head[4].bias.requires_grad and torch.all(head[4].bias == 0) and head[4].weight.requires_grad
    assert all(p is not head[4].bias for g in common.param_groups(head, 1e-4) for p in g["params"])
    plain = simclr.SimCLR("resnet_small", 32, 128, head_bn=False).projector
    assert [type(m).__name__ for m in plain] == ["Linear", "ReLU", "Linear"] and plain[0].bias is not None


def test_simclr_proj_layers_3_is_the_v2_head(capsys):
    """--proj-layers 3: the v2 code's head (model_util.projection_head, num_proj_layers=3):
    two hidden Linear -> BN -> ReLU layers as wide as h, then Linear -> BN without shift;
    the rebuilt head (evaluate.load_head) computes the same z; other values are refused."""
    model = simclr.SimCLR("resnet_small", 32, 128, head_bn=True, proj_layers=3)
    head = model.projector
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    dim = head[0].in_features
    assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == [(dim, dim), (dim, dim), (dim, 128)]
    assert not head[-1].bias.requires_grad and head[3].bias is None
    plain = simclr.SimCLR("resnet_small", 32, 128, head_bn=False, proj_layers=3).projector
    assert [type(m).__name__ for m in plain] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    rebuilt, out = evaluate.load_head(model.state_dict(), "simclr")
    model.eval(), rebuilt.eval()
    h = torch.randn(4, dim)
    with torch.no_grad():
        assert out == 128 and torch.allclose(rebuilt(h), head(h), atol=1e-6)
    with pytest.raises(SystemExit):
        simclr.get_args(["--proj-layers", "4"])
    capsys.readouterr()


def test_simclr_sqrt_rate_and_loss_scale(tmp_path, simclr_bn):
    """The printed base rate: 0.075 x sqrt(32) under --lr-scaling sqrt (not 1.0 x sqrt(32)),
    1.0 x 32/256 under linear; --loss-scale sum trains on exactly twice the mean of Eq. (1)."""
    base = ["simclr.py", *SMOKE, "--arch", "resnet_small", "--max-steps", "1", "--knn-every", "0"]
    sqrt = run([*base, "--lr-scaling", "sqrt", "--out", str(tmp_path / "sqrt")]).stdout
    assert header_lr(sqrt) == pytest.approx(0.075 * math.sqrt(32), abs=1e-4)
    linear = (simclr_bn / "stdout.txt").read_text()  # the same command, 2 steps
    assert header_lr(linear) == pytest.approx(32 / 256, abs=1e-4)
    mean = run([*base, "--loss-scale", "mean", "--out", str(tmp_path / "mean")]).stdout
    assert first_loss(linear) == pytest.approx(2 * first_loss(mean), rel=1e-3)


def test_nt_xent_builds_its_indices_on_the_inputs_device():
    """No host-to-device copy per step: every tensor the loss makes lives on z's device
    (checked with a 'meta' device, where a CPU-made index tensor cannot be used)."""
    z1, z2 = torch.randn(4, 8, device="meta"), torch.randn(4, 8, device="meta")
    assert simclr.nt_xent_loss(z1, z2, 0.5).device.type == "meta"
    assert aag.gnt_xent_loss(z1, z2, torch.randn(4, 8, device="meta"), 0.1).device.type == "meta"


# ---------------------------------------------------------------------------
# AAG: StepLR, blur, embedding kNN
# ---------------------------------------------------------------------------

def test_aag_schedule_and_monitor_defaults(capsys):
    """Cosine by default (Sec. Experiments); --schedule step with ISIF's demo_seen.py schedule
    within 200 epochs (x0.1 from 120, x0.05 from 160); kNN monitor on the embedding; SimCLR's
    kernel blur p=0.5 on the basic views; milestones outside the run are refused in one line."""
    a = aag.get_args([])
    assert (a.schedule, a.milestones, a.milestone_factors, a.knn_features, a.blur) == (
        "cosine", [120, 160], [0.1, 0.05], "embedding", 0.5)
    blurs = [t for t in aag.AAGViews(a).basic.transforms if isinstance(t, T.RandomApply)
             and any(isinstance(u, T.GaussianBlur) for u in t.transforms)]
    assert len(blurs) == 1 and blurs[0].p == 0.5 and tuple(blurs[0].transforms[0].kernel_size) == (3, 3)
    assert aag.get_args(["--schedule", "step", "--milestones", "50", "150"]).milestones == [50, 150]
    error_line(capsys, lambda: aag.get_args(["--schedule", "step", "--epochs", "100"]), common.USAGE)


def test_aag_step_schedule_values():
    """Warmup as the cosine schedule, then base, base x 0.1 from the first milestone epoch,
    base x 0.01 from the second; no decay inside an epoch."""
    lr = lambda s: aag.step_lr(s, warmup_steps=4, base_lr=0.1, steps_per_epoch=10, milestones=[6, 9],
                               factors=[0.1, 0.01])
    assert [lr(s) for s in range(4)] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lr(4) == lr(59) == pytest.approx(0.1)
    assert lr(60) == lr(89) == pytest.approx(0.01)
    assert lr(90) == lr(199) == pytest.approx(0.001)
    no_warmup = aag.step_lr(0, warmup_steps=0, base_lr=0.03, steps_per_epoch=5, milestones=[1], factors=[0.1])
    assert no_warmup == pytest.approx(0.03)


def isif_lr(epoch, base):
    """mangye16/Unsupervised_Embedding_Learning demo_seen.py adjust_learning_rate (HEAD 29de398), verbatim logic."""
    lr = base
    if 120 <= epoch < 160:
        lr = base * 0.1
    elif 160 <= epoch < 200:
        lr = base * 0.05
    elif epoch >= 200:
        lr = base * 0.01
    return lr


def test_aag_step_defaults_reproduce_isif(capsys):
    """The default milestones/factors give ISIF's lr at every epoch of AAG's 200 (the x0.05
    branch fires at 160); --epochs 301 with milestones 120 160 200 and factors 0.1 0.05 0.01
    gives ISIF's whole 301-epoch run. --milestones alone: StepLR's cumulative x0.1."""
    a = aag.get_args(["--schedule", "step"])
    assert (a.epochs, a.warmup_epochs, a.milestones, a.milestone_factors) == (200, 0, [120, 160], [0.1, 0.05])
    spe = 7
    lr = lambda s, a: aag.step_lr(s, warmup_steps=0, base_lr=0.03, steps_per_epoch=spe, milestones=a.milestones,
                                  factors=a.milestone_factors)
    for e in range(a.epochs):
        assert lr(e * spe, a) == pytest.approx(isif_lr(e, 0.03)) == pytest.approx(lr(e * spe + spe - 1, a))
    assert lr(160 * spe, a) == pytest.approx(0.03 * 0.05)
    full = aag.get_args(["--schedule", "step", "--epochs", "301", "--milestones", "120", "160", "200",
                         "--milestone-factors", "0.1", "0.05", "0.01"])
    assert all(lr(e * spe, full) == pytest.approx(isif_lr(e, 0.03)) for e in range(301))
    assert aag.get_args(["--milestones", "50", "150"]).milestone_factors == pytest.approx([0.1, 0.01])
    assert aag.get_args(["--milestone-factors", "0.2", "0.02"]).milestones == [120, 160]
    error_line(capsys, lambda: aag.get_args(["--milestones", "50", "150", "--milestone-factors", "0.1"]), common.USAGE)
    error_line(capsys, lambda: aag.get_args(["--milestones", "150", "50"]), common.USAGE)
    error_line(capsys, lambda: aag.get_args(["--milestones", "120", "160", "200", "--milestone-factors", "0.1"]),
               common.USAGE)


def test_aag_help_names_isif_schedule_and_port_randaugment(capsys):
    """--help: the step schedule's factors (no 'never fire'), and that --aux-policy randaugment
    is torchvision's, not the MindSpore port's RandAugment."""
    with pytest.raises(SystemExit):
        aag.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "never fire" not in text and "never fire" not in aag.__doc__
    assert "--milestone-factors 0.1 0.05 0.01" in text and "120 160" in text
    assert "torchvision's RandAugment" in text and "Cutout 13 px" in text and "Translate 33 px" in text
    assert "18 ops" in aag.__doc__ and "2f24bec" in aag.__doc__


# ---------------------------------------------------------------------------
# The CIFAR AlexNet (Tables 1-2)
# ---------------------------------------------------------------------------

def test_alexnet_shapes_and_layers(capsys):
    """--arch alexnet: five 3x3 convs 64-192-384-256-256, [B, 256, 4, 4] at 32 px, two FC
    layers to h of 1024; 64 px pooled to the same 4x4; larger images refused in one line."""
    net, dim = common.resnet("alexnet", 32)
    assert dim == 1024 and "alexnet" in common.ARCHS
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(c, (3, 3)) for c in (64, 192, 384, 256, 256)]
    x = torch.randn(3, 3, 32, 32)
    assert net.features(x).shape == (3, 256, 4, 4)
    assert net(x).shape == (3, 1024)
    assert common.resnet("alexnet", 64)[0](torch.randn(2, 3, 64, 64)).shape == (2, 1024)
    error_line(capsys, lambda: common.resnet("alexnet", 96), common.USAGE)


@pytest.fixture(scope="module")
def aag_alexnet(tmp_path_factory):
    """A 2-step AAG run (one epoch of 32 images) with --arch alexnet and the kNN monitor."""
    out = tmp_path_factory.mktemp("aag_alexnet")
    run(["aag.py", *SMOKE, "--subset", "32", "--batch-size", "16", "--arch", "alexnet", "--epochs", "1",
         "--knn-every", "1", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def simclr_bn(tmp_path_factory):
    """A 2-step SimCLR run with the authors' BN head (the default); its stdout in stdout.txt."""
    out = tmp_path_factory.mktemp("simclr_bn")
    proc = run(["simclr.py", *SMOKE, "--arch", "resnet_small", "--max-steps", "2", "--knn-every", "0", "--out", str(out)])
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def eval_args(ckpt, features):
    return evaluate.get_args(["--ckpt", str(ckpt), "--features", features])


def test_aag_monitor_is_the_embedding_knn(aag_alexnet, ctx):
    """The logged kNN is the kNN on g(f(x)) of the saved weights (the paper's protocol)."""
    ckpt = torch.load(aag_alexnet / "last.pt", map_location="cpu", weights_only=True)
    logged = json.loads((aag_alexnet / "log.jsonl").read_text().splitlines()[-1])["knn_top1"]
    model = aag.AAG("alexnet", 32, 128, "linear")
    model.load_state_dict(ckpt["model"])
    train_set, test_set = common.subset(common.dataset("synthetic", ".", True), 32), common.dataset("synthetic", ".", False)
    knn = lambda net: common.knn_accuracy(net, train_set, test_set, 10, ctx, 32, "synthetic")
    assert logged == pytest.approx(knn(nn.Sequential(model.backbone, model.projector)), abs=1e-6)


@pytest.mark.parametrize("run_name", ["aag_alexnet", "simclr_bn"])
def test_embedding_features_are_head_of_backbone(run_name, request):
    """evaluate.py --features embedding rebuilds the head from last.pt: its network's output
    equals the trained model's projector(backbone(x)) in eval mode (linear head on AlexNet;
    SimCLR's BN head with running statistics on resnet_small)."""
    out = request.getfixturevalue(run_name)
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    model = aag.AAG("alexnet", 32, 128, "linear") if run_name == "aag_alexnet" else simclr.SimCLR("resnet_small", 32, 128)
    model.load_state_dict(ckpt["model"])
    model.eval()
    net, dim = evaluate.load_backbone(eval_args(out / "last.pt", "embedding"))
    net.eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = model.projector(model.backbone(x))
        assert dim == 128
        assert torch.allclose(net(x), expected, atol=1e-5)
        h_net, h_dim = evaluate.load_backbone(eval_args(out / "last.pt", "backbone"))
        assert h_dim == (1024 if run_name == "aag_alexnet" else 128)
        assert torch.allclose(h_net.eval()(x), model.backbone(x), atol=1e-5)


def test_embedding_refused_without_a_head(simclr_bn, capsys):
    """backbone.pt holds no head, --random-init has none: one error line each."""
    error_line(capsys, lambda: evaluate.load_backbone(eval_args(simclr_bn / "backbone.pt", "embedding")), common.USAGE)
    error_line(capsys, lambda: evaluate.get_args(["--random-init", "--arch", "resnet_small", "--data", "synthetic",
                                                  "--features", "embedding"]), common.USAGE)


def build_from_args(module_name):
    """The method's model class built from its own get_args defaults (resnet_small, synthetic)."""
    module = importlib.import_module(module_name)
    args = module.get_args(["--data", "synthetic", "--arch", "resnet_small"])
    if getattr(args, "bn_splits", 0) is None:  # CLSA, ReSSL: main() completes it after setup; one process: 8 groups
        args.bn_splits = 8
    cls = getattr(module, {"simclr": "SimCLR", "aag": "AAG", "clsa": "CLSA", "ressl": "ReSSL", "dssl": "DSSL"}[module_name])
    params = inspect.signature(cls.__init__).parameters
    kwargs = {name: getattr(args, name) for name in params if name != "self" and hasattr(args, name)}
    return cls(**kwargs)


@pytest.mark.parametrize("module_name", ["simclr", "aag", "clsa", "ressl", "dssl"])
def test_head_rebuilds_for_every_method(module_name):
    """evaluate.load_head rebuilds each method's default head from its state dict alone,
    computing the same z as the model's own projector."""
    torch.manual_seed(0)
    model = build_from_args(module_name).eval()
    head, dim = evaluate.load_head(model.state_dict(), module_name)
    head.eval()
    with torch.no_grad():
        for m in model.projector.modules():  # non-trivial BN statistics
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
        head.load_state_dict({k[len("projector."):]: v for k, v in model.state_dict().items() if k.startswith("projector.")})
        first_linear = next(m for m in model.projector.modules() if isinstance(m, nn.Linear))
        h = torch.randn(6, first_linear.in_features)
        assert torch.allclose(head(h), model.projector(h), atol=1e-5)
    assert dim == model.projector(h).shape[1]


# ---------------------------------------------------------------------------
# evaluate.py: --linear-crop-scale
# ---------------------------------------------------------------------------

def test_linear_crop_scale_reaches_the_probe(monkeypatch, ctx, capsys):
    """Default 0.08-1; DSSL's 0.8 1 is the RandomResizedCrop of --linear-aug; LO > HI refused."""
    assert tuple(evaluate.get_args(["--random-init", "--arch", "resnet_small", "--data", "synthetic"]).linear_crop_scale) == (0.08, 1.0)
    args = evaluate.get_args(["--random-init", "--arch", "resnet_small", "--data", "synthetic", "--linear-aug",
                              "--linear-crop-scale", "0.8", "1", "--image-size", "32"])
    crop = probe_crop(monkeypatch, args, ctx)
    assert isinstance(crop, T.RandomResizedCrop) and tuple(crop.scale) == (0.8, 1.0)
    error_line(capsys, lambda: evaluate.get_args(["--random-init", "--arch", "resnet_small", "--data", "synthetic",
                                                  "--linear-crop-scale", "0.9", "0.2"]), common.USAGE)
