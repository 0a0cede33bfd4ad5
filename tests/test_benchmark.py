"""tests/benchmark.py: its table rows parse, its data-wait share means what it
says, the sync accounting of gpu-check, and gpu-check's CPU subset."""
import argparse
import math
import tempfile
import time
import warnings

import pytest

import benchmark
import common
from conftest import run

B = 8
SMALL = ["--data", "synthetic", "--arch", "resnet_small", "--batch-size", str(B), "--workers", "0"]


def options(**changes):
    opts = dict(data="synthetic", data_dir="./data", arch="resnet_small", batch_size=B, workers=0, amp=None,
                channels_last=False, steps=2, warmup=1, methods=None)
    return argparse.Namespace(**{**opts, **changes})


def test_methods_prints_one_parsable_row_per_method(capsys):
    benchmark.main(["methods", *SMALL, "--steps", "1", "--warmup", "1", "--methods", "simclr", "aag"])
    lines = capsys.readouterr().out.splitlines()
    header = lines.index(benchmark.HEADER)
    assert set(lines[header + 1]) == {"|", "-"}
    rows = [benchmark.parse_row(line) for line in lines[header + 2:] if line.startswith("|")]
    assert [r["name"] for r in rows] == [f"SimCLR (B={B})", f"AAG (B={B})"]
    assert [(r["views"], r["pixels_per_view"], r["expected_passes"], r["expected_pixels"]) for r in rows] == \
        [(2, 1024, 1.0, 1.0), (3, 1024, 1.5, 1.5)]
    for r in rows:
        assert r["images_per_s"] > 0 and r["compute_images_per_s"] > 0 and r["peak_gib"] > 0
        assert 0 <= r["wait_share"] <= 1
        # images/s is printed rounded to a whole number: allow for that
        assert r["epoch_s"] == pytest.approx(50_000 / r["images_per_s"], rel=0.6 / r["images_per_s"] + 0.01)
    assert rows[0]["cost"] == 1.0 and rows[1]["cost"] > 0


def test_passes_count_a_forward_only_view_at_a_third():
    """Per image, relative to SimCLR's two back-propagated views: CLSA-Single's key is only forwarded
    (1 + 3 + 3 of 6), ReSSL 1x's teacher view too (1 + 3), DSSL-BYOL's target encodes all four views
    at the CIFAR weights (4 x 3 + 4)."""
    for key, expected in (("clsa-single", 7 / 6), ("ressl", 4 / 6), ("dssl-byol", 16 / 6)):
        r = benchmark.measure(key, options(steps=1))
        assert r["passes"] / (6 * 32 * 32) == pytest.approx(expected), key


def test_compare_layouts_prints_both_rates(capsys):
    nchw, nhwc = benchmark.compare_layouts(options(steps=1))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert nchw > 0 and nhwc > 0
    assert line.startswith("layout: SimCLR compute alone on cpu (resnet_small, B=8, amp off): NCHW ")
    assert line.endswith(f"channels-last {nhwc:.0f} images/s ({nhwc / nchw:.2f}x)")


class Sleepy:
    """A view transform that first sleeps: a loader made artificially slow."""

    def __init__(self, transform, seconds):
        self.transform, self.seconds = transform, seconds

    def __call__(self, img):
        time.sleep(self.seconds)
        return self.transform(img)


def test_loader_times_each_methods_imagenet_views(capsys):
    """One row per ImageNet recipe, each with the views its own Views class makes at 224 px,
    a CPU time per image, and the epoch figures derived from it."""
    benchmark.main(["loader", "--images", "2"])
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = [[cell.strip() for cell in r] for r in rows[1:]]  # past the header
    assert [(r[0], int(r[1])) for r in rows] == [
        ("SimCLR", 2), ("AAG", 3), ("CLSA-Single", 3), ("CLSA-Multi", 11), ("ReSSL 1x", 2),
        ("ReSSL 5 crops", 6), ("DSSL (SimSiam, BYOL)", 4), ("DSSL-SimCLR", 4)]
    for _, _, ms, hours, minutes in rows:
        ms, hours, minutes = float(ms), float(hours), float(minutes)
        assert ms > 0
        # each printed to 0.1: ms's rounding moves hours by up to 0.018, minutes by up to 0.017
        assert hours == pytest.approx(ms * benchmark.IMAGENET_TRAIN / 3.6e6, abs=0.07)
        assert minutes == pytest.approx(ms * benchmark.IMAGENET_TRAIN / 6e4 / benchmark.LOADER_WORKERS, abs=0.07)


def test_data_wait_share_rises_when_the_loader_is_slow(monkeypatch):
    fast = benchmark.measure("simclr", options())
    original = common.train_loader
    monkeypatch.setattr(common, "train_loader",
                        lambda ds, transform, *a, **k: original(ds, Sleepy(transform, 0.08), *a, **k))
    slow = benchmark.measure("simclr", options())
    for r in (fast, slow):
        assert 0 <= r["wait_share"] <= 1
    # B images x 80 ms per batch, all of it spent inside next() with no loader workers
    assert slow["wait_share"] > fast["wait_share"] + 0.1, (fast, slow)
    timed_wall = 2 * B / slow["images_per_s"]  # 2 timed steps of B images
    assert slow["wait_share"] * timed_wall >= 2 * B * 0.08 * 0.9


