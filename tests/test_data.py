"""Data set readers: every test writes a few images in the
real on-disk layout under tmp_path and reads them back through
common.dataset / common.load_data, with downloads switched off."""
import argparse
import os
import pickle

import numpy as np
import pytest
from PIL import Image

import common


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def expect_failure(capsys, fn, *needles):
    """fn() must end with SystemExit(1) and print exactly one line starting
    with 'error:' to stderr that names one of `needles` (a path or data set)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn()
    assert e.value.code == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert any(n in lines[0] for n in needles), (needles, err)
    return lines[0]


def pil_array(ds, i):
    img, label = ds[i]
    assert isinstance(img, Image.Image)
    return np.asarray(img), label


def save_jpeg(path, colour, size=(8, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")


# ---------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle folders)
# ---------------------------------------------------------------------------

CIFAR10_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_rows(n, marks=()):
    """uint8 [n, 3072] in the official order (1024 R, 1024 G, 1024 B, each
    row-major); marks: (image, row, col, channel, value)."""
    data = np.zeros((n, 3072), np.uint8)
    for i, r, c, ch, v in marks:
        data[i, ch * 1024 + r * 32 + c] = v
    return data


def write_pickle(path, obj, bytes_keys=False):
    if bytes_keys:
        obj = {k.encode("latin1"): v for k, v in obj.items()}
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def cifar10_batch(data, labels):
    n = len(labels)
    return {"batch_label": "testing batch 1 of 1", "labels": list(labels), "data": data,
            "filenames": [f"img_{i}.png" for i in range(n)]}


def write_cifar10(root, bytes_keys=False, n=3, test=None):
    """Five training batches of n images (labels 0..n-1 plus the batch index)
    and a test batch; image 0 of data_batch_2 has a marked pixel."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for b in range(1, 6):
        marks = [(0, 3, 17, 1, 200)] if b == 2 else []
        labels = [(b + i) % 10 for i in range(n)]
        write_pickle(os.path.join(folder, f"data_batch_{b}"), cifar10_batch(cifar_rows(n, marks), labels), bytes_keys)
    test = test or cifar10_batch(cifar_rows(2, [(1, 30, 2, 2, 77)]), [9, 4])
    write_pickle(os.path.join(folder, "test_batch"), test, bytes_keys)
    return folder


@pytest.mark.parametrize("bytes_keys", [False, True], ids=["str-keys", "bytes-keys"])
def test_cifar10_reads_official_layout(tmp_path, bytes_keys):
    """CIFAR-10 batches with str or bytes keys load: train is the five batches
    in order, test is test_batch, and a pixel written at (row, col, channel) in
    the channel-major rows comes back at that place in the PIL image."""
    write_cifar10(tmp_path, bytes_keys=bytes_keys)
    train = common.dataset("cifar10", str(tmp_path), True, download=False)
    test = common.dataset("cifar10", str(tmp_path), False, download=False)
    assert len(train) == 15 and len(test) == 2
    assert [train[i][1] for i in range(15)] == [(b + i) % 10 for b in range(1, 6) for i in range(3)]
    assert [test[i][1] for i in range(2)] == [9, 4]
    x, _ = pil_array(train, 3)  # image 0 of data_batch_2
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8
    assert x[3, 17, 1] == 200
    assert x.sum() == 200  # nowhere else
    x, _ = pil_array(test, 1)
    assert x[30, 2, 2] == 77 and x.sum() == 77
    assert pil_array(test, 0)[0].sum() == 0


