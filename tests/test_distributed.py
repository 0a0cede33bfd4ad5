"""Two processes (torchrun, gloo) give the one-process result: NT-Xent through
gather_with_grad, and a DDP + LARS step; TrainSampler's sharding of the
global batch; shuffle-BN's batch_shuffle over two processes."""
import pytest
import torch

import common
import dist_train_check as setup_
import simclr
from conftest import torchrun

WORLD = 2


# ---------------------------------------------------------------------------
# torchrun results
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks of tests/dist_train_check.py saved: [rank0, rank1]."""
    out = str(tmp_path_factory.mktemp("dist") / "result")
    torchrun(WORLD, ["tests/dist_train_check.py", out], timeout=300)
    results = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(WORLD)]
    assert [r["rank"] for r in results] == [0, 1] and all(r["world"] == WORLD for r in results)
    return results


def one_process_ntxent():
    """Loss and gradients of NT-Xent on the full global batch in one process."""
    z1, z2 = setup_.embedding_batch()
    z1.requires_grad_()
    z2.requires_grad_()
    loss = simclr.nt_xent_loss(z1, z2, setup_.TAU)
    loss.backward()
    return loss.detach(), z1.grad, z2.grad


def one_process_training():
    """The same model, data and LARS steps on the full global batch, no DDP, no gather."""
    model = setup_.make_model()
    optimizer = setup_.make_optimizer(model)
    losses, grads, params = [], [], []
    for x1, x2 in setup_.image_batches():
        e1, e2 = model(x1, x2)
        loss = simclr.nt_xent_loss(e1, e2, setup_.TAU)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})
        optimizer.step()
        params.append({k: p.detach().clone() for k, p in model.named_parameters()})
    return dict(losses=losses, grads=grads, params=params, start=setup_.make_model().state_dict())


def test_gathered_ntxent_loss_equals_one_process(ranks):
    """Each rank's NT-Xent over the gathered embeddings equals the one-process
    loss on the full global batch of 8."""
    loss, _, _ = one_process_ntxent()
    for r in ranks:
        assert r["ntxent_loss"].item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-6)


def test_gathered_ntxent_gradient_is_world_times_one_process(ranks):
    """Rank r's local leaves (rows 4r..4r+3) receive world x the one-process
    gradient of those rows (negatives on the other rank included), so DDP's
    averaging over ranks gives exactly the one-process gradient."""
    _, g1, g2 = one_process_ntxent()
    n = setup_.GLOBAL_BATCH // WORLD
    for rank, r in enumerate(ranks):
        rows = slice(rank * n, (rank + 1) * n)
        assert r["ntxent_grad1"].shape == (n, setup_.EMBED_DIM)
        torch.testing.assert_close(r["ntxent_grad1"] / WORLD, g1[rows], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r["ntxent_grad2"] / WORLD, g2[rows], rtol=1e-5, atol=1e-7)
    assert g1.abs().max() > 1e-3


def test_ddp_wraps_model(ranks):
    """common.ddp returns a DistributedDataParallel module when world > 1."""
    assert all(r["wrapped_in_ddp"] for r in ranks)


def test_ddp_loss_equals_one_process(ranks):
    """Per step, the loss on each rank (global NT-Xent over gathered
    embeddings) equals the one-process loss on the global batch."""
    ref = one_process_training()
    for r in ranks:
        for step in range(setup_.STEPS):
            assert r["losses"][step].item() == pytest.approx(ref["losses"][step].item(), rel=1e-6, abs=1e-6)


def test_ddp_gradients_equal_one_process(ranks):
    """After backward, the DDP-averaged gradient of every parameter equals the
    one-process gradient, at both steps (the second after a LARS update)."""
    ref = one_process_training()
    for r in ranks:
        for step in range(setup_.STEPS):
            assert r["grads"][step].keys() == ref["grads"][step].keys()
            for k, g in ref["grads"][step].items():
                torch.testing.assert_close(r["grads"][step][k], g, rtol=1e-4, atol=1e-6, msg=f"step {step} {k}")
                assert g.abs().max() > 0


def test_ddp_lars_steps_equal_one_process(ranks):
    """Parameters after each LARS step (weights adapted, biases plain momentum
    SGD) equal the one-process ones, including the size and direction of the
    update itself (compared as after - before, which is small for weights)."""
    ref = one_process_training()
    for r in ranks:
        before = ref["start"]
        for step in range(setup_.STEPS):
            for k, p in ref["params"][step].items():
                torch.testing.assert_close(r["params"][step][k], p, rtol=0, atol=1e-6, msg=f"step {step} {k}")
                update, ref_update = r["params"][step][k] - before[k], p - before[k]
                assert ref_update.abs().max() > 0
                torch.testing.assert_close(update, ref_update, rtol=1e-3, atol=1e-7, msg=f"update {step} {k}")
            before = ref["params"][step]


def test_ddp_replicas_stay_identical(ranks):
    """Both ranks hold bit-identical parameters after every step."""
    for step in range(setup_.STEPS):
        for k, p in ranks[0]["params"][step].items():
            assert torch.equal(p, ranks[1]["params"][step][k]), (step, k)


def test_batch_shuffle_spreads_the_global_batch_and_unshuffle_restores(ranks):
    """The two ranks' shuffled halves are the one-process permutation of the
    global batch (so images move between processes, which is what shuffle-BN
    is for); unshuffle gives each rank its own rows back."""
    x = setup_.shuffle_batch()
    one_process, _ = common.batch_shuffle(x, seed=setup_.SHUFFLE_SEED)
    torch.testing.assert_close(torch.cat([r["shuffled"] for r in ranks]), one_process)
    assert set(ranks[0]["shuffled"][:, 0].tolist()) != set(range(setup_.GLOBAL_BATCH // WORLD))
    for rank, r in enumerate(ranks):
        n = setup_.GLOBAL_BATCH // WORLD
        torch.testing.assert_close(r["restored"], x[rank * n:(rank + 1) * n] * 10)


def test_batch_shuffle_moves_only_the_rows_another_rank_needs(ranks):
    """Channels-last images: the shuffled halves are the one-process permutation and the
    way back restores each rank's images, both still channels-last; the exchange is one
    all_to_all each way (no all-gather of the images) carrying exactly the images whose
    slot is on the other rank, which the one-process permutation says how many."""
    x = setup_.shuffle_images()
    n = setup_.GLOBAL_BATCH // WORLD
    one_process, _ = common.batch_shuffle(x, seed=setup_.SHUFFLE_SEED)
    torch.testing.assert_close(torch.cat([r["images_shuffled"] for r in ranks]), one_process)
    slot_of = torch.argsort(one_process[:, 0, 0, 0].floor().long())   # image i sits in slot slot_of[i]
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["images_restored"], x[rank * n:(rank + 1) * n] * 10)
        assert r["channels_last"] == [True, True]
        leaving = int((slot_of[rank * n:(rank + 1) * n] // n != rank).sum())      # our images computed there
        arriving = int((one_process[rank * n:(rank + 1) * n, 0, 0, 0].floor().long() // n != rank).sum())
        assert leaving > 0 and r["collectives"] == [("all_to_all", leaving, arriving), ("all_to_all", arriving, leaving)]


# ---------------------------------------------------------------------------
# TrainSampler (no processes needed: rank and world are arguments)
# ---------------------------------------------------------------------------

N, BATCH = 50, 8  # 6 full global batches; 2 items dropped per epoch


def steps_of(sampler, local):
    """The sampler's (index, seed) keys cut into per-step lists of `local` keys."""
    keys = list(sampler)
    assert len(keys) % local == 0
    return [keys[i:i + local] for i in range(0, len(keys), local)]


