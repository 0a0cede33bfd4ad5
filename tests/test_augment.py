"""View recipes and augmentations: SimCLR's views (App. A, B.9), normalisation,
the evaluation transform, seeded views, DSSL's jigsaw and the AutoAugment
wrapper (CLSA's stronger augmentation: tests/test_clsa.py; AAG's RandAugment:
tests/test_aag.py)."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import aag
import common
import dssl
import simclr
from conftest import noise_image


def flat_transforms(t):
    """Every transform inside Compose / RandomApply, with the RandomApply
    probability that gates it (1.0 when not gated)."""
    out = []
    if isinstance(t, T.Compose):
        for s in t.transforms:
            out += flat_transforms(s)
    elif isinstance(t, T.RandomApply):
        out.append((t, 1.0))
        out += [(s, t.p) for s in t.transforms]
    else:
        out.append((t, 1.0))
    return out


# ---------------------------------------------------------------------------
# SimCLR views (Chen et al. 2020, App. A)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("data,side,img_side", [("cifar10", 32, 32), ("cifar10", 32, 48), ("imagenet", 224, 256)])
def test_simclr_views_shape_dtype_and_differ(data, side, img_side):
    """SimCLRViews gives two uint8 [3, S, S] tensors (S = 32 CIFAR, 224
    ImageNet) that differ from each other."""
    args = simclr.get_args(["--data", data])
    assert args.image_size == side
    views = simclr.SimCLRViews(args)
    torch.manual_seed(0)
    out = views(noise_image(img_side, img_side))
    assert isinstance(out, (list, tuple)) and len(out) == 2
    for v in out:
        assert isinstance(v, torch.Tensor) and v.dtype == torch.uint8
        assert v.shape == (3, side, side)
        assert 0 <= int(v.min()) and int(v.max()) <= 255
    assert not torch.equal(out[0], out[1])


def test_simclr_cifar_recipe():
    """CIFAR recipe (App. B.9): crop 0.08-1 at 32 px, flip, colour distortion
    of strength 0.5 (ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8), grayscale
    p=0.2, and no Gaussian blur: not even a RandomApply with p=0, which would
    still draw a random number per view and so change the views after it."""
    args = simclr.get_args(["--data", "cifar10"])
    ops = flat_transforms(simclr.SimCLRViews(args).t)
    kinds = [type(t) for t, _ in ops]
    assert not any(isinstance(t, T.GaussianBlur) for t, _ in ops)  # KernelBlur included
    crop = next(t for t, _ in ops if isinstance(t, T.RandomResizedCrop))
    assert tuple(crop.size) == (32, 32) and tuple(crop.scale) == (0.08, 1.0)
    assert T.RandomHorizontalFlip in kinds
    jitter, p = next((t, p) for t, p in ops if isinstance(t, T.ColorJitter))
    assert p == pytest.approx(0.8)
    for name in ("brightness", "contrast", "saturation"):
        assert tuple(getattr(jitter, name)) == pytest.approx((0.6, 1.4))
    assert tuple(jitter.hue) == pytest.approx((-0.1, 0.1))
    gray = next(t for t, _ in ops if isinstance(t, T.RandomGrayscale))
    assert gray.p == pytest.approx(0.2)


def test_simclr_v1_differences_are_named_and_real():
    """The Deviations name what still differs from the v1 command (google-research/simclr at
    85e8552): additive brightness there, a multiplicative factor here (two grey levels keep
    their ratio under this file's jitter); 100-try crop there; one blur sigma per batch there."""
    doc = " ".join(simclr.__doc__.split())
    for words in ("additive (tf.image.random_brightness", "100 attempts", "one sigma per batch",
                  "`--weight-decay 1e-4 --proj-layers 3`", "244e712"):
        assert words in doc
    jitter = next(t for t, _ in flat_transforms(simclr.SimCLRViews(simclr.get_args(["--data", "cifar10"])).t)
                  if isinstance(t, T.ColorJitter))
    only_brightness = T.ColorJitter(brightness=jitter.brightness)
    img = torch.tensor([[[0.2, 0.4]]]).expand(3, 1, 2)
    torch.manual_seed(0)
    for _ in range(5):
        out = only_brightness(img)
        if out[0, 0, 1] < 1:  # unclipped: a factor, not an offset
            assert out[0, 0, 1] / out[0, 0, 0] == pytest.approx(2.0, rel=1e-4)


def test_simclr_imagenet_recipe():
    """ImageNet recipe (App. A): strength 1.0 jitter and Gaussian blur with
    p=0.5, an odd kernel of about 10% of the 224 px side, sigma 0.1-2.0."""
    args = simclr.get_args(["--data", "imagenet"])
    ops = flat_transforms(simclr.SimCLRViews(args).t)
    blur, p = next((t, p) for t, p in ops if isinstance(t, T.GaussianBlur))
    assert p == pytest.approx(0.5)
    k = blur.kernel_size[0]
    assert blur.kernel_size[0] == blur.kernel_size[1] and k % 2 == 1
    assert abs(k - 22.4) <= 2
    assert tuple(blur.sigma) == pytest.approx((0.1, 2.0))
    jitter = next(t for t, _ in ops if isinstance(t, T.ColorJitter))
    assert tuple(jitter.brightness) == pytest.approx((0.2, 1.8))
    assert tuple(jitter.hue) == pytest.approx((-0.2, 0.2))


# ---------------------------------------------------------------------------
# Normalisation and the evaluation transform
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("data", ["cifar10", "stl10", "imagenet"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_on_device_normalises_with_data_info(ctx, data, channels_last):
    """normalize_on_device turns uint8 images into (x/255 - mean)/std with the data
    set's DATA_INFO mean and std, per channel, as float32."""
    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    info = common.DATA_INFO[data]
    mean, std = torch.tensor(info["mean"]).view(1, 3, 1, 1), torch.tensor(info["std"]).view(1, 3, 1, 1)
    expected = (x.double() / 255 - mean.double()) / std.double()
    out = common.normalize_on_device(x, ctx, data, channels_last)
    assert out.dtype == torch.float32 and out.shape == x.shape and out.device == ctx.device
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-5, rtol=1e-5)
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_eval_transform_small_keeps_image():
    """For CIFAR-size data eval_transform keeps a 32x32 image exactly (uint8
    [3, 32, 32]) and resizes a larger one to 32x32."""
    img = noise_image(32, 32)
    out = common.eval_transform("cifar10", 32)(img)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert torch.equal(out, TF.pil_to_tensor(img))
    assert common.eval_transform("stl10", 64)(noise_image(96, 96)).shape == (3, 64, 64)


@pytest.mark.parametrize("data", ["imagenet", "folder"])
def test_eval_transform_imagenet_resize_256_centre_crop_224(data):
    """For ImageNet/folder eval_transform resizes the short side to 256 and
    takes the central 224x224 crop (the standard protocol)."""
    tf = common.eval_transform(data, 224)
    resize = next(t for t in tf.transforms if isinstance(t, T.Resize))
    assert resize.size in (256, [256], (256,))
    img = noise_image(400, 300)
    out = tf(img)
    assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)
    by_hand = TF.center_crop(TF.resize(img, 256, interpolation=T.InterpolationMode.BICUBIC), 224)
    assert torch.equal(out, TF.pil_to_tensor(by_hand))


# ---------------------------------------------------------------------------
# SeededViews
# ---------------------------------------------------------------------------

def seeded_dataset():
    ds = [(noise_image(32, 32, seed=i), 10 + i) for i in range(3)]
    tf = T.Compose([T.RandomResizedCrop(16), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4, 0.1), common.to_tensor])
    return common.SeededViews(ds, tf)


