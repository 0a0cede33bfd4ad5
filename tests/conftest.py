"""Shared test helpers: run a script as a user would, and find real data."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Tests run on the CPU with few threads: small and repeatable.
ENV = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")


def run(args, timeout=600, check=True):
    """Run `python args...` in the repository root; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    return proc


def torchrun(nproc, args, timeout=600, check=True):
    """Run a script under torchrun with `nproc` CPU processes (gloo)."""
    return run(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args],
               timeout=timeout, check=check)


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
def ctx():
    """A single-process CPU context (common.setup seeds the global RNG: restored after)."""
    import common
    state = torch.get_rng_state()
    yield common.setup(argparse.Namespace(seed=0, amp="off"))
    torch.set_rng_state(state)
