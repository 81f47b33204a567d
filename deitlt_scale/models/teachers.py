"""CNN teachers: the CIFAR ResNet-32, the torchvision-layout ResNet-50, or any timm model, frozen
for distillation.

State-dict layouts are those of the published long-tail teachers (METHOD.md 3.1), so that their
checkpoints convert by renaming only:

* ``resnet32``: ``conv1, bn1, layer{1,2,3}.{0..4}.{conv1,bn1,conv2,bn2}``, classifier ``linear``.
  16/32/64 channels, option-A (parameter-free, zero-padded) shortcuts, global average pooling.
  Its CIFAR siblings ``resnet8``, ``resnet14``, ``resnet20``, ``resnet44`` and ``resnet56`` (He et
  al. 2016: depth 6n + 2, n blocks per stage) share the layout with n instead of 5 blocks.
* ``resnet50``: torchvision's ResNet-50 (v1.5, stride on the 3x3 conv), classifier ``fc``.

* any other name that ``timm.is_model`` accepts (e.g. ``regnety_160``, the DeiT baseline's
  teacher, or a tagged name such as ``regnety_160.deit_in1k``): ``timm.create_model(name,
  pretrained=False, num_classes=K)``, in timm's key layout. Nothing is downloaded: the weights come
  from the teacher file.

``normed=True`` (resnet32 / resnet50 only) replaces the classifier by :class:`NormedLinear`, a
cosine classifier whose weight is stored as (features, classes) like the reference's (no bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deitlt_scale.errors import UserError

# CIFAR ResNets (depth 6n + 2): blocks per stage
CIFAR_RESNETS = {
    "resnet8": 1,
    "resnet14": 2,
    "resnet20": 3,
    "resnet32": 5,
    "resnet44": 7,
    "resnet56": 9,
}
TEACHER_ARCHS = (*CIFAR_RESNETS, "resnet50")
# attribute name of each arch's classifier, and its pooled feature width
CLASSIFIER = {**dict.fromkeys(CIFAR_RESNETS, "linear"), "resnet50": "fc"}
FEATURE_DIM = {**dict.fromkeys(CIFAR_RESNETS, 64), "resnet50": 2048}


class NormedLinear(nn.Module):
    """Cosine classifier: ``normalize(x) @ normalize(W, dim=0)``, logits in [-1, 1].

    ``weight`` has shape (in_features, out_features), transposed against ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        # Columns of norm ~1 (the reference's initialisation).
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


class _Pad(nn.Module):
    """Option-A shortcut: stride-2 subsampling and zero channels on both sides (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_projection = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = _Pad(planes - in_planes) if needs_projection else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet32(nn.Module):
    """CIFAR ResNet-32 (He et al. 2016, 3 stages x 5 basic blocks); any input size >= 8 px.
    ``blocks`` per stage gives its siblings (:data:`CIFAR_RESNETS`)."""

    def __init__(self, num_classes: int, normed: bool = False, blocks: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stage = []
            for i in range(blocks):
                stage.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear: nn.Module = (
            NormedLinear(64, num_classes) if normed else nn.Linear(64, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x: Tensor) -> Tensor:
        """Pooled feature (B, 64)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return torch.flatten(self.avgpool(out), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.features(x))


def _resnet50(num_classes: int, normed: bool) -> nn.Module:
    from torchvision.models import resnet50

    model = resnet50(weights=None, num_classes=num_classes)
    if normed:
        model.fc = NormedLinear(2048, num_classes)
    return model


def is_timm_arch(arch: str) -> bool:
    """Whether ``arch`` is built by timm (any timm model name other than the project's own)."""
    import timm

    return arch not in TEACHER_ARCHS and timm.is_model(arch)


def is_teacher_arch(arch: str) -> bool:
    return arch in TEACHER_ARCHS or is_timm_arch(arch)


def timm_input_config(arch: str) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(input side in px, mean, std)`` from timm's pretrained_cfg of ``arch`` (the tagged
    config when the name carries a tag, else the arch's default)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    size = cfg.input_size[-1] if cfg is not None and cfg.input_size else None
    if cfg is None or not size or not cfg.mean or not cfg.std:
        raise UserError(
            f"timm has no input size or normalisation for {arch!r}; pass --input-size, --mean "
            "and --std"
        )
    return int(size), tuple(cfg.mean), tuple(cfg.std)


def create_teacher_arch(arch: str, num_classes: int, normed: bool = False) -> nn.Module:
    """A randomly initialised teacher network: a CIFAR ResNet (``resnet32``, ...) | ``resnet50``
    | a timm model name."""
    if num_classes < 1:
        raise UserError(f"a teacher needs at least one class, got num_classes={num_classes}")
    if arch in CIFAR_RESNETS:
        return ResNet32(num_classes, normed, blocks=CIFAR_RESNETS[arch])
    if arch == "resnet50":
        return _resnet50(num_classes, normed)
    if is_timm_arch(arch):
        if normed:
            raise UserError(
                f"a cosine (normed) classifier exists for the ResNets only, not {arch!r}"
            )
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    raise UserError(
        f"unknown teacher arch {arch!r}; use {' or '.join(TEACHER_ARCHS)} or a timm model name "
        "(python -c 'import timm; print(timm.list_models())')"
    )


def freeze(
    model: nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = False
) -> nn.Module:
    """Eval mode (BatchNorm on running statistics), no gradients, cast to ``dtype``.

    The teacher is never trained by the student run: it stays outside the optimizer and the
    DeepSpeed engine, so freezing it here is what keeps it constant.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(dtype=dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def resize_for_teacher(images: Tensor, input_size: int) -> Tensor:
    """The student's (mixed, normalised) batch at the teacher's input size, as the reference
    feeds it: bicubic without antialias, and untouched when the sizes already match
    (METHOD.md 3.2)."""
    if images.shape[-2:] == (input_size, input_size):
        return images
    return F.interpolate(images, size=(input_size, input_size), mode="bicubic", align_corners=False)
