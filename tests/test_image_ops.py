"""The AutoAugment/RandAugment pixel ops the view recipes draw (common.py's and
torchvision's), one at a time, against what each docstring states: how many grey
levels posterize keeps, where a translation, a shear and a rotation move a marked
pixel, which square cutout paints, and which values solarize and solarize_add invert."""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import common
import dssl
from conftest import noise_image


def dot(x, y, side=32):
    """A black image with one white pixel at column x, row y."""
    a = np.zeros((side, side, 3), dtype=np.uint8)
    a[y, x] = 255
    return Image.fromarray(a)


def where(img):
    """(column, row) of every lit pixel."""
    return [(int(c), int(r)) for r, c in np.argwhere(np.asarray(img)[..., 0] > 127)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_posterize_keeps_at_most_2_to_the_bits_levels_per_channel(bits):
    out = np.asarray(TF.posterize(noise_image(32), bits))
    for c in range(3):
        levels = np.unique(out[..., c])
        assert len(levels) <= 2 ** bits
        assert all(int(v) % 2 ** (8 - bits) == 0 for v in levels)  # the low 8 - bits bits are cleared
    if bits <= 4:
        assert len(np.unique(out[..., 0])) == 2 ** bits  # 1024 noise pixels reach every level


def test_posterize_at_one_bit_is_a_threshold_at_128():
    src = np.asarray(noise_image(32, seed=1)).astype(int)
    assert np.array_equal(np.asarray(TF.posterize(noise_image(32, seed=1), 1)), np.where(src >= 128, 128, 0))


@pytest.mark.parametrize("v", [1, 3, 7, -5])
def test_translate_moves_content_by_v_pixels(v):
    assert where(common.translate_x(dot(12, 9), v)) == [(12 + v, 9)]  # right for v > 0
    assert where(common.translate_y(dot(12, 9), v)) == [(12, 9 + v)]  # down for v > 0


def test_translation_fills_uncovered_pixels_with_black():
    out = np.asarray(common.translate_x(Image.new("RGB", (32, 32), (200, 100, 50)), 5))
    assert (out[:, :5] == 0).all() and (out[:, 5:] == (200, 100, 50)).all()


def test_shear_reads_from_x_plus_v_y():
    """shear_x: output (x, y) reads input (x + v y, y), so a pixel at (x0, y0) lands at x0 - v y0."""
    assert where(common.shear_x(dot(20, 10), 0.5)) == [(15, 10)]
    assert where(common.shear_y(dot(10, 20), 0.5)) == [(10, 15)]
    assert where(common.shear_x(dot(20, 0), 0.5)) == [(20, 0)]  # row 0 does not move


def test_rotate_is_counter_clockwise():
    out = where(TF.rotate(dot(28, 16), 90))  # right of centre -> above centre
    assert len(out) == 1 and abs(out[0][0] - 16) <= 1 and out[0][1] < 8


@pytest.mark.parametrize("v,seed", [(7, 0), (4, 1), (12, 2)])
def test_cutout_paints_a_v_by_v_square_of_fill_with_the_torch_rng(v, seed):
    src = Image.new("RGB", (32, 32), (0, 0, 0))
    torch.manual_seed(seed)
    out = np.asarray(dssl.cutout(src, v, fill=(125, 123, 114)))
    torch.manual_seed(seed)
    cx, cy = int(torch.randint(32, ())), int(torch.randint(32, ()))  # the centre cutout draws
    painted = (out == (125, 123, 114)).all(-1)
    assert painted.sum() + (out == 0).all(-1).sum() == 32 * 32  # fill or untouched, nothing else
    rows, cols = np.nonzero(painted)
    x0, y0 = max(0, cx - v // 2), max(0, cy - v // 2)
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (x0, y0, min(32, x0 + v), min(32, y0 + v))
    assert painted.sum() == (min(32, x0 + v) - x0) * (min(32, y0 + v) - y0)  # a full rectangle


def test_cutout_of_size_zero_changes_nothing():
    img = noise_image(32, seed=3)
    assert np.array_equal(np.asarray(dssl.cutout(img, 0)), np.asarray(img))


@pytest.mark.parametrize("threshold", [0, 43, 128, 256])
def test_solarize_inverts_values_at_or_above_the_threshold(threshold):
    src = np.asarray(noise_image(32, seed=4)).astype(int)
    out = np.asarray(TF.solarize(noise_image(32, seed=4), threshold)).astype(int)
    assert np.array_equal(out, np.where(src >= threshold, 255 - src, src))


@pytest.mark.parametrize("v", [0, 18, 110])
def test_solarize_add_adds_clips_then_solarizes_at_128(v):
    src = np.asarray(noise_image(32, seed=5)).astype(int)
    added = np.clip(src + v, 0, 255)
    out = np.asarray(dssl.solarize_add(noise_image(32, seed=5), v)).astype(int)
    assert np.array_equal(out, np.where(added >= 128, 255 - added, added))


def test_invert_and_identity():
    src = np.asarray(noise_image(32, seed=6)).astype(int)
    assert np.array_equal(np.asarray(common.invert(noise_image(32, seed=6))).astype(int), 255 - src)
    assert common.identity(noise_image(32, seed=6)).tobytes() == noise_image(32, seed=6).tobytes()


@pytest.mark.parametrize("op", [TF.adjust_saturation, TF.adjust_contrast, TF.adjust_brightness, TF.adjust_sharpness])
def test_enhance_ops_are_the_identity_at_factor_1_and_change_the_image_otherwise(op):
    src = np.asarray(noise_image(32, seed=7)).astype(int)
    assert np.array_equal(np.asarray(op(noise_image(32, seed=7), 1.0)).astype(int), src)
    assert np.abs(np.asarray(op(noise_image(32, seed=7), 0.4)).astype(int) - src).mean() > 1
    assert np.asarray(TF.adjust_brightness(noise_image(32, seed=7), 0.0)).max() == 0  # factor 0: black