@pytest.mark.parametrize("bytes_keys", [False, True], ids=["str-keys", "bytes-keys"])
def test_cifar100_uses_fine_labels(tmp_path, bytes_keys):
    """CIFAR-100's train/test pickles load with the 100 fine labels, not the
    20 coarse ones, and pixels keep their place."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, fine, coarse in (("train", [55, 99, 3], [1, 19, 0]), ("test", [42, 7], [2, 5])):
        marks = [(0, 5, 9, 0, 123)] if split == "train" else []
        write_pickle(folder / split, {"filenames": ["a"] * len(fine), "batch_label": split, "fine_labels": fine,
                                      "coarse_labels": coarse, "data": cifar_rows(len(fine), marks)}, bytes_keys)
    train = common.dataset("cifar100", str(tmp_path), True, download=False)
    test = common.dataset("cifar100", str(tmp_path), False, download=False)
    assert [train[i][1] for i in range(len(train))] == [55, 99, 3]
    assert [test[i][1] for i in range(len(test))] == [42, 7]
    x, _ = pil_array(train, 0)
    assert x[5, 9, 0] == 123 and x.sum() == 123


@pytest.mark.parametrize("data", [
    cifar_rows(2).astype(np.float32),
    cifar_rows(2).astype(np.int16),
    np.zeros((10, 3000), np.uint8),
], ids=["float32", "int16", "10x3000"])
def test_cifar_bad_data_array_fails(tmp_path, capsys, data):
    """A test_batch whose 'data' has the wrong dtype or a row length other
    than 3072 ends with exit code 1 and one 'error:' line naming the folder."""
    folder = write_cifar10(tmp_path, test=cifar10_batch(data, list(range(len(data)))))
    expect_failure(capsys, lambda: common.dataset("cifar10", str(tmp_path), False, download=False), folder)


def test_cifar_image_shaped_data_fails(tmp_path, capsys):
    """'data' stored as uint8 [N, 32, 32, 3] (height-width-channel images, not
    the official [N, 3072] rows) is a wrong shape: it must be rejected with
    exit code 1 instead of being reshaped into scrambled images."""
    data = np.zeros((2, 32, 32, 3), np.uint8)
    folder = write_cifar10(tmp_path, test=cifar10_batch(data, [0, 1]))
    expect_failure(capsys, lambda: common.dataset("cifar10", str(tmp_path), False, download=False), folder)


@pytest.mark.parametrize("labels", [[0, 10], [-1, 3], [0, 1, 2]], ids=["label-10", "label-minus-1", "3-labels-2-images"])
def test_cifar_bad_labels_fail(tmp_path, capsys, labels):
    """Labels outside 0..9 or a label count that differs from the image count
    end with exit code 1 and one 'error:' line naming the folder."""
    folder = write_cifar10(tmp_path, test=cifar10_batch(cifar_rows(2), labels))
    expect_failure(capsys, lambda: common.dataset("cifar10", str(tmp_path), False, download=False), folder)


def test_cifar100_label_out_of_range_fails(tmp_path, capsys):
    """A CIFAR-100 fine label of 100 is out of range: exit code 1."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split in ("train", "test"):
        write_pickle(folder / split, {"fine_labels": [0, 100], "coarse_labels": [0, 1], "data": cifar_rows(2)})
    expect_failure(capsys, lambda: common.dataset("cifar100", str(tmp_path), True, download=False), str(folder))


