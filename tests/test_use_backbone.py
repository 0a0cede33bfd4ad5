"""README's "Use the backbone" snippets, run exactly as written there: a
backbone.pt (saved as save_run saves it) loads strictly into a plain
torchvision ResNet-50 (ImageNet stem) and ResNet-18 (CIFAR stem), and the
result computes the same features as the network that was trained."""
import os
import re

import pytest
import torch

import common
from conftest import ROOT


def readme_snippets():
    """The ```python blocks of README's "Use the backbone" section, in order."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = re.search(r"^## Use the backbone\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Use the backbone' section"
    return re.findall(r"```python\n(.*?)```", section.group(1), re.S)


def saved_backbone(arch, image_size, path):
    """A backbone.pt as save_run writes it, from a network with non-trivial BN statistics."""
    torch.manual_seed(0)
    backbone, _ = common.resnet(arch, image_size)
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    common.save_atomic(backbone.state_dict(), str(path))
    return backbone.eval()


def run_snippet(code, path):
    """exec a README snippet with its backbone.pt path pointed at `path`; returns its `net`."""
    paths = re.findall(r'torch\.load\("([^"]+backbone\.pt)"', code)
    assert len(paths) == 1, code
    scope = {}
    exec(code.replace(paths[0], str(path)), scope)
    return scope["net"].eval()


@pytest.mark.parametrize("which, arch, image_size, side", [(0, "resnet50", 224, 96), (1, "resnet18", 32, 32)])
def test_readme_snippet_loads_backbone_pt_strictly_and_gives_the_same_features(tmp_path, which, arch, image_size, side):
    snippets = readme_snippets()
    assert len(snippets) == 2
    assert f"torchvision.models.{arch}()" in snippets[which] and "strict=True" in snippets[which]
    path = tmp_path / "backbone.pt"
    trained = saved_backbone(arch, image_size, path)
    net = run_snippet(snippets[which], path)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        h = net(x)
        assert h.shape == (2, 2048 if arch == "resnet50" else 512)
        torch.testing.assert_close(h, trained(x), rtol=1e-5, atol=1e-5)


def test_cifar_stem_lines_matter_and_64px_keeps_the_max_pool(tmp_path):
    """The README's rule for 33-64 px (the first stem line only) gives the trained network's features;
    the 32 px snippet without its max-pool line does not (so the comparison above sees the stem)."""
    cifar = readme_snippets()[1]
    no_pool = "\n".join(line for line in cifar.splitlines() if not line.startswith("net.maxpool"))
    assert no_pool != cifar
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "backbone.pt"
    trained32 = saved_backbone("resnet18", 32, path)
    with torch.no_grad():
        assert not torch.allclose(run_snippet(no_pool, path)(x), trained32(x), atol=1e-3)
    trained64 = saved_backbone("resnet18", 64, path)
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(run_snippet(no_pool, path)(x), trained64(x), rtol=1e-5, atol=1e-5)