def global_steps(world, epoch=0, start_step=0, seed=0):
    """Per step, the concatenation of ranks 0..world-1's slices, in rank order."""
    per_rank = []
    for rank in range(world):
        s = common.TrainSampler(N, BATCH, rank, world, seed)
        s.set_epoch(epoch, start_step)
        per_rank.append(steps_of(s, BATCH // world))
    assert len({len(p) for p in per_rank}) == 1
    return [sum((p[step] for p in per_rank), []) for step in range(len(per_rank[0]))]


@pytest.mark.parametrize("world", [2, 4])
def test_sampler_rank_slices_concatenate_to_one_process_batch(world):
    """Concatenating the ranks' slices of each step, in rank order, gives the
    one-process global batch in the same order (indices and seeds)."""
    one = global_steps(1)
    assert len(one) == N // BATCH and all(len(b) == BATCH for b in one)
    assert global_steps(world) == one


def test_sampler_indices_distinct_and_in_range():
    """Within an epoch every index appears at most once (so every step's
    indices are distinct), all are valid, and the last partial batch is dropped."""
    steps = global_steps(2)
    flat = [i for step in steps for i, _ in step]
    for step in steps:
        assert len({i for i, _ in step}) == BATCH
    assert len(flat) == len(set(flat)) == (N // BATCH) * BATCH
    assert all(0 <= i < N for i in flat)


def test_sampler_set_epoch_reshuffles():
    """set_epoch changes the order; the same epoch gives the same order again."""
    assert global_steps(2, epoch=0) != global_steps(2, epoch=1)
    assert global_steps(2, epoch=1) == global_steps(2, epoch=1)
    assert global_steps(2, seed=0) != global_steps(2, seed=1)


def test_sampler_start_step_skips_exactly_the_first_batches():
    """start_step=k yields the same epoch's batches from step k on, on every rank,
    and len() counts only what is left."""
    full = global_steps(2, epoch=3)
    assert global_steps(2, epoch=3, start_step=2) == full[2:]
    for rank in range(2):
        s = common.TrainSampler(N, BATCH, rank, 2, 0)
        s.set_epoch(3, 2)
        assert len(s) == len(list(s)) == (N // BATCH - 2) * (BATCH // 2)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sampler_len(world):
    """len() is the number of keys one rank yields: steps x local batch."""
    s = common.TrainSampler(N, BATCH, world - 1, world, 0)
    assert len(s) == len(list(s)) == (N // BATCH) * (BATCH // world)


def test_sampler_seeds_independent_of_world_size():
    """Each index gets the same per-sample seed whatever the world size (so its
    views do not depend on the number of processes); seeds differ between
    samples and between epochs."""
    for epoch in (0, 1):
        seeds = {}
        for world in (1, 2, 4):
            for step in global_steps(world, epoch=epoch):
                for i, seed in step:
                    assert seeds.setdefault(i, seed) == seed
        assert len(set(seeds.values())) == len(seeds)
    e0 = dict(k for step in global_steps(1, epoch=0) for k in step)
    e1 = dict(k for step in global_steps(1, epoch=1) for k in step)
    assert all(e0[i] != e1[i] for i in set(e0) & set(e1))


@pytest.mark.parametrize("n,batch,world", [(50, 9, 2), (50, 6, 4), (5, 8, 1), (7, 8, 2), (50, 2, 2)])
def test_sampler_rejects_bad_batch(n, batch, world, capsys):
    """A global batch not divisible by the world size, or larger than the data
    set, ends the program with exit code 2 (a usage error) and one message."""
    with pytest.raises(SystemExit) as exc:
        common.TrainSampler(n, batch, 0, world, 0)
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")
