"""Bad input ends simclr.py and evaluate.py with one sentence on stderr, no
traceback, and exit code 2 for a wrong command line or 1 for something found
wrong while running: missing data, unreadable or mismatched checkpoints."""
import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import common
import evaluate
from conftest import ENV, ROOT, error_line, labelled_tree, run

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


# ---------------------------------------------------------------------------
# evaluate.py: its files, Ctrl-C, out of memory; folder data sets: odd files
# ---------------------------------------------------------------------------

RANDOM = ["--random-init", "--arch", "resnet_small", "--data", "synthetic", "--subset", "64", "--workers", "0"]


def test_a_broken_args_json_beside_backbone_pt_is_named(tmp_path, capsys):
    """A torn args.json (a killed write): one line naming it and the JSON error, not a JSONDecodeError traceback."""
    torch.save(common.resnet("resnet_small", 32)[0].state_dict(), tmp_path / "backbone.pt")
    (tmp_path / "args.json").write_text('{"data": "synthetic", "arch": "resnet_sm')
    ckpt = str(tmp_path / "backbone.pt")
    line = error_line(capsys, lambda: evaluate.load_backbone(evaluate.get_args(["--ckpt", ckpt])), common.RUNTIME)
    assert line == (f"error: {tmp_path / 'args.json'}, the settings of {ckpt}, is not valid JSON (Unterminated string "
                    "starting at: line 1 column 31 (char 30)); repair it, or delete it and pass --data and --arch")


def test_a_ckpt_folder_and_a_json_in_a_missing_folder_are_refused_before_any_work(tmp_path, capsys):
    line = error_line(capsys, lambda: evaluate.get_args(["--ckpt", str(tmp_path)]), common.USAGE)
    assert line == f"error: --ckpt {tmp_path} is a folder, not a checkpoint file; pass its last.pt or backbone.pt"
    json_path = tmp_path / "nowhere" / "r.json"
    line = error_line(capsys, lambda: evaluate.get_args([*RANDOM, "--json", str(json_path)]), common.USAGE)
    assert line == f"error: --json {json_path}: the folder {tmp_path / 'nowhere'} does not exist"


def test_the_results_line_comes_before_a_json_that_cannot_be_written(tmp_path, capsys, keep_rng):
    """--json naming a folder passes the command line; the write fails after the results are printed."""
    with pytest.raises(SystemExit) as e:
        evaluate.main([*RANDOM, "--no-linear", "--json", str(tmp_path)])
    out, err = capsys.readouterr()
    assert e.value.code == common.RUNTIME and out.splitlines()[-1].startswith("knn_top1=")
    assert err == f"error: could not write --json {tmp_path} (Is a directory); the results are the line above\n"


def test_out_of_memory_in_the_augmented_probe_names_linear_batch_size(capsys, monkeypatch, keep_rng):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after: main installs the hook

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(evaluate, "linear_with_aug", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as e:
        evaluate.main([*RANDOM, "--no-knn", "--linear-aug", "--linear-batch-size", "512"])
    capsys.readouterr()
    sys.excepthook(e.type, e.value, e.tb)
    assert capsys.readouterr().err == (
        "error: CUDA out of memory at 512 images per GPU (--linear-batch-size 512 over 1 process(es)), --amp off: lower "
        "--linear-batch-size, or use --amp bf16 (fp16 before Ampere); more GPUs keep the global batch at a smaller "
        "per-GPU share (README: memory per GPU)\n")


def test_ctrl_c_in_evaluate_ends_in_one_line_with_exit_130():
    """SIGINT to the whole process group (as a terminal sends it, loader worker included) once the probe runs."""
    proc = subprocess.Popen([sys.executable, "evaluate.py", *RANDOM, "--workers", "1", "--no-knn", "--linear-aug",
                             "--linear-epochs", "100000", "--linear-batch-size", "32"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = proc.stdout.readline()
    while first.startswith("note:"):  # the loader's data-wait hint may come first, as timing has it
        first = proc.stdout.readline()
    if first.startswith("linear epoch 1/"):
        os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert first.startswith("linear epoch 1/"), err
    assert proc.returncode == 130 and err == "error: interrupted\n", err
    assert "Traceback" not in out


def test_only_regular_files_are_images_and_a_broken_link_fails_when_read(tmp_path):
    """A named pipe called like an image (opening it blocks) is skipped as a text file is, in --data folder and in
    ImageNet's class folders; a broken link stays listed, so reading it ends in the unreadable-image line."""
    root = labelled_tree(tmp_path)
    os.mkfifo(tmp_path / "train" / "cat" / "004.png")
    os.mkfifo(tmp_path / "val" / "dog" / "zz.JPEG")
    os.symlink(tmp_path / "gone.png", tmp_path / "train" / "dog" / "gone.png")
    train = common.dataset("folder", root, True)
    assert [os.path.relpath(p, tmp_path) for p, _ in train.samples] == (
        [f"train/cat/00{i}.png" for i in range(4)] + [f"train/dog/00{i}.png" for i in range(4)] + ["train/dog/gone.png"])
    assert [os.path.basename(p) for p, _ in common.dataset("imagenet", root, False).samples] == ["000.png", "001.png"] * 2
    with pytest.raises(common.BadImageError, match="gone.png is not a readable image"):
        train[8]


def test_a_link_back_into_the_tree_is_not_followed(tmp_path):
    """train/cat/loop -> train: the 8 images once each, labels kept (followed: 329 images, no labels)."""
    root = labelled_tree(tmp_path)
    os.symlink(tmp_path / "train", tmp_path / "train" / "cat" / "loop")
    train = common.dataset("folder", root, True)
    assert train.classes == ["cat", "dog"] and [y for _, y in train.samples] == [0] * 4 + [1] * 4


def test_a_data_dir_that_is_a_file_says_so(tmp_path, capsys):
    path = tmp_path / "data.tar"
    path.write_bytes(b"x")
    line = error_line(capsys, lambda: common.dataset("folder", str(path), True), common.USAGE)
    assert line == f"error: --data-dir {path} is a file, not a folder; pass the folder that holds the data"
