"""PaCo building blocks: the MoCo container (layout, momentum update, queue, inference, import as a
teacher) and the parametric contrastive loss against a loop-by-loop evaluation of its formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deitlt_scale.config import PaCoConfig
from deitlt_scale.errors import UserError
from deitlt_scale.losses import PaCoLoss
from deitlt_scale.models.importers import import_checkpoint
from deitlt_scale.models.moco import MoCo, teacher_from_moco
from deitlt_scale.models.teacher_file import load_teacher

K = 5


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def images(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def moco32() -> MoCo:
    torch.manual_seed(0)
    return MoCo("resnet32", K, moco_dim=8, moco_k=16, moco_m=0.9)


# --------------------------------------------------------------------------------------------
# The container


def test_state_dict_has_the_published_paco_layout(moco32):
    keys = set(moco32.state_dict())
    assert {"queue", "queue_l", "queue_ptr", "linear.weight", "linear_k.bias"} <= keys
    assert {"encoder_q.conv1.weight", "encoder_q.layer3.4.bn2.running_var"} <= keys
    assert {"encoder_q.fc.0.weight", "encoder_q.fc.1.running_mean", "encoder_q.fc.3.weight"} <= keys
    assert {
        k.replace("encoder_q.", "encoder_k.", 1) for k in keys if k.startswith("encoder_q.")
    } <= keys
    sd = moco32.state_dict()
    assert sd["encoder_q.fc.3.weight"].shape == (8, 64)
    assert sd["linear.weight"].shape == (K, 64)
    assert sd["queue"].shape == (16, 8) and sd["queue_l"].shape == (16,)


def test_resnet50_container_pools_2048_features_in_torchvision_names():
    model = MoCo("resnet50", 3, moco_dim=128, moco_k=32)
    sd = model.state_dict()
    assert sd["encoder_q.fc.0.weight"].shape == (2048, 2048)
    assert sd["linear.weight"].shape == (3, 2048)
    assert "encoder_q.layer4.2.bn3.weight" in sd and "encoder_k.layer4.2.conv3.weight" in sd


def test_key_side_starts_as_a_copy_and_takes_no_gradient(moco32):
    for q, k in zip(moco32.encoder_q.state_dict().values(), moco32.encoder_k.state_dict().values()):
        assert torch.equal(q, k)
    assert torch.equal(moco32.linear.weight, moco32.linear_k.weight)
    assert not any(p.requires_grad for p in moco32.encoder_k.parameters())
    assert not any(p.requires_grad for p in moco32.linear_k.parameters())


def test_queue_rows_start_with_unit_norm(moco32):
    assert torch.allclose(moco32.queue.norm(dim=1), torch.ones(16))


def test_momentum_update_moves_keys_by_one_minus_m_towards_the_queries(moco32):
    with torch.no_grad():
        for p in moco32.encoder_q.parameters():
            p.add_(1.0)
        moco32.linear.weight.add_(1.0)
    before = moco32.encoder_k.conv1.weight.clone()
    query = moco32.encoder_q.conv1.weight.clone()
    moco32.momentum_update()
    assert torch.allclose(moco32.encoder_k.conv1.weight, 0.9 * before + 0.1 * query)
    assert torch.allclose(moco32.linear_k.weight, moco32.linear.weight - 0.9, atol=1e-6)


def test_forward_train_gives_queries_keys_queue_and_centre_logits(moco32):
    moco32.train()
    labels = torch.tensor([0, 1, 2, 3])
    queue_before = moco32.queue.clone()
    out = moco32.forward_train(images(4), images(4, seed=2), labels)
    assert out.features.shape == (4 + 4 + 16, 8) and out.logits.shape == (4, K)
    assert torch.allclose(out.features.norm(dim=1), torch.ones(24), atol=1e-6)
    assert torch.equal(out.labels, torch.cat([labels, labels, moco32.queue_l]))
    assert torch.equal(out.features[8:], queue_before) and torch.equal(moco32.queue, queue_before)
    assert not out.keys.requires_grad and out.features[:4].requires_grad


def test_gradients_reach_the_query_encoder_and_centres_only(moco32):
    moco32.train()
    labels = torch.tensor([0, 1, 1, 4])
    out = moco32.forward_train(images(4), images(4, seed=2), labels)
    loss = PaCoLoss(PaCoConfig(alpha=0.5), [8, 4, 2, 1, 1])(out.features, out.labels, out.logits)
    loss["loss"].backward()
    assert moco32.encoder_q.fc[3].weight.grad is not None and moco32.linear.weight.grad is not None
    assert all(p.grad is None for p in moco32.encoder_k.parameters())


def test_enqueue_replaces_the_oldest_rows_and_wraps_around(moco32):
    keys = F.normalize(torch.randn(8, 8), dim=1)
    moco32.enqueue(keys, torch.arange(8) % K)
    assert int(moco32.queue_ptr) == 8 and torch.equal(moco32.queue[:8], keys)
    moco32.enqueue(keys * 0 + 1, torch.zeros(8, dtype=torch.long))
    assert int(moco32.queue_ptr) == 0 and torch.equal(moco32.queue_l[8:], torch.zeros(8).long())
    moco32.enqueue(-keys, torch.ones(8, dtype=torch.long))
    assert torch.equal(moco32.queue[:8], -keys) and int(moco32.queue_ptr) == 8


def test_enqueue_refuses_a_batch_that_does_not_divide_the_queue(moco32):
    with pytest.raises(UserError, match="moco_k=16 is not a multiple of the global batch 3"):
        moco32.enqueue(torch.randn(3, 8), torch.zeros(3, dtype=torch.long))


def test_wrong_feat_dim_for_the_arch_is_a_user_error():
    with pytest.raises(UserError, match="paco.feat_dim=2048 but resnet32 pools 64-d"):
        MoCo("resnet32", K, feat_dim=2048)


def test_inference_is_the_classifier_on_the_query_encoders_pooled_feature(moco32):
    randomize_bn(moco32)
    moco32.eval()
    x = images(3)
    with torch.no_grad():
        expected = moco32.linear(moco32.encoder_q.features(x))
        assert torch.equal(moco32(x), expected)


@pytest.mark.parametrize("arch, size", [("resnet32", 32), ("resnet50", 64)])
def test_a_saved_container_imports_as_a_teacher_with_the_same_logits(arch, size, tmp_path):
    torch.manual_seed(0)
    model = MoCo(arch, K, moco_dim=16, moco_k=32)
    randomize_bn(model)
    model.eval()
    path = tmp_path / "moco_ckpt.pth.tar"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # DDP-saved, as PaCo's
    torch.save({"epoch": 400, "arch": arch, "state_dict": state}, path)
    report = import_checkpoint("paco", path, arch, K, size, tmp_path / "t", label_space="model")
    assert set(report.dropped) == {
        "encoder_k",
        "encoder_q.fc",
        "linear_k",
        "queue",
        "queue_l",
        "queue_ptr",
    }
    teacher, info = load_teacher(tmp_path / "t")
    x = images(2, size)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model(x), rtol=0, atol=1e-5)
    assert (info.arch, info.num_classes, info.normed) == (arch, K, False)


def test_teacher_from_moco_computes_the_containers_inference(moco32):
    randomize_bn(moco32)
    moco32.eval()
    teacher = teacher_from_moco(moco32).eval()
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), moco32(x), rtol=0, atol=1e-6)
    assert not any(name.startswith("fc") for name in teacher.state_dict())


# --------------------------------------------------------------------------------------------
# The loss


def paco_by_loops(features, labels, logits, counts, alpha, beta, gamma, t):
    """PaCo/LT losses.py PaCoLoss.forward written out element by element (supt = 1,
    base_temperature = temperature), in float64 Python arithmetic."""
    f = features.double().tolist()
    z = logits.double().tolist()
    lab = labels.tolist()
    b, c, n = len(z), len(z[0]), len(f)
    prior = [x / sum(counts) for x in counts]
    total = 0.0
    for i in range(b):
        row = [z[i][k] + math.log(prior[k] + 1e-9) for k in range(c)]
        row += [sum(f[i][d] * f[j][d] for d in range(len(f[i]))) / t for j in range(n)]
        top = max(row)
        row = [v - top for v in row]
        mask = [beta * (k == lab[i]) for k in range(c)]
        mask += [alpha * (lab[j] == lab[i]) * (j != i) for j in range(n)]
        weight = [1.0] * c + [gamma * (j != i) for j in range(n)]
        denom = sum(w * math.exp(v) for w, v in zip(weight, row))
        log_prob = [v - math.log(denom + 1e-12) for v in row]
        total += -sum(m * lp for m, lp in zip(mask, log_prob)) / sum(mask)
    return total / b


@pytest.mark.parametrize(
    "alpha, beta, gamma, t", [(0.01, 1.0, 1.0, 0.05), (0.05, 1.0, 1.0, 0.2), (1.0, 0.5, 0.0, 0.1)]
)
def test_paco_loss_equals_the_formula_evaluated_loop_by_loop(alpha, beta, gamma, t):
    g = torch.Generator().manual_seed(3)
    b, queue, dim, counts = 6, 10, 4, [50, 20, 8, 3]
    features = F.normalize(torch.randn(2 * b + queue, dim, generator=g), dim=1)
    labels = torch.randint(0, 4, (2 * b + queue,), generator=g)
    labels[b : 2 * b] = labels[:b]  # keys carry their queries' labels
    logits = torch.randn(b, 4, generator=g) * 3
    cfg = PaCoConfig(alpha=alpha, beta=beta, gamma=gamma, temperature=t)
    got = PaCoLoss(cfg, counts)(features, labels, logits)["loss"]
    expected = paco_by_loops(features, labels, logits, counts, alpha, beta, gamma, t)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.ndim == 0


def test_paco_loss_shifts_the_centre_logits_by_the_log_prior():
    """With alpha = 0 and gamma = 0 only the centres count: the loss is the logit-adjusted CE."""
    g = torch.Generator().manual_seed(4)
    features = F.normalize(torch.randn(8, 3, generator=g), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 0, 1, 2, 0])
    logits = torch.randn(4, 3, generator=g)
    counts = torch.tensor([60.0, 30.0, 10.0])
    cfg = PaCoConfig(alpha=0.0, beta=1.0, gamma=0.0, temperature=0.1)
    got = PaCoLoss(cfg, counts.tolist())(features, labels, logits)["loss"]
    adjusted = logits + torch.log(counts / counts.sum() + 1e-9)
    assert got.item() == pytest.approx(F.cross_entropy(adjusted, labels[:4]).item(), rel=1e-6)


def test_paco_loss_refuses_logits_of_another_class_count():
    with pytest.raises(ValueError, match="logits have 3 classes, the class prior 4"):
        PaCoLoss(PaCoConfig(), [4, 3, 2, 1])(
            torch.randn(6, 2), torch.zeros(6).long(), torch.randn(2, 3)
        )


# --------------------------------------------------------------------------------------------
# Across ranks (two gloo processes on CPU)


def _two_rank_worker(rank: int, init: str, out: str) -> None:
    from deitlt_scale.models.moco import batch_shuffle, batch_unshuffle

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same container on both ranks, as after a DDP broadcast
        model = MoCo("resnet32", K, moco_dim=4, moco_k=12)
        randomize_bn(model)
        torch.manual_seed(100 + rank)  # each rank its own samples and its own (unused) draws
        x = torch.arange(3.0).repeat(2, 1).T + 10 * rank  # rows: this rank's sample ids
        shuffled, unshuffle = batch_shuffle(x)
        back = batch_unshuffle(shuffled * 2, unshuffle)
        model.eval()  # BatchNorm on running statistics: keys do not depend on the shuffle
        im_k = images(3, size=8, seed=rank)
        out_train = model.forward_train(images(3, size=8, seed=5 + rank), im_k, torch.arange(3))
        with torch.no_grad():
            direct = F.normalize(model.encoder_k(im_k)[1], dim=1)
        model.enqueue(out_train.keys, torch.arange(3) + 3 * rank)
        torch.save(
            {
                "shuffled": shuffled,
                "back": back,
                "keys": out_train.keys,
                "direct": direct,
                "queue": model.queue.clone(),
                "queue_l": model.queue_l.clone(),
                "ptr": int(model.queue_ptr),
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_two_rank_worker, args=(f"file://{tmp}/rendezvous", str(tmp)), nprocs=2)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


def test_batch_shuffle_deals_a_permutation_of_the_global_batch_and_unshuffle_inverts_it(
    two_ranks,
):
    dealt = torch.cat([r["shuffled"][:, 0] for r in two_ranks])
    assert sorted(dealt.tolist()) == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
    for rank, r in enumerate(two_ranks):
        expected = (torch.arange(3.0).repeat(2, 1).T + 10 * rank) * 2
        assert torch.equal(r["back"], expected)


def test_keys_under_shuffling_bn_come_back_to_their_own_samples(two_ranks):
    for r in two_ranks:
        torch.testing.assert_close(r["keys"], r["direct"], rtol=0, atol=1e-6)


def test_enqueue_fills_the_queue_with_every_ranks_keys_in_rank_order(two_ranks):
    keys = torch.cat([r["keys"] for r in two_ranks])
    for r in two_ranks:
        assert r["ptr"] == 6
        assert torch.equal(r["queue"][:6], keys)
        assert r["queue_l"][:6].tolist() == [0, 1, 2, 3, 4, 5]
