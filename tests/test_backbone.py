"""common.resnet's stem rule, on the image size alone: a 3x3 stride-1 first
convolution at 64 px and below, no max-pool at 32 px and below (CIFAR), the
ImageNet stem above 64 px; checked by module, by feature-map size, by the
default image size of every data set, and through ReSSL's model."""
import pytest
import torch
import torch.nn as nn

import common
import ressl


def stem(net):
    """(first convolution's kernel side, its stride, whether a max-pool follows)."""
    return net.conv1.kernel_size[0], net.conv1.stride[0], not isinstance(net.maxpool, nn.Identity)


@pytest.mark.parametrize("arch", ["resnet_small", "resnet18", "resnet50"])
@pytest.mark.parametrize("size,expected", [
    (16, (3, 1, False)), (32, (3, 1, False)),   # CIFAR, SVHN (and smaller): the full CIFAR stem
    (33, (3, 1, True)), (64, (3, 1, True)),     # STL-10 / Tiny ImageNet at 64 px: 3x3 conv, max-pool kept
    (65, (7, 2, True)), (96, (7, 2, True)), (224, (7, 2, True)),  # ImageNet stem
])
def test_stem_follows_the_image_size(arch, size, expected):
    net, _ = common.resnet(arch, size)
    assert stem(net) == expected
    if expected[2]:
        assert isinstance(net.maxpool, nn.MaxPool2d) and net.maxpool.stride == 2


@pytest.mark.parametrize("size,last", [(32, 4), (64, 4), (96, 3), (224, 7)])
def test_last_stage_resolution(size, last):
    """32 px (no max-pool) and 64 px (max-pool kept) both reach the last stage at 4x4."""
    net, dim = common.resnet("resnet_small", size)
    net.eval()
    seen = []
    net.layer4.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        h = net(torch.randn(2, 3, size, size))
    assert h.shape == (2, dim) and seen[0][-2:] == (last, last)


@pytest.mark.parametrize("data,maxpool", [
    ("cifar10", False), ("cifar100", False), ("svhn", False), ("synthetic", False),
    ("tinyimagenet", True), ("stl10", True), ("imagenet", True)])
def test_max_pool_by_data_set_default_size(data, maxpool):
    """Every data set at its default --image-size: only the 32 px ones drop the max-pool."""
    net, _ = common.resnet("resnet_small", common.DATA_INFO[data]["image_size"])
    assert stem(net)[2] is maxpool


@pytest.mark.parametrize("data,expected", [
    ("cifar10", (32, (3, 1, False))), ("cifar100", (32, (3, 1, False))),
    ("stl10", (64, (3, 1, True))), ("tinyimagenet", (64, (3, 1, True))),   # ReSSL's medium data sets, Sec. 4
    ("imagenet", (224, (7, 2, True)))])
def test_ressl_student_and_teacher_stems_per_data_set(data, expected, monkeypatch):
    """ReSSL's defaults per data set: STL-10 (resized to 64 px) and Tiny ImageNet keep the max-pool as the
    authors' small-data code; CIFAR drops it; student and teacher share the stem."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = ressl.get_args(["--data", data])
    model = ressl.ReSSL("resnet_small", args.image_size, 8, 16, 4, 1)
    assert (args.image_size, stem(model.backbone)) == expected
    assert stem(model.teacher[0]) == expected[1]


def test_state_dict_keys_do_not_depend_on_the_max_pool():
    """The max-pool has no parameters: a 64 px backbone's weights load strictly into a 32 px one, so
    evaluate.py can rebuild either from the saved image size."""
    a, _ = common.resnet("resnet18", 64)
    b, _ = common.resnet("resnet18", 32)
    b.load_state_dict(a.state_dict(), strict=True)
