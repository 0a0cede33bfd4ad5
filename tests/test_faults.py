"""Faults and hostile input: unreadable or hostile data files, bad images in a
folder, impossible numbers, an --out that cannot be written, a full disk, two
runs on one --out, a second Ctrl-C, the wrong checkpoint to resume from.
Each ends in one line and a known exit code, and loses nothing."""
import argparse
import errno
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import simclr
from conftest import error_line, labelled_tree, run, torchrun


def digest(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


# ---------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------

def test_random_bytes_as_a_cifar_batch_end_in_one_line(tmp_path, capsys):
    """Random files make the unpickler raise many kinds of errors (OverflowError,
    MemoryError, KeyError, ...): 300 of them, every one a single line naming the file."""
    rng = np.random.default_rng(0)
    for i in range(300):
        path = tmp_path / f"data_batch_{i}"
        head = rng.choice([b"", b"\x80\x02", b"\x80\x04"])
        path.write_bytes(head + rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8).tobytes())
        assert str(path) in error_line(capsys, lambda: common._unpickle(str(path)), common.RUNTIME)


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {EXPLOIT_MARKER}",))


EXPLOIT_MARKER = ""


def test_a_hostile_cifar_batch_is_refused_without_running_it(tmp_path, capsys):
    global EXPLOIT_MARKER
    EXPLOIT_MARKER = str(tmp_path / "pwned")
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Exploit(), "labels": [0]}, protocol=2))
    err = error_line(capsys, lambda: common._unpickle(str(path)), common.RUNTIME)
    assert "system" in err and str(path) in err
    assert not os.path.exists(EXPLOIT_MARKER)
    # What a real batch holds still loads: str and bytes keys, numpy arrays, lists.
    good = {b"data": np.arange(12, dtype=np.uint8).reshape(2, 6), "labels": [1, 2], "batch_label": b"x"}
    for protocol in (2, 4):
        path.write_bytes(pickle.dumps(good, protocol=protocol))
        back = common._unpickle(str(path))
        assert np.array_equal(back[b"data"], good[b"data"]) and back["labels"] == [1, 2]


def test_a_broken_image_in_a_folder_ends_in_one_line_and_keeps_the_checkpoint(tmp_path):
    data, out = tmp_path / "tree", tmp_path / "out"
    labelled_tree(data, classes=("a", "b"), n=12)
    flags = ["simclr.py", "--data", "folder", "--data-dir", str(data), "--image-size", "32", "--arch", "resnet_small",
             "--batch-size", "8", "--knn-every", "0", "--workers", "2", "--out", str(out)]
    run([*flags, "--epochs", "1"], threads=1)
    before = digest(out)
    (data / "train" / "a" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    proc = run([*flags, "--epochs", "3"], check=False, threads=1)
    assert proc.returncode == common.RUNTIME, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "zz_broken.png is not a readable image" in proc.stderr
    after = digest(out)
    for name in ("last.pt", "backbone.pt"):
        assert after[name] == before[name]


# ---------------------------------------------------------------------------
# Impossible numbers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--lr", "-1"), ("--lr", "0"), ("--lr", "nan"), ("--workers", "-1"), ("--weight-decay", "-0.1"),
    ("--warmup-epochs", "-1"), ("--epochs", "0"), ("--batch-size", "-4"), ("--knn-every", "-1"),
    ("--log-every", "0"), ("--subset", "0"), ("--image-size", "x"), ("--lr", "inf"),
])
def test_impossible_shared_numbers_are_refused(capsys, flag, value):
    assert flag in error_line(capsys, lambda: simclr.get_args([flag, value]), common.USAGE)


def test_possible_edge_numbers_are_accepted():
    args = simclr.get_args(["--workers", "0", "--weight-decay", "0", "--warmup-epochs", "0", "--knn-every", "0"])
    assert (args.workers, args.weight_decay, args.warmup_epochs, args.knn_every) == (0, 0.0, 0.0, 0)


# ---------------------------------------------------------------------------
# --out, disk full, the lock
# ---------------------------------------------------------------------------

def out_args(out):
    return argparse.Namespace(out=str(out), method="simclr")


MAIN = common.Context(0, 1, 0, torch.device("cpu"), None)


