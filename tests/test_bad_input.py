"""Bad input ends simclr.py and evaluate.py with one sentence on stderr, no
traceback, and exit code 2 for a wrong command line or 1 for something found
wrong while running: missing data, unreadable or mismatched checkpoints."""
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import run

TRAIN = ["simclr.py", "--data", "synthetic", "--arch", "resnet_small", "--workers", "0",
         "--batch-size", "8", "--subset", "64", "--knn-every", "0", "--log-every", "1"]
EVAL = ["evaluate.py", "--workers", "0", "--subset", "64", "--linear-epochs", "1"]

# name: expected exit code (2: wrong command line, 1: found wrong while running)
CASES = {
    "cifar10_missing": 1,
    "unknown_data": 2,
    "batch_size_zero": 2,
    "max_steps_negative": 2,
    "max_steps_zero": 2,
    "batch_larger_than_data": 2,
    "resume_garbage": 1,
    "resume_truncated": 1,
    "resume_other_arch": 1,
    "resume_other_method": 1,
    "eval_garbage": 1,
    "eval_missing": 1,
    "eval_other_arch": 1,
    "eval_no_ckpt": 2,
    "eval_random_init_no_arch": 2,
    "eval_bare_backbone": 2,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 2-step resnet_small run: its --out folder."""
    out = tmp_path_factory.mktemp("trained")
    run([*TRAIN, "--out", str(out), "--max-steps", "2"])
    return out


@pytest.fixture(scope="module")
def paths(trained, tmp_path_factory):
    """The broken inputs, each in its own folder so that no case sees another's files."""
    root = tmp_path_factory.mktemp("bad")
    p = {name: root / name for name in ("empty", "garbage", "truncated", "other_arch", "other_method", "bare", "runs")}
    for folder in p.values():
        folder.mkdir()
    (p["garbage"] / "last.pt").write_bytes(bytes(range(256)) * 40)
    real = (trained / "last.pt").read_bytes()
    (p["truncated"] / "last.pt").write_bytes(real[: len(real) // 2])
    for name in ("last.pt", "backbone.pt", "args.json", "log.jsonl"):
        shutil.copy(trained / name, p["other_arch"] / name)
    ckpt = torch.load(trained / "last.pt", map_location="cpu", weights_only=True)
    ckpt["method"] = "ressl"
    torch.save(ckpt, p["other_method"] / "last.pt")
    shutil.copy(trained / "backbone.pt", p["bare"] / "backbone.pt")  # no args.json beside it
    p["missing"] = root / "nowhere" / "last.pt"
    return p


@pytest.fixture(scope="module")
def outcomes(trained, paths):
    """Every case run as a subprocess (two at a time): {name: CompletedProcess}."""
    out = lambda name: ["--out", str(paths["runs"] / name)]  # never write into the repository's runs/
    commands = {
        "cifar10_missing": ["simclr.py", "--data", "cifar10", "--data-dir", str(paths["empty"]), "--no-download",
                            "--arch", "resnet_small", "--workers", "0", *out("cifar10")],
        "unknown_data": ["simclr.py", "--data", "nosuchset", *out("nosuchset")],
        "batch_size_zero": [*TRAIN, "--batch-size", "0", *out("b0")],
        "max_steps_negative": [*TRAIN, "--max-steps", "-1", *out("m-1")],
        "max_steps_zero": [*TRAIN, "--max-steps", "0", *out("m0")],
        "batch_larger_than_data": ["simclr.py", "--data", "synthetic", "--arch", "resnet_small", "--workers", "0",
                                   "--batch-size", "3000", *out("b3000")],
        "resume_garbage": [*TRAIN, "--max-steps", "3", "--out", str(paths["garbage"])],
        "resume_truncated": [*TRAIN, "--max-steps", "3", "--out", str(paths["truncated"])],
        "resume_other_arch": [*TRAIN, "--arch", "resnet18", "--max-steps", "3", "--out", str(paths["other_arch"])],
        "resume_other_method": [*TRAIN, "--max-steps", "3", "--out", str(paths["other_method"])],
        "eval_garbage": [*EVAL, "--ckpt", str(paths["garbage"] / "last.pt")],
        "eval_missing": [*EVAL, "--ckpt", str(paths["missing"])],
        "eval_other_arch": [*EVAL, "--ckpt", str(trained / "last.pt"), "--arch", "resnet18"],
        "eval_no_ckpt": [*EVAL],
        "eval_random_init_no_arch": [*EVAL, "--random-init", "--data", "synthetic"],
        "eval_bare_backbone": [*EVAL, "--ckpt", str(paths["bare"] / "backbone.pt")],
    }
    assert commands.keys() == CASES.keys()
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda args: run(args, check=False, threads=1), commands.values()))
    return dict(zip(commands, procs))


def message(proc):
    """The one error line on stderr (without the 'error: ' prefix)."""
    return proc.stderr.strip().removeprefix("error:").strip()


@pytest.mark.parametrize("name", list(CASES))
def test_fails_with_one_error_line_and_no_traceback(outcomes, name):
    """Exit code 2 (command line) or 1 (runtime); stderr is exactly one non-empty line starting with
    'error:'; no traceback anywhere."""
    proc = outcomes[name]
    report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-2000:]}"
    assert proc.returncode == CASES[name], report
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, report
    assert lines[0].startswith("error:") and len(lines[0]) > len("error: "), report
    assert "Traceback" not in proc.stdout + proc.stderr, report


