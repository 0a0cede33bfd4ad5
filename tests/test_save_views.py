"""--save-views: each script draws the first images and their views at epoch 0
into one PNG grid and exits without training. The grid's cells are checked
against the tensors the training loader itself yields for those images."""
import importlib

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import error_line

PAD = 2  # make_grid's padding around every cell, before the grid is enlarged


def factor(side):
    """The one integer factor save_views enlarges the grid by: a cell of at least 96 px."""
    return -(-96 // side)


def native(img, side):
    """The PNG read back at the views' own size, after checking that it is the native grid
    enlarged by factor(side) with exact nearest-neighbour copies (every pixel a k x k block)."""
    k = factor(side)
    big = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    small = big[:, ::k, ::k]
    assert torch.equal(small.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2), big)
    return small
SMALL = ["--data", "synthetic", "--arch", "resnet_small", "--workers", "0", "--subset", "64", "--batch-size", "64",
         "--seed", "3"]

# (method, extra flags, cell side, column names after "original")
CASES = {
    "simclr": ("simclr", [], 32, ["t(x)", "t'(x)"]),
    "aag": ("aag", [], 32, ["g_basic1(d)", "g_basic2(d)", "g_aux(d)"]),
    "aag-no-aux": ("aag", ["--aux-policy", "none"], 32, ["g_basic1(d)", "g_basic2(d)"]),
    "clsa-single": ("clsa", [], 32, ["key T(x)", "weak T'(x) 32px", "strong S(x) 32px"]),
    "clsa-multi": ("clsa", ["--image-size", "48", "--weak-sizes", "48", "32", "--strong-sizes", "48", "32", "16"], 48,
                   ["key T(x)", "weak T'(x) 48px", "weak T'(x) 32px", "strong S(x) 48px", "strong S(x) 32px",
                    "strong S(x) 16px"]),
    "clsa-mocov2": ("clsa", ["--variant", "mocov2"], 32, ["key T(x)", "weak T'(x) 32px"]),
    "clsa-strong-query-key": ("clsa", ["--variant", "strong-query-key"], 32, ["key S(T(x))", "strong S(x) 32px"]),
    "ressl-multicrop": ("ressl", ["--student-crops", "32", "16"], 32,
                        ["teacher T_w(x)", "student T_s(x) 32px", "student T_s(x) 16px"]),
    "dssl": ("dssl", [], 32, ["v", "v'", "t^(v)", "t^(v')"]),
    "dssl-heavy-off": ("dssl", ["--heavy", "off"], 32, ["v", "v'"]),
}


def cell(grid, row, col, side):
    top, left = PAD + row * (side + PAD), PAD + col * (side + PAD)
    return grid[:, top:top + side, left:left + side]


def centre(x, side):
    """The [3, h, w] view inside its padded cell of `side`."""
    h, w = x.shape[1:]
    top, left = (side - h) // 2, (side - w) // 2
    return (slice(None), slice(top, top + h), slice(left, left + w))


def epoch0_views(module, argv, n):
    """{index: list of view tensors} for images 0..n-1, read from the real
    training loader at epoch 0 (one batch holds all 64 images, shuffled)."""
    args = module.get_args(argv)
    ctx = common.setup(args)
    ds = common.load_data(args, ctx).pretrain
    views_cls = next(getattr(module, k) for k in dir(module) if k.endswith("Views"))
    loader = common.train_loader(ds, views_cls(args), args.batch_size, 0, args.seed, ctx)
    sampler = loader.sampler
    sampler.set_epoch(0)
    order = [i for i, _ in sampler]
    (batch, _), = list(loader)
    return {i: [v[order.index(i)] for v in batch] for i in range(n)}, ds


