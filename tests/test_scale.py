"""Large runs: the sharded evaluation (the training features never gathered),
resume from rank 0's checkpoint with node-local --out folders, one download per
node, loader workers from the CPU affinity, the ETA past a day, and a CUDA
out-of-memory turned into one line."""
import os
import re
import shutil

import pytest
import torch

import common
import evaluate
from conftest import progress_line, run, torchrun

CHECK = "tests/scale_dist_check.py"
TINY = ["--data", "synthetic", "--arch", "resnet_small", "--workers", "0", "--batch-size", "16", "--subset", "64",
        "--knn-every", "0", "--log-every", "1"]


def markers(proc):
    """{check name: "OK" or "FAIL reason"} from the `SCALE <name> OK|FAIL ...` lines; DONE last."""
    found = {}
    for line in proc.stdout.splitlines():
        body = line[len("SCALE "):] if line.startswith("SCALE ") else None
        if body == "DONE" or (body and body.endswith(" OK")):
            found[body[:-3] if body != "DONE" else body] = "OK"
        elif body and " FAIL " in body:
            name, _, reason = body.partition(" FAIL ")
            found[name] = "FAIL " + reason
    return found


# ---------------------------------------------------------------------------
# Sharded kNN and probe (2 gloo processes) against one process holding everything
# ---------------------------------------------------------------------------

def test_sharded_knn_and_probe_equal_the_unsharded_ones_two_processes():
    proc = torchrun(2, [CHECK, "eval"])
    got = markers(proc)
    assert "DONE" in got, proc.stdout
    names = [f"knn k={k} t={t}" for k in (1, 5, 15, 40) for t in (0.07, 1.0)] + ["knn_top1", "probe sgd", "probe adam",
                                                                                  "extract shard"]
    for name in names:
        assert got.get(name) == "OK", f"{name}: {got.get(name)}"


def test_knn_chunks_over_the_bank_give_the_same_neighbours():
    torch.manual_seed(0)
    train, test = torch.randn(50, 8), torch.randn(13, 8)
    y = torch.randint(0, 4, (50,))
    whole = common.knn_predict(test, train, y, 4, k=9, t=0.2, normalize=True, bank_chunk=1000)
    for bank_chunk in (1, 4, 9, 49):
        assert torch.equal(common.knn_predict(test, train, y, 4, k=9, t=0.2, normalize=True, bank_chunk=bank_chunk), whole)
    # normalize=True is the same as normalising first (the old contract)
    normed = common.knn_predict(torch.nn.functional.normalize(test, dim=1), torch.nn.functional.normalize(train, dim=1),
                                y, 4, k=9, t=0.2)
    assert torch.equal(normed, whole)


def test_probe_standardises_without_a_copy_and_matches_torch_std():
    f = torch.randn(300, 5) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 7
    mean, std = evaluate._feature_stats(f, len(f), chunk=7)
    torch.testing.assert_close(mean, f.mean(0))
    torch.testing.assert_close(std, f.std(0) + 1e-6)


def test_linear_aug_never_extracts_the_training_features(monkeypatch, tmp_path):
    seen = []
    real = common.extract_features

    def spy(backbone, ds, *a, **kw):
        seen.append(len(ds))
        return real(backbone, ds, *a, **kw)

    monkeypatch.setattr(common, "extract_features", spy)
    evaluate.main(["--random-init", "--arch", "resnet_small", "--data", "synthetic", "--subset", "24", "--workers", "0",
                   "--no-knn", "--linear-aug", "--linear-epochs", "1", "--linear-batch-size", "8", "--json", str(tmp_path / "r.json")])
    test_size = len(common.dataset("synthetic", ".", False))
    assert seen == [test_size]  # the test set only: the probe reads the 24 training images itself