def test_missing_data_names_the_data_set_and_the_folder(outcomes, paths):
    """Missing CIFAR-10 with --no-download: the sentence names cifar10 and where it looked."""
    text = message(outcomes["cifar10_missing"])
    assert "cifar10" in text and str(paths["empty"]) in text


def test_command_line_errors_name_the_flag(outcomes):
    """A bad value is reported with the flag (or value) at fault."""
    assert "nosuchset" in message(outcomes["unknown_data"])
    assert "--batch-size" in message(outcomes["batch_size_zero"])
    assert "--max-steps" in message(outcomes["max_steps_negative"])
    assert "--max-steps" in message(outcomes["max_steps_zero"])
    assert "--batch-size" in message(outcomes["batch_larger_than_data"])


def test_unreadable_checkpoints_are_reported_as_such(outcomes, paths):
    """Garbage bytes or a truncated last.pt in --out (resume auto), and garbage given to evaluate.py,
    are 'not a readable checkpoint', naming the file; a missing --ckpt names the path."""
    for name, folder in (("resume_garbage", "garbage"), ("resume_truncated", "truncated"), ("eval_garbage", "garbage")):
        text = message(outcomes[name])
        assert "not a readable checkpoint" in text, (name, text)
        assert str(paths[folder] / "last.pt") in text, (name, text)
    assert str(paths["missing"]) in message(outcomes["eval_missing"])


def test_other_architecture_mentions_arch(outcomes):
    """A resnet_small checkpoint evaluated or resumed as resnet18: the sentence points at --arch."""
    assert "--arch" in message(outcomes["eval_other_arch"])
    assert "--arch" in message(outcomes["resume_other_arch"])


def test_refused_resume_leaves_the_run_untouched(outcomes, trained, paths):
    """A resume refused for another --arch changes nothing in --out: args.json still describes the
    checkpoint beside it (evaluate.py reads it for backbone.pt) and last.pt is unchanged."""
    assert outcomes["resume_other_arch"].returncode == 1
    folder = paths["other_arch"]
    assert (folder / "last.pt").read_bytes() == (trained / "last.pt").read_bytes()
    assert json.loads((folder / "args.json").read_text())["arch"] == "resnet_small"
    assert (folder / "args.json").read_text() == (trained / "args.json").read_text()


def test_other_method_names_both_methods(outcomes):
    """A 'ressl' last.pt resumed by simclr.py: the sentence names both methods."""
    text = message(outcomes["resume_other_method"])
    assert "ressl" in text and "simclr" in text


def test_evaluate_usage_errors_say_what_is_needed(outcomes):
    """Neither --ckpt nor --random-init; --random-init without --arch; a bare backbone.pt with no
    args.json and no --arch/--data: each sentence names the missing flag."""
    text = message(outcomes["eval_no_ckpt"])
    assert "--ckpt" in text and "--random-init" in text
    assert "--arch" in message(outcomes["eval_random_init_no_arch"])
    text = message(outcomes["eval_bare_backbone"])
    assert ("--data" in text or "--arch" in text) and "need" in text, text