def test_the_compute_alone_never_waits_for_data(monkeypatch):
    """The compute-only pass repeats a batch already on the device: its next() is instant."""
    record, compute = benchmark.Record(1), benchmark.Record(1, steps=2)
    original = common.train_loader
    monkeypatch.setattr(common, "train_loader",
                        lambda ds, transform, *a, **k: original(ds, Sleepy(transform, 0.02), *a, **k))
    with tempfile.TemporaryDirectory() as out:
        benchmark.run_method("simclr", [*SMALL, "--max-steps", "3", "--log-every", "100", "--resume", "none"], out,
                             record, compute)
        log = benchmark.read_log(out)
    assert record.measured == compute.measured == 2
    # the Run is put back after the compute pass: the real run logs steps 1-3 alone
    assert [(r["step"], r["skipped_steps"]) for r in log] == [(3, 0)]
    assert record.wait >= 2 * B * 0.02 * 0.9
    assert compute.wait < 0.05 * compute.wall


def test_the_compute_pass_leaves_the_run_as_it_was(tmp_path, ctx):
    """set_aside: steps taken inside it (up to its own stop point) leave the Run's
    step, stop point and epoch sums as they were, and its clock without the
    pass's time; the epoch record is that of the real steps alone."""
    import torch
    from conftest import make_run

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Linear(3, 4)

        def forward(self, x):
            return self.backbone(x)

    args = argparse.Namespace(method="simclr", arch="resnet_small", image_size=32, data="synthetic", epochs=2,
                              max_steps=None, log_every=2, batch_size=2)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = ctx.grad_scaler()
    run, _ = make_run(args, ctx, model, opt, scaler, [None] * 4, tmp_path)
    losses = []

    def step(x):
        z = model(torch.full((2, 3), x) + torch.arange(6.0).view(2, 3))
        loss = z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss, run.end_step(loss, z)

    losses.append(step(1.0)[0].item())
    before = dict(step=run.step, stop_at=run.stop_at, stopped=run.stopped, sums=run.sums.clone(), n=run.n,
                  optimizer_steps=run.optimizer_steps, epoch=run.epoch, first_step=run.first_step)
    clock = run.t0
    with benchmark.set_aside(run, stop_at=run.step + 2):
        assert run.stop_at == 3
        assert [step(9.0)[1] for _ in range(2)] == [False, True]  # the pass's own stop point
        time.sleep(0.05)
    after = dict(step=run.step, stop_at=run.stop_at, stopped=run.stopped, sums=run.sums, n=run.n,
                 optimizer_steps=run.optimizer_steps, epoch=run.epoch, first_step=run.first_step)
    assert after.pop("sums").tolist() == before.pop("sums").tolist() and after == before == dict(
        step=1, stop_at=8, stopped=False, n=1, optimizer_steps=1, epoch=0, first_step=0)
    assert run.t0 - clock >= 0.05
    for x in (2.0, 3.0, 4.0):
        loss, last = step(x)
        losses.append(loss.item())
    assert not last  # the run goes on to its own stop point (step 8)
    run.end_epoch()
    record = benchmark.read_log(str(tmp_path))[-1]
    assert (record["step"], record["skipped_steps"], record["complete"]) == (4, 0, True)
    assert record["loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)


def test_sync_accounting():
    # steps 1..8, logging every 4: the log steps are 4 and 8 (and stop_at)
    syncs = [(None, "common.py"), (1, "grad_scaler.py"), (4, "simclr.py"), (8, "simclr.py"), (3, "simclr.py"),
             (6, "grad_scaler.py")]
    assert benchmark.unexpected_syncs(syncs, stop_at=8, log_every=4, fp16=True) == [(3, "simclr.py")]
    assert benchmark.unexpected_syncs(syncs, stop_at=8, log_every=4, fp16=False) == \
        [(1, "grad_scaler.py"), (3, "simclr.py"), (6, "grad_scaler.py")]
    assert benchmark.unexpected_syncs([(7, "simclr.py")], stop_at=7, log_every=4, fp16=False) == []


def test_warnings_are_attributed_to_the_loop_step_they_happen_in():
    """A loop that warns in the body of step 12 and after the loop: owners 12 and None."""

    class Loader:
        sampler = None

        def __iter__(self):
            return iter([1, 2, 3])

    def train_one_epoch(model, loader, optimizer, scaler, lr_at, run, args, ctx):
        for _ in loader:
            run.step += 1  # run.end_step
            if run.step == 12:
                warnings.warn("in the body")
            if run.step >= run.stop_at:
                break
        warnings.warn("after the loop")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = benchmark.Record(0, timing=False, caught=caught)
        wrapped = benchmark.instrument(train_one_epoch, record)
        run = argparse.Namespace(step=10, stop_at=13)
        wrapped(None, Loader(), None, None, None, run, None, None)
        assert run.step == 13
    assert [str(w.message) for w in caught] == ["in the body", "after the loop"]
    assert record.owner == [12, None]


def test_gpu_check_on_the_cpu_runs_its_subset_and_exits_0():
    proc = run(["tests/benchmark.py", "gpu-check", "--methods", "simclr", *SMALL, "--check-batch", str(B),
                "--check-steps", "3", "--check-log-every", "2"], timeout=300)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("no CUDA device") and len(lines[0]) < 200
    assert any(line.startswith("PASS  SimCLR bf16 + channels-last: losses finite") for line in lines)
    assert any(line.startswith("PASS") and "resumed from its checkpoint at step 3" in line for line in lines)
    assert not any(line.startswith("FAIL") for line in lines) and lines[-1] == "gpu-check: all PASS"


def test_gpu_check_exits_1_on_a_fail(monkeypatch, capsys):
    real = benchmark.read_log
    monkeypatch.setattr(benchmark, "read_log", lambda out: [dict(r, loss=math.nan) for r in real(out)])
    opts = options(methods=["simclr"], check_batch=B, check_steps=2, check_log_every=2, no_table=True)
    assert benchmark.gpu_check(opts) == 1
    out = capsys.readouterr().out
    assert "FAIL  SimCLR bf16 + channels-last: losses finite (nan)" in out
    assert out.endswith(" FAIL\n") and "PASS" not in out  # the resume's losses are read through the same log
