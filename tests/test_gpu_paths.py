"""The GPU code paths of common.py, emulated on the CPU: the precision chosen
for each card (device capability mocked), resuming across precision modes,
permutations drawn on the device, SplitBatchNorm keeping channels-last, the
SyncBN / split-BN guard, LARS with multi-tensor ops, evaluation inputs in the
training memory format, and --deterministic.

What only a GPU can confirm is listed in the README (Mixed precision and GPUs)."""
import argparse
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

CUDA = torch.device("cuda", 0)


# ---------------------------------------------------------------------------
# --amp auto: bf16 only where the card has it natively
# ---------------------------------------------------------------------------

def fake_card(monkeypatch, capability, name):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    # What the emulation makes torch report on sm_70/sm_75: the reason auto must not ask it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.mark.parametrize("capability, name, expected", [
    ((7, 5), "NVIDIA GeForce RTX 2080 Ti", torch.float16),
    ((7, 0), "Tesla V100-SXM2-16GB", torch.float16),
    ((8, 0), "NVIDIA A100-SXM4-40GB", torch.bfloat16),
    ((9, 0), "NVIDIA H100 80GB HBM3", torch.bfloat16),
])
def test_amp_auto_is_bf16_only_on_native_cards(monkeypatch, capsys, capability, name, expected):
    fake_card(monkeypatch, capability, name)
    assert common.choose_amp("auto", CUDA) is expected
    assert capsys.readouterr().err == ""


def test_amp_auto_on_sm75_enables_loss_scaling(monkeypatch):
    """fp16 on an RTX 2080 Ti comes with an enabled GradScaler (bf16 would have none)."""
    fake_card(monkeypatch, (7, 5), "NVIDIA GeForce RTX 2080 Ti")
    made = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: made.append((device, enabled)))
    ctx = common.Context(0, 1, 0, CUDA, common.choose_amp("auto", CUDA))
    ctx.grad_scaler()
    assert made == [("cuda", True)]
    fake_card(monkeypatch, (8, 0), "NVIDIA A100-SXM4-40GB")
    common.Context(0, 1, 0, CUDA, common.choose_amp("auto", CUDA)).grad_scaler()
    assert made[-1] == ("cuda", False)


def test_amp_bf16_on_an_old_card_warns_once_in_one_line(monkeypatch, capsys):
    fake_card(monkeypatch, (7, 5), "NVIDIA GeForce RTX 2080 Ti")
    assert common.choose_amp("bf16", CUDA) is torch.bfloat16  # the user's explicit choice is kept
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning:") and "emulated" in err and "7.5" in err
    common.choose_amp("bf16", CUDA, warn=False)  # ranks other than 0 stay quiet
    assert capsys.readouterr().err == ""
    fake_card(monkeypatch, (8, 6), "NVIDIA GeForce RTX 3090")
    common.choose_amp("bf16", CUDA)
    assert capsys.readouterr().err == ""


def test_amp_on_the_cpu():
    cpu = torch.device("cpu")
    assert common.choose_amp("auto", cpu) is None
    assert common.choose_amp("bf16", cpu) is torch.bfloat16
    assert common.choose_amp("off", cpu) is None
    with pytest.raises(SystemExit) as e:
        common.choose_amp("fp16", cpu)
    assert e.value.code == common.USAGE


# ---------------------------------------------------------------------------
# Resume across precision modes: the scaler state is loaded only when both have one
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("saved_fp16", [False, True])
@pytest.mark.parametrize("resumed_fp16", [False, True])
def test_resume_across_precision_modes(tmp_path, saved_fp16, resumed_fp16):
    args = argparse.Namespace(out=str(tmp_path), resume="auto", method="simclr", arch="resnet_small", image_size=32,
                              data="synthetic")

    def run_parts(fp16):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=fp16)
        return model, opt, scaler

    model, opt, scaler = run_parts(saved_fp16)
    scaler.scale(model(torch.ones(3, 4)).sum()).backward()
    scaler.step(opt)
    scaler.update(2.0 ** 7 if saved_fp16 else None)  # a scale the resumed fp16 run must see again
    common.save_run(args, model, model, opt, scaler, step=5, epoch=1)

    model2, opt2, scaler2 = run_parts(resumed_fp16)
    assert common.resume(args, model2, opt2, scaler2) == 5
    torch.testing.assert_close(model2.weight, model.weight)
    assert opt2.state_dict()["state"][0]["momentum_buffer"].abs().sum() > 0
    if resumed_fp16:
        assert scaler2.get_scale() == (2.0 ** 7 if saved_fp16 else 2.0 ** 10)  # fresh scale after a bf16/off run
    else:
        assert scaler2.state_dict() == {}


