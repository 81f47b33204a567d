"""The MoCo container PaCo trains (Cui et al. 2021, PaCo/LT ``moco/builder.py``), in its key layout.

Parts (state-dict names, which ``deitlt teacher import --format paco`` reads):

* ``encoder_q``, ``encoder_k``: the ResNet (``resnet32``: CIFAR layout, 64-d pooled feature;
  ``resnet50``: torchvision layout, 2048-d) whose classifier ``fc`` is the projection
  ``Linear(d, d) -> BatchNorm1d(d) -> ReLU -> Linear(d, moco_dim)`` (``fc.0``, ``fc.1``, ``fc.3``);
  with ``mlp=False`` a single ``Linear(d, moco_dim)``.
* ``linear = Linear(feat_dim, K)``: the classifier on ``encoder_q``'s pooled feature, whose weights
  are PaCo's learnable class centres; ``linear_k``, its momentum copy.
* Buffers ``queue`` (moco_k x moco_dim, unit rows), ``queue_l`` (moco_k labels), ``queue_ptr`` (1).

``encoder_k`` and ``linear_k`` take no gradient: :meth:`MoCo.momentum_update` moves them to
``m * key + (1 - m) * query`` (parameters only; the key encoder's BatchNorm statistics come from
its own forward passes). Inference is ``linear(pooled feature of encoder_q)``, the projection is
not computed.

Across ranks (torch.distributed initialised, world > 1) the keys are computed with MoCo's
shuffling BN (:func:`batch_shuffle`) and the queue is filled with every rank's keys.

Differences from the reference, deliberately: the queue starts with unit-norm rows (the reference
normalises the random queue over its length, so its first keys are nearly zero) and the pooled
feature is returned by the encoder rather than captured by a forward hook. Both concern only
the state before the first ``moco_k / batch`` steps or the code's shape, not the method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deitlt_scale.errors import UserError
from deitlt_scale.models.teachers import CIFAR_RESNETS, FEATURE_DIM, ResNet32

PACO_ARCHS = (*CIFAR_RESNETS, "resnet50")


def projection(dim_in: int, dim_out: int, mlp: bool) -> nn.Module:
    """MoCo v2's head: ``Linear-BN-ReLU-Linear`` (keys ``0``, ``1``, ``3``) or one ``Linear``."""
    if not mlp:
        return nn.Linear(dim_in, dim_out)
    return nn.Sequential(
        nn.Linear(dim_in, dim_in), nn.BatchNorm1d(dim_in), nn.ReLU(), nn.Linear(dim_in, dim_out)
    )


class ProjectedResNet32(ResNet32):
    """The CIFAR ResNet-32 (or a sibling of ``blocks`` per stage) with the projection ``fc`` in
    place of its classifier ``linear``."""

    def __init__(self, moco_dim: int, mlp: bool = True, blocks: int = 5) -> None:
        super().__init__(num_classes=1, blocks=blocks)
        del self.linear
        self.fc = projection(FEATURE_DIM["resnet32"], moco_dim, mlp)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """(pooled feature (B, 64), projection (B, moco_dim))."""
        feat = self.features(x)
        return feat, self.fc(feat)