def test_seeded_views_repeatable_per_key():
    """The same (index, seed) key gives identical views whatever was drawn
    before; another seed gives other views; the label comes along."""
    sv = seeded_dataset()
    a, label = sv[(1, 123)]
    torch.rand(100)
    b, _ = sv[(1, 123)]
    assert label == 11 and torch.equal(a, b)
    others = [sv[(1, s)][0] for s in (124, 125, 126)]
    assert all(not torch.equal(a, o) for o in others)
    assert len(sv) == 3


def test_seeded_views_restore_global_rng():
    """Drawing a view leaves the global torch RNG where it was: the numbers
    drawn after it equal those of an undisturbed sequence."""
    sv = seeded_dataset()
    torch.manual_seed(7)
    ref = torch.rand(2), torch.rand(2)
    torch.manual_seed(7)
    first = torch.rand(2)
    sv[(0, 5)]
    sv[(2, 99)]
    second = torch.rand(2)
    assert torch.equal(first, ref[0]) and torch.equal(second, ref[1])


# ---------------------------------------------------------------------------
# Jigsaw (DSSL's heavy view)
# ---------------------------------------------------------------------------

def tile_image(side, grid=4, border_seed=3):
    """side x side RGB image: tile (i, j) of the grid has the constant colour
    (16 i + j + 1, 200 - 10 j, 5 i); pixels beyond the last whole tile are noise."""
    t = side // grid
    x = np.asarray(noise_image(side, side, seed=border_seed)).copy()
    for i in range(grid):
        for j in range(grid):
            x[i * t:(i + 1) * t, j * t:(j + 1) * t] = (16 * i + j + 1, 200 - 10 * j, 5 * i)
    return Image.fromarray(x)


def tiles_of(x, side, grid=4):
    t = side // grid
    return [x[i * t:(i + 1) * t, j * t:(j + 1) * t] for i in range(grid) for j in range(grid)]


