"""Objectives: the DeiT-LT student loss (METHOD.md 5) and the teacher losses (LDAM, CE, PaCo).

Student, hard distillation (the paper's recipe)::

    L = (1 - alpha) * SoftTargetCE(z_cls, t) + alpha * CE(z_dist, argmax teacher(x_mixed))

``t`` are the Mixup/CutMix targets with label smoothing; ``targets=None`` (the CIFAR DRW phase
with ``no_mixup_drw``) switches the CLS term to hard-label CE without smoothing. In the DRW phase
the DIST CE is weighted by the effective-number weights of the *teacher's* class, with PyTorch's
weighted-mean reduction ``sum_i w_i CE_i / sum_i w_i`` (METHOD.md 5.3, 10.4).

All terms are computed in fp32 whatever the autocast dtype of the logits; every returned value is
a 0-d device tensor, so calling an objective never synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from deitlt_scale.config import DistillConfig, PaCoConfig
from deitlt_scale.data.longtail import drw_weights

if TYPE_CHECKING:
    from deitlt_scale.models.student import StudentOutput


def soft_target_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_i sum_k -t_ik log softmax(z_i)_k`` (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def balanced_bce(shifted: Tensor, targets: Tensor | None, labels: Tensor) -> Tensor:
    """LiVT's Bal-BCE on logits already shifted by :func:`cls_logit_shift`: ``K * mean BCE``
    of ``sigmoid(z + tau * log(pi / (1 - pi)))`` against the (mixed, smoothed) targets, or the
    one-hot labels when there are none; K is the class count (LiVT ``util/loss.py``)."""
    k = shifted.shape[-1]
    if targets is None:
        targets = F.one_hot(labels, k)
    return k * F.binary_cross_entropy_with_logits(shifted, targets.to(shifted.dtype))


def teacher_in_mix(teacher_labels: Tensor, targets: Tensor | None, labels: Tensor) -> Tensor:
    """Fraction of teacher labels that are one of the ground-truth labels mixed into their
    image: a class the image's target gives more than the smoothing floor (the image's own label
    when it is not mixed, or when ``targets`` is None)."""
    if targets is None:
        return (teacher_labels == labels).float().mean().detach()
    given = targets.gather(1, teacher_labels[:, None]).squeeze(1)
    return (given > targets.min(dim=1).values).float().mean().detach()


class _DeviceTensor:
    """A constant kept on CPU and copied once per device it is used on (no per-step copies)."""

    def __init__(self, values: Tensor) -> None:
        self._cpu = values
        self._copies: dict[torch.device, Tensor] = {}

    def on(self, device: torch.device) -> Tensor:
        t = self._copies.get(device)
        if t is None:
            t = self._copies[device] = self._cpu.to(device)
        return t


class DeiTLTObjective:
    """The student loss; returns named, already-scaled components for logging.

    Args:
        cfg: ``distill`` section (type, alpha, tau, beta).
        train_counts: training images per class in model-label order (for the DRW weights).
        class_map: ``class_map[original] = model label``; pass it only when the teacher
            predicts original labels (``teacher.map_targets``). The teacher's argmax (hard) or
            its logit columns (soft) are then moved to model labels by a device-side gather.
    """

    def __init__(
        self,
        cfg: DistillConfig,
        train_counts: Sequence[int],
        class_map: Sequence[int] | None = None,
    ) -> None:
        self.type = cfg.type
        self.alpha = float(cfg.alpha)
        self.tau = float(cfg.tau)
        self.num_classes = len(train_counts)
        w = torch.as_tensor(drw_weights(train_counts, cfg.beta), dtype=torch.float32)
        self._weights = _DeviceTensor(w)
        self._bce = cfg.cls_loss == "bal_bce"
        self._cls_shift: _DeviceTensor | None = None
        if cfg.cls_loss != "ce":
            self._cls_shift = _DeviceTensor(cls_logit_shift(cfg, train_counts))
        self._class_map: _DeviceTensor | None = None
        self._inverse_map: _DeviceTensor | None = None
        if class_map is not None:
            cmap = torch.as_tensor(list(class_map), dtype=torch.long)
            if sorted(cmap.tolist()) != list(range(self.num_classes)):
                raise ValueError(
                    f"class_map must be a permutation of 0..{self.num_classes - 1} "
                    f"(one entry per class of train_counts), got {len(cmap)} entries"
                )
            self._class_map = _DeviceTensor(cmap)
            self._inverse_map = _DeviceTensor(torch.argsort(cmap))

    def teacher_labels(self, teacher_logits: Tensor) -> Tensor:
        """Hard distillation targets (B,) in model labels: argmax, mapped when a class map is set."""
        labels = teacher_logits.argmax(dim=-1)
        if self._class_map is not None:
            labels = self._class_map.on(labels.device)[labels]
        return labels

    def _cls_logits(self, logits: Tensor) -> Tensor:
        """The CLS logits the CLS loss sees: shifted by ``tau * log prior`` for the long-tail
        losses of ``distill.cls_loss`` (the model predicts with the unshifted logits)."""
        logits = logits.float()
        if self._cls_shift is None:
            return logits
        return logits + self._cls_shift.on(logits.device)

    def _cls_term(self, logits: Tensor, targets: Tensor | None, labels: Tensor) -> Tensor:
        if self._bce:
            return balanced_bce(logits, targets, labels)
        if targets is None:
            return F.cross_entropy(logits, labels)
        return soft_target_ce(logits, targets.float())

    def __call__(
        self,
        out: StudentOutput,
        targets: Tensor | None,
        labels: Tensor,
        teacher_logits: Tensor | None,
        drw: bool,
    ) -> dict[str, Tensor]:
        """One micro-batch.

        Args:
            out: the student's heads.
            targets: (B, K) mixed, label-smoothed targets, or None for hard labels.
            labels: (B,) ground-truth model labels of the (unmixed) samples.
            teacher_logits: (B, K) teacher logits on the same augmented, mixed batch; None for
                ``type: none``.
            drw: whether the deferred re-weighting phase is active.

        Returns ``{"loss", "cls", "dist"}`` (``cls``/``dist`` scaled by ``1 - alpha``/``alpha``)
        plus ``"teacher_agreement"`` (fraction of teacher labels equal to ``labels``) and
        ``"teacher_in_mix"`` (:func:`teacher_in_mix`), detached, when a teacher is used.
        """
        if self.type == "none":
            return self._no_teacher(out, targets, labels, drw)
        if teacher_logits is None:
            raise ValueError(f"distill.type={self.type} needs teacher logits")
        if out.dist_logits is None:
            raise ValueError(f"distill.type={self.type} needs a distilled student (DIST head)")
        if teacher_logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"the teacher predicts {teacher_logits.shape[-1]} classes, the student "
                f"{self.num_classes}; the teacher file does not belong to this dataset"
            )
        dist_logits = out.dist_logits.float()
        l_cls = self._cls_term(self._cls_logits(out.cls_logits), targets, labels)
        t_labels = self.teacher_labels(teacher_logits)
        if self.type == "hard":
            weight = self._weights.on(dist_logits.device) if drw else None
            l_dist = F.cross_entropy(dist_logits, t_labels, weight=weight)
        else:
            l_dist = self._soft(dist_logits, teacher_logits.float())
        cls_part = (1.0 - self.alpha) * l_cls
        dist_part = self.alpha * l_dist
        return {
            "loss": cls_part + dist_part,
            "cls": cls_part.detach(),
            "dist": dist_part.detach(),
            "teacher_agreement": (t_labels == labels).float().mean().detach(),
            "teacher_in_mix": teacher_in_mix(t_labels, targets, labels),
        }

    def _soft(self, dist_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """KL(teacher || student) at temperature tau, ``sum * tau^2 / numel`` (METHOD.md 5.1).

        DRW does not weight it: the reference's weighted-soft variant scales log-probabilities,
        which has no meaning, so it is not reproduced.
        """
        if self._inverse_map is not None:
            # Column m of the mapped logits is the teacher's original class inverse_map[m].
            teacher_logits = teacher_logits[:, self._inverse_map.on(teacher_logits.device)]
        tau = self.tau
        return (
            F.kl_div(
                F.log_softmax(dist_logits / tau, dim=1),
                F.log_softmax(teacher_logits / tau, dim=1),
                reduction="sum",
                log_target=True,
            )
            * (tau * tau)
            / dist_logits.numel()
        )

    def _no_teacher(
        self, out: StudentOutput, targets: Tensor | None, labels: Tensor, drw: bool
    ) -> dict[str, Tensor]:
        """Baselines: the plain ViT trains its CLS head only; a distilled student without a
        teacher trains DIST on the same ground-truth targets. In DRW the criterion becomes CE
        weighted by the ground-truth class (METHOD.md 5.3, no-distillation models)."""

        def term(logits: Tensor) -> Tensor:
            logits = logits.float()
            if not drw:
                return self._cls_term(logits, targets, labels)
            weight = self._weights.on(logits.device)
            if targets is None:
                return F.cross_entropy(logits, labels, weight=weight)
            # Class weights with probability targets: PyTorch averages over the batch.
            return F.cross_entropy(logits, targets.float(), weight=weight)

        l_cls = term(self._cls_logits(out.cls_logits))
        if out.dist_logits is None:
            zero = l_cls.detach() * 0
            return {"loss": l_cls, "cls": l_cls.detach(), "dist": zero}
        cls_part = (1.0 - self.alpha) * l_cls
        dist_part = self.alpha * term(out.dist_logits)
        return {"loss": cls_part + dist_part, "cls": cls_part.detach(), "dist": dist_part.detach()}


def cls_logit_shift(cfg: DistillConfig, train_counts: Sequence[int]) -> Tensor:
    """``tau * log(n_c / N)`` per class (float32) for ``distill.cls_loss``: tau = 1 for
    ``balanced_softmax`` (Ren et al., NeurIPS 2020), ``cls_tau`` for ``logit_adjusted`` (Menon
    et al., ICLR 2021); zeros for ``ce``; ``cls_tau * log(pi_c / (1 - pi_c))`` for ``bal_bce``
    (LiVT, Xu et al., CVPR 2023). Adding it to the logits before the loss makes the loss prefer
    a classifier that is right on the *balanced* distribution."""
    counts = torch.as_tensor(list(train_counts), dtype=torch.float64)
    if (counts <= 0).any():
        raise ValueError("every class needs a training image for the log prior of cls_loss")
    if cfg.cls_tau < 0:
        raise ValueError(f"distill.cls_tau must be >= 0, got {cfg.cls_tau}")
    prior = counts / counts.sum()
    if cfg.cls_loss == "bal_bce":  # the unbiased sigmoid's margin, log(pi / (1 - pi))
        return (cfg.cls_tau * (torch.log(prior) - torch.log1p(-prior))).float()
    tau = {"ce": 0.0, "balanced_softmax": 1.0, "logit_adjusted": float(cfg.cls_tau)}[cfg.cls_loss]
    return (tau * torch.log(prior)).float()


class LDAMObjective:
    """LDAM loss (Cao et al. 2019) with optional DRW class weights, for teacher training.

    Margins ``m_c = C / n_c^(1/4)`` with C chosen so ``max_c m_c = cfg.ldam_max_margin``; the
    true-class logit is lowered by its margin and all logits are scaled by ``s = cfg.ldam_scale``
    before CE. With ``drw=True`` the CE is weighted by the effective-number weights of the
    ground-truth class (weighted-mean reduction).
    """

    def __init__(self, cfg: DistillConfig, train_counts: Sequence[int]) -> None:
        counts = torch.as_tensor(list(train_counts), dtype=torch.float64)
        if (counts <= 0).any():
            raise ValueError("every class needs at least one training image for LDAM margins")
        m = counts.pow(-0.25)
        self._margins = _DeviceTensor((m * (cfg.ldam_max_margin / m.max())).float())
        self._weights = _DeviceTensor(
            torch.as_tensor(drw_weights(train_counts, cfg.beta), dtype=torch.float32)
        )
        self.scale = float(cfg.ldam_scale)

    @property
    def margins(self) -> Tensor:
        return self._margins.on(torch.device("cpu"))

    def __call__(self, logits: Tensor, labels: Tensor, drw: bool) -> dict[str, Tensor]:
        logits = logits.float()
        margin = self._margins.on(logits.device)[labels]
        adjusted = logits.scatter_add(1, labels[:, None], -margin[:, None])
        weight = self._weights.on(logits.device) if drw else None
        return {"loss": F.cross_entropy(self.scale * adjusted, labels, weight=weight)}


class CEObjective:
    """Plain cross-entropy for teacher training (``teacher_loss: ce``); CE-DRW when ``drw``."""

    def __init__(self, cfg: DistillConfig, train_counts: Sequence[int]) -> None:
        self._weights = _DeviceTensor(
            torch.as_tensor(drw_weights(train_counts, cfg.beta), dtype=torch.float32)
        )

    def __call__(self, logits: Tensor, labels: Tensor, drw: bool) -> dict[str, Tensor]:
        weight = self._weights.on(logits.device) if drw else None
        return {"loss": F.cross_entropy(logits.float(), labels, weight=weight)}


def teacher_objective(
    cfg: DistillConfig, train_counts: Sequence[int]
) -> LDAMObjective | CEObjective:
    """The teacher-training loss named by ``cfg.teacher_loss`` (``ldam`` | ``ce``)."""
    if cfg.teacher_loss == "ldam":
        return LDAMObjective(cfg, train_counts)
    return CEObjective(cfg, train_counts)


class PaCoLoss:
    """Parametric contrastive loss (Cui et al. 2021), the formula of PaCo/LT ``losses.py``.

    For query i of B (label y_i) against the C class centres and the N = 2B + moco_k contrast
    features ``f = [queries; keys; queue]`` (unit rows, labels ``l``)::

        a_ic = z_ic + log(pi_c + 1e-9)            class-centre logits, z = linear(feature),
                                                  pi the training class prior ("rebalanced")
        a_ij = q_i . f_j / temperature            sample logits, j != i
        P_i  = beta [c = y_i] over c  +  alpha [l_j = y_i, j != i] over j     (positive weights)
        D_i  = sum_c exp(a_ic) + gamma sum_{j != i} exp(a_ij)                 (denominator)
        L_i  = -sum P_i (a - log D_i) / sum P_i,      loss = mean_i L_i

    The query's own key (j = B + i) and same-class queue entries are positives. Computed in fp32
    with a log-sum-exp; returns ``{"loss"}`` as a 0-d device tensor.

    Args:
        cfg: the ``paco`` section (alpha, beta, gamma, temperature).
        train_counts: training images per class in model-label order (the prior pi).
    """

    def __init__(self, cfg: PaCoConfig, train_counts: Sequence[int]) -> None:
        counts = torch.as_tensor(list(train_counts), dtype=torch.float64)
        if counts.ndim != 1 or len(counts) < 1 or (counts < 0).any() or counts.sum() <= 0:
            raise ValueError(
                "train_counts must be non-negative per-class counts with a positive sum"
            )
        if cfg.temperature <= 0 or cfg.beta <= 0 or cfg.alpha < 0 or cfg.gamma < 0:
            raise ValueError(
                "PaCo needs temperature > 0, beta > 0 and alpha, gamma >= 0, got "
                f"{cfg.temperature}, {cfg.beta}, {cfg.alpha}, {cfg.gamma}"
            )
        self.alpha, self.beta, self.gamma = float(cfg.alpha), float(cfg.beta), float(cfg.gamma)
        self.temperature = float(cfg.temperature)
        self.num_classes = len(counts)
        self._log_prior = _DeviceTensor(torch.log(counts / counts.sum() + 1e-9).float())

    def __call__(self, features: Tensor, labels: Tensor, logits: Tensor) -> dict[str, Tensor]:
        """``features`` (N, d) with the B queries first, ``labels`` (N,), ``logits`` (B, C) of
        the queries (e.g. the fields of :class:`deitlt_scale.models.moco.MoCoOutput`)."""
        b, c = logits.shape
        if c != self.num_classes:
            raise ValueError(f"logits have {c} classes, the class prior {self.num_classes}")
        if features.shape[0] != labels.shape[0] or features.shape[0] < b:
            raise ValueError(
                f"features ({features.shape[0]}) and labels ({labels.shape[0]}) must align and "
                f"hold the {b} queries first"
            )
        features, logits = features.float(), logits.float()
        q_labels = labels[:b]
        centre = logits + self._log_prior.on(logits.device)
        sample = features[:b] @ features.T / self.temperature  # (B, N)
        not_self = torch.ones_like(sample, dtype=torch.bool)
        not_self[torch.arange(b, device=sample.device), torch.arange(b, device=sample.device)] = (
            False
        )
        same = (q_labels[:, None] == labels[None, :]) & not_self
        positives = torch.cat(
            [
                F.one_hot(q_labels, c).float() * self.beta,
                same.float() * self.alpha,
            ],
            dim=1,
        )
        all_logits = torch.cat([centre, sample], dim=1)
        # log D_i = logsumexp(a + log w), with w = 1 on centres, gamma on other samples, 0 on self.
        sample_w = not_self.float() * self.gamma
        log_w = torch.cat([torch.zeros_like(centre), torch.log(sample_w)], dim=1)
        log_denominator = torch.logsumexp(all_logits + log_w, dim=1, keepdim=True)
        log_prob = all_logits - log_denominator
        per_query = -(positives * log_prob).sum(1) / positives.sum(1)
        return {"loss": per_query.mean()}
