"""Faults and hostile input: unreadable or hostile data files, bad images in a
folder, impossible numbers, an --out that cannot be written, a full disk, two
runs on one --out, a second Ctrl-C, the wrong checkpoint to resume from.
Each ends in one line and a known exit code, and loses nothing."""
import argparse
import errno
import fcntl
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import simclr
from conftest import ListLoader, error_line, labelled_tree, run, torchrun


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
    ("--log-every", "0"), ("--subset", "0"), ("--image-size", "x"), ("--lr", "inf"), ("--seed", "-1"),
    ("--seed", "99999999999999"),
])
def test_impossible_shared_numbers_are_refused(capsys, flag, value):
    assert flag in error_line(capsys, lambda: simclr.get_args([flag, value]), common.USAGE)


def test_possible_edge_numbers_are_accepted():
    args = simclr.get_args(["--workers", "0", "--weight-decay", "0", "--warmup-epochs", "0", "--knn-every", "0",
                            "--seed", "2147483647"])
    assert (args.workers, args.weight_decay, args.warmup_epochs, args.knn_every) == (0, 0.0, 0.0, 0)
    # The largest seed still seeds every sample of a million-image epoch (seeds wrap at 2^63).
    sampler = common.TrainSampler(1_000_000, 2, seed=args.seed)
    sampler.set_epoch(999)
    i, seed = next(iter(sampler))
    assert seed > 2**64 and common.SeededViews([(None, 0)] * 1_000_000, lambda img: torch.rand(1))[(0, seed)]


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


