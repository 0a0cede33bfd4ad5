"""--data folder on your own images: labelled and unlabelled trees, the kNN
monitor and evaluate.py without labels, unreadable files, and the share of
time the training loop waits for data (progress line, log.jsonl, the hint)."""
import json
import os
import re
import time

import pytest
import torch

import common
from conftest import error_line, labelled_tree, progress_line, run, torchrun, write_images


# ---------------------------------------------------------------------------
# Which trees are labelled
# ---------------------------------------------------------------------------

def test_labelled_tree_reads_as_before_with_val_mapped_to_train_classes(tmp_path):
    """train/<class>/ and val/<class>/: labels in sorted class order; a val/ missing a class keeps train's indices."""
    root = labelled_tree(tmp_path, classes=("ant", "bee", "cow"))
    for f in os.listdir(tmp_path / "val" / "ant"):
        os.remove(tmp_path / "val" / "ant" / f)
    os.rmdir(tmp_path / "val" / "ant")
    train = common.dataset("folder", root, True)
    test = common.dataset("folder", root, False)
    assert train.classes == ["ant", "bee", "cow"] and common.missing_labels(train) is None
    assert [y for _, y in train.samples] == [0] * 4 + [1] * 4 + [2] * 4
    assert [(os.path.basename(os.path.dirname(p)), y) for p, y in test.samples] == [("bee", 1)] * 2 + [("cow", 2)] * 2
    img, label = train[5]
    assert img.mode == "RGB" and img.size == (36, 40) and label == 1
    assert common.num_classes("folder", common.subset(train, 6)) == 3  # through --subset's wrapper too


@pytest.mark.parametrize("layout", ["flat", "nested", "one_class", "no_train"])
def test_unlabelled_trees_give_every_image_without_labels(tmp_path, layout):
    """A flat train/, nested folders, a single folder, or --data-dir holding images with no train/:
    every image file (by extension, any case; dot-files and other files skipped), label -1, no test split."""
    top = tmp_path if layout == "no_train" else tmp_path / "train"
    where = {"flat": [top], "nested": [top / "2019" / "a", top / "2020"], "one_class": [top / "only"],
             "no_train": [top / "x" / "y", top]}[layout]
    for i, folder in enumerate(where):
        write_images(folder, 3, exts=("JPG", "png", "JpEg"), seed=i)
    (top / "notes.txt").write_text("not an image")
    (top / "._000.jpg").write_bytes(b"macOS resource fork")
    write_images(tmp_path / "val" / "a", 2)  # a labelled val/ does not make the tree labelled
    write_images(tmp_path / "val" / "b", 2)
    train = common.dataset("folder", str(tmp_path), True)
    assert len(train) == 3 * len(where) + (4 if layout == "no_train" else 0)
    assert train.classes is None and {y for _, y in train.samples} == {-1}
    assert all(p.lower().endswith((".jpg", ".png", ".jpeg")) and "._" not in p for p, _ in train.samples)
    assert common.dataset("folder", str(tmp_path), False) is None
    why = common.missing_labels(common.subset(train, 2))
    assert ("no train/" in why) if layout == "no_train" else ("class folders" in why)
    assert train[0][0].mode == "RGB"


def test_labelled_train_without_val_pretrains_but_has_no_test_set(tmp_path):
    root = labelled_tree(tmp_path, val=False)
    train = common.dataset("folder", root, True)
    assert train.classes == ["cat", "dog"] and common.dataset("folder", root, False) is None
    assert "no val/" in common.missing_labels(train)


def test_file_order_is_sorted_and_the_same_on_every_call(tmp_path):
    """Every process of a torchrun run walks the tree itself: the order must not depend on the file system."""
    write_images(tmp_path / "b", 3)
    write_images(tmp_path / "a" / "z", 2)
    paths = [p for p, _ in common.dataset("folder", str(tmp_path), True).samples]
    assert paths == sorted(paths, key=lambda p: os.path.relpath(p, tmp_path).split(os.sep))
    assert paths == [p for p, _ in common.dataset("folder", str(tmp_path), True).samples]


@pytest.mark.parametrize("case", ["empty", "missing", "val_unknown_class", "val_flat"])
def test_bad_trees_end_in_one_line(tmp_path, capsys, case):
    root = str(tmp_path)
    if case == "empty":
        (tmp_path / "train" / "a").mkdir(parents=True)
        (tmp_path / "train" / "a" / "readme.txt").write_text("x")
        expect = "no image files"
    elif case == "missing":
        root, expect = str(tmp_path / "nowhere"), "does not exist"
    elif case == "val_unknown_class":
        labelled_tree(tmp_path)
        write_images(tmp_path / "val" / "eel", 1)
        expect = "eel"
    else:
        labelled_tree(tmp_path, val=False)
        write_images(tmp_path / "val", 2)
        expect = "val/<class>/<image>"
    line = error_line(capsys, lambda: [common.dataset("folder", root, t) for t in (True, False)], common.RUNTIME)
    assert expect in line, line