# ---------------------------------------------------------------------------
# No host syncs: shuffle-BN's permutation is drawn on the host, its indices copied without blocking
# ---------------------------------------------------------------------------

def test_batch_shuffle_draws_on_the_host_and_copies_its_indices_once(monkeypatch):
    """The all_to_all's row counts must be host integers, so the permutation is drawn by a CPU
    generator from the seed (nothing read back from the device); the indices it implies reach the
    device in one [4, n] copy."""
    drawn, copied = [], []
    randperm, to_device = torch.randperm, common.host_to_device

    def spy_randperm(n, *a, generator=None, **k):
        drawn.append((k.get("device"), generator.device))
        return randperm(n, *a, generator=generator, **k)

    def spy_copy(t, device):
        copied.append((t.device, tuple(t.shape), device))
        return to_device(t, device)

    monkeypatch.setattr(torch, "randperm", spy_randperm)
    monkeypatch.setattr(common, "host_to_device", spy_copy)
    x = torch.arange(16.).view(8, 2)
    shuffled, plan = common.batch_shuffle(x, seed=3)
    restored = common.batch_unshuffle(shuffled, plan)
    assert drawn == [(None, torch.device("cpu"))]
    assert copied == [(torch.device("cpu"), (4, 8), x.device)]
    # The permutation is the one a CPU generator draws from the seed (every rank, every resume).
    perm = randperm(8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(shuffled, x[perm])
    torch.testing.assert_close(restored, x)


def test_normalize_on_device_copies_the_mean_and_std_once_without_blocking(monkeypatch):
    """Normalising a batch needs the data set's mean and std on the device: they are copied
    through host_to_device (no blocking copy) once per (data set, device), not once per view."""
    copied, to_device = [], common.host_to_device

    def spy_copy(t, device):
        copied.append((t.device, tuple(t.shape), device))
        return to_device(t, device)

    monkeypatch.setattr(common, "host_to_device", spy_copy)
    common._mean_std.cache_clear()
    ctx = common.Context(0, 1, 0, torch.device("cpu"), None)
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    out = [common.normalize_on_device(x, ctx, "cifar10") for _ in range(3)]
    assert copied == [(torch.device("cpu"), (1, 3, 1, 1), ctx.device)] * 2  # mean, std; then cached
    info = common.DATA_INFO["cifar10"]
    mean, std = (255 * torch.tensor(info[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    for o in out:
        torch.testing.assert_close(o, (x.float() - mean) / std)


def test_host_to_device_copies_from_pinned_memory_without_blocking(monkeypatch):
    """CUDA emulated: the copy goes through pin_memory() and .to(..., non_blocking=True) (a
    pageable copy would make the host wait for the device's queue); other devices copy plainly."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, device, **k: calls.append((str(device), k)) or t)
    t = torch.arange(4)
    common.host_to_device(t, torch.device("cuda", 0))
    assert calls == ["pin", ("cuda:0", {"non_blocking": True})]
    calls.clear()
    common.host_to_device(t, torch.device("cpu"))
    assert calls == [("cpu", {})]


def test_seeded_views_touch_only_the_cpu_generator(monkeypatch):
    """CUDA emulated, 2 GPUs: a view is drawn under the CPU generator alone, seeded and restored without a
    CUDA call (a loader worker forked from a CUDA process must not use CUDA; seeding every GPU costs 100x)."""
    def no_cuda(*args, **kwargs):
        raise AssertionError("drawing a view called into CUDA")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all", "init"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    views = common.SeededViews([(None, 0)], lambda img: torch.rand(3))
    state = torch.get_rng_state()
    assert torch.equal(views[(0, 5)][0], views[(0, 5)][0]) and not torch.equal(views[(0, 5)][0], views[(0, 6)][0])
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------
# SplitBatchNorm under channels-last
# ---------------------------------------------------------------------------

def loop_group_bn(x, weight, bias, eps, splits):
    """Reference: each group {i : i % splits == g} normalised on its own, one at a time."""
    out = torch.empty_like(x).contiguous()
    for g in range(splits):
        xs = x[g::splits]
        for ch in range(x.shape[1]):
            v = xs[:, ch]
            out[g::splits, ch] = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + eps) * weight[ch] + bias[ch]
    return out


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_split_bn_keeps_the_memory_format(fmt):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = (torch.randn(12, 6, 5, 5) * 2 + 1).contiguous(memory_format=fmt).requires_grad_()
    split = common.SplitBatchNorm(bn, 4).train()
    out = split(x)
    assert out.is_contiguous(memory_format=fmt)
    if fmt == torch.channels_last:
        assert not out.is_contiguous()  # really NHWC, not a tensor that happens to be both
    ref = loop_group_bn(x.detach(), bn.weight.detach(), bn.bias.detach(), bn.eps, 4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # Running statistics: momentum 0.3 towards the mean over groups of each group's mean / unbiased variance.
    xd = x.detach()
    means = torch.stack([xd[g::4].mean((0, 2, 3)) for g in range(4)]).mean(0)
    variances = torch.stack([xd[g::4].var((0, 2, 3), unbiased=True) for g in range(4)]).mean(0)
    torch.testing.assert_close(split.running_mean, 0.3 * means, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.running_var, 0.7 + 0.3 * variances, atol=1e-5, rtol=1e-5)
    # Gradients equal those of the reference (the formula, not just the forward values).
    xr = x.detach().clone().requires_grad_()
    w, b = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad((out ** 2 * torch.arange(5.)).sum(), x)
    (gr,) = torch.autograd.grad((loop_group_bn(xr, w, b, bn.eps, 4) ** 2 * torch.arange(5.)).sum(), xr)
    torch.testing.assert_close(gx, gr, atol=1e-4, rtol=1e-4)


def test_split_bn_channels_last_equals_nchw_in_a_network():
    """A ResNet with split BN gives the same output and running statistics in both formats."""
    torch.manual_seed(1)
    a, _ = common.resnet("resnet_small", 32)
    common.split_bn(a, 4)
    b, _ = common.resnet("resnet_small", 32)
    common.split_bn(b, 4)
    b.load_state_dict(a.state_dict())
    b = b.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(a.train()(x), b.train()(x.contiguous(memory_format=torch.channels_last)),
                               atol=1e-4, rtol=1e-4)
    for (name, s1), (_, s2) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5, msg=name)


def test_split_bn_under_cpu_autocast_returns_the_input_dtype():
    bn = common.SplitBatchNorm(nn.BatchNorm2d(4), 2).train()
    x = torch.randn(8, 4, 3, 3, dtype=torch.bfloat16)
    out = bn(x)
    assert out.dtype == torch.bfloat16
    ref = loop_group_bn(x.float(), bn.weight.detach(), bn.bias.detach(), bn.eps, 2)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    assert bn.running_mean.dtype == torch.float32


# ---------------------------------------------------------------------------
# LARS with multi-tensor ops equals the per-tensor loop
# ---------------------------------------------------------------------------

def loop_lars_step(params_groups, state, eta):
    """The per-tensor LARS update, written plainly (one parameter at a time)."""
    with torch.no_grad():
        for group in params_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad + group["weight_decay"] * w
                if group["lars"]:
                    wn, gn = w.norm(), g.norm()
                    if wn > 0 and gn > 0:
                        g = g * (eta * wn / gn)
                v = state.setdefault(w, torch.zeros_like(w))
                v.mul_(0.9).add_(g, alpha=group["lr"])
                w.sub_(v)


def test_lars_foreach_equals_the_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    ref = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    ref.load_state_dict(net.state_dict())
    with torch.no_grad():
        net[3].weight.zero_()  # a zero norm: trust ratio 1
        ref[3].weight.zero_()
    opt = common.LARS(common.param_groups(net, 1e-3), lr=0.5, eta=0.02)
    groups = [dict(g, params=[dict(ref.named_parameters())[n] for n, p in net.named_parameters()
                              if any(p is q for q in g["params"])]) for g in opt.param_groups]
    state = {}
    for step in range(4):
        x = torch.randn(16, 5)
        for model in (net, ref):
            model.zero_grad()
            F.cross_entropy(model(x), torch.arange(16) % 3).backward()
        net[0].bias.grad = None if step == 2 else net[0].bias.grad  # a parameter without a gradient is skipped
        ref[0].bias.grad = None if step == 2 else ref[0].bias.grad
        opt.step()
        loop_lars_step(groups, state, eta=0.02)
        for (name, p), q in zip(net.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=f"step {step}: {name}")
    assert not torch.equal(net[3].weight, torch.zeros_like(net[3].weight))


# ---------------------------------------------------------------------------
# Evaluation feeds the model in its training memory format
# ---------------------------------------------------------------------------

def test_extract_features_feeds_a_channels_last_model_channels_last(ctx):
    torch.manual_seed(0)
    ds = common.dataset("synthetic", "", train=False, image_size=32)
    ds = torch.utils.data.Subset(ds, range(12))
    net, _ = common.resnet("resnet_small", 32)
    tf = common.eval_transform("synthetic", 32)
    plain, labels = common.extract_features(net, ds, tf, ctx, "synthetic", batch_size=5)
    seen = []
    net = net.to(memory_format=torch.channels_last)
    hook = net.conv1.register_forward_pre_hook(lambda m, inp: seen.append(
        inp[0].is_contiguous(memory_format=torch.channels_last) and not inp[0].is_contiguous()))
    cl, labels2 = common.extract_features(net, ds, tf, ctx, "synthetic", batch_size=5)
    hook.remove()
    assert seen == [True, True, True]
    torch.testing.assert_close(cl, plain, atol=1e-4, rtol=1e-4)
    assert torch.equal(labels, labels2)


# ---------------------------------------------------------------------------
# --deterministic
# ---------------------------------------------------------------------------

def test_deterministic_flag_turns_on_deterministic_algorithms(monkeypatch, keep_rng):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        common.setup(argparse.Namespace(seed=0, amp="off", deterministic=True))
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
    common.setup(argparse.Namespace(seed=0, amp="off"))
    assert not torch.are_deterministic_algorithms_enabled()


# ---------------------------------------------------------------------------
# fp16's skipped steps are counted by the Run (optimizer steps vs. loop steps)
# ---------------------------------------------------------------------------

class Net(nn.Module):
    """A one-layer model with the `backbone` a Run saves."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 1)

    def forward(self, x):
        return self.backbone(x)


def amp_step(model, opt, scaler, run, overflow=False):
    """One step of the loop as the method files write it; True when the Run says stop."""
    out = model(torch.ones(2, 3))
    loss = out.sum() * (float("inf") if overflow else 1.0)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return run.end_step(loss, torch.randn(2, 4))


def record(out):
    return json.loads((out / "log.jsonl").read_text().splitlines()[-1])


def test_run_counts_steps_skipped_by_loss_scaling(tmp_path, ctx):
    """Under an enabled (fp16-style) GradScaler, gradients that overflow make scaler.step
    skip optimizer.step (the weights stay, the scale halves); the Run's epoch record
    counts that step, and only that one, as skipped. With the scaler disabled no step
    is skipped."""
    from conftest import make_run
    args = argparse.Namespace(method="simclr", arch="resnet_small", image_size=32, data="synthetic", epochs=1,
                              max_steps=None, log_every=1000, batch_size=2)
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)  # enabled: the fp16 code path, on the CPU
    assert scaler.is_enabled()
    run, _ = make_run(args, ctx, model, opt, scaler, [None, None], tmp_path / "fp16")
    before = model.backbone.weight.detach().clone()
    assert not amp_step(model, opt, scaler, run, overflow=True)  # skipped
    assert torch.equal(model.backbone.weight, before) and scaler.get_scale() == 2.0 ** 3
    assert amp_step(model, opt, scaler, run)  # taken; the last step of the run
    assert not torch.equal(model.backbone.weight, before) and scaler.get_scale() == 2.0 ** 3
    run.end_epoch()
    assert record(tmp_path / "fp16")["skipped_steps"] == 1

    off = torch.amp.GradScaler("cpu", enabled=False)
    run, _ = make_run(args, ctx, model, opt, off, [None, None], tmp_path / "off")
    for _ in range(2):
        w = model.backbone.weight.detach().clone()
        amp_step(model, opt, off, run)
        assert not torch.equal(model.backbone.weight, w)
    run.end_epoch()
    assert record(tmp_path / "off")["skipped_steps"] == 0