@pytest.mark.parametrize("case", list(CASES))
def test_grid_is_what_training_sees(case, tmp_path, capsys, keep_rng):
    method, extra, side, names = CASES[case]
    module = importlib.import_module(method)
    png, out, n = tmp_path / "views.png", tmp_path / "out", 5
    argv = [*SMALL, *extra, "--out", str(out)]
    module.main([*argv, "--save-views", str(png), "--save-views-n", str(n)])

    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{method} views: " + " | ".join(["original", *names]) + "  (")
    assert "padded" in line and "resized" in line and str(png) in line
    k = factor(side)
    assert f"enlarged x{k}, nearest neighbour, to {side * k} px cells" in line
    assert not out.exists()  # no training, --out untouched

    cols = 1 + len(names)
    img = Image.open(png)
    assert img.format == "PNG" and img.mode == "RGB"
    assert img.size == (k * (cols * (side + PAD) + PAD), k * (n * (side + PAD) + PAD))  # one integer multiple
    assert side * k >= 96
    grid = native(img, side)

    expected, ds = epoch0_views(module, argv, n)
    for i in range(n):
        original = torch.from_numpy(np.array(ds[i][0].convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(cell(grid, i, 0, side), original)  # synthetic images are drawn at --image-size
        assert len(expected[i]) == len(names)
        for j, v in enumerate(expected[i]):
            c = cell(grid, i, j + 1, side)
            assert torch.equal(c[centre(v, side)], v), f"{case}: image {i}, column {names[j]}"
            if v.shape[1] < side:  # smaller views are padded on grey, not upscaled
                rest = c.clone()
                rest[centre(v, side)] = 128
                assert (rest == 128).all()


def test_views_differ_from_another_seed(tmp_path, capsys, keep_rng):
    """The seeds matter: --seed changes the picture, so the equality above is not vacuous."""
    import simclr
    grids = []
    for seed in ("3", "4"):
        png = tmp_path / f"s{seed}.png"
        simclr.main([*SMALL[:-1], seed, "--save-views", str(png), "--save-views-n", "2", "--out", str(tmp_path / "o")])
        grids.append(native(Image.open(png), 32).permute(1, 2, 0).numpy())
    assert grids[0].shape == grids[1].shape
    assert not np.array_equal(grids[0][:, 34:], grids[1][:, 34:])  # the views differ ...
    assert np.array_equal(grids[0][:, :34], grids[1][:, :34])      # ... the originals do not


def test_original_resized_to_cell(cifar10_dir, tmp_path, capsys, keep_rng):
    """Real CIFAR-10 at --image-size 16: 32 px originals are shrunk into the 16 px cells."""
    import dssl
    png = tmp_path / "c.png"
    dssl.main(["--data", "cifar10", "--data-dir", cifar10_dir, "--no-download", "--arch", "resnet_small",
               "--workers", "0", "--image-size", "16", "--subset", "512", "--batch-size", "256",
               "--save-views", str(png), "--save-views-n", "3", "--out", str(tmp_path / "o")])
    assert "16 px cells" in capsys.readouterr().out
    img = Image.open(png)
    assert img.size == (6 * (5 * 18 + 2), 6 * (3 * 18 + 2))  # 16 px cells enlarged x6 to 96 px
    grid = native(img, 16).permute(1, 2, 0).numpy()
    ds = common.dataset("cifar10", cifar10_dir, True, False)
    small = np.array(ds[0][0].resize((16, 16), Image.BICUBIC)).astype(int)
    assert np.abs(grid[2:18, 2:18].astype(int) - small).max() <= 1


def test_cifar_grid_is_large_enough_to_look_at(cifar10_dir, tmp_path, capsys, keep_rng):
    """Real CIFAR-10 at 32 px: the whole grid (about 104 x 274 px at its own size) is enlarged x3,
    so a cell is 96 px; every pixel is a 3 x 3 block of the native grid's pixel, and the
    original's cell is the image itself, enlarged."""
    import simclr
    png = tmp_path / "c.png"
    simclr.main(["--data", "cifar10", "--data-dir", cifar10_dir, "--no-download", "--arch", "resnet_small",
                 "--workers", "0", "--subset", "512", "--batch-size", "256",
                 "--save-views", str(png), "--save-views-n", "3", "--out", str(tmp_path / "o")])
    assert "enlarged x3" in capsys.readouterr().out
    img = Image.open(png)
    assert img.size == (3 * (3 * 34 + 2), 3 * (3 * 34 + 2))
    grid = native(img, 32)
    ds = common.dataset("cifar10", cifar10_dir, True, False)
    original = torch.from_numpy(np.array(ds[0][0].convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(grid[:, 2:34, 2:34], original)
    big = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    assert torch.equal(big[:, 6:102, 6:102], original.repeat_interleave(3, 1).repeat_interleave(3, 2))  # a 96 px cell


def test_multicrop_relative_sizes_kept(tmp_path, capsys, keep_rng):
    """ReSSL with student crops 32 and 16: after the x3 enlargement the 16 px view fills a
    48 x 48 block centred in its 96 px cell, half the 32 px view's 96; the rest is grey."""
    import ressl
    png = tmp_path / "m.png"
    ressl.main([*SMALL, "--student-crops", "32", "16", "--save-views", str(png), "--save-views-n", "2",
                "--out", str(tmp_path / "o")])
    capsys.readouterr()
    big = torch.from_numpy(np.array(Image.open(png))).permute(2, 0, 1)
    k, side = 3, 32
    assert big.shape[1:] == (k * (2 * (side + PAD) + PAD), k * (4 * (side + PAD) + PAD))
    for row in range(2):
        top = k * (PAD + row * (side + PAD))
        big_view = big[:, top:top + k * side, k * (PAD + 2 * (side + PAD)):][:, :, :k * side]
        small_cell = big[:, top:top + k * side, k * (PAD + 3 * (side + PAD)):][:, :, :k * side]
        inner = small_cell[:, k * 8:k * 24, k * 8:k * 24]  # the 16 px view, centred, now 48 px
        assert inner.shape[1:] == (48, 48) and big_view.shape[1:] == (96, 96)
        rest = small_cell.clone()
        rest[:, k * 8:k * 24, k * 8:k * 24] = 128
        assert (rest == 128).all()  # grey padding: the view is not upscaled to the cell
        assert not (inner == 128).all()


@pytest.mark.parametrize("flags, words", [
    (["--save-views-n", "0"], "at least 1"),
    (["--save-views-n", "65"], "more than the 64 images"),
    (["--save-views", "{tmp}/missing/v.png"], "does not exist"),
    (["--save-views", "{tmp}/v.jpg"], "ending in .png"),
])
def test_bad_input_is_one_line(flags, words, tmp_path, capsys, keep_rng):
    import ressl
    flags = [f.format(tmp=tmp_path) for f in flags]
    if "--save-views" not in flags:
        flags += ["--save-views", str(tmp_path / "v.png")]
    assert words in error_line(capsys, lambda: ressl.main([*SMALL, "--out", str(tmp_path / "o"), *flags]), common.USAGE)
    assert not list(tmp_path.iterdir())  # nothing written
