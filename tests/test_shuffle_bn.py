"""Shuffle-BN pieces of common.py: SplitBatchNorm (BN over groups of the batch)
and batch_shuffle / batch_unshuffle (one process here; tests/test_distributed.py
covers two)."""
import torch
import torch.nn as nn

import common


def reference_group_bn(x, bn, splits):
    """Loop reference: normalise each group {i : i % splits == g} on its own."""
    out = torch.empty_like(x)
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    for g in range(splits):
        xs = x[g::splits]
        mean, var = xs.mean(dims, keepdim=True), xs.var(dims, unbiased=False, keepdim=True)
        out[g::splits] = (xs - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)
    return out


def test_split_bn_normalises_each_group_separately():
    torch.manual_seed(0)
    for x, bn in ((torch.randn(12, 5, 3, 3) * 3 + 1, nn.BatchNorm2d(5)), (torch.randn(12, 7) * 2 - 1, nn.BatchNorm1d(7))):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
        split = common.SplitBatchNorm(bn, 3).train()
        torch.testing.assert_close(split(x), reference_group_bn(x, bn, 3), atol=1e-5, rtol=1e-5)
        # Differs from plain BN over the whole batch (so the test could fail).
        assert not torch.allclose(split(x), bn.train()(x), atol=1e-3)


def test_split_bn_running_stats_are_the_mean_over_groups():
    torch.manual_seed(1)
    x = torch.randn(8, 4, 2, 2) + torch.arange(8.).view(8, 1, 1, 1)
    bn = nn.BatchNorm2d(4, momentum=0.5)
    split = common.SplitBatchNorm(bn, 2).train()
    split(x)
    means = torch.stack([x[g::2].mean((0, 2, 3)) for g in range(2)]).mean(0)
    variances = torch.stack([x[g::2].var((0, 2, 3), unbiased=True) for g in range(2)]).mean(0)
    torch.testing.assert_close(split.running_mean, 0.5 * means, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.running_var, 0.5 + 0.5 * variances, atol=1e-5, rtol=1e-5)
    assert int(split.num_batches_tracked) == 1


def test_split_bn_eval_mode_and_state_dict_are_plain_bn():
    torch.manual_seed(2)
    net, _ = common.resnet("resnet_small", 32)
    plain_keys = set(net.state_dict())
    common.split_bn(net, 4)
    assert any(isinstance(m, common.SplitBatchNorm) for m in net.modules())
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in net.modules())
    assert set(net.state_dict()) == plain_keys
    fresh, _ = common.resnet("resnet_small", 32)
    fresh.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(net.eval()(x), fresh.eval()(x))


def test_split_bn_gradient_matches_reference():
    torch.manual_seed(3)
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    bn = nn.BatchNorm2d(3)
    out = common.SplitBatchNorm(bn, 2).train()(x)
    (g1,) = torch.autograd.grad((out ** 3).sum(), x)
    (g2,) = torch.autograd.grad((reference_group_bn(x, bn, 2) ** 3).sum(), x)
    torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)


def test_batch_shuffle_permutes_and_unshuffle_restores():
    x = torch.arange(16.).view(8, 2)
    shuffled, unshuffle = common.batch_shuffle(x, seed=7)
    assert not torch.equal(shuffled, x)
    assert sorted(shuffled[:, 0].tolist()) == x[:, 0].tolist()
    torch.testing.assert_close(common.batch_unshuffle(shuffled * 10, unshuffle), x * 10)
    again, _ = common.batch_shuffle(x, seed=7)
    assert torch.equal(again, shuffled)  # same seed, same permutation (exact resume)
    other, _ = common.batch_shuffle(x, seed=8)
    assert not torch.equal(other, shuffled)


def test_split_bn_weight_and_bias_gradients_sum_over_the_groups():
    """The groups share one weight and bias: their gradients are the reference's, summed over all groups."""
    torch.manual_seed(4)
    x = torch.randn(8, 3, 2, 2)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    split = common.SplitBatchNorm(bn, 4).train()
    grads = torch.autograd.grad((split(x) ** 3).sum(), [split.weight, split.bias])
    ref = torch.autograd.grad((reference_group_bn(x, bn, 4) ** 3).sum(), [bn.weight, bn.bias])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(grads[0], torch.autograd.grad((bn(x) ** 3).sum(), bn.weight)[0], atol=1e-2)