# ---------------------------------------------------------------------------
# Resume: rank 0 reads the checkpoint and sends it to every process
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A 2-step run (a) and a copy of it (c) with one weight changed: same flags, same step, other weights."""
    root = tmp_path_factory.mktemp("resume")
    run(["simclr.py", *TINY, "--max-steps", "2", "--out", str(root / "a")])
    shutil.copytree(root / "a", root / "c")
    ckpt = torch.load(root / "c" / "last.pt", weights_only=True)
    next(iter(ckpt["model"].values())).add_(1.0)
    torch.save(ckpt, root / "c" / "last.pt")
    return root


def test_every_process_resumes_from_rank_0s_checkpoint_two_processes(checkpoints, tmp_path):
    """Rank 1's --out (a node-local disk) holds the same checkpoint, none, or another one at the same step: in
    every case both processes continue from rank 0's step 2 and end with the same weights; rank 1's folder is
    left as it was."""
    finals = {}
    for case, rank1 in (("same", checkpoints / "a"), ("empty", None), ("other", checkpoints / "c")):
        r0, r1 = tmp_path / case / "r0", tmp_path / case / "r1"
        shutil.copytree(checkpoints / "a", r0)
        if rank1:
            shutil.copytree(rank1, r1)
        else:
            r1.mkdir()
        before = sorted(os.listdir(r1))
        proc = torchrun(2, [CHECK, "resume", str(r0), str(r1), *TINY, "--max-steps", "4"])
        assert "from step 2" in proc.stdout and re.search(r"\bstep 4/", proc.stdout), proc.stdout
        assert sorted(os.listdir(r1)) == before, case
        ckpt = torch.load(r0 / "last.pt", weights_only=True)
        assert ckpt["step"] == 4
        finals[case] = ckpt["model"]
    for case in ("empty", "other"):
        assert all(torch.equal(finals["same"][k], v) for k, v in finals[case].items()), case


# ---------------------------------------------------------------------------
# Data: one download per node; loader workers from the affinity
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("nodes", ["one-node", "two-nodes"])
def test_rank_0_reads_and_downloads_before_the_others_two_processes(tmp_path, nodes):
    log = tmp_path / "log"
    torchrun(2, [CHECK, "load", str(log), nodes])
    events = [line.split() for line in log.read_text().splitlines()]
    end0 = max(float(t) for what, rank, t in events if rank == "0" and what == "end")
    start1 = min(float(t) for what, rank, t in events if rank == "1" and what == "start")
    assert len(events) == 8 and start1 >= end0, events


def test_workers_default_is_the_affinity_shared_by_the_local_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert common.default_workers() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert common.default_workers() == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert common.default_workers() == 12
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert common.default_workers() == 1  # never 0


def test_train_loader_keeps_two_batches_per_worker_in_flight(ctx):
    loader = common.train_loader(common._synthetic(True, 32, n=8), common.to_tensor, 4, 1, 0, ctx)
    assert loader.prefetch_factor == 2


# ---------------------------------------------------------------------------
# Small ones
# ---------------------------------------------------------------------------

def test_eta_shows_days_past_24_hours():
    assert common.duration(3 * 3600 + 4 * 60 + 5) == "03:04:05"
    assert common.duration(86400 + 3 * 3600 + 4 * 60 + 5) == "1d 03:04:05"
    assert common.duration(12 * 86400) == "12d 00:00:00"
    # 10 s for 1 step: 10^6 steps left take 115 days
    assert re.search(r"eta 115d \d\d:\d\d:\d\d", progress_line(1, 10.0, 10**6, 1))


def test_cuda_out_of_memory_ends_in_one_line_with_the_batch_per_gpu():
    script = ("import argparse, torch, common\n"
              "common.setup(argparse.Namespace(method='simclr', batch_size=4096, amp='off', seed=0))\n"
              "raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')\n")
    proc = run(["-c", script], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: CUDA out of memory at 4096 images per GPU (--batch-size 4096 over 1 process(es)), --amp off: lower "
        "--batch-size, or use --amp bf16 (fp16 before Ampere); more GPUs keep the global batch at a smaller per-GPU "
        "share (README: memory per GPU)"]
    other = run(["-c", "import argparse, common\ncommon.setup(argparse.Namespace(seed=0))\nraise ValueError('x')\n"],
                check=False)
    assert other.returncode == 1 and "Traceback" in other.stderr and "ValueError: x" in other.stderr