def test_unreadable_image_in_an_unlabelled_tree_names_the_file(tmp_path, capsys):
    write_images(tmp_path, 7)
    bad = tmp_path / "zz.JPG"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    ds = common.dataset("folder", str(tmp_path), True)
    ctx = common.Context(0, 1, 0, torch.device("cpu"), None)
    tf = lambda img: common.to_tensor(img.resize((8, 8)))
    loader = common.train_loader(ds, tf, 8, 0, 0, ctx)
    line = error_line(capsys, lambda: [None for _ in loader], common.RUNTIME)
    assert str(bad) in line and "not a readable image" in line


# ---------------------------------------------------------------------------
# Training and evaluation on an unlabelled tree
# ---------------------------------------------------------------------------

def train(data_dir, out, max_steps, *extra):
    return run(["simclr.py", "--data", "folder", "--data-dir", str(data_dir), "--image-size", "32", "--arch",
                "resnet_small", "--batch-size", "8", "--workers", "0", "--log-every", "1", "--knn-every", "1",
                "--max-steps", str(max_steps), "--out", str(out), *extra], threads=1)


def test_pretraining_on_an_unlabelled_tree_skips_knn_in_one_line_and_resumes(tmp_path):
    """An end-to-end run on a flat folder: one line says why the kNN monitor is off, the progress lines
    show the data wait, log.jsonl records it (no kNN), and a second run resumes from last.pt."""
    write_images(tmp_path / "imgs" / "train", 16, exts=("jpg", "PNG"))
    out = tmp_path / "out"
    proc = train(tmp_path / "imgs", out, 2)
    off = [line for line in proc.stdout.splitlines() if line.startswith("kNN monitor off")]
    assert len(off) == 1 and "class folders" in off[0] and proc.stderr.strip() == ""
    steps = [line for line in proc.stdout.splitlines() if re.search(r"\bstep \d+/\d+", line)]
    assert len(steps) == 2 and all(re.search(r" img/s  data \d+%  eta ", line) for line in steps)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(records) == 1 and 0 < records[0]["data_wait"] < 1 and "knn_top1" not in records[0]
    assert json.loads((out / "args.json").read_text())["knn_every"] == 0
    proc = train(tmp_path / "imgs", out, 3)
    assert "from step 2" in proc.stdout
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 3

    ev = run(["evaluate.py", "--ckpt", str(out / "last.pt"), "--workers", "0"], check=False)
    err = ev.stderr.strip().splitlines()
    assert ev.returncode == 1 and len(err) == 1, ev.stderr
    assert err[0].startswith("error: evaluate.py needs labelled images") and "class folders" in err[0]


def test_torchrun_two_processes_on_an_unlabelled_tree(tmp_path):
    """DDP works the same without labels: 2 CPU processes, 2 steps, one kNN line (rank 0 only)."""
    write_images(tmp_path / "imgs", 16)
    out = tmp_path / "out"
    proc = torchrun(2, ["simclr.py", "--data", "folder", "--data-dir", str(tmp_path / "imgs"), "--image-size", "32",
                        "--arch", "resnet_small", "--batch-size", "8", "--workers", "0", "--knn-every", "1",
                        "--max-steps", "2", "--out", str(out)], timeout=300)
    assert sum(line.startswith("kNN monitor off") for line in proc.stdout.splitlines()) == 1
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2


# ---------------------------------------------------------------------------
# Time spent waiting for data
# ---------------------------------------------------------------------------

class Slow(torch.utils.data.Dataset):
    def __init__(self, n, delay):
        self.n, self.delay = n, delay

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay)
        return torch.zeros(2), 0


def loader_over(ds, batch=2):
    return common.MeasuredLoader(ds, batch_size=batch, num_workers=0)


def test_data_wait_is_high_for_a_slow_loader_and_low_for_slow_compute(capsys):
    """The share counts time inside next(): near 1 when loading is slow, near 0 when the loop's own work is."""
    slow_data = loader_over(Slow(8, 0.02))
    assert len(list(slow_data)) == 4 and slow_data.data_wait() > 0.8
    slow_step = loader_over(Slow(8, 0.0))
    for _ in slow_step:
        time.sleep(0.04)
    assert slow_step.data_wait() < 0.2
    out = capsys.readouterr().out
    assert out.count("waiting for data") == 1 and "--workers (now 0)" in out  # the starved pass only
    list(slow_data)
    assert "waiting for data" not in capsys.readouterr().out  # one hint per run, not per epoch


def test_progress_line_shows_the_wait():
    loader = loader_over(Slow(4, 0.01))
    list(loader)
    line = progress_line(2, 1.0, 10, 8, loader)
    assert re.search(r" img/s  data (9\d|100)%  eta \d\d:\d\d:\d\d  z-std 0.088$", line), line