def test_out_that_is_a_file_or_cannot_be_made(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("keep me")
    assert "is a file" in error_line(capsys, lambda: common.claim_out(out_args(f), MAIN), common.USAGE)
    # A folder below a file cannot be created.
    assert "cannot write" in error_line(capsys, lambda: common.claim_out(out_args(f / "run"), MAIN), common.RUNTIME)
    assert f.read_text() == "keep me"


def test_disk_full_keeps_the_previous_checkpoint_and_no_temporary(tmp_path, capsys, monkeypatch):
    path = tmp_path / "last.pt"
    common.save_atomic({"step": 1}, str(path))
    good = path.read_bytes()

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    err = error_line(capsys, lambda: common.save_atomic({"step": 2}, str(path)), common.RUNTIME)
    assert "disk is full" in err and "previous one is kept" in err
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["last.pt"]


def test_torch_reporting_a_failed_write_as_runtime_error(tmp_path, capsys, monkeypatch):
    def failing(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file data/0: "
                           "file write failed")

    monkeypatch.setattr(torch, "save", failing)
    assert "could not write" in error_line(capsys, lambda: common.save_atomic({"step": 2}, str(tmp_path / "last.pt")),
                                           common.RUNTIME)
    assert os.listdir(tmp_path) == []


def dead_pid():
    pid = 2 ** 22 - 1
    while common._alive(pid):
        pid -= 1
    return pid


def test_a_killed_save_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    (tmp_path / f"last.pt.tmp{dead_pid()}").write_bytes(b"x" * 100)
    live = tmp_path / f"backbone.pt.tmp{os.getppid()}"  # a live process may still be writing it
    live.write_bytes(b"y")
    (tmp_path / "last.pt").write_bytes(b"keep")
    common.claim_out(out_args(tmp_path), MAIN)
    assert sorted(os.listdir(tmp_path)) == sorted(["args.json", "backbone.pt.tmp%d" % os.getppid(), "last.pt", "run.lock"])


def test_a_second_live_run_on_the_same_out_is_refused(tmp_path, capsys):
    (tmp_path / "run.lock").write_text(f"{os.getppid()} {os.uname().nodename}")
    (tmp_path / "log.jsonl").write_text("{}\n")
    before = digest(tmp_path)
    assert f"process {os.getppid()}" in error_line(capsys, lambda: common.claim_out(out_args(tmp_path), MAIN),
                                                   common.RUNTIME)
    assert digest(tmp_path) == before
    # A lock whose process is gone is taken over.
    (tmp_path / "run.lock").write_text(f"{dead_pid()} {os.uname().nodename}")
    common.claim_out(out_args(tmp_path), MAIN)
    assert (tmp_path / "run.lock").read_text() == f"{os.getpid()} {os.uname().nodename}"


def test_two_processes_on_one_out(tmp_path):
    """The second of two real runs on the same --out stops in one line while the first trains."""
    import subprocess
    import sys
    import time
    from conftest import ENV, ROOT
    flags = ["simclr.py", "--data", "synthetic", "--arch", "resnet_small", "--workers", "0", "--batch-size", "8",
             "--subset", "64", "--knn-every", "0", "--log-every", "1", "--out", str(tmp_path)]
    first = subprocess.Popen([sys.executable, *flags, "--epochs", "50"], cwd=ROOT, env=dict(ENV, OMP_NUM_THREADS="1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # never read: a full pipe would block it
    try:
        for _ in range(600):
            if (tmp_path / "args.json").exists():
                break
            time.sleep(0.1)
        second = run([*flags, "--epochs", "50"], check=False, threads=1)
        assert second.returncode == common.RUNTIME and "another run" in second.stderr
        assert second.stderr.count("\n") == 1
    finally:
        first.terminate()
        first.wait(timeout=120)
    assert not (tmp_path / "run.lock").exists()  # released when the first run ended


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
@pytest.mark.parametrize("module,flags", [
    ("simclr", []),
    ("clsa", ["--queue-size", "64", "--bn-splits", "1"]),
])
def test_no_process_group_thread_outlives_main_under_torchrun(tmp_path, module, flags):
    """After main() returns under torchrun, nothing holds the process group any more: gloo's
    threads are gone (the count is back to before main), so none is left to abort the
    interpreter's exit. An exception hook that kept the run's context held them before."""
    torchrun(2, ["tests/teardown_check.py", str(tmp_path), module, "--data", "synthetic", "--arch", "resnet_small",
                        "--workers", "0", "--batch-size", "16", "--subset", "64", "--max-steps", "2",
                        "--knn-every", "0", "--log-every", "1", *flags, "--out", str(tmp_path)],
                    threads=1)  # one OpenMP thread: a pool of more starts lazily and would count too
    for rank in (0, 1):
        before, after = (tmp_path / f"threads.{rank}").read_text().split()
        assert int(after) == int(before), (rank, before, after)


# ---------------------------------------------------------------------------
# Signals and the wrong checkpoint
# ---------------------------------------------------------------------------

def test_a_second_signal_exits_130_in_one_line(capsys):
    import signal
    stop = common.StopSignal(install=False)
    stop._handle(signal.SIGINT, None)
    assert stop.requested
    with pytest.raises(SystemExit) as e:
        stop._handle(signal.SIGINT, None)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_stop_signal_installs_its_handler_only_when_asked():
    import signal
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        common.StopSignal(install=False)
        assert {s: signal.getsignal(s) for s in old} == old
        stop = common.StopSignal()
        assert all(signal.getsignal(s) == stop._handle for s in old)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def resume_args(tmp_path, **kw):
    base = dict(out=str(tmp_path), resume="auto", method="simclr", arch="resnet_small", image_size=32, data="synthetic",
                proj_dim=128, epochs=10)
    return argparse.Namespace(**dict(base, **kw))


def test_resuming_from_a_bare_backbone_says_what_to_pass(tmp_path, capsys):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "backbone.pt")
    args = resume_args(tmp_path, resume=str(tmp_path / "backbone.pt"))
    model = nn.Linear(2, 2)
    err = error_line(capsys, lambda: common.resume(args, model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                   torch.amp.GradScaler("cpu", enabled=False)), common.USAGE)
    assert "bare backbone" in err and "last.pt" in err


def test_a_checkpoint_with_other_shapes_names_the_flag_that_differs(tmp_path, capsys):
    model = nn.Linear(4, 128)
    opt, scaler = torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False)
    common.save_run(resume_args(tmp_path), model, model, opt, scaler, step=3, epoch=0)
    other = nn.Linear(4, 64)
    err = error_line(capsys, lambda: common.resume(resume_args(tmp_path, proj_dim=64, epochs=20), other,
                                                   torch.optim.SGD(other.parameters(), lr=0.1), scaler), common.RUNTIME)
    assert "--proj-dim 128 (now 64)" in err and "--epochs" not in err


@pytest.mark.parametrize("script, flag, value", [
    ("simclr", "--tau", "0"), ("aag", "--tau", "-0.1"), ("clsa", "--queue-size", "0"), ("clsa", "--strong-p", "1.5"),
    ("ressl", "--tau-t", "0"), ("ressl", "--ema-momentum", "1.1"), ("dssl", "--weights", "-1"),
    ("dssl", "--p-jigsaw", "2"), ("evaluate", "--knn-k", "0"), ("evaluate", "--linear-lr", "-1"),
    ("evaluate", "--workers", "-1"),
])
def test_impossible_method_numbers_are_refused(capsys, script, flag, value):
    module = __import__(script)
    argv = [flag, value] + (["0", "0", "0"] if flag == "--weights" else [])
    assert flag in error_line(capsys, lambda: module.get_args(argv), common.USAGE)


def test_a_diverging_run_stops_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    """A run whose loss turns non-finite stops at the next log step with exit 1,
    one line naming the step and the learning rate, and last.pt untouched."""
    flags = ["simclr.py", "--data", "synthetic", "--arch", "resnet_small", "--workers", "0", "--batch-size", "16",
             "--subset", "64", "--knn-every", "0", "--log-every", "1", "--out", str(tmp_path)]
    run([*flags, "--epochs", "1"], threads=1)
    before = digest(tmp_path)
    import json
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert record["skipped_steps"] == 0  # float32: no loss scaler, nothing skipped
    proc = run([*flags, "--epochs", "30", "--lr", "1e30", "--warmup-epochs", "0"], check=False, threads=1)
    assert proc.returncode == common.RUNTIME, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: the loss is nan at step ")
    assert "--lr" in proc.stderr
    after = digest(tmp_path)
    assert after["last.pt"] == before["last.pt"] and after["backbone.pt"] == before["backbone.pt"]
    assert "run.lock" not in after


def test_fp16_tolerates_a_few_overflowing_steps(monkeypatch):
    """Under fp16 loss scaling a non-finite loss is stopped only after
    NONFINITE_PATIENCE log steps in a row; in float32 at once."""
    class Scaler:
        def __init__(self, on):
            self.on = on

        def is_enabled(self):
            return self.on

    ctx, stop = MAIN, common.StopSignal(install=False)
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    for _ in range(common.StopSignal.NONFINITE_PATIENCE - 1):
        stop.check_loss(ctx, nan, 10, 0.1, Scaler(True))  # tolerated: the scaler is still searching
    assert stop.nonfinite == common.StopSignal.NONFINITE_PATIENCE - 1
    stop.check_loss(ctx, one, 11, 0.1, Scaler(True))
    assert stop.nonfinite == 0  # a finite loss resets the count
    for _ in range(common.StopSignal.NONFINITE_PATIENCE - 1):
        stop.check_loss(ctx, nan, 12, 0.1, Scaler(True))
    with pytest.raises(SystemExit):
        stop.check_loss(ctx, nan, 13, 0.1, Scaler(True))
    stop.nonfinite = 0
    with pytest.raises(SystemExit):
        stop.check_loss(ctx, nan, 14, 0.1, Scaler(False))


def test_a_stop_request_is_seen_at_the_next_step_in_one_process():
    import signal
    stop = common.StopSignal(install=False)
    assert stop.pending(MAIN) is False
    stop._handle(signal.SIGTERM, None)
    assert stop.pending(MAIN) is True
