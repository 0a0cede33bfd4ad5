"""NT-Xent (simclr.nt_xent_loss) against a literal reading of SimCLR Eq. (1) / Algorithm 1."""
import math

import pytest
import torch

import simclr


def cosine(a, b):
    """Cosine similarity of two 1-D tensors, written out element by element."""
    dot = sum(a[d] * b[d] for d in range(len(a)))
    na = torch.sqrt(sum(a[d] * a[d] for d in range(len(a))))
    nb = torch.sqrt(sum(b[d] * b[d] for d in range(len(b))))
    return dot / (na * nb)


def nt_xent_reference(z1, z2, tau):
    """SimCLR Algorithm 1, one anchor at a time. The 2N views are interleaved
    as in the paper (2k-1, 2k are the two views of image k); for each anchor i
    with positive j: l(i, j) = -log( exp(s_ij/tau) / sum_{k != i} exp(s_ik/tau) ).
    Loss = (1/2N) * sum over all 2N anchors. Differentiable by autograd."""
    n = z1.shape[0]
    views = []
    for k in range(n):
        views.append(z1[k])
        views.append(z2[k])
    total = 0.0
    for i in range(2 * n):
        j = i + 1 if i % 2 == 0 else i - 1
        numerator = torch.exp(cosine(views[i], views[j]) / tau)
        denominator = 0.0
        for k in range(2 * n):
            if k != i:
                denominator = denominator + torch.exp(cosine(views[i], views[k]) / tau)
        total = total - torch.log(numerator / denominator)
    return total / (2 * n)


CASES = [  # (N, D, tau)
    (1, 3, 0.5),
    (2, 4, 0.1),
    (3, 5, 0.5),
    (4, 2, 1.0),
    (5, 7, 0.2),
]


@pytest.mark.parametrize("n,d,tau", CASES)
def test_value_matches_reference_float64(n, d, tau):
    """For float64 inputs the loss equals the per-anchor loop of Eq. (1) to
    float32 precision (the loss computes in float32), and is a float32 scalar."""
    g = torch.Generator().manual_seed(100 * n + d)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64)
    loss = simclr.nt_xent_loss(z1, z2, tau)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    ref = nt_xent_reference(z1, z2, tau)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("n,d,tau", CASES)
