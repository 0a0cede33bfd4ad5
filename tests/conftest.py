"""Shared test helpers: run a script as a user would, and find real data."""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Tests run on the CPU with few threads: small and repeatable.
ENV = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")


def run(args, timeout=600, check=True, threads=2):
    """Run `python args...` in the repository root; returns the CompletedProcess.
    threads=1 for runs started two at a time (2 x 2 threads on 2 cores is much slower)."""
    env = dict(ENV, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    return proc


def torchrun(nproc, args, timeout=600, check=True, threads=2):
    """Run a script under torchrun with `nproc` CPU processes (gloo)."""
    return run(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args],
               timeout=timeout, check=check, threads=threads)


def single_error_line(capsys):
    """What the code under test printed to stderr: exactly one line starting with 'error: ' (returned)."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def error_line(capsys, fn, code):
    """fn() must end with SystemExit(code) after printing one 'error: ' line; returns that line."""
    with pytest.raises(SystemExit) as e:
        fn()
    assert e.value.code == code
    return single_error_line(capsys)


@pytest.fixture
def cifar10_dir():
    """Folder holding the real cifar-10-batches-py: $SSL_DATA_DIR or ./data.
    Skips without it, unless SSL_REQUIRE_DATA=1 (set by CI) makes that a failure."""
    root = os.environ.get("SSL_DATA_DIR", os.path.join(ROOT, "data"))
    if os.path.isfile(os.path.join(root, "cifar-10-batches-py", "test_batch")):
        return root
    message = f"real CIFAR-10 not found in {root}/cifar-10-batches-py (set SSL_DATA_DIR or fetch it into ./data)"
    if os.environ.get("SSL_REQUIRE_DATA") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def keep_rng():
    """For tests that seed the global RNG (common.setup, a method's main()): restored after."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.fixture
def ctx(keep_rng):
    """A single-process CPU context (common.setup seeds the global RNG: restored after)."""
    import common
    return common.setup(argparse.Namespace(seed=0, amp="off"))


def noise_image(w, h=None, seed=0, mode="RGB"):
    """A w x h (square by default) PIL image of uniformly random pixels, RGB or L."""
    h = w if h is None else h
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8), mode)


def write_images(folder, n, exts=("png",), size=(40, 36), seed=0):
    """n small random images in `folder`, cycling through the extensions (any case)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        ext = exts[i % len(exts)]
        fmt = "JPEG" if ext.lower() in ("jpg", "jpeg") else ext.upper()
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:03d}.{ext}"), fmt)


def labelled_tree(root, classes=("cat", "dog"), n=4, val=True):
    """--data folder's labelled layout: train/<class>/ with n images each, val/<class>/ with 2."""
    for c in classes:
        write_images(os.path.join(root, "train", c), n)
        if val:
            write_images(os.path.join(root, "val", c), 2, seed=1)
    return str(root)


_random_init = {}


def random_init_knn(data_dir, subset, image_size=32):
    """kNN top-1 of a randomly initialised resnet_small on the real CIFAR-10 (the
    first `subset` training images as the bank, all test images): the baseline of
    the learning checks, computed once per setting and shared by them."""
    key = (data_dir, subset, image_size)
    if key not in _random_init:
        with tempfile.TemporaryDirectory() as tmp:
            run(["evaluate.py", "--random-init", "--arch", "resnet_small", "--data", "cifar10", "--data-dir", data_dir,
                 "--no-download", "--subset", str(subset), "--image-size", str(image_size), "--workers", "2",
                 "--no-linear", "--json", os.path.join(tmp, "random.json")])
            with open(os.path.join(tmp, "random.json")) as f:
                _random_init[key] = json.load(f)["knn_top1"]
    return _random_init[key]


class ListLoader(list):
    """A list of batches standing in for the training loader: what common.Run reads of one."""
    dataset = ()

    def data_wait(self):
        return 0.0


def progress_line(step, seconds, stop_at, batch, loader=ListLoader(), lr=0.1, loss=1.0, z_std=0.088):
    """common.Run's progress line after `step` steps in `seconds`, without a run around it."""
    import time
    import common
    run = argparse.Namespace(step=step, first_step=0, t0=time.perf_counter() - seconds, stop_at=stop_at, epoch=0,
                             args=argparse.Namespace(batch_size=batch, epochs=1), loader=loader,
                             optimizer=argparse.Namespace(param_groups=[dict(lr=lr)]))
    return common.Run.progress_line(run, loss, z_std)


def make_run(args, ctx, model, optimizer, scaler, batches, out):
    """A common.Run over `batches` (a list of loader batches) for calling a method's
    train_one_epoch directly: from step 0, writing to `out`, no kNN monitor, no
    signal handlers. Returns (run, loader)."""
    import common
    args = argparse.Namespace(**dict(vars(args), out=str(out), resume="none", knn_every=0))
    loader = ListLoader(batches)
    return common.Run(args, ctx, model, optimizer, scaler, loader), loader


def probe_crop(monkeypatch, args, ctx):
    """The RandomResizedCrop that evaluate.linear_with_aug builds for `args` (training stops at the loader)."""
    import common
    import evaluate
    import torch.nn as nn
    seen = {}

    def capture(ds, transform, *rest, **kw):
        seen["crop"] = transform.transforms[0]
        raise StopIteration

    monkeypatch.setattr(common, "train_loader", capture)
    with pytest.raises(StopIteration):
        evaluate.linear_with_aug(nn.Identity(), 3, None, None, None, 10, args, ctx)
    return seen["crop"]