class ProjectedResNet50(nn.Module):
    """torchvision's ResNet-50 with the projection ``fc``; same key names as torchvision's."""

    def __init__(self, moco_dim: int, mlp: bool = True) -> None:
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        for name, child in net.named_children():
            if name != "fc":
                self.add_module(name, child)
        self.fc = projection(FEATURE_DIM["resnet50"], moco_dim, mlp)

    def features(self, x: Tensor) -> Tensor:
        """Pooled feature (B, 2048)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feat = self.features(x)
        return feat, self.fc(feat)


def projected_encoder(arch: str, moco_dim: int, mlp: bool = True) -> nn.Module:
    if arch in CIFAR_RESNETS:
        return ProjectedResNet32(moco_dim, mlp, blocks=CIFAR_RESNETS[arch])
    if arch == "resnet50":
        return ProjectedResNet50(moco_dim, mlp)
    raise UserError(
        f"PaCo needs a CIFAR ResNet ({', '.join(CIFAR_RESNETS)}) or resnet50, got {arch!r}"
    )


@dataclass
class MoCoOutput:
    """One training forward.

    ``features`` (2B + moco_k, moco_dim): unit-norm query projections, key projections and the
    queue as it was before this batch; ``labels`` (2B + moco_k,): their labels; ``logits``
    (B, K): ``linear`` on the queries' pooled features; ``keys`` (B, moco_dim): this batch's
    keys, to :meth:`MoCo.enqueue` once the loss is computed.
    """

    features: Tensor
    labels: Tensor
    logits: Tensor
    keys: Tensor


class MoCo(nn.Module):
    """Query/key encoders, the class-centre classifier and the key queue (see module docstring).

    Args:
        arch: ``resnet32`` | ``resnet50``.
        num_classes: K.
        moco_dim: projection width the contrast is computed on.
        moco_k: queue length; it must be a multiple of the (global) batch that is enqueued.
        moco_m: key-encoder momentum, in [0, 1).
        feat_dim: pooled-feature width; ``None`` takes the arch's (64 | 2048).
        mlp: MLP projection (True, the published setting) or one Linear.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        moco_dim: int = 128,
        moco_k: int = 8192,
        moco_m: float = 0.999,
        feat_dim: int | None = None,
        mlp: bool = True,
    ) -> None:
        super().__init__()
        if arch not in PACO_ARCHS:
            raise UserError(f"PaCo needs one of {', '.join(PACO_ARCHS)}, got {arch!r}")
        feat_dim = FEATURE_DIM[arch] if feat_dim is None else feat_dim
        if feat_dim != FEATURE_DIM[arch]:
            raise UserError(
                f"paco.feat_dim={feat_dim} but {arch} pools {FEATURE_DIM[arch]}-d features; "
                "leave it unset or give the arch's width"
            )
        if not 0.0 <= moco_m < 1.0:
            raise UserError(f"paco.moco_m must be in [0, 1), got {moco_m}")
        self.arch, self.num_classes = arch, num_classes
        self.moco_k, self.moco_m = moco_k, moco_m
        self.encoder_q = projected_encoder(arch, moco_dim, mlp)
        self.encoder_k = projected_encoder(arch, moco_dim, mlp)
        self.linear = nn.Linear(feat_dim, num_classes)
        self.linear_k = nn.Linear(feat_dim, num_classes)
        for q, k in self._pairs():
            k.data.copy_(q.data)
            k.requires_grad_(False)
        # The key encoder starts with the query encoder's BatchNorm statistics too.
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        self.register_buffer("queue", F.normalize(torch.randn(moco_k, moco_dim), dim=1))
        self.register_buffer("queue_l", torch.randint(0, num_classes, (moco_k,)))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def _pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        return [
            *zip(self.encoder_q.parameters(), self.encoder_k.parameters()),
            *zip(self.linear.parameters(), self.linear_k.parameters()),
        ]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``key = m * key + (1 - m) * query`` for encoder_k and linear_k (before the keys of a
        batch are computed, as the reference)."""
        m = self.moco_m
        for q, k in self._pairs():
            k.mul_(m).add_(q.detach(), alpha=1.0 - m)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor) -> None:
        """Replace the oldest ``len(keys)`` queue rows by ``keys``/``labels``, gathered from
        every rank in rank order when torch.distributed is initialised (as the reference)."""
        if _distributed():
            keys, labels = _all_gather(keys), _all_gather(labels)
        n = keys.shape[0]
        if self.moco_k % n:
            raise UserError(
                f"paco.moco_k={self.moco_k} is not a multiple of the global batch {n}; "
                "change one of them"
            )
        # Rows ptr .. ptr + n - 1 computed on the device: reading the pointer on the host would
        # wait for the step's kernels every step.
        rows = self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.queue_l.index_copy_(0, rows, labels.to(self.queue_l.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.moco_k)

    def forward_train(self, im_q: Tensor, im_k: Tensor, labels: Tensor) -> MoCoOutput:
        """Queries with gradient, keys without; neither the key encoder nor the queue change here.

        Per optimizer step: :meth:`momentum_update`, then this (twice under SAM: both passes see
        the same keys and queue), the loss, and :meth:`enqueue` of ``out.keys`` with the labels.
        """
        feat_q, proj_q = self.encoder_q(im_q)
        q = F.normalize(proj_q, dim=1)
        with torch.no_grad():
            if _distributed():
                # Shuffling BN (MoCo): the key encoder's BatchNorm sees a random sub-batch of the
                # global batch, so its statistics cannot tie a key to its own query.
                shuffled, unshuffle = batch_shuffle(im_k)
                _, proj_k = self.encoder_k(shuffled)
                k = batch_unshuffle(F.normalize(proj_k, dim=1), unshuffle)
            else:
                _, proj_k = self.encoder_k(im_k)
                k = F.normalize(proj_k, dim=1)
        queue, queue_l = self.queue.clone(), self.queue_l.clone()
        return MoCoOutput(
            features=torch.cat([q, k.to(q.dtype), queue.to(q.dtype)], dim=0),
            labels=torch.cat([labels, labels, queue_l], dim=0),
            logits=self.linear(feat_q),
            keys=k,
        )

    def forward(
        self, images: Tensor, im_k: Tensor | None = None, labels: Tensor | None = None
    ) -> Tensor | MoCoOutput:
        """Inference ``model(images)``: K-way logits ``linear(pooled feature of encoder_q)``.
        Training ``model(im_q, im_k, labels)``: :meth:`forward_train` (so that a DeepSpeed
        engine, which calls the module, runs either)."""
        if im_k is not None:
            if labels is None:
                raise ValueError("a training forward needs the labels with the key view")
            return self.forward_train(images, im_k, labels)
        return self.linear(self.encoder_q.features(images))


def teacher_from_moco(model: MoCo) -> nn.Module:
    """The plain teacher network PaCo's inference computes: ``encoder_q`` without its projection,
    with ``linear`` as the classifier (``linear`` for resnet32, ``fc`` for resnet50), converted
    as ``deitlt teacher import --format paco`` converts a saved checkpoint. Ready for
    :func:`~deitlt_scale.models.teacher_file.save_teacher` (``normed: false``)."""
    from deitlt_scale.models.importers import convert_state
    from deitlt_scale.models.teacher_file import load_state_strict
    from deitlt_scale.models.teachers import create_teacher_arch

    state, _ = convert_state("paco", {"state_dict": model.state_dict()}, model.arch, "the model")
    teacher = create_teacher_arch(model.arch, model.num_classes)
    load_state_strict(
        teacher, state, "the PaCo model", f"{model.arch} with {model.num_classes} classes"
    )
    return teacher


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _all_gather(t: Tensor) -> Tensor:
    """Every rank's ``t`` (same shape on all ranks), concatenated in rank order; no gradient."""
    world = torch.distributed.get_world_size()
    out = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def batch_shuffle(x: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's share of a random permutation of the global batch (every rank's ``x``).

    Rank 0 draws the permutation and broadcasts it. Returns ``(shuffled, unshuffle)``: the
    ``len(x)`` samples this rank now holds, and the index that :func:`batch_unshuffle` inverts
    the permutation with.
    """
    gathered = _all_gather(x)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    perm = torch.randperm(gathered.shape[0], device=x.device)
    torch.distributed.broadcast(perm, src=0)
    return gathered[perm.view(world, -1)[rank]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(y: Tensor, unshuffle: Tensor) -> Tensor:
    """The rows of ``y`` (computed on :func:`batch_shuffle`'s output) back on the ranks and in
    the order of the original samples."""
    gathered = _all_gather(y)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return gathered[unshuffle.view(world, -1)[rank]]