def lock_is_free(folder):
    """True when no process holds OUT/run.lock (this test takes and drops it)."""
    with open(os.path.join(folder, "run.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def test_a_killed_save_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    (tmp_path / "last.pt.tmp4242").write_bytes(b"x" * 100)
    (tmp_path / "backbone.pt.tmp77").write_bytes(b"y")
    (tmp_path / "last.pt").write_bytes(b"keep")
    (tmp_path / "notes.tmp1").write_bytes(b"not ours")
    common.claim_out(out_args(tmp_path), MAIN)
    assert sorted(os.listdir(tmp_path)) == sorted(["args.json", "last.pt", "notes.tmp1", "run.lock"])


def test_a_second_live_run_on_the_same_out_is_refused(tmp_path, capsys):
    holder = open(tmp_path / "run.lock", "a+")  # another live run: a second open file description holding the lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    holder.write("process 4242 on elsewhere")
    holder.flush()
    (tmp_path / "log.jsonl").write_text("{}\n")
    before = digest(tmp_path)
    assert "another run (process 4242 on elsewhere)" in error_line(
        capsys, lambda: common.claim_out(out_args(tmp_path), MAIN), common.RUNTIME)
    assert digest(tmp_path) == before
    # A lock whose process is gone (the kernel released it) is taken over, whatever the file says.
    holder.close()
    assert lock_is_free(tmp_path)
    common.claim_out(out_args(tmp_path), MAIN)
    assert (tmp_path / "run.lock").read_text() == f"process {os.getpid()} on {os.uname().nodename}"
    assert not lock_is_free(tmp_path)
    common.claim_out(out_args(tmp_path), MAIN)  # the same process may claim it again


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
    assert lock_is_free(tmp_path)  # released when the first run ended


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

class Steps(ListLoader):
    sampler = argparse.Namespace(set_epoch=lambda *a, **k: None)


def tiny_run(tmp_path, fp16=False):
    """A common.Run over 4 steps of nothing, for its stop and loss checks."""
    model = nn.Linear(2, 2)
    args = argparse.Namespace(out=str(tmp_path), resume="none", method="simclr", arch="resnet_small", data="synthetic",
                              batch_size=2, epochs=1, max_steps=None, log_every=1, knn_every=0)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    return common.Run(args, MAIN, model, torch.optim.SGD(model.parameters(), lr=0.1), scaler, Steps([None] * 4),
                      knn_net=model)


def test_a_second_signal_exits_130_in_one_line(tmp_path, capsys):
    import signal
    run = tiny_run(tmp_path)
    common._on_signal(run.requests, signal.SIGINT, None)
    assert run.requests
    with pytest.raises(SystemExit) as e:
        common._on_signal(run.requests, signal.SIGINT, None)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_stop_handlers_are_installed_when_the_epochs_begin(tmp_path):
    import signal
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run = tiny_run(tmp_path)
        assert {s: signal.getsignal(s) for s in old} == old
        next(run.epochs())
        for s in old:
            assert signal.getsignal(s).func is common._on_signal and signal.getsignal(s).args == (run.requests,)
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
    # Other flags are another run (a resume refuses them): --resume none starts it over in the same --out.
    proc = run([*flags, "--epochs", "30", "--lr", "1e30", "--warmup-epochs", "0", "--resume", "none"], check=False,
               threads=1)
    assert proc.returncode == common.RUNTIME, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: the loss is nan at step ")
    assert "--lr" in proc.stderr
    after = digest(tmp_path)
    assert after["last.pt"] == before["last.pt"] and after["backbone.pt"] == before["backbone.pt"]
    assert lock_is_free(tmp_path)


def test_fp16_tolerates_a_few_overflowing_steps(tmp_path):
    """Under fp16 loss scaling a non-finite loss is stopped only after
    NONFINITE_PATIENCE log steps in a row; in float32 at once."""
    run = tiny_run(tmp_path, fp16=True)
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    for _ in range(common.Run.NONFINITE_PATIENCE - 1):
        run.check_loss(nan)  # tolerated: the scaler is still searching
    assert run.nonfinite == common.Run.NONFINITE_PATIENCE - 1
    run.check_loss(one)
    assert run.nonfinite == 0  # a finite loss resets the count
    for _ in range(common.Run.NONFINITE_PATIENCE - 1):
        run.check_loss(nan)
    with pytest.raises(SystemExit):
        run.check_loss(nan)
    run = tiny_run(tmp_path / "fp32")
    with pytest.raises(SystemExit):
        run.check_loss(nan)


def test_a_stop_request_is_seen_at_the_next_step_in_one_process(tmp_path):
    import signal
    run, loss, z = tiny_run(tmp_path), torch.tensor(1.0), torch.randn(4, 8)
    assert run.end_step(loss, z) is False and not run.stopped
    common._on_signal(run.requests, signal.SIGTERM, None)
    assert run.end_step(loss, z) is True and run.stopped and run.step == 2


# ---------------------------------------------------------------------------
# Round 2: a failing rank, torchrun's variables, degenerate batches, resume
# that would change the run, a torn log, a killed loader worker
# ---------------------------------------------------------------------------

DIST = ["--data", "synthetic", "--arch", "resnet_small", "--workers", "0", "--batch-size", "8", "--subset", "64",
        "--knn-every", "0", "--log-every", "1"]


def dist_fault(tmp_path, fault, *flags):
    """simclr.py under torchrun (2 gloo processes) with `fault` in rank 1 (tests/fault_dist_check.py);
    returns the process and each rank's stderr, read from torchrun's --log-dir."""
    logs = tmp_path / f"logs{len(list(tmp_path.glob('logs*')))}"
    proc = torchrun(2, ["--log-dir", str(logs), "--redirects", "3", "tests/fault_dist_check.py", fault, "simclr", *DIST,
                        "--out", str(tmp_path / "out"), *flags], check=False, threads=1)
    return proc, ["".join(p.read_text() for p in logs.glob(f"*/attempt_0/{r}/stderr.log")) for r in (0, 1)]


@pytest.mark.parametrize("fault, line", [("fail-at-load", "rank one cannot read its data"),
                                         ("fail-at-step", "rank one fails at step 2")])
def test_a_failing_rank_ends_the_run_in_its_own_line_alone(tmp_path, fault, line):
    """Rank 1 fails at the data barrier or during a DDP step: its line is the only one; rank 0,
    blocked in a collective, leaves without a word (no gloo traceback)."""
    proc, (err0, err1) = dist_fault(tmp_path, fault, "--epochs", "1")
    assert proc.returncode != 0
    assert (err0, err1) == ("", f"error: {line}\n")


def test_a_killed_rank_is_reported_by_rank_0_and_the_run_resumes(tmp_path):
    proc, _ = dist_fault(tmp_path, "none", "--epochs", "1")  # 8 steps: last.pt at step 8
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = digest(tmp_path / "out")["last.pt"]
    proc, (err0, err1) = dist_fault(tmp_path, "kill-at-step", "--epochs", "2")
    assert proc.returncode != 0 and err1 == ""
    assert err0.count("\n") == 1 and err0.startswith("error: another process of this run ended without an error")
    assert digest(tmp_path / "out")["last.pt"] == before
    proc, (err0, err1) = dist_fault(tmp_path, "none", "--epochs", "2")
    assert proc.returncode == 0 and err0 == err1 == ""
    assert torch.load(tmp_path / "out" / "last.pt", weights_only=True)["step"] == 16


def test_a_command_line_error_under_torchrun_is_printed_once(tmp_path, monkeypatch, capsys):
    proc, (err0, err1) = dist_fault(tmp_path, "none", "--batch-size", "7")
    assert proc.returncode != 0 and err1 == ""  # torchrun exits 1 for any failed worker
    assert err0 == "error: --batch-size 7 does not split into 2 equal shares of 2 images or more\n"
    # Before the process group exists (argparse), rank 0 alone speaks too.
    for rank, said in (("1", ""), ("0", "--tau")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            simclr.get_args(["--tau", "0"])
        assert e.value.code == common.USAGE and said in capsys.readouterr().err


@pytest.mark.parametrize("env, says", [
    (dict(RANK="0", WORLD_SIZE="2"), "WORLD_SIZE=2 without MASTER_ADDR and MASTER_PORT"),
    (dict(RANK="1", WORLD_SIZE="1"), "RANK=1 LOCAL_RANK=0 WORLD_SIZE=1 is not a process of a run"),
    (dict(WORLD_SIZE="two"), "WORLD_SIZE=two is not a process of a run"),
])
def test_torchrun_variables_without_torchrun_end_in_one_line(monkeypatch, capsys, env, says):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert says in error_line(capsys, lambda: common.setup(argparse.Namespace(seed=0)), common.RUNTIME)


def test_a_process_started_by_hand_says_what_it_waits_for_and_stops_waiting(monkeypatch, capsys):
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(common, "PEER_WAIT", 2)
    t = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        common.setup(argparse.Namespace(seed=0))
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == common.RUNTIME and time.perf_counter() - t < 60
    assert err[0] == f"process 0 of 2: waiting up to 2 s for the others at 127.0.0.1:{port}"
    assert len(err) == 2 and err[1].startswith("error: process 0 of 2 could not join the others")


@pytest.mark.parametrize("script", ["simclr", "aag", "clsa", "ressl", "dssl"])
def test_a_batch_of_one_is_refused_by_every_method_with_the_reason(capsys, script):
    err = error_line(capsys, lambda: __import__(script).get_args(["--batch-size", "1"]), common.USAGE)
    assert "--batch-size: must be at least 2: BatchNorm" in err


def test_a_resume_that_would_change_the_run_is_refused(tmp_path):
    """A run started at batch 16 resumed at batch 32: one line naming the flag; nothing in --out changes."""
    flags = ["simclr.py", "--data", "synthetic", "--arch", "resnet_small", "--workers", "0", "--subset", "64",
             "--knn-every", "0", "--epochs", "1", "--out", str(tmp_path)]
    run([*flags, "--batch-size", "16"], threads=1)
    before = digest(tmp_path)
    proc = run([*flags, "--batch-size", "32", "--max-steps", "1"], check=False, threads=1)
    assert proc.returncode == common.RUNTIME and proc.stderr.count("\n") == 1
    assert "was trained with --batch-size 16 (now 32)" in proc.stderr and "max-steps" not in proc.stderr
    assert digest(tmp_path) == before


@pytest.mark.parametrize("drop", ["args", "model", "optimizer"])
def test_a_checkpoint_without_a_part_ends_in_one_line(tmp_path, capsys, drop):
    model = nn.Linear(4, 128)
    opt, scaler = torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False)
    common.save_run(resume_args(tmp_path), model, model, opt, scaler, step=3, epoch=0)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    del ckpt[drop]
    torch.save(ckpt, tmp_path / "last.pt")
    err = error_line(capsys, lambda: common.resume(resume_args(tmp_path), model, opt, scaler), common.RUNTIME)
    assert f"not a complete training checkpoint (no {drop})" in err


def test_a_torn_log_line_does_not_swallow_the_next_record(tmp_path):
    import json
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1}\n{"epoch": 2, "lo')  # killed while writing epoch 2
    common.append_line(str(log), json.dumps({"epoch": 3}))
    common.append_line(str(log), json.dumps({"epoch": 4}))
    lines = log.read_text().splitlines()
    assert lines == ['{"epoch": 1}', '{"epoch": 2, "lo', '{"epoch": 3}', '{"epoch": 4}']


class Killed(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does to a worker


def test_a_killed_loader_worker_ends_in_one_line(capsys):
    loader = torch.utils.data.DataLoader(Killed(), batch_size=2, num_workers=1)
    err = error_line(capsys, lambda: list(common.fail_on_bad_images(loader)), common.RUNTIME)
    assert "DataLoader worker" in err and "out-of-memory killer" in err and "--workers" in err