@pytest.mark.parametrize("content", ["truncated", "garbage", "empty", "not-a-dict", "no-labels"])
def test_cifar_unreadable_batch_fails(tmp_path, capsys, content):
    """A truncated, garbage, empty or wrong-content data_batch_1 ends with exit
    code 1 and one 'error:' line naming the file."""
    folder = write_cifar10(tmp_path)
    path = os.path.join(folder, "data_batch_1")
    full = pickle.dumps(cifar10_batch(cifar_rows(3), [0, 1, 2]))
    raw = {"truncated": full[: len(full) // 2], "garbage": b"this is not a pickle at all\n" * 4, "empty": b"",
           "not-a-dict": pickle.dumps([1, 2, 3]), "no-labels": pickle.dumps({"data": cifar_rows(3)})}[content]
    with open(path, "wb") as f:
        f.write(raw)
    expect_failure(capsys, lambda: common.dataset("cifar10", str(tmp_path), True, download=False), path)


@pytest.mark.parametrize("missing", ["data_batch_3", "test_batch"])
def test_cifar_missing_batch_without_download_fails(tmp_path, capsys, missing):
    """With download=False a missing batch file is not fetched: exit code 1,
    one 'error:' line naming the data set and the expected folder."""
    folder = write_cifar10(tmp_path)
    os.remove(os.path.join(folder, missing))
    line = expect_failure(capsys, lambda: common.dataset("cifar10", str(tmp_path), True, download=False), folder)
    assert "cifar10" in line and missing in line


def test_cifar_missing_folder_without_download_fails(tmp_path, capsys):
    """An empty --data-dir with download=False fails in one line naming cifar100."""
    expect_failure(capsys, lambda: common.dataset("cifar100", str(tmp_path), True, download=False), "cifar100")


# ---------------------------------------------------------------------------
# SVHN (.mat files)
# ---------------------------------------------------------------------------

def write_svhn(root, split, labels, marks=()):
    sio = pytest.importorskip("scipy.io", reason="reading SVHN's .mat files needs scipy")
    n = len(labels)
    X = np.zeros((32, 32, 3, n), np.uint8)
    for i, r, c, ch, v in marks:
        X[r, c, ch, i] = v
    sio.savemat(os.path.join(root, f"{split}_32x32.mat"), {"X": X, "y": np.array(labels, np.uint8).reshape(n, 1)})


def test_svhn_labels_and_orientation(tmp_path):
    """SVHN's label 10 (digit 0) becomes 0, other digits keep their value, and
    X[row, col, channel, n] comes back at (row, col, channel) of image n."""
    write_svhn(tmp_path, "train", [10, 1, 9, 10], marks=[(2, 4, 27, 2, 250)])
    write_svhn(tmp_path, "test", [3, 10])
    train = common.dataset("svhn", str(tmp_path), True, download=False)
    test = common.dataset("svhn", str(tmp_path), False, download=False)
    assert [train[i][1] for i in range(4)] == [0, 1, 9, 0]
    assert [test[i][1] for i in range(2)] == [3, 0]
    x, _ = pil_array(train, 2)
    assert x.shape == (32, 32, 3)
    assert x[4, 27, 2] == 250 and x.sum() == 250


def test_svhn_bad_files_fail(tmp_path, capsys):
    """A missing SVHN file (download=False), a garbage .mat and a label of 11
    each end with exit code 1 and one 'error:' line naming the file."""
    pytest.importorskip("scipy.io", reason="reading SVHN's .mat files needs scipy")
    path = os.path.join(tmp_path, "test_32x32.mat")
    expect_failure(capsys, lambda: common.dataset("svhn", str(tmp_path), False, download=False), path)
    with open(path, "wb") as f:
        f.write(b"MATLAB? no, just garbage bytes" * 10)
    expect_failure(capsys, lambda: common.dataset("svhn", str(tmp_path), False, download=False), path)
    write_svhn(tmp_path, "test", [1, 11])
    expect_failure(capsys, lambda: common.dataset("svhn", str(tmp_path), False, download=False), path)


# ---------------------------------------------------------------------------
# STL-10 (binary files)
# ---------------------------------------------------------------------------

def stl_images(n, marks=()):
    """uint8 [n, 3, W, H] in C order (each plane column-major, as STL-10 stores
    it); marks: (image, row, col, channel, value)."""
    a = np.zeros((n, 3, 96, 96), np.uint8)
    for i, r, c, ch, v in marks:
        a[i, ch, c, r] = v
    return a


def write_stl10(root, train_y=(1, 10, 5), test_y=(2, 1), n_unlabeled=2):
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder, exist_ok=True)
    stl_images(len(train_y), [(1, 5, 70, 0, 211)]).tofile(os.path.join(folder, "train_X.bin"))
    np.array(train_y, np.uint8).tofile(os.path.join(folder, "train_y.bin"))
    stl_images(len(test_y), [(0, 90, 1, 2, 99)]).tofile(os.path.join(folder, "test_X.bin"))
    np.array(test_y, np.uint8).tofile(os.path.join(folder, "test_y.bin"))
    stl_images(n_unlabeled, [(n_unlabeled - 1, 0, 95, 1, 33)]).tofile(os.path.join(folder, "unlabeled_X.bin"))
    return folder


def test_stl10_splits_labels_and_orientation(tmp_path):
    """STL-10 labels 1..10 become 0..9; a pixel stored at plane[col, row]
    comes out at (row, col); pretrain=True appends the unlabeled images with
    label -1 after the labelled training images."""
    write_stl10(tmp_path)
    train = common.dataset("stl10", str(tmp_path), True, download=False, image_size=96)
    test = common.dataset("stl10", str(tmp_path), False, download=False, image_size=96)
    pre = common.dataset("stl10", str(tmp_path), True, download=False, image_size=96, pretrain=True)
    assert [train[i][1] for i in range(len(train))] == [0, 9, 4]
    assert [test[i][1] for i in range(len(test))] == [1, 0]
    assert [pre[i][1] for i in range(len(pre))] == [0, 9, 4, -1, -1]
    x, _ = pil_array(train, 1)
    assert x.shape == (96, 96, 3)
    assert x[5, 70, 0] == 211 and x.sum() == 211
    x, _ = pil_array(test, 0)
    assert x[90, 1, 2] == 99 and x.sum() == 99
    x, _ = pil_array(pre, 4)
    assert x[0, 95, 1] == 33 and x.sum() == 33
    assert np.array_equal(pil_array(pre, 1)[0], pil_array(train, 1)[0])