def test_value_matches_reference_float32(n, d, tau):
    """For float32 inputs the loss equals the loop reference computed in float64."""
    g = torch.Generator().manual_seed(7 * n + d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    loss = simclr.nt_xent_loss(z1, z2, tau)
    ref = nt_xent_reference(z1.double(), z2.double(), tau)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


def test_n1_has_only_the_positive_in_the_denominator():
    """With one image, each anchor's only other view is its positive, so every
    term is -log(1) and the loss is exactly 0 whatever the embeddings."""
    z1, z2 = torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([[-3.0, 0.5, 0.2]])
    assert simclr.nt_xent_loss(z1, z2, 0.5).item() == pytest.approx(0.0, abs=1e-6)


def test_known_value_by_hand():
    """N=2 with orthogonal unit embeddings: z1 = (e1, e2), z2 = (e1, e3). Anchor
    z1[0] has s = 1 with its positive and 0 with the two others, so its term is
    -log(e^{1/t} / (e^{1/t} + 2)); the same holds for z2[0]. Anchor z1[1] = e2
    has s = 0 with everything: -log(1/3); likewise z2[1] = e3."""
    t = 0.5
    z1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    z2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    a = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    b = math.log(3.0)
    expected = (2 * a + 2 * b) / 4
    assert simclr.nt_xent_loss(z1, z2, t).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n,d,tau", CASES)
def test_gradients_match_reference(n, d, tau):
    """d loss / d z1 and d loss / d z2 equal the loop reference's autograd gradients."""
    g = torch.Generator().manual_seed(31 * n + d)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    simclr.nt_xent_loss(a1, a2, tau).backward()
    r1, r2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    nt_xent_reference(r1, r2, tau).backward()
    assert a1.grad is not None and a2.grad is not None
    assert a1.grad.dtype == torch.float64  # gradient returns in the input's dtype
    torch.testing.assert_close(a1.grad, r1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a2.grad, r2.grad, rtol=1e-5, atol=1e-6)
    if n > 1:  # for N = 1 the loss is constant (0) and so are its gradients
        assert r1.grad.abs().max() > 1e-3


def test_invariant_to_scaling_inputs():
    """The loss L2-normalises its inputs: scaling all embeddings, or each row by
    its own positive factor, leaves the loss unchanged."""
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    base = simclr.nt_xent_loss(z1, z2, 0.2).item()
    for c in (1e-3, 0.5, 10.0, 1e3):
        assert simclr.nt_xent_loss(c * z1, c * z2, 0.2).item() == pytest.approx(base, rel=1e-5)
    r1 = torch.rand(6, 1, generator=g) * 50 + 0.01
    r2 = torch.rand(6, 1, generator=g) * 50 + 0.01
    assert simclr.nt_xent_loss(r1 * z1, r2 * z2, 0.2).item() == pytest.approx(base, rel=1e-5)


def test_not_invariant_to_temperature():
    """tau enters the loss: a different temperature gives a different value
    (guards against a loss that ignores its tau argument)."""
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    assert abs(simclr.nt_xent_loss(z1, z2, 0.1).item() - simclr.nt_xent_loss(z1, z2, 1.0).item()) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """float16 / bfloat16 inputs (as produced under autocast) give a finite
    float32 loss: equal to the float32 loss on the same (rounded) values, and
    close to the float32 loss on the unrounded inputs. At tau = 0.05 the logits
    reach 20, where exp() would overflow float16 if computed in half precision."""
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    z2 = z1 + 0.1 * z2  # positives close together: large logits
    for tau in (0.5, 0.05):
        h1, h2 = z1.to(dtype), z2.to(dtype)
        loss = simclr.nt_xent_loss(h1, h2, tau)
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss)
        same_values = simclr.nt_xent_loss(h1.float(), h2.float(), tau)
        assert loss.item() == pytest.approx(same_values.item(), rel=1e-5, abs=1e-6)
        full = simclr.nt_xent_loss(z1, z2, tau)
        assert loss.item() == pytest.approx(full.item(), rel=5e-2, abs=5e-2)


def test_half_precision_gradients_finite():
    """Backward through float16 inputs gives finite float16 gradients."""
    g = torch.Generator().manual_seed(6)
    z1 = torch.randn(8, 16, generator=g).half().requires_grad_()
    z2 = torch.randn(8, 16, generator=g).half().requires_grad_()
    simclr.nt_xent_loss(z1, z2, 0.1).backward()
    assert z1.grad.dtype == torch.float16
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    assert z1.grad.abs().max() > 0


def test_symmetric_in_the_two_views():
    """Swapping z1 and z2 relabels the views but not the pairs: same loss."""
    g = torch.Generator().manual_seed(8)
    z1, z2 = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    assert simclr.nt_xent_loss(z2, z1, 0.3).item() == pytest.approx(simclr.nt_xent_loss(z1, z2, 0.3).item(), rel=1e-6)


def test_pairs_matter():
    """Shuffling the rows of z2 alone (pairing image i with another image's view)
    changes the loss; shuffling z1 and z2 together does not."""
    g = torch.Generator().manual_seed(9)
    z1, z2 = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    base = simclr.nt_xent_loss(z1, z2, 0.3).item()
    perm = torch.tensor([1, 2, 3, 4, 0])
    assert simclr.nt_xent_loss(z1[perm], z2[perm], 0.3).item() == pytest.approx(base, rel=1e-6)
    assert abs(simclr.nt_xent_loss(z1, z2[perm], 0.3).item() - base) > 1e-3