@pytest.mark.parametrize("side", [32, 34])
def test_jigsaw_permutes_whole_tiles(side):
    """Jigsaw(4) returns an image of the same size and mode whose 16 tiles
    are the input's tiles, each intact, in some order; over several draws
    the order is not always the identity; pixels beyond the last whole tile
    (a side not divisible by 4) are unchanged."""
    torch.manual_seed(0)
    img = tile_image(side)
    src = np.asarray(img)
    colours = [tuple(t[0, 0]) for t in tiles_of(src, side)]
    assert len(set(colours)) == 16
    jig = dssl.Jigsaw(4)
    orders = []
    for _ in range(5):
        out = jig(img)
        assert isinstance(out, Image.Image) and out.size == img.size and out.mode == img.mode
        y = np.asarray(out)
        tiles = tiles_of(y, side)
        for t in tiles:
            assert (t == t[0, 0]).all()  # intact: one colour
        got = [tuple(t[0, 0]) for t in tiles]
        assert sorted(got) == sorted(colours)
        orders.append([colours.index(c) for c in got])
        cut = 4 * (side // 4)
        assert np.array_equal(y[cut:], src[cut:]) and np.array_equal(y[:, cut:], src[:, cut:])
    assert any(o != list(range(16)) for o in orders)
    assert len({tuple(o) for o in orders}) > 1


def test_jigsaw_keeps_grayscale_mode():
    """A grayscale (mode L) image stays mode L with the same pixels in another order."""
    torch.manual_seed(1)
    img = noise_image(16, 16, mode="L")
    out = dssl.Jigsaw(4)(img)
    assert out.mode == "L" and out.size == (16, 16)
    assert sorted(np.asarray(out).ravel()) == sorted(np.asarray(img).ravel())


# ---------------------------------------------------------------------------
# AutoAugment policy (AAG's auxiliary view) and SimCLR's blur
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("data,policy", [
    ("svhn", T.AutoAugmentPolicy.SVHN), ("imagenet", T.AutoAugmentPolicy.IMAGENET),
    ("folder", T.AutoAugmentPolicy.IMAGENET), ("cifar10", T.AutoAugmentPolicy.CIFAR10),
    ("cifar100", T.AutoAugmentPolicy.CIFAR10), ("stl10", T.AutoAugmentPolicy.CIFAR10),
    ("tinyimagenet", T.AutoAugmentPolicy.CIFAR10),
])
def test_autoaugment_policy_per_data_set(data, policy):
    """AAG's auxiliary view picks AutoAugment's published policy: SVHN for svhn,
    IMAGENET for imagenet and folder, CIFAR10 for the other data sets."""
    aa = aag.AAGViews(aag.get_args(["--data", data])).aux.transforms[-1]
    assert isinstance(aa, T.AutoAugment) and aa.policy == policy
    out = aa(noise_image(32, 32))
    assert isinstance(out, Image.Image) and out.size == (32, 32)


def test_kernel_blur_equals_torchvisions_gaussian_blur():
    """SimCLR's blur (two 1-D passes, the end taps under 1/1024 dropped) gives torchvision's
    GaussianBlur on the image's tensor (same sigma draw from the same seed, the same RNG calls)
    within 1/255, for RGB and grayscale images, at each data set's kernel size, over sigma 0.1-2.0."""
    rng = np.random.default_rng(0)
    for size, k, mode in ((32, 3, "RGB"), (96, 9, "RGB"), (64, 7, "L"), (224, 23, "RGB")):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        for seed in range(12):
            torch.manual_seed(seed)
            ref = T.GaussianBlur(k, (0.1, 2.0))(TF.pil_to_tensor(img))
            after_ref = torch.rand(())
            torch.manual_seed(seed)
            out = common.KernelBlur(k, (0.1, 2.0))(img)
            assert torch.rand(()) == after_ref  # the same RNG draws: the views after it are unchanged too
            assert out.mode == mode and out.size == img.size
            assert (TF.pil_to_tensor(out).int() - ref.int()).abs().max() <= 1
    imagenet_views = simclr.SimCLRViews(simclr.get_args(["--data", "imagenet"]))  # the blur SimCLR's views use
    assert isinstance(imagenet_views.t.transforms[-1].transforms[0], common.KernelBlur)


@pytest.mark.parametrize("k,sigma", [(3, 1.0), (7, 1.5), (9, 2.0)])  # sigmas exact in float32
def test_kernel_blur_keeps_its_bytes_where_no_tap_is_dropped(k, sigma):
    """Where every tap weighs 1/2048 or more, the blur is the full kernel's two 1-D passes, byte for byte."""
    img = noise_image(40, 40)
    x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    w = w / w.sum()
    assert w.min() >= 1 / 2048
    t = torch.nn.functional.pad(TF.pil_to_tensor(img).float()[None], [k // 2] * 4, mode="reflect")
    t = torch.nn.functional.conv2d(t, w.view(1, 1, 1, k).expand(3, 1, 1, k), groups=3)
    t = torch.nn.functional.conv2d(t, w.view(1, 1, k, 1).expand(3, 1, k, 1), groups=3)
    full = t[0].round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(TF.pil_to_tensor(common.KernelBlur(k, (sigma, sigma))(img)), full)