@pytest.mark.parametrize("part", ["train_X.bin", "unlabeled_X.bin"])
def test_stl10_bad_image_file_size_fails(tmp_path, capsys, part):
    """An STL-10 image file whose size is not a multiple of 3x96x96 bytes ends
    with exit code 1 and one 'error:' line naming it."""
    folder = write_stl10(tmp_path)
    path = os.path.join(folder, part)
    with open(path, "ab") as f:
        f.write(b"\0" * 100)
    expect_failure(capsys, lambda: common.dataset("stl10", str(tmp_path), True, download=False, pretrain=True), path)


@pytest.mark.parametrize("train_y", [(0, 1, 2), (1, 11, 2), (1, 2)], ids=["label-0", "label-11", "too-few"])
def test_stl10_bad_labels_fail(tmp_path, capsys, train_y):
    """train_y.bin with a label outside 1..10 or fewer labels than images: exit code 1."""
    folder = write_stl10(tmp_path)
    np.array(train_y, np.uint8).tofile(os.path.join(folder, "train_y.bin"))
    expect_failure(capsys, lambda: common.dataset("stl10", str(tmp_path), True, download=False), folder)


def test_stl10_missing_without_download_fails(tmp_path, capsys):
    """No stl10_binary folder and download=False: exit code 1 naming stl10."""
    expect_failure(capsys, lambda: common.dataset("stl10", str(tmp_path), True, download=False, pretrain=True), "stl10")


def test_stl10_missing_label_file_fails(tmp_path, capsys):
    """train_X.bin present but train_y.bin missing (download=False) is missing
    data: exit code 1 and one 'error:' line naming the folder or the file,
    not a FileNotFoundError traceback."""
    folder = write_stl10(tmp_path)
    os.remove(os.path.join(folder, "train_y.bin"))
    expect_failure(capsys, lambda: common.dataset("stl10", str(tmp_path), True, download=False), folder)


def test_stl10_empty_image_file_fails(tmp_path, capsys):
    """A zero-byte test_X.bin (an interrupted copy) holds no STL-10 images:
    exit code 1 and one 'error:' line naming it, not a ValueError traceback."""
    folder = write_stl10(tmp_path)
    path = os.path.join(folder, "test_X.bin")
    open(path, "wb").close()
    expect_failure(capsys, lambda: common.dataset("stl10", str(tmp_path), False, download=False), path)


# ---------------------------------------------------------------------------
# Tiny ImageNet, ImageNet, folder (image files)
# ---------------------------------------------------------------------------

TINY_WNIDS = ["n02", "n01", "n03"]  # sorted order: n01 -> 0, n02 -> 1, n03 -> 2


def write_tiny(base, val_rows=None):
    root = os.path.join(base, "tiny-imagenet-200")
    colours = {"n01": (255, 0, 0), "n02": (0, 255, 0), "n03": (0, 0, 255)}
    for wnid in TINY_WNIDS:
        for k in range(2):
            save_jpeg(os.path.join(root, "train", wnid, "images", f"{wnid}_{k}.JPEG"), colours[wnid], (64, 64))
    with open(os.path.join(root, "train", "n01", "n01_boxes.txt"), "w") as f:
        f.write("n01_0.JPEG\t0\t0\t10\t10\n")
    val_rows = val_rows or [("val_0.JPEG", "n03"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n02"), ("val_3.JPEG", "n03")]
    os.makedirs(os.path.join(root, "val", "images"))
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
        for file, wnid in val_rows:
            f.write(f"{file}\t{wnid}\t0\t0\t63\t63\n")
    for file, wnid in val_rows:
        save_jpeg(os.path.join(root, "val", "images", file), colours.get(wnid, (9, 9, 9)), (64, 64))
    return root


@pytest.mark.parametrize("point_at", ["parent", "dataset"])
def test_tinyimagenet_train_and_val(tmp_path, point_at):
    """Tiny ImageNet reads with --data-dir at the parent or at
    tiny-imagenet-200 itself; val labels follow val_annotations.txt mapped
    through the train class index (sorted wnids), and images are 64x64 RGB."""
    root = write_tiny(tmp_path)
    data_dir = str(tmp_path) if point_at == "parent" else root
    train = common.dataset("tinyimagenet", data_dir, True, download=False)
    val = common.dataset("tinyimagenet", data_dir, False, download=False)
    assert len(train) == 6
    assert sorted(train[i][1] for i in range(6)) == [0, 0, 1, 1, 2, 2]
    assert [val[i][1] for i in range(len(val))] == [2, 0, 1, 2]
    img, label = val[1]
    assert img.size == (64, 64) and img.mode == "RGB"
    r, g, b = np.asarray(img).reshape(-1, 3).mean(0)
    assert r > 200 and g < 50 and b < 50  # val_1 is the red n01 image
    img, label = train[0]
    assert label == 0 and np.asarray(img)[..., 0].mean() > 200


def test_tinyimagenet_unknown_val_wnid_fails(tmp_path, capsys):
    """A val annotation naming a wnid that train/ does not have: exit code 1,
    one 'error:' line naming the annotation file."""
    root = write_tiny(tmp_path, val_rows=[("val_0.JPEG", "n01"), ("val_1.JPEG", "n99")])
    notes = os.path.join(root, "val", "val_annotations.txt")
    expect_failure(capsys, lambda: common.dataset("tinyimagenet", str(tmp_path), False, download=False), notes)


def test_tinyimagenet_missing_fails(tmp_path, capsys):
    """No Tiny ImageNet under --data-dir: exit code 1 naming tinyimagenet."""
    expect_failure(capsys, lambda: common.dataset("tinyimagenet", str(tmp_path), True, download=False), "tinyimagenet")


def write_class_folders(root, classes=("cat", "ant", "dog"), per_class=2, val=True):
    for split in ("train", "val") if val else ("train",):
        for c, name in enumerate(classes):
            for k in range(per_class if split == "train" else 1):
                save_jpeg(os.path.join(root, split, name, f"{name}_{k}.JPEG"), (40 * c, 0, 0))


@pytest.mark.parametrize("name,sub", [("imagenet", ""), ("imagenet", "imagenet"), ("folder", "")])
def test_image_folders_read(tmp_path, name, sub):
    """ImageNet (train/ and val/ under --data-dir or --data-dir/imagenet) and
    folder read as class folders with sorted class indices."""
    write_class_folders(os.path.join(tmp_path, sub) if sub else str(tmp_path))
    train = common.dataset(name, str(tmp_path), True, download=False)
    val = common.dataset(name, str(tmp_path), False, download=False)
    assert len(train) == 6 and len(val) == 3
    assert train.classes == ["ant", "cat", "dog"]
    assert [train[i][1] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [val[i][1] for i in range(3)] == [0, 1, 2]
    img, _ = val[2]
    assert isinstance(img, Image.Image) and img.size == (8, 8)
    assert common.num_classes("folder", train) == 3


@pytest.mark.parametrize("name", ["imagenet"])
def test_image_folders_missing_fail(tmp_path, capsys, name):
    """No train/ (or only train/ and no val/) under --data-dir: exit code 1
    and one sentence naming the data set and the expected folder. (A `folder`
    tree may be unlabelled and have no val/: tests/test_own_data.py.)"""
    line = expect_failure(capsys, lambda: common.dataset(name, str(tmp_path), True, download=False),
                          os.path.join(str(tmp_path), "train"), os.path.join(str(tmp_path), name, "train"))
    assert name in line and "not found" in line
    write_class_folders(str(tmp_path), val=False)
    line = expect_failure(capsys, lambda: common.dataset(name, str(tmp_path), False, download=False),
                          os.path.join(str(tmp_path), "val"))
    assert name in line


def test_folder_without_images_fails(tmp_path, capsys):
    """train/ with class folders but no image files: exit code 1 naming the folder."""
    os.makedirs(tmp_path / "train" / "a")
    expect_failure(capsys, lambda: common.dataset("folder", str(tmp_path), True, download=False),
                   os.path.join(str(tmp_path), "train"))


# ---------------------------------------------------------------------------
# synthetic, --subset and load_data
# ---------------------------------------------------------------------------

def arrays(ds):
    return np.stack([np.asarray(ds[i][0]) for i in range(len(ds))]), np.array([ds[i][1] for i in range(len(ds))])


def test_synthetic_is_deterministic_balanced_and_sized(tmp_path):
    """synthetic needs no files, gives identical images on every call, has 10
    balanced classes, honours image_size, and its train and test sets differ."""
    x1, y1 = arrays(common.dataset("synthetic", str(tmp_path), False, download=False, image_size=40))
    x2, y2 = arrays(common.dataset("synthetic", str(tmp_path), False, download=False, image_size=40))
    assert x1.shape[1:] == (40, 40, 3) and x1.dtype == np.uint8
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    counts = np.bincount(y1, minlength=10)
    assert len(counts) == 10 and counts.max() - counts.min() <= 1
    train = common.dataset("synthetic", str(tmp_path), True, download=False, image_size=40)
    xt, yt = arrays(common.subset(train, len(x1)))
    assert len(train) > len(x1)
    assert not np.array_equal(xt, x1)
    assert set(np.bincount(np.array([train[i][1] for i in range(len(train))]), minlength=10)) <= {
        len(train) // 10, len(train) // 10 + 1}
    assert os.listdir(tmp_path) == []  # nothing written


def test_subset_is_the_first_n_items():
    """common.subset(ds, n) (--subset N) keeps items 0..n-1 in order; None or
    n >= len(ds) keeps the whole data set."""
    ds = common.ArrayDataset(np.arange(5, dtype=np.uint8).repeat(12).reshape(5, 2, 2, 3), [3, 1, 4, 1, 5])
    sub = common.subset(ds, 3)
    assert len(sub) == 3
    assert [sub[i][1] for i in range(3)] == [3, 1, 4]
    assert [int(np.asarray(sub[i][0])[0, 0, 0]) for i in range(3)] == [0, 1, 2]
    assert common.subset(ds, None) is ds and common.subset(ds, 5) is ds and common.subset(ds, 9) is ds


def namespace(data, data_dir, image_size, subset=None):
    return argparse.Namespace(data=data, data_dir=str(data_dir), download=False, image_size=image_size, subset=subset)


def test_load_data_stl10_pretrain_includes_unlabeled(tmp_path, ctx):
    """load_data on STL-10: the pre-training set is train+unlabeled, the
    labelled training set is train only, the test set is test; --subset takes
    the first N images of both training sets but not of the test set."""
    write_stl10(tmp_path, train_y=(1, 2, 3), test_y=(4, 5, 6, 7), n_unlabeled=4)
    pre, train, test = common.load_data(namespace("stl10", tmp_path, 96), ctx)
    assert (len(pre), len(train), len(test)) == (7, 3, 4)
    assert [pre[i][1] for i in range(7)] == [0, 1, 2, -1, -1, -1, -1]
    assert [train[i][1] for i in range(3)] == [0, 1, 2]
    assert [test[i][1] for i in range(4)] == [3, 4, 5, 6]
    pre, train, test = common.load_data(namespace("stl10", tmp_path, 96, subset=2), ctx)
    assert (len(pre), len(train), len(test)) == (2, 2, 4)
    assert [pre[i][1] for i in range(2)] == [0, 1]


def test_load_data_cifar10_subset(tmp_path, ctx):
    """load_data on CIFAR-10: pre-training and training sets are the same
    images; --subset 4 gives the first four training images in file order."""
    write_cifar10(tmp_path)
    pre, train, test = common.load_data(namespace("cifar10", tmp_path, 32, subset=4), ctx)
    assert len(pre) == len(train) == 4 and len(test) == 2
    assert [train[i][1] for i in range(4)] == [1, 2, 3, 2]
    assert [pre[i][1] for i in range(4)] == [1, 2, 3, 2]
    assert np.asarray(pre[3][0])[3, 17, 1] == 200


def test_load_data_missing_fails(tmp_path, ctx, capsys):
    """load_data with download=False on an empty --data-dir fails in one line."""
    expect_failure(capsys, lambda: common.load_data(namespace("cifar10", tmp_path, 32), ctx), "cifar10")
